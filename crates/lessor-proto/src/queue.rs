//! Messages of the `/v1/queue.*` endpoints (Querator `proto/queue.proto`, package `querator`): produce, lease,
//! complete, retry, stats, clear and reload, plus `QueueInfo`, which `queues.create`/`update`/`info` use.
//!
//! Field numbers and JSON names match Querator's proto file; see the crate docs for how JSON is read and
//! written. Lessor's extension fields (numbered from [`crate::extensions::FIRST_EXTENSION_FIELD`], well clear of
//! Querator's) are at their zero value unless a Lessor feature is in use, so they are left out of both encodings
//! and Querator's clients never see them.

use crate::extensions::RetryBackoff;
use crate::json::{message, Bool, Bytes, Msg, Rep, Str, I32, I64};
use crate::timestamp::Timestamp;

message! {
    /// Body of `/v1/queue.produce`: items to add to one queue.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueProduceRequest {
        /// Name of the queue the items go to.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// How long the client waits for the items to be accepted, as a Go duration (`"1m"`).
        #[json(Str, "request_timeout", "requestTimeout")]
        #[prost(string, tag = "2")]
        pub request_timeout: String,
        /// The items to produce.
        #[json(Rep<QueueProduceItem>, "items")]
        #[prost(message, repeated, tag = "3")]
        pub items: Vec<QueueProduceItem>,
    }
}

message! {
    /// One item of a produce request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueProduceItem {
        /// User-defined encoding of the payload.
        #[json(Str, "encoding")]
        #[prost(string, tag = "1")]
        pub encoding: String,
        /// User-defined kind or type of the payload.
        #[json(Str, "kind")]
        #[prost(string, tag = "2")]
        pub kind: String,
        /// User-defined reference.
        #[json(Str, "reference")]
        #[prost(string, tag = "3")]
        pub reference: String,
        /// When set, the item is scheduled and enters the queue at this time.
        #[json(Msg<Timestamp>, "enqueue_at", "enqueueAt")]
        #[prost(message, optional, tag = "4")]
        pub enqueue_at: Option<Timestamp>,
        /// Binary payload (base64 in JSON); takes precedence over `utf8` when non-empty.
        #[json(Bytes, "bytes")]
        #[prost(bytes = "vec", tag = "5")]
        pub bytes: Vec<u8>,
        /// UTF-8 payload, used when `bytes` is empty.
        #[json(Str, "utf8")]
        #[prost(string, tag = "6")]
        pub utf8: String,
        /// Lessor extension: idempotency key. Within the queue's `dedup_window`, a second item with the same key
        /// (in any partition) is acknowledged but not stored again. Empty: no deduplication.
        #[json(Str, "dedup_id", "dedupId")]
        #[prost(string, tag = "100")]
        pub dedup_id: String,
        /// Lessor extension: 0 (the default, lowest) to 9; a lease serves higher priorities first, FIFO within
        /// one priority.
        #[json(I32, "priority")]
        #[prost(int32, tag = "101")]
        pub priority: i32,
    }
}

message! {
    /// Body of `/v1/queue.lease`: a long-poll for up to `batch_size` items.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueLeaseRequest {
        /// Name of the queue to lease from.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Maximum number of items wanted.
        #[json(I32, "batch_size", "batchSize")]
        #[prost(int32, tag = "2")]
        pub batch_size: i32,
        /// Caller-chosen id, unique per consumer.
        #[json(Str, "client_id", "clientId")]
        #[prost(string, tag = "3")]
        pub client_id: String,
        /// How long to wait for items, as a Go duration.
        #[json(Str, "request_timeout", "requestTimeout")]
        #[prost(string, tag = "4")]
        pub request_timeout: String,
    }
}

message! {
    /// One leased item.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueLeaseItem {
        /// User-defined encoding of the payload.
        #[json(Str, "encoding")]
        #[prost(string, tag = "1")]
        pub encoding: String,
        /// User-defined kind of the payload.
        #[json(Str, "kind")]
        #[prost(string, tag = "2")]
        pub kind: String,
        /// User-defined reference.
        #[json(Str, "reference")]
        #[prost(string, tag = "3")]
        pub reference: String,
        /// Item id, unique within its partition.
        #[json(Str, "id")]
        #[prost(string, tag = "4")]
        pub id: String,
        /// Times the item has been leased or retried.
        #[json(I32, "attempts")]
        #[prost(int32, tag = "5")]
        pub attempts: i32,
        /// When the lease expires and the item is offered again.
        #[json(Msg<Timestamp>, "lease_deadline", "leaseDeadline")]
        #[prost(message, optional, tag = "6")]
        pub lease_deadline: Option<Timestamp>,
        /// The payload (base64 in JSON).
        #[json(Bytes, "bytes")]
        #[prost(bytes = "vec", tag = "7")]
        pub bytes: Vec<u8>,
        /// Lessor extension: the item's priority (omitted when 0).
        #[json(I32, "priority")]
        #[prost(int32, tag = "100")]
        pub priority: i32,
    }
}

impl QueueLeaseItem {
    /// Clears Lessor's extension fields, leaving Querator's message (see [`crate::routes::EXTENSIONS_HEADER`]).
    pub fn clear_extensions(&mut self) {
        self.priority = 0;
    }
}

message! {
    /// Reply of `/v1/queue.lease`: items from a single partition.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueLeaseResponse {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition every item came from; complete and retry must name it.
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// The leased items.
        #[json(Rep<QueueLeaseItem>, "items")]
        #[prost(message, repeated, tag = "3")]
        pub items: Vec<QueueLeaseItem>,
    }
}

message! {
    /// Body of `/v1/queue.complete`: marks leased items done.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueCompleteRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition the ids belong to.
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// How long to wait for the operation, as a Go duration.
        #[json(Str, "request_timeout", "requestTimeout")]
        #[prost(string, tag = "3")]
        pub request_timeout: String,
        /// Ids of the leased items to complete.
        #[json(Rep<String>, "ids")]
        #[prost(string, repeated, tag = "4")]
        pub ids: Vec<String>,
    }
}

message! {
    /// Body of `/v1/queue.retry`: returns leased items to the queue, now or later, or dead-letters them.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueRetryRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition the items belong to.
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// The items to retry.
        #[json(Rep<QueueRetryItem>, "items")]
        #[prost(message, repeated, tag = "3")]
        pub items: Vec<QueueRetryItem>,
    }
}

message! {
    /// One item of a retry request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueRetryItem {
        /// Id of the leased item.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// When the item becomes available again; absent or past means now.
        #[json(Msg<Timestamp>, "retry_at", "retryAt")]
        #[prost(message, optional, tag = "2")]
        pub retry_at: Option<Timestamp>,
        /// Send the item to the dead-letter queue instead of retrying it.
        #[json(Bool, "dead")]
        #[prost(bool, tag = "3")]
        pub dead: bool,
    }
}

message! {
    /// A queue's configuration: the body of `/v1/queues.create` and `/v1/queues.update`, and the reply of
    /// `/v1/queues.info`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueInfo {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// When the queue was created.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "2")]
        pub created_at: Option<Timestamp>,
        /// When the queue was last updated.
        #[json(Msg<Timestamp>, "updated_at", "updatedAt")]
        #[prost(message, optional, tag = "3")]
        pub updated_at: Option<Timestamp>,
        /// Name of the dead-letter queue, if any.
        #[json(Str, "dead_queue", "deadQueue")]
        #[prost(string, tag = "4")]
        pub dead_queue: String,
        /// User-defined reference.
        #[json(Str, "reference")]
        #[prost(string, tag = "5")]
        pub reference: String,
        /// Lease duration of the queue, as a Go duration.
        #[json(Str, "lease_timeout", "leaseTimeout")]
        #[prost(string, tag = "6")]
        pub lease_timeout: String,
        /// How long an item may live regardless of attempts, as a Go duration.
        #[json(Str, "expire_timeout", "expireTimeout")]
        #[prost(string, tag = "7")]
        pub expire_timeout: String,
        /// Attempts allowed before dead-lettering; 0 means unlimited.
        #[json(I32, "max_attempts", "maxAttempts")]
        #[prost(int32, tag = "8")]
        pub max_attempts: i32,
        /// Number of partitions requested.
        #[json(I32, "requested_partitions", "requestedPartitions")]
        #[prost(int32, tag = "9")]
        pub requested_partitions: i32,
        /// Per-partition information (Querator never fills it).
        #[json(Rep<PartitionInfo>, "partitions")]
        #[prost(message, repeated, tag = "10")]
        pub partitions: Vec<PartitionInfo>,
        /// Namespace owning the queue.
        #[json(Str, "namespace")]
        #[prost(string, tag = "11")]
        pub namespace: String,
        /// Lessor extension: how long an item's `dedup_id` is remembered, as a Go duration. Empty (or `"0s"`)
        /// means the default, 5 minutes. In an update, empty leaves it unchanged.
        #[json(Str, "dedup_window", "dedupWindow")]
        #[prost(string, tag = "100")]
        pub dedup_window: String,
        /// Lessor extension: retry backoff after a lease expiry or a retry without `retry_at`. Absent: off
        /// (Querator's behaviour). In an update, absent leaves it unchanged and `{}` turns it off.
        #[json(Msg<RetryBackoff>, "retry_backoff", "retryBackoff")]
        #[prost(message, optional, tag = "101")]
        pub retry_backoff: Option<RetryBackoff>,
        /// Lessor extension: the queue is paused (`queue.pause`): produce is accepted, leases wait. A create
        /// with `true` makes the queue paused from the start; an update ignores it (so writing back what
        /// `queues.info` returned changes nothing): use `queue.pause` and `queue.resume`.
        #[json(Bool, "paused")]
        #[prost(bool, tag = "102")]
        pub paused: bool,
        /// Lessor extension: the longest lease one `queue.extend` may set, as a Go duration. Empty (or `"0s"`)
        /// means the queue's `expire_timeout`. In an update, empty leaves it unchanged and `"0s"` resets it.
        #[json(Str, "max_lease_timeout", "maxLeaseTimeout")]
        #[prost(string, tag = "103")]
        pub max_lease_timeout: String,
        /// Lessor extension, output only: the queue is being filled by `lessor restore` and refuses produce,
        /// lease and the other item requests until the restore finishes. Ignored in create and update.
        #[json(Bool, "restoring")]
        #[prost(bool, tag = "104")]
        pub restoring: bool,
    }
}

impl QueueInfo {
    /// Clears Lessor's extension fields, leaving Querator's message (see [`crate::routes::EXTENSIONS_HEADER`]).
    pub fn clear_extensions(&mut self) {
        self.dedup_window.clear();
        self.retry_backoff = None;
        self.paused = false;
        self.max_lease_timeout.clear();
        self.restoring = false;
    }
}

message! {
    /// Information about one partition of a queue.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PartitionInfo {
        /// Partition number.
        #[json(I32, "partition")]
        #[prost(int32, tag = "1")]
        pub partition: i32,
    }
}

message! {
    /// Body of `/v1/queue.clear`. Field 2 is unused (it was `retry` in older Querator versions).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueClearRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Clear scheduled items.
        #[json(Bool, "scheduled")]
        #[prost(bool, tag = "3")]
        pub scheduled: bool,
        /// Clear items waiting in the queue.
        #[json(Bool, "queue")]
        #[prost(bool, tag = "4")]
        pub queue: bool,
        /// Remove items regardless of their lease state.
        #[json(Bool, "destructive")]
        #[prost(bool, tag = "5")]
        pub destructive: bool,
    }
}

message! {
    /// Body of `/v1/queue.reload`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueReloadRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
    }
}

message! {
    /// Body of `/v1/queue.stats`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueStatsRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Lessor extension: also report each partition's `oldest_ready_age`. Off by default, so the reply a
        /// Querator client gets (which never sets this) carries only Querator's fields, as its strict protojson
        /// decoder needs.
        #[json(Bool, "with_oldest_age", "withOldestAge")]
        #[prost(bool, tag = "100")]
        pub with_oldest_age: bool,
        /// Lessor extension: also report each partition's items and payload bytes per storage tier (`tiers`). Off
        /// by default, for the same reason as `with_oldest_age`.
        #[json(Bool, "with_tiers", "withTiers")]
        #[prost(bool, tag = "101")]
        pub with_tiers: bool,
    }
}

message! {
    /// Reply of `/v1/queue.stats`. `logical_queues` has no `json_name` in Querator's proto, so its JSON
    /// name is the lowerCamelCase `logicalQueues`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueStatsResponse {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Stats of each logical queue.
        #[json(Rep<QueueLogicalStats>, "logicalQueues")]
        #[prost(message, repeated, tag = "2")]
        pub logical_queues: Vec<QueueLogicalStats>,
    }
}

message! {
    /// Stats of one partition.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuePartitionStats {
        /// Partition number.
        #[json(I32, "partition")]
        #[prost(int32, tag = "1")]
        pub partition: i32,
        /// Items stored in the partition.
        #[json(I32, "total")]
        #[prost(int32, tag = "2")]
        pub total: i32,
        /// Items currently leased.
        #[json(I32, "total_leased", "totalLeased")]
        #[prost(int32, tag = "3")]
        pub total_leased: i32,
        /// Failures since the partition last became available; -1 when it is not ready.
        #[json(I32, "failures")]
        #[prost(int32, tag = "4")]
        pub failures: i32,
        /// Average age of the items, as a Go duration.
        #[json(Str, "average_age", "averageAge")]
        #[prost(string, tag = "5")]
        pub average_age: String,
        /// Average age of the leased items, as a Go duration.
        #[json(Str, "average_leased_age", "averageLeasedAge")]
        #[prost(string, tag = "6")]
        pub average_leased_age: String,
        /// Scheduled items.
        #[json(I32, "scheduled")]
        #[prost(int32, tag = "7")]
        pub scheduled: i32,
        /// Un-leased items the in-memory state counts (newer Querator versions only).
        #[json(I32, "un_leased", "unLeased")]
        #[prost(int32, tag = "8")]
        pub un_leased: i32,
        /// Time until the partition's lifecycle pass, as a Go duration (newer Querator versions only).
        #[json(Str, "next_lifecycle_run", "nextLifecycleRun")]
        #[prost(string, tag = "9")]
        pub next_lifecycle_run: String,
        /// Lessor extension: age of the oldest item next in line (the heads of the ready queue, every priority),
        /// as a Go duration. Only when the request sets `with_oldest_age`, and omitted when there is no ready item.
        #[json(Str, "oldest_ready_age", "oldestReadyAge")]
        #[prost(string, tag = "100")]
        pub oldest_ready_age: String,
        /// Lessor extension: items and payload bytes per storage tier. Only when the request sets `with_tiers`.
        #[json(Msg<QueueTierStats>, "tiers")]
        #[prost(message, optional, tag = "101")]
        pub tiers: Option<QueueTierStats>,
    }
}

message! {
    /// Lessor extension: a partition's items and payload bytes per storage tier. Tiers overlap: an item counts in
    /// every tier holding part of it (a fjall item's record is in memory and on disk; an offloaded item's record is
    /// where its store keeps it, its payload in `object`). Bytes are payload bytes as stored; for `object`, the
    /// payloads' length before compression. PostgreSQL reports its items as `disk` and nothing in `memory`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueTierStats {
        /// Items whose record is in the server's memory.
        #[json(I64, "memory_items", "memoryItems")]
        #[prost(int64, tag = "1")]
        pub memory_items: i64,
        /// Payload bytes held in the server's memory.
        #[json(I64, "memory_bytes", "memoryBytes")]
        #[prost(int64, tag = "2")]
        pub memory_bytes: i64,
        /// Items on local disk or in the database.
        #[json(I64, "disk_items", "diskItems")]
        #[prost(int64, tag = "3")]
        pub disk_items: i64,
        /// Payload bytes on local disk or in the database.
        #[json(I64, "disk_bytes", "diskBytes")]
        #[prost(int64, tag = "4")]
        pub disk_bytes: i64,
        /// Items whose payload is in object storage.
        #[json(I64, "object_items", "objectItems")]
        #[prost(int64, tag = "5")]
        pub object_items: i64,
        /// Their payloads' bytes (before compression).
        #[json(I64, "object_bytes", "objectBytes")]
        #[prost(int64, tag = "6")]
        pub object_bytes: i64,
    }
}

message! {
    /// Stats of one logical queue (Querator runs one per queue per process).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueLogicalStats {
        /// Produce requests waiting to be processed.
        #[json(I32, "produce_waiting", "produceWaiting")]
        #[prost(int32, tag = "6")]
        pub produce_waiting: i32,
        /// Lease requests waiting for items.
        #[json(I32, "lease_waiting", "leaseWaiting")]
        #[prost(int32, tag = "7")]
        pub lease_waiting: i32,
        /// Complete requests waiting to be processed.
        #[json(I32, "complete_waiting", "completeWaiting")]
        #[prost(int32, tag = "8")]
        pub complete_waiting: i32,
        /// Requests in flight.
        #[json(I32, "in_flight", "inFlight")]
        #[prost(int32, tag = "10")]
        pub in_flight: i32,
        /// Stats of each partition.
        #[json(Rep<QueuePartitionStats>, "partitions")]
        #[prost(message, repeated, tag = "11")]
        pub partitions: Vec<QueuePartitionStats>,
    }
}
