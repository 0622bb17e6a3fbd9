//! Messages of the `/v1/roles.*` and `/v1/rolebindings.*` endpoints (Querator `proto/roles.proto`): a role is a
//! named set of permissions in a namespace; a binding gives a user a role there.

use crate::json::{message, Msg, Rep, Str, I32};
use crate::timestamp::Timestamp;

message! {
    /// A role, as `/v1/roles.list` returns it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Role {
        /// Generated id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// The namespace the role belongs to.
        #[json(Str, "namespace")]
        #[prost(string, tag = "2")]
        pub namespace: String,
        /// Name, unique in the namespace.
        #[json(Str, "name")]
        #[prost(string, tag = "3")]
        pub name: String,
        /// Permission names (`queue.produce`, ...).
        #[json(Rep<String>, "permissions")]
        #[prost(string, repeated, tag = "4")]
        pub permissions: Vec<String>,
        /// When the role was created.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "5")]
        pub created_at: Option<Timestamp>,
    }
}

message! {
    /// Body of `/v1/roles.create`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleCreateRequest {
        /// The namespace (empty: `_system`).
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Name, unique in the namespace; not one of the standard roles' names.
        #[json(Str, "name")]
        #[prost(string, tag = "2")]
        pub name: String,
        /// Permission names.
        #[json(Rep<String>, "permissions")]
        #[prost(string, repeated, tag = "3")]
        pub permissions: Vec<String>,
    }
}

message! {
    /// Reply of `/v1/roles.create`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleCreateResponse {
        /// The new role's id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
    }
}

message! {
    /// Body of `/v1/roles.update`: replaces a role's permissions.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleUpdateRequest {
        /// The namespace (empty: `_system`).
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Name of the role.
        #[json(Str, "name")]
        #[prost(string, tag = "2")]
        pub name: String,
        /// The new permission names.
        #[json(Rep<String>, "permissions")]
        #[prost(string, repeated, tag = "3")]
        pub permissions: Vec<String>,
    }
}

message! {
    /// Body of `/v1/roles.list`: one page of a namespace's roles, ordered by name.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RolesListRequest {
        /// The namespace (empty: `_system`).
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Maximum number of roles to return; 0 means the server default.
        #[json(I32, "limit")]
        #[prost(int32, tag = "2")]
        pub limit: i32,
        /// Role name to start the page from (inclusive).
        #[json(Str, "pivot")]
        #[prost(string, tag = "3")]
        pub pivot: String,
    }
}

message! {
    /// Reply of `/v1/roles.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RolesListResponse {
        /// The roles of the page.
        #[json(Rep<Role>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<Role>,
    }
}

message! {
    /// Body of `/v1/roles.delete`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RolesDeleteRequest {
        /// The namespace (empty: `_system`).
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Name of the role.
        #[json(Str, "name")]
        #[prost(string, tag = "2")]
        pub name: String,
    }
}

message! {
    /// A user holding a role in a namespace, as `/v1/rolebindings.list` returns it.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleBinding {
        /// Generated id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
        /// The namespace the grant applies to.
        #[json(Str, "namespace")]
        #[prost(string, tag = "2")]
        pub namespace: String,
        /// The user.
        #[json(Str, "user_id", "userId")]
        #[prost(string, tag = "3")]
        pub user_id: String,
        /// The role's id.
        #[json(Str, "role_id", "roleId")]
        #[prost(string, tag = "4")]
        pub role_id: String,
        /// When the binding was created.
        #[json(Msg<Timestamp>, "created_at", "createdAt")]
        #[prost(message, optional, tag = "5")]
        pub created_at: Option<Timestamp>,
    }
}

message! {
    /// Body of `/v1/rolebindings.create`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleBindingCreateRequest {
        /// The namespace (empty: `_system`); the role must exist there.
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Name of the role.
        #[json(Str, "role_name", "roleName")]
        #[prost(string, tag = "2")]
        pub role_name: String,
        /// The user.
        #[json(Str, "user_id", "userId")]
        #[prost(string, tag = "3")]
        pub user_id: String,
    }
}

message! {
    /// Reply of `/v1/rolebindings.create`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleBindingCreateResponse {
        /// The new binding's id.
        #[json(Str, "id")]
        #[prost(string, tag = "1")]
        pub id: String,
    }
}

message! {
    /// Body of `/v1/rolebindings.list`: one page of a namespace's bindings, ordered by user then role.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleBindingsListRequest {
        /// The namespace (empty: `_system`).
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Only this user's bindings (empty: everyone's). Querator ignores it; Lessor honours it.
        #[json(Str, "user_id_filter", "userIdFilter")]
        #[prost(string, tag = "2")]
        pub user_id_filter: String,
        /// Maximum number of bindings to return; 0 means the server default.
        #[json(I32, "limit")]
        #[prost(int32, tag = "3")]
        pub limit: i32,
        /// User id to start the page from (inclusive).
        #[json(Str, "pivot")]
        #[prost(string, tag = "4")]
        pub pivot: String,
    }
}

message! {
    /// Reply of `/v1/rolebindings.list`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleBindingsListResponse {
        /// The bindings of the page.
        #[json(Rep<RoleBinding>, "items")]
        #[prost(message, repeated, tag = "1")]
        pub items: Vec<RoleBinding>,
    }
}

message! {
    /// Body of `/v1/rolebindings.delete`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoleBindingDeleteRequest {
        /// The namespace (empty: `_system`).
        #[json(Str, "namespace")]
        #[prost(string, tag = "1")]
        pub namespace: String,
        /// Name of the role.
        #[json(Str, "role_name", "roleName")]
        #[prost(string, tag = "2")]
        pub role_name: String,
        /// The user.
        #[json(Str, "user_id", "userId")]
        #[prost(string, tag = "3")]
        pub user_id: String,
    }
}
