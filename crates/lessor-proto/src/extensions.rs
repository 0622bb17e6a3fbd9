//! Messages of Lessor's extension routes, which Querator does not have: lease extension (`queue.extend`), pause and
//! resume (`queue.pause`, `queue.resume`), browsing items without leasing them (`queue.browse`), and dead-letter
//! redrive (`queue.redrive`, `redrive.list`, `redrive.get`, `redrive.cancel`), backup and restore
//! (`storage.backup`, `storage.restore.begin`, `storage.restore.import`, `storage.restore.finish`), online
//! rebalance (`queues.rebalance`, declared by Querator without a message, and `rebalance.list`, `rebalance.get`), and
//! the dashboard's reads (`queue.history`, `server.info`); plus [`RetryBackoff`], the
//! `QueueInfo.retry_backoff` extension field.
//!
//! The JSON rules are the same as for Querator's messages (see the crate docs): zero values are omitted, the
//! snake_case name and the lowerCamelCase proto name are both accepted. Fields that Lessor adds to Querator's own
//! messages (`QueueProduceItem.dedup_id`, `QueueInfo.dedup_window`, ...) are numbered from
//! [`FIRST_EXTENSION_FIELD`], so they cannot collide with a field Querator adds later in its own range.
//!
//! The browse filter `priority` is a proto3 `optional` field, so "absent" (any priority) and `0` stay apart:
//! ```
//! use lessor_proto::{decode, encode, Encoding, QueueBrowseRequest};
//!
//! let any: QueueBrowseRequest = decode(Encoding::Json, br#"{"queue_name":"q"}"#).unwrap();
//! assert_eq!(any.priority, None);
//! let zero: QueueBrowseRequest = decode(Encoding::Json, br#"{"queue_name":"q","priority":0}"#).unwrap();
//! assert_eq!(zero.priority, Some(0));
//! assert_eq!(encode(Encoding::Json, &zero), br#"{"queue_name":"q","priority":0}"#);
//! ```

use crate::json::{message, Bool, Bytes, Msg, OptI32, Rep, Str, F64, I32, I64};
use crate::timestamp::Timestamp;

/// The first field number Lessor uses for its extension fields in Querator's messages (Querator numbers its
/// fields from 1 and, at the version Lessor follows, stops at 15).
pub const FIRST_EXTENSION_FIELD: u32 = 100;

message! {
    /// A queue's retry backoff (`QueueInfo.retry_backoff`): after a lease expiry, or a retry without `retry_at`,
    /// the item waits `min(max, base × factor^(attempts-1))`, less up to `jitter` of that, before its next
    /// attempt. `base` empty or zero turns backoff off.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryBackoff {
        /// Delay before the second attempt, as a Go duration (`"1s"`); empty or `"0s"`: off.
        #[json(Str, "base")]
        #[prost(string, tag = "1")]
        pub base: String,
        /// Longest delay, as a Go duration; empty: bounded only by the server's limit (168h).
        #[json(Str, "max")]
        #[prost(string, tag = "2")]
        pub max: String,
        /// Growth per attempt, 1 to 100; 0 means 2.
        #[json(F64, "factor")]
        #[prost(double, tag = "3")]
        pub factor: f64,
        /// 0 to 1: the fraction of each delay that is random (0.2: between 80 % and 100 % of it).
        #[json(F64, "jitter")]
        #[prost(double, tag = "4")]
        pub jitter: f64,
    }
}

message! {
    /// Body of `/v1/queue.extend`: pushes the lease deadline of held items to now + `lease_timeout`. All the ids
    /// or none: an id that is not leased any more (its lease expired and the item moved on) fails the request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueExtendRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition the ids belong to (from the lease).
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// Ids of the leased items.
        #[json(Rep<String>, "ids")]
        #[prost(string, repeated, tag = "3")]
        pub ids: Vec<String>,
        /// New lease length from now, as a Go duration; empty: the queue's `lease_timeout`. At most the queue's
        /// `max_lease_timeout`.
        #[json(Str, "lease_timeout", "leaseTimeout")]
        #[prost(string, tag = "4")]
        pub lease_timeout: String,
        /// How long to wait for the operation, as a Go duration.
        #[json(Str, "request_timeout", "requestTimeout")]
        #[prost(string, tag = "5")]
        pub request_timeout: String,
    }
}

message! {
    /// Body of `/v1/queue.pause`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuePauseRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
    }
}

message! {
    /// Body of `/v1/queue.resume`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueResumeRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
    }
}

message! {
    /// Body of `/v1/queue.browse`: one page of a partition's items, in id order, without leasing them.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueBrowseRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition to browse.
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// `"ready"`, `"leased"`, `"scheduled"`, or empty for ready and leased items together.
        #[json(Str, "state")]
        #[prost(string, tag = "3")]
        pub state: String,
        /// Only items of this priority. A proto3 `optional` field: absent means any priority, `0` means priority 0
        /// (JSON writes it whenever it is set).
        #[json(OptI32, "priority")]
        #[prost(int32, optional, tag = "4")]
        pub priority: Option<i32>,
        /// Item id to start from (inclusive); empty: the head. A reply's `next_pivot` continues it.
        #[json(Str, "pivot")]
        #[prost(string, tag = "5")]
        pub pivot: String,
        /// Most items returned, 1 to 1000; 0 means 100.
        #[json(I32, "limit")]
        #[prost(int32, tag = "6")]
        pub limit: i32,
    }
}

message! {
    /// Reply of `/v1/queue.browse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueBrowseResponse {
        /// The items of the page, in id order.
        #[json(Rep<BrowseItem>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<BrowseItem>,
        /// Pivot of the next page; empty at the end. A page may hold fewer than `limit` items and still have a
        /// next page (each request reads a bounded part of the partition).
        #[json(Str, "next_pivot", "nextPivot")]
        #[prost(string, tag = "2")]
        pub next_pivot: String,
    }
}

message! {
    /// One browsed item.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BrowseItem {
        /// Item id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// `"ready"`, `"leased"` or `"scheduled"`.
        #[json(Str, "state")]
        #[prost(string, tag = "2")]
        pub state: String,
        /// For a leased item, the `client_id` of the lease request that holds it; empty when the server does not
        /// know (leased before a restart, or through another server sharing the storage).
        #[json(Str, "holder")]
        #[prost(string, tag = "3")]
        pub holder: String,
        /// When the lease ends (leased items).
        #[json(Msg<Timestamp>, "lease_deadline", "leaseDeadline")]
        #[prost(message, optional, tag = "4")]
        pub lease_deadline: Option<Timestamp>,
        /// Priority, 0 to 9.
        #[json(I32, "priority")]
        #[prost(int32, tag = "5")]
        pub priority: i32,
        /// Times the item has been leased.
        #[json(I32, "attempts")]
        #[prost(int32, tag = "6")]
        pub attempts: i32,
        /// When a scheduled item enters the queue.
        #[json(Msg<Timestamp>, "enqueue_at", "enqueueAt")]
        #[prost(message, optional, tag = "7")]
        pub enqueue_at: Option<Timestamp>,
        /// When the item expires regardless of attempts.
        #[json(Msg<Timestamp>, "expire_deadline", "expireDeadline")]
        #[prost(message, optional, tag = "8")]
        pub expire_deadline: Option<Timestamp>,
        /// When the item was created.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "9")]
        pub created_at: Option<Timestamp>,
        /// User-defined reference.
        #[json(Str, "reference")]
        #[prost(string, tag = "10")]
        pub reference: String,
        /// User-defined encoding.
        #[json(Str, "encoding")]
        #[prost(string, tag = "11")]
        pub encoding: String,
        /// User-defined kind.
        #[json(Str, "kind")]
        #[prost(string, tag = "12")]
        pub kind: String,
        /// The payload (base64 in JSON).
        #[json(Bytes, "payload")]
        #[prost(bytes = "vec", tag = "13")]
        pub payload: Vec<u8>,
        /// Id of the item this one was moved from (dead-letter moves).
        #[json(Str, "source_id", "sourceId")]
        #[prost(string, tag = "14")]
        pub source_id: String,
    }
}

message! {
    /// Body of `/v1/queue.redrive`: starts a server-side task moving items out of a dead-letter queue.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueRedriveRequest {
        /// The dead-letter queue (it must be some queue's `dead_queue`).
        #[json(Str, "dead_queue", "deadQueue")]
        #[prost(string, tag = "1")]
        pub dead_queue: String,
        /// Where the items go; empty: back to the queue each came from.
        #[json(Str, "target_queue", "targetQueue")]
        #[prost(string, tag = "2")]
        pub target_queue: String,
        /// Only items that came from this queue; empty: any.
        #[json(Str, "source_queue", "sourceQueue")]
        #[prost(string, tag = "3")]
        pub source_queue: String,
        /// Only items of this kind; empty: any.
        #[json(Str, "kind")]
        #[prost(string, tag = "4")]
        pub kind: String,
        /// Most items moved per second; 0: as fast as storage allows.
        #[json(I32, "rate_per_sec", "ratePerSec")]
        #[prost(int32, tag = "5")]
        pub rate_per_sec: i32,
        /// Most items moved in all; 0: every matching item.
        #[json(I64, "max_items", "maxItems")]
        #[prost(int64, tag = "6")]
        pub max_items: i64,
    }
}

message! {
    /// A redrive task: the reply of `/v1/queue.redrive`, `/v1/redrive.get` and `/v1/redrive.cancel`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RedriveTask {
        /// The task id.
        #[json(Str, "task_id", "taskId")]
        #[prost(string, tag = "1")]
        pub task_id: String,
        /// The dead-letter queue it moves items out of.
        #[json(Str, "dead_queue", "deadQueue")]
        #[prost(string, tag = "2")]
        pub dead_queue: String,
        /// Where items go; empty: their source queues.
        #[json(Str, "target_queue", "targetQueue")]
        #[prost(string, tag = "3")]
        pub target_queue: String,
        /// Source filter; empty: any.
        #[json(Str, "source_queue", "sourceQueue")]
        #[prost(string, tag = "4")]
        pub source_queue: String,
        /// Kind filter; empty: any.
        #[json(Str, "kind")]
        #[prost(string, tag = "5")]
        pub kind: String,
        /// Rate limit (items per second); 0: none.
        #[json(I32, "rate_per_sec", "ratePerSec")]
        #[prost(int32, tag = "6")]
        pub rate_per_sec: i32,
        /// Item limit; 0: none.
        #[json(I64, "max_items", "maxItems")]
        #[prost(int64, tag = "7")]
        pub max_items: i64,
        /// `"running"`, `"completed"`, `"cancelled"` or `"failed"`.
        #[json(Str, "status")]
        #[prost(string, tag = "8")]
        pub status: String,
        /// Items moved so far.
        #[json(I64, "moved")]
        #[prost(int64, tag = "9")]
        pub moved: i64,
        /// Items looked at and left in the dead-letter queue (filtered out, or leased).
        #[json(I64, "skipped")]
        #[prost(int64, tag = "10")]
        pub skipped: i64,
        /// Items in the dead-letter queue when the task last looked.
        #[json(I64, "remaining")]
        #[prost(int64, tag = "11")]
        pub remaining: i64,
        /// Why the task failed; empty otherwise.
        #[json(Str, "error")]
        #[prost(string, tag = "12")]
        pub error: String,
        /// When it was started.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "13")]
        pub created_at: Option<Timestamp>,
        /// When its progress was last saved.
        #[json(Msg<Timestamp>, "updated_at", "updatedAt")]
        #[prost(message, optional, tag = "14")]
        pub updated_at: Option<Timestamp>,
    }
}

message! {
    /// Body of `/v1/redrive.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RedriveListRequest {
        /// Only the tasks of this dead-letter queue; empty: every task (checked in `_system`).
        #[json(Str, "dead_queue", "deadQueue")]
        #[prost(string, tag = "1")]
        pub dead_queue: String,
    }
}

message! {
    /// Reply of `/v1/redrive.list`: tasks, newest first.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RedriveListResponse {
        /// The tasks.
        #[json(Rep<RedriveTask>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<RedriveTask>,
    }
}

message! {
    /// Body of `/v1/redrive.get` and `/v1/redrive.cancel`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RedriveTaskRequest {
        /// The task id.
        #[json(Str, "task_id", "taskId")]
        #[prost(string, tag = "1")]
        pub task_id: String,
        /// The task's dead-letter queue. When set, the permission is checked in that queue's namespace (and a task
        /// of another queue is "not found"); when empty, in `_system`, which only administrators hold.
        #[json(Str, "dead_queue", "deadQueue")]
        #[prost(string, tag = "2")]
        pub dead_queue: String,
    }
}

message! {
    /// Body of `/v1/storage.backup`: the queues to back up. The reply is not a message but the backup file itself
    /// (`application/octet-stream`, streamed; see [`crate::backup`]).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StorageBackupRequest {
        /// Queue names; empty: every queue.
        #[json(Rep<String>, "queue_names", "queueNames")]
        #[prost(string, repeated, tag = "1")]
        pub queue_names: Vec<String>,
        /// Most items per second the backup reads (0: as fast as it can), to leave the serving path more of a
        /// small machine.
        #[json(I64, "max_items_per_sec", "maxItemsPerSec")]
        #[prost(int64, tag = "2")]
        pub max_items_per_sec: i64,
        /// The newest backup format version the client reads (0: version 1, what clients before version 2 read).
        /// The server writes the newest version it knows up to this one; version 1 cannot carry an item larger
        /// than a record ([`crate::backup::V1_MAX_PAYLOAD`]), so such an item fails a version 1 backup by name.
        #[json(I32, "format_version", "formatVersion")]
        #[prost(int32, tag = "3")]
        pub format_version: i32,
    }
}

message! {
    /// Body of `/v1/storage.restore.begin`: creates the queue in the restoring state (or finds it there, to resume).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RestoreBeginRequest {
        /// The queue's definition: a protobuf [`crate::backup::QueueRecord`], with the name it gets here.
        #[json(Bytes, "queue")]
        #[prost(bytes = "vec", tag = "1")]
        pub queue: Vec<u8>,
        /// The queue's namespace (the one in `queue`), where `queue.create` is checked.
        #[json(Str, "namespace")]
        #[prost(string, tag = "2")]
        pub namespace: String,
        /// Replace an existing queue of that name (its items are deleted).
        #[json(Bool, "overwrite")]
        #[prost(bool, tag = "3")]
        pub overwrite: bool,
    }
}

message! {
    /// Reply of `/v1/storage.restore.begin`: how many items each partition holds already (zero for a new
    /// restore), so a resumed restore skips the blocks that are in.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RestoreBeginResponse {
        /// Items held per partition, in partition order.
        #[json(Rep<i64>, "partition_items", "partitionItems")]
        #[prost(int64, repeated, tag = "1")]
        pub partition_items: Vec<i64>,
    }
}

message! {
    /// Body of `/v1/storage.restore.import`: one block of a backup file, imported into the queue it names here.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RestoreImportRequest {
        /// The queue being restored.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// The block as stored in the file: a zstd-compressed [`crate::backup::ItemBlock`] (its partition and
        /// first item say where it goes; its queue name is ignored), or uncompressed (see `uncompressed`). It
        /// holds whole items: a split item's parts are joined into it first.
        #[json(Bytes, "block")]
        #[prost(bytes = "vec", tag = "2")]
        pub block: Vec<u8>,
        /// CRC-32 of `block`, as the file's record header holds it.
        #[json(I64, "crc32")]
        #[prost(int64, tag = "3")]
        pub crc32: i64,
        /// `block` is the protobuf [`crate::backup::ItemBlock`] itself, not compressed: how a page holding an item
        /// too large for a compressed page (which decompresses to at most [`crate::backup::MAX_RECORD`] bytes) is
        /// sent. Its size is then its decoded size, bounded by the route's body limit.
        #[json(Bool, "uncompressed")]
        #[prost(bool, tag = "4")]
        pub uncompressed: bool,
    }
}

message! {
    /// Reply of `/v1/storage.restore.import`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RestoreImportResponse {
        /// Items the partition holds after the block (where its next block starts).
        #[json(I64, "partition_items", "partitionItems")]
        #[prost(int64, tag = "1")]
        pub partition_items: i64,
    }
}

message! {
    /// Body of `/v1/storage.restore.finish`: ends a restore; the queue takes traffic again.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RestoreFinishRequest {
        /// The queue being restored.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
    }
}

message! {
    /// One partition to move (in [`QueueRebalanceRequest`] and [`RebalanceTask`]).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PartitionMove {
        /// The partition number.
        #[json(I32, "partition")]
        #[prost(int32, tag = "100")]
        pub partition: i32,
        /// The `partition-storage` name it moves to.
        #[json(Str, "to_store", "toStore")]
        #[prost(string, tag = "101")]
        pub to_store: String,
    }
}

message! {
    /// Body of `/v1/queues.rebalance` (declared by Querator without a message; Lessor's fields are numbered from
    /// 100): exactly one of `moves`, `spread` or `partitions`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueRebalanceRequest {
        /// The queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "100")]
        pub queue_name: String,
        /// Partitions to move to other stores, one after the other.
        #[json(Rep<PartitionMove>, "moves")]
        #[prost(message, repeated, tag = "101")]
        pub moves: Vec<PartitionMove>,
        /// Move partitions so that each store holds its share by the current affinities.
        #[json(Bool, "spread")]
        #[prost(bool, tag = "102")]
        pub spread: bool,
        /// A new partition count: more grows the queue at once, fewer drains the highest-numbered partitions
        /// into the others.
        #[json(I32, "partitions")]
        #[prost(int32, tag = "103")]
        pub partitions: i32,
        /// Most items moved per second; 0: as fast as the queue allows.
        #[json(I64, "max_items_per_sec", "maxItemsPerSec")]
        #[prost(int64, tag = "104")]
        pub max_items_per_sec: i64,
    }
}

message! {
    /// A rebalance task: the reply of `/v1/queues.rebalance` and `/v1/rebalance.get`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RebalanceTask {
        /// The task id.
        #[json(Str, "task_id", "taskId")]
        #[prost(string, tag = "100")]
        pub task_id: String,
        /// The queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "101")]
        pub queue_name: String,
        /// The partition moves (a spread is resolved into moves when it starts).
        #[json(Rep<PartitionMove>, "moves")]
        #[prost(message, repeated, tag = "102")]
        pub moves: Vec<PartitionMove>,
        /// The partition count asked for; 0: unchanged.
        #[json(I32, "partitions")]
        #[prost(int32, tag = "103")]
        pub partitions: i32,
        /// `"running"`, `"completed"` or `"failed"`.
        #[json(Str, "status")]
        #[prost(string, tag = "104")]
        pub status: String,
        /// Items moved so far.
        #[json(I64, "moved")]
        #[prost(int64, tag = "105")]
        pub moved: i64,
        /// Items left in the partitions still to drain, when last looked at.
        #[json(I64, "remaining")]
        #[prost(int64, tag = "106")]
        pub remaining: i64,
        /// The last error (retried while running; why it failed otherwise).
        #[json(Str, "error")]
        #[prost(string, tag = "107")]
        pub error: String,
        /// When it was started.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "108")]
        pub created_at: Option<Timestamp>,
        /// When its progress was last saved.
        #[json(Msg<Timestamp>, "updated_at", "updatedAt")]
        #[prost(message, optional, tag = "109")]
        pub updated_at: Option<Timestamp>,
        /// The rate limit (items per second); 0: none.
        #[json(I64, "max_items_per_sec", "maxItemsPerSec")]
        #[prost(int64, tag = "110")]
        pub max_items_per_sec: i64,
    }
}

message! {
    /// Body of `/v1/rebalance.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RebalanceListRequest {
        /// Only the tasks of this queue; empty: every task (checked in `_system`).
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "100")]
        pub queue_name: String,
    }
}

message! {
    /// Reply of `/v1/rebalance.list`: tasks, newest first.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RebalanceListResponse {
        /// The tasks.
        #[json(Rep<RebalanceTask>, "items")]
        #[prost(message, repeated, tag = "100")]
        pub items: Vec<RebalanceTask>,
    }
}

message! {
    /// Body of `/v1/rebalance.get`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RebalanceTaskRequest {
        /// The task id.
        #[json(Str, "task_id", "taskId")]
        #[prost(string, tag = "100")]
        pub task_id: String,
        /// The task's queue. When set, the permission is checked in that queue's namespace (and a task of another
        /// queue is "not found"); when empty, in `_system`.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "101")]
        pub queue_name: String,
    }
}

message! {
    /// Body of `/v1/queue.history` (Lessor extension): the recent rates of one queue, for the dashboard's charts.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueHistoryRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
    }
}

message! {
    /// Reply of `/v1/queue.history`: the samples the server keeps in memory for the queue, oldest first.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueHistoryResponse {
        /// Milliseconds between two samples.
        #[json(I64, "interval_ms", "intervalMs")]
        #[prost(int64, tag = "1")]
        pub interval_ms: i64,
        /// The samples, oldest first; empty for a queue created since the last sample.
        #[json(Rep<HistorySample>, "samples")]
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<HistorySample>,
    }
}

message! {
    /// One sample of a queue's history: counts of events since the previous sample, and depths at the sample.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistorySample {
        /// When the sample was taken, Unix milliseconds.
        #[json(I64, "time_ms", "timeMs")]
        #[prost(int64, tag = "1")]
        pub time_ms: i64,
        /// Items produced since the previous sample.
        #[json(I64, "produced")]
        #[prost(int64, tag = "2")]
        pub produced: i64,
        /// Items leased since the previous sample.
        #[json(I64, "leased")]
        #[prost(int64, tag = "3")]
        pub leased: i64,
        /// Items completed since the previous sample.
        #[json(I64, "completed")]
        #[prost(int64, tag = "4")]
        pub completed: i64,
        /// Items retried since the previous sample.
        #[json(I64, "retried")]
        #[prost(int64, tag = "5")]
        pub retried: i64,
        /// Items dead-lettered since the previous sample.
        #[json(I64, "dead_lettered", "deadLettered")]
        #[prost(int64, tag = "6")]
        pub dead_lettered: i64,
        /// Ready items at the sample.
        #[json(I64, "ready")]
        #[prost(int64, tag = "7")]
        pub ready: i64,
        /// Leased items at the sample.
        #[json(I64, "leased_now", "leasedNow")]
        #[prost(int64, tag = "8")]
        pub leased_now: i64,
        /// Scheduled items at the sample.
        #[json(I64, "scheduled")]
        #[prost(int64, tag = "9")]
        pub scheduled: i64,
        /// Mean age (now - created_at) of the items leased since the previous sample, in milliseconds: how long
        /// they waited from produce to lease. 0 when none was leased.
        #[json(I64, "lease_age_ms", "leaseAgeMs")]
        #[prost(int64, tag = "10")]
        pub lease_age_ms: i64,
    }
}

/// Body of `/v1/server.info` (Lessor extension): empty (JSON `{}`; unknown fields are ignored, as everywhere).
#[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize)]
pub struct ServerInfoRequest {}

message! {
    /// Reply of `/v1/server.info`: what the server runs, for the dashboard's server page. No secrets: store
    /// settings (paths, connection strings, passwords) are left out.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServerInfoResponse {
        /// The server's version.
        #[json(Str, "version")]
        #[prost(string, tag = "1")]
        pub version: String,
        /// Driver of the queue store.
        #[json(Str, "queue_storage", "queueStorage")]
        #[prost(string, tag = "2")]
        pub queue_storage: String,
        /// The partition stores.
        #[json(Rep<StoreSummary>, "partition_storage", "partitionStorage")]
        #[prost(message, repeated, tag = "3")]
        pub partition_storage: Vec<StoreSummary>,
        /// `none` or `internal`.
        #[json(Str, "auth_backend", "authBackend")]
        #[prost(string, tag = "4")]
        pub auth_backend: String,
        /// Whether the server speaks HTTPS.
        #[json(Bool, "tls")]
        #[prost(bool, tag = "5")]
        pub tls: bool,
        /// Largest produce body in bytes.
        #[json(I64, "max_produce_body", "maxProduceBody")]
        #[prost(int64, tag = "6")]
        pub max_produce_body: i64,
    }
}

message! {
    /// One partition store of [`ServerInfoResponse`].
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StoreSummary {
        /// Its name.
        #[json(Str, "name")]
        #[prost(string, tag = "1")]
        pub name: String,
        /// Its driver.
        #[json(Str, "driver")]
        #[prost(string, tag = "2")]
        pub driver: String,
        /// Its placement weight.
        #[json(F64, "affinity")]
        #[prost(double, tag = "3")]
        pub affinity: f64,
    }
}

message! {
    /// Body of `/v1/queues.overview` (Lessor extension): one page of a namespace's queues with their figures, the
    /// dashboard's overview in one request. Paged like `queues.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuesOverviewRequest {
        /// The namespace whose queues to show (`_system` when empty), as `queues.list`.
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// The first queue name of the page (inclusive); empty: from the start.
        #[json(Str, "pivot")]
        #[prost(string, tag = "2")]
        pub pivot: String,
        /// Most queues in the page (1 to 1,000, as `queues.list`; 0: the default).
        #[json(I32, "limit")]
        #[prost(int32, tag = "3")]
        pub limit: i32,
    }
}

message! {
    /// Reply of `/v1/queues.overview`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuesOverviewResponse {
        /// The queues, in name order.
        #[json(Rep<QueueOverview>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<QueueOverview>,
        /// The pivot of the next page; empty after the last.
        #[json(Str, "next_pivot", "nextPivot")]
        #[prost(string, tag = "2")]
        pub next_pivot: String,
    }
}

message! {
    /// One queue of [`QueuesOverviewResponse`]: its depths, recent rates (from the server's history ring, over the
    /// last few samples) and the oldest item next in line.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueueOverview {
        /// The queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Its namespace.
        #[json(Str, "namespace")]
        #[prost(string, tag = "2")]
        pub namespace: String,
        /// Items a lease can take now (all partitions).
        #[json(I64, "ready")]
        #[prost(int64, tag = "3")]
        pub ready: i64,
        /// Items held by consumers.
        #[json(I64, "leased")]
        #[prost(int64, tag = "4")]
        pub leased: i64,
        /// Items waiting for their schedule.
        #[json(I64, "scheduled")]
        #[prost(int64, tag = "5")]
        pub scheduled: i64,
        /// The dead-letter queue's name (empty: none).
        #[json(Str, "dead_queue", "deadQueue")]
        #[prost(string, tag = "6")]
        pub dead_queue: String,
        /// Items in the dead-letter queue (ready, leased and scheduled); omitted when the caller may not read it.
        #[json(I64, "dead_depth", "deadDepth")]
        #[prost(int64, tag = "7")]
        pub dead_depth: i64,
        /// Items produced per second, recently.
        #[json(F64, "produce_rate", "produceRate")]
        #[prost(double, tag = "8")]
        pub produce_rate: f64,
        /// Items leased per second, recently.
        #[json(F64, "lease_rate", "leaseRate")]
        #[prost(double, tag = "9")]
        pub lease_rate: f64,
        /// Items completed per second, recently.
        #[json(F64, "complete_rate", "completeRate")]
        #[prost(double, tag = "10")]
        pub complete_rate: f64,
        /// Age of the oldest item next in line over all partitions, as a Go duration (empty: nothing ready).
        #[json(Str, "oldest_ready_age", "oldestReadyAge")]
        #[prost(string, tag = "11")]
        pub oldest_ready_age: String,
        /// Whether the queue is paused.
        #[json(Bool, "paused")]
        #[prost(bool, tag = "12")]
        pub paused: bool,
        /// Why the figures are missing, when they are (a partition store that does not answer): the row still
        /// shows the queue.
        #[json(Str, "error")]
        #[prost(string, tag = "13")]
        pub error: String,
        /// True when the caller may list the queue but not read its stats (`queue.stats`): the figures are then
        /// left out, not zero.
        #[json(Bool, "stats_hidden", "statsHidden")]
        #[prost(bool, tag = "14")]
        pub stats_hidden: bool,
        /// Items and payload bytes per storage tier, summed over the queue's partitions (with the figures).
        #[json(Msg<crate::queue::QueueTierStats>, "tiers")]
        #[prost(message, optional, tag = "15")]
        pub tiers: Option<crate::queue::QueueTierStats>,
    }
}

/// Body of `/v1/auth.whoami` (Lessor extension): empty (JSON `{}`).
#[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize)]
pub struct AuthWhoamiRequest {}

message! {
    /// Reply of `/v1/auth.whoami`: who the caller's key is and what it may do, without any secret (no key, no
    /// hash). The dashboard reads it after a key is entered, to pick the key's namespace.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AuthWhoamiResponse {
        /// Whether the server checks keys at all (`auth-backend: internal`); when false, everyone is an anonymous
        /// administrator and the other fields are empty.
        #[json(Bool, "auth_enabled", "authEnabled")]
        #[prost(bool, tag = "1")]
        pub auth_enabled: bool,
        /// The user's id (`anonymous` without a key).
        #[json(Str, "user_id", "userId")]
        #[prost(string, tag = "2")]
        pub user_id: String,
        /// The user's name.
        #[json(Str, "username")]
        #[prost(string, tag = "3")]
        pub username: String,
        /// The key's id (empty without a key).
        #[json(Str, "key_id", "keyId")]
        #[prost(string, tag = "4")]
        pub key_id: String,
        /// The key's namespace scope (empty: none, the key works wherever its user is bound).
        #[json(Str, "namespace_scope", "namespaceScope")]
        #[prost(string, tag = "5")]
        pub namespace_scope: String,
        /// The permissions the user holds, per namespace where it has bindings (`_system` ones apply everywhere;
        /// a scoped key uses only its scope's and `_system`'s). In namespace order.
        #[json(Rep<NamespacePermissions>, "namespaces")]
        #[prost(message, repeated, tag = "6")]
        pub namespaces: Vec<NamespacePermissions>,
    }
}

message! {
    /// The permissions of [`AuthWhoamiResponse`] in one namespace.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespacePermissions {
        /// The namespace.
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Permission names (`queue.produce`, ...), in Querator's order.
        #[json(Rep<String>, "permissions")]
        #[prost(string, repeated, tag = "2")]
        pub permissions: Vec<String>,
    }
}

message! {
    /// Body of `/v1/offload.sweep` (Lessor extension): run the sweeper of orphaned payload objects now.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OffloadSweepRequest {
        /// The `partition-storage` entry to sweep; empty: every one with `payload-offload`.
        #[json(Str, "store")]
        #[prost(string, tag = "1")]
        pub store: String,
    }
}

message! {
    /// Reply of `/v1/offload.sweep`: what the sweeper did, per store.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OffloadSweepResponse {
        /// One entry per store swept, in configuration order.
        #[json(Rep<OffloadSweepStore>, "stores")]
        #[prost(message, repeated, tag = "1")]
        pub stores: Vec<OffloadSweepStore>,
    }
}

message! {
    /// What one store's sweep did.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OffloadSweepStore {
        /// The `partition-storage` entry.
        #[json(Str, "store")]
        #[prost(string, tag = "1")]
        pub store: String,
        /// Objects listed under the store's prefix.
        #[json(I64, "listed")]
        #[prost(int64, tag = "2")]
        pub listed: i64,
        /// Objects deleted: older than the grace period (`offload-grace`) and referenced by no item.
        #[json(I64, "deleted")]
        #[prost(int64, tag = "3")]
        pub deleted: i64,
        /// Objects kept (`listed - deleted`): referenced by an item, younger than the grace, being written, or of
        /// a partition not open on this server.
        #[json(I64, "spared")]
        #[prost(int64, tag = "4")]
        pub spared: i64,
        /// Of those, unreferenced-looking objects kept only because their partition is not open on this server (a
        /// queue not loaded here, or another server's); the server that has it open sweeps them.
        #[json(I64, "not_open", "notOpen")]
        #[prost(int64, tag = "5")]
        pub not_open: i64,
    }
}
