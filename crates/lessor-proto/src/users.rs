//! Messages of the `/v1/users.*` endpoints (Querator `proto/users.proto`): users hold API keys and are bound to
//! roles. There is no password and no update.

use crate::json::{message, Msg, Rep, Str, I32};
use crate::timestamp::Timestamp;

message! {
    /// A user, as `/v1/users.list` returns it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct User {
        /// Generated id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// Unique name.
        #[json(Str, "username")]
        #[prost(string, tag = "2")]
        pub username: String,
        /// Id in an external directory.
        #[json(Str, "external_id", "externalId")]
        #[prost(string, tag = "3")]
        pub external_id: String,
        /// Contact address (not verified).
        #[json(Str, "email")]
        #[prost(string, tag = "4")]
        pub email: String,
        /// When the user was created.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "5")]
        pub created_at: Option<Timestamp>,
        /// When the user was last updated.
        #[json(Msg<Timestamp>, "updated_at", "updatedAt")]
        #[prost(message, optional, tag = "6")]
        pub updated_at: Option<Timestamp>,
    }
}

message! {
    /// Body of `/v1/users.create`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UserCreateRequest {
        /// Unique name.
        #[json(Str, "username")]
        #[prost(string, tag = "1")]
        pub username: String,
        /// Contact address.
        #[json(Str, "email")]
        #[prost(string, tag = "2")]
        pub email: String,
        /// Id in an external directory.
        #[json(Str, "external_id", "externalId")]
        #[prost(string, tag = "3")]
        pub external_id: String,
    }
}

message! {
    /// Reply of `/v1/users.create`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UserCreateResponse {
        /// The new user's id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
    }
}

message! {
    /// Body of `/v1/users.list`: one page of users in creation order.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UsersListRequest {
        /// Maximum number of users to return; 0 means the server default.
        #[json(I32, "limit")]
        #[prost(int32, tag = "1")]
        pub limit: i32,
        /// User id to start the page from (inclusive).
        #[json(Str, "pivot")]
        #[prost(string, tag = "2")]
        pub pivot: String,
    }
}

message! {
    /// Reply of `/v1/users.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UsersListResponse {
        /// The users of the page.
        #[json(Rep<User>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<User>,
    }
}

message! {
    /// Body of `/v1/users.delete`: the user goes with its keys and role bindings.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UsersDeleteRequest {
        /// Id of the user to delete.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
    }
}
