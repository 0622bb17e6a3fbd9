//! Messages of the `/v1/apikeys.*` endpoints (Querator `proto/apikeys.proto`). The raw key appears once, in
//! [`APIKeyCreateResponse::key`]; listings carry metadata only.

use crate::json::{message, Msg, Rep, Str, I32};
use crate::timestamp::Timestamp;

message! {
    /// What `/v1/apikeys.list` tells about a key: never the key or its hash.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct APIKeyMetadata {
        /// Generated id (what `apikeys.delete` takes).
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// The user the key authenticates as.
        #[json(Str, "user_id", "userId")]
        #[prost(string, tag = "2")]
        pub user_id: String,
        /// The only namespace the key works in (empty: any its user may use).
        #[json(Str, "namespace_scope", "namespaceScope")]
        #[prost(string, tag = "3")]
        pub namespace_scope: String,
        /// Free text.
        #[json(Str, "name")]
        #[prost(string, tag = "4")]
        pub name: String,
        /// `qtr-<tag>-<first 8 characters>`, enough to recognise a key.
        #[json(Str, "prefix")]
        #[prost(string, tag = "5")]
        pub prefix: String,
        /// When the key stops working (absent: never).
        #[json(Msg<Timestamp>, "expires_at", "expiresAt")]
        #[prost(message, optional, tag = "6")]
        pub expires_at: Option<Timestamp>,
        /// When a server last looked the key up (absent: never used).
        #[json(Msg<Timestamp>, "last_used_at", "lastUsedAt")]
        #[prost(message, optional, tag = "7")]
        pub last_used_at: Option<Timestamp>,
        /// When the key was created.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "8")]
        pub created_at: Option<Timestamp>,
    }
}

message! {
    /// Body of `/v1/apikeys.create`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct APIKeyCreateRequest {
        /// The user the key is for.
        #[json(Str, "user_id", "userId")]
        #[prost(string, tag = "1")]
        pub user_id: String,
        /// Free text.
        #[json(Str, "name")]
        #[prost(string, tag = "2")]
        pub name: String,
        /// Limit the key to this namespace (empty: no limit).
        #[json(Str, "namespace_scope", "namespaceScope")]
        #[prost(string, tag = "3")]
        pub namespace_scope: String,
        /// When the key stops working (absent: never).
        #[json(Msg<Timestamp>, "expires_at", "expiresAt")]
        #[prost(message, optional, tag = "4")]
        pub expires_at: Option<Timestamp>,
        /// Tag of the key (`qtr-<tag>-...`); empty: the scoped namespace's tag, else `live`.
        #[json(Str, "key_tag", "keyTag")]
        #[prost(string, tag = "5")]
        pub key_tag: String,
    }
}

message! {
    /// Reply of `/v1/apikeys.create`: the only time the key itself is sent.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct APIKeyCreateResponse {
        /// The key's id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// The key, to send as `Authorization: Bearer <key>`; not stored and not shown again.
        #[json(Str, "key")]
        #[prost(string, tag = "2")]
        pub key: String,
        /// The key's displayable prefix.
        #[json(Str, "prefix")]
        #[prost(string, tag = "3")]
        pub prefix: String,
    }
}

message! {
    /// Body of `/v1/apikeys.list`: one page of keys in creation order.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct APIKeysListRequest {
        /// Only this user's keys (empty: every user's).
        #[json(Str, "user_id", "userId")]
        #[prost(string, tag = "1")]
        pub user_id: String,
        /// Maximum number of keys to return; 0 means the server default.
        #[json(I32, "limit")]
        #[prost(int32, tag = "2")]
        pub limit: i32,
        /// Key id to start the page from (inclusive).
        #[json(Str, "pivot")]
        #[prost(string, tag = "3")]
        pub pivot: String,
    }
}

message! {
    /// Reply of `/v1/apikeys.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct APIKeysListResponse {
        /// The keys of the page.
        #[json(Rep<APIKeyMetadata>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<APIKeyMetadata>,
    }
}

message! {
    /// Body of `/v1/apikeys.delete`: revokes a key.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct APIKeysDeleteRequest {
        /// Id of the key.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
    }
}
