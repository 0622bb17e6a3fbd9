//! Messages of the `/v1/queues.*` endpoints (Querator `proto/queues.proto`): list, delete and info.
//! Create and update take a [`QueueInfo`], which lives in [`crate::queue`].

use crate::json::{message, Bool, Rep, Str, I32};
use crate::queue::QueueInfo;

message! {
    /// Body of `/v1/queues.list`: one page of queues, ordered by name.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuesListRequest {
        /// Name to start the page from.
        #[json(Str, "pivot")]
        #[prost(string, tag = "2")]
        pub pivot: String,
        /// Maximum number of queues to return; 0 means the server default.
        #[json(I32, "limit")]
        #[prost(int32, tag = "3")]
        pub limit: i32,
        /// Namespace to list; empty means the default namespace.
        #[json(Str, "namespace")]
        #[prost(string, tag = "4")]
        pub namespace: String,
    }
}

message! {
    /// Reply of `/v1/queues.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuesListResponse {
        /// The queues of the page.
        #[json(Rep<QueueInfo>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<QueueInfo>,
    }
}

message! {
    /// Body of `/v1/queues.delete`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuesDeleteRequest {
        /// Name of the queue to delete.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
        /// Delete even with leased or waiting items (Querator accepts but ignores it).
        #[json(Bool, "force")]
        #[prost(bool, tag = "2")]
        pub force: bool,
    }
}

message! {
    /// Body of `/v1/queues.info`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueuesInfoRequest {
        /// Name of the queue.
        #[json(Str, "queue_name", "queueName")]
        #[prost(string, tag = "1")]
        pub queue_name: String,
    }
}
