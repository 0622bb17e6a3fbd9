//! Messages of the `/v1/storage/*` endpoints (Querator `proto/storage.proto`): list, import and delete raw
//! items of one partition, for inspection and repair.

use crate::json::{message, Bool, Bytes, Msg, Rep, Str, I32};
use crate::timestamp::Timestamp;

message! {
    /// Body of `/v1/storage/items.list` and `/v1/storage/scheduled.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StorageItemsListRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition to list.
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// Item id to start the page from.
        #[json(Str, "pivot")]
        #[prost(string, tag = "3")]
        pub pivot: String,
        /// Maximum number of items; 0 means the server default.
        #[json(I32, "limit")]
        #[prost(int32, tag = "4")]
        pub limit: i32,
    }
}

message! {
    /// Reply of the storage list endpoints.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StorageItemsListResponse {
        /// The items of the page.
        #[json(Rep<StorageItem>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<StorageItem>,
    }
}

message! {
    /// Body of `/v1/storage/items.import`: writes items into a partition as they are.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StorageItemsImportRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition to write to.
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// The items to import.
        #[json(Rep<StorageItem>, "items")]
        #[prost(message, repeated, tag = "3")]
        pub items: Vec<StorageItem>,
    }
}

message! {
    /// Reply of `/v1/storage/items.import`: the items with their newly assigned ids. The field number is 2
    /// in Querator's proto.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StorageItemsImportResponse {
        /// The imported items.
        #[json(Rep<StorageItem>, "items")]
        #[prost(message, repeated, tag = "2")]
        pub items: Vec<StorageItem>,
    }
}

message! {
    /// Body of `/v1/storage/items.delete`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StorageItemsDeleteRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Partition the ids belong to.
        #[json(I32, "partition")]
        #[prost(int32, tag = "2")]
        pub partition: i32,
        /// Ids of the items to delete.
        #[json(Rep<String>, "ids")]
        #[prost(string, repeated, tag = "3")]
        pub ids: Vec<String>,
    }
}

message! {
    /// An item as stored, with every bookkeeping field.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StorageItem {
        /// Item id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// Id of the item this one was copied from (dead-letter moves).
        #[json(Str, "source_id")]
        #[prost(string, tag = "2")]
        pub source_id: String,
        /// Whether the item is leased.
        #[json(Bool, "is_leased", "isLeased")]
        #[prost(bool, tag = "3")]
        pub is_leased: bool,
        /// When the current lease expires.
        #[json(Msg<Timestamp>, "lease_deadline", "leaseDeadline")]
        #[prost(message, optional, tag = "4")]
        pub lease_deadline: Option<Timestamp>,
        /// When the item expires regardless of attempts.
        #[json(Msg<Timestamp>, "expire_deadline", "expireDeadline")]
        #[prost(message, optional, tag = "5")]
        pub expire_deadline: Option<Timestamp>,
        /// When the item is moved to the dead-letter queue.
        #[json(Msg<Timestamp>, "dead_deadline", "deadDeadline")]
        #[prost(message, optional, tag = "6")]
        pub dead_deadline: Option<Timestamp>,
        /// When the item was created.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "7")]
        pub created_at: Option<Timestamp>,
        /// When the item was last updated.
        #[json(Msg<Timestamp>, "updated_at", "updatedAt")]
        #[prost(message, optional, tag = "8")]
        pub updated_at: Option<Timestamp>,
        /// When a scheduled item enters the queue.
        #[json(Msg<Timestamp>, "enqueue_at", "enqueueAt")]
        #[prost(message, optional, tag = "9")]
        pub enqueue_at: Option<Timestamp>,
        /// Times the item has been leased or retried.
        #[json(I32, "attempts")]
        #[prost(int32, tag = "10")]
        pub attempts: i32,
        /// Attempts allowed; 0 means unlimited.
        #[json(I32, "max_attempts", "maxAttempts")]
        #[prost(int32, tag = "11")]
        pub max_attempts: i32,
        /// User-defined reference.
        #[json(Str, "reference")]
        #[prost(string, tag = "12")]
        pub reference: String,
        /// User-defined encoding.
        #[json(Str, "encoding")]
        #[prost(string, tag = "13")]
        pub encoding: String,
        /// User-defined kind.
        #[json(Str, "kind")]
        #[prost(string, tag = "14")]
        pub kind: String,
        /// The payload (base64 in JSON).
        #[json(Bytes, "payload")]
        #[prost(bytes = "vec", tag = "15")]
        pub payload: Vec<u8>,
        /// Lessor extension: the item's priority, 0 to 9 (omitted when 0, so Querator's clients never see it).
        #[json(I32, "priority")]
        #[prost(int32, tag = "100")]
        pub priority: i32,
    }
}

impl StorageItem {
    /// Clears Lessor's extension fields, leaving Querator's message (see [`crate::routes::EXTENSIONS_HEADER`]).
    pub fn clear_extensions(&mut self) {
        self.priority = 0;
    }
}
