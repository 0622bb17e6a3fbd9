//! Messages of the `/v1/namespaces.*` endpoints (Querator `proto/namespaces.proto`): a namespace is the isolation
//! boundary queues, roles and role bindings belong to.
//!
//! `namespaces.create` and `namespaces.update` take a [`NamespaceInfo`]; list and delete have their own requests.

use crate::json::{message, Msg, Rep, Str, I32};
use crate::timestamp::Timestamp;

message! {
    /// A namespace: the body of `/v1/namespaces.create` and `/v1/namespaces.update`, and an item of
    /// `/v1/namespaces.list`. Field 3's proto name is `createdAt` and its `json_name` is `created_at`, so JSON output
    /// writes `created_at` and input takes either.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespaceInfo {
        /// Unique name; names starting with `_` are reserved.
        #[json(Str, "name")]
        #[prost(string, tag = "1")]
        pub name: String,
        /// Free text.
        #[json(Str, "description")]
        #[prost(string, tag = "2")]
        pub description: String,
        /// When the namespace was created (output only).
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "3")]
        pub created_at: Option<Timestamp>,
        /// Tag embedded in API keys scoped to the namespace (`qtr-<tag>-...`); empty: none.
        #[json(Str, "api_key_tag", "apiKeyTag")]
        #[prost(string, tag = "4")]
        pub api_key_tag: String,
    }
}

message! {
    /// Body of `/v1/namespaces.list`: one page of namespaces, ordered by name.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespacesListRequest {
        /// Name to start the page from (inclusive).
        #[json(Str, "pivot")]
        #[prost(string, tag = "1")]
        pub pivot: String,
        /// Maximum number of namespaces to return; 0 means the server default.
        #[json(I32, "limit")]
        #[prost(int32, tag = "2")]
        pub limit: i32,
    }
}

message! {
    /// Reply of `/v1/namespaces.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespacesListResponse {
        /// The namespaces of the page.
        #[json(Rep<NamespaceInfo>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<NamespaceInfo>,
    }
}

message! {
    /// Body of `/v1/namespaces.delete`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespacesDeleteRequest {
        /// Name of the namespace to delete.
        #[json(Str, "name")]
        #[prost(string, tag = "1")]
        pub name: String,
    }
}
