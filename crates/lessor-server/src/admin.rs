//! Handlers of the access-control routes: `/v1/namespaces.*`, `/v1/users.*`, `/v1/apikeys.*`, `/v1/roles.*` and
//! `/v1/rolebindings.*`, and the conversions between their wire messages and the auth records.
//!
//! The route's permission has been checked before a handler runs (in [`crate::http`], from the route table); these
//! handlers only translate. The rules (reserved names, uniqueness, what blocks a deletion) are the auth service's
//! ([`lessor_core::auth::Auth`]), so they hold however a change arrives. The routes work with every
//! `auth-backend`: with `none` nobody is checked, but the records are still kept.
//!
//! What never leaves the server: an API key's hash, and the key itself except in the one `apikeys.create` reply.

use lessor_core::auth::{self as core_auth, KeySpec, NamespaceSpec};
use lessor_core::error::QueueError;
use lessor_proto::routes;
use lessor_proto::{self as pb, Reply};

use crate::convert::{ts_from, ts_to};
use crate::error::ApiError;
use crate::http::{Api, Ctx};

// ---- conversions ----------------------------------------------------------------------------------------------

fn namespace_out(n: core_auth::Namespace) -> pb::NamespaceInfo {
    pb::NamespaceInfo {
        name: n.name,
        description: n.description,
        created_at: ts_to(n.created_at),
        api_key_tag: n.api_key_tag,
    }
}

fn namespace_spec(n: pb::NamespaceInfo) -> NamespaceSpec {
    // `created_at` is the server's to set: a client's value is ignored, on update too (the record keeps its own).
    NamespaceSpec {
        name: n.name,
        description: n.description,
        api_key_tag: n.api_key_tag,
    }
}

fn user_out(u: core_auth::User) -> pb::User {
    pb::User {
        id: u.id,
        username: u.username,
        external_id: u.external_id,
        email: u.email,
        created_at: ts_to(u.created_at),
        updated_at: ts_to(u.updated_at),
    }
}

/// A key's metadata: the record without its hash.
fn key_out(k: core_auth::ApiKey) -> pb::APIKeyMetadata {
    pb::APIKeyMetadata {
        id: k.id,
        user_id: k.user_id,
        namespace_scope: k.namespace_scope,
        name: k.name,
        prefix: k.prefix,
        expires_at: ts_to(k.expires_at),
        last_used_at: ts_to(k.last_used_at),
        created_at: ts_to(k.created_at),
    }
}

fn role_out(r: core_auth::Role) -> pb::Role {
    pb::Role {
        id: r.id,
        namespace: r.namespace,
        name: r.name,
        permissions: r.permissions,
        created_at: ts_to(r.created_at),
    }
}

fn binding_out(b: core_auth::RoleBinding) -> pb::RoleBinding {
    pb::RoleBinding {
        id: b.id,
        namespace: b.namespace,
        user_id: b.user_id,
        role_id: b.role_id,
        created_at: ts_to(b.created_at),
    }
}

// ---- namespaces -----------------------------------------------------------------------------------------------

pub(crate) fn namespaces_create(api: Api) -> Api {
    api.rpc(
        routes::NamespacesCreate,
        |ctx: Ctx, r: pb::NamespaceInfo| async move {
            ctx.auth.namespace_create(namespace_spec(r)).await?;
            Ok(Reply::ok())
        },
    )
}

pub(crate) fn namespaces_update(api: Api) -> Api {
    api.rpc(
        routes::NamespacesUpdate,
        |ctx: Ctx, r: pb::NamespaceInfo| async move {
            ctx.auth.namespace_update(namespace_spec(r)).await?;
            Ok(Reply::ok())
        },
    )
}

pub(crate) fn namespaces_list(api: Api) -> Api {
    api.rpc(
        routes::NamespacesList,
        |ctx: Ctx, r: pb::NamespacesListRequest| async move {
            let items = ctx.auth.namespace_list(&r.pivot, r.limit).await?;
            Ok(pb::NamespacesListResponse {
                items: items.into_iter().map(namespace_out).collect(),
            })
        },
    )
}

pub(crate) fn namespaces_delete(api: Api) -> Api {
    api.rpc(
        routes::NamespacesDelete,
        |ctx: Ctx, r: pb::NamespacesDeleteRequest| async move {
            let has_queues = match ctx.engine.has_queues_in(&r.name).await {
                Ok(b) => b,
                // A name no queue can have (empty, malformed): the auth service refuses it with the namespace's
                // own rule, which is the message the caller should see.
                Err(QueueError::Invalid(_)) => false,
                Err(e) => return Err(ApiError::from(e)),
            };
            ctx.auth.namespace_delete(&r.name, has_queues).await?;
            Ok(Reply::ok())
        },
    )
}

// ---- users ----------------------------------------------------------------------------------------------------

pub(crate) fn users_create(api: Api) -> Api {
    api.rpc(
        routes::UsersCreate,
        |ctx: Ctx, r: pb::UserCreateRequest| async move {
            let id = ctx
                .auth
                .user_create(&r.username, &r.email, &r.external_id)
                .await?;
            Ok(pb::UserCreateResponse { id })
        },
    )
}

pub(crate) fn users_list(api: Api) -> Api {
    api.rpc(
        routes::UsersList,
        |ctx: Ctx, r: pb::UsersListRequest| async move {
            let items = ctx.auth.user_list(&r.pivot, r.limit).await?;
            Ok(pb::UsersListResponse {
                items: items.into_iter().map(user_out).collect(),
            })
        },
    )
}

pub(crate) fn users_delete(api: Api) -> Api {
    api.rpc(
        routes::UsersDelete,
        |ctx: Ctx, r: pb::UsersDeleteRequest| async move {
            ctx.auth.user_delete(&r.id).await?;
            Ok(Reply::ok())
        },
    )
}

// ---- api keys -------------------------------------------------------------------------------------------------

pub(crate) fn apikeys_create(api: Api) -> Api {
    api.rpc(
        routes::ApiKeysCreate,
        |ctx: Ctx, r: pb::APIKeyCreateRequest| async move {
            let spec = KeySpec {
                user_id: r.user_id,
                name: r.name,
                namespace_scope: r.namespace_scope,
                expires_at: ts_from(&r.expires_at),
                tag: r.key_tag,
            };
            let (record, key) = ctx.auth.key_create(spec).await?;
            Ok(pb::APIKeyCreateResponse {
                id: record.id,
                key,
                prefix: record.prefix,
            })
        },
    )
}

pub(crate) fn apikeys_list(api: Api) -> Api {
    api.rpc(
        routes::ApiKeysList,
        |ctx: Ctx, r: pb::APIKeysListRequest| async move {
            let items = ctx.auth.key_list(&r.user_id, &r.pivot, r.limit).await?;
            Ok(pb::APIKeysListResponse {
                items: items.into_iter().map(key_out).collect(),
            })
        },
    )
}

pub(crate) fn apikeys_delete(api: Api) -> Api {
    api.rpc(
        routes::ApiKeysDelete,
        |ctx: Ctx, r: pb::APIKeysDeleteRequest| async move {
            ctx.auth.key_delete(&r.id).await?;
            Ok(Reply::ok())
        },
    )
}

// ---- roles ----------------------------------------------------------------------------------------------------

pub(crate) fn roles_create(api: Api) -> Api {
    api.rpc(
        routes::RolesCreate,
        |ctx: Ctx, r: pb::RoleCreateRequest| async move {
            let id = ctx
                .auth
                .role_create(&r.namespace, &r.name, &r.permissions)
                .await?;
            Ok(pb::RoleCreateResponse { id })
        },
    )
}

pub(crate) fn roles_update(api: Api) -> Api {
    api.rpc(
        routes::RolesUpdate,
        |ctx: Ctx, r: pb::RoleUpdateRequest| async move {
            ctx.auth
                .role_update(&r.namespace, &r.name, &r.permissions)
                .await?;
            Ok(Reply::ok())
        },
    )
}

pub(crate) fn roles_list(api: Api) -> Api {
    api.rpc(
        routes::RolesList,
        |ctx: Ctx, r: pb::RolesListRequest| async move {
            let items = ctx.auth.role_list(&r.namespace, &r.pivot, r.limit).await?;
            Ok(pb::RolesListResponse {
                items: items.into_iter().map(role_out).collect(),
            })
        },
    )
}

pub(crate) fn roles_delete(api: Api) -> Api {
    api.rpc(
        routes::RolesDelete,
        |ctx: Ctx, r: pb::RolesDeleteRequest| async move {
            ctx.auth.role_delete(&r.namespace, &r.name).await?;
            Ok(Reply::ok())
        },
    )
}

// ---- role bindings --------------------------------------------------------------------------------------------

pub(crate) fn rolebindings_create(api: Api) -> Api {
    api.rpc(
        routes::RoleBindingsCreate,
        |ctx: Ctx, r: pb::RoleBindingCreateRequest| async move {
            let id = ctx
                .auth
                .binding_create(&r.namespace, &r.role_name, &r.user_id)
                .await?;
            Ok(pb::RoleBindingCreateResponse { id })
        },
    )
}

pub(crate) fn rolebindings_list(api: Api) -> Api {
    api.rpc(
        routes::RoleBindingsList,
        |ctx: Ctx, r: pb::RoleBindingsListRequest| async move {
            let items = ctx
                .auth
                .binding_list(&r.namespace, &r.user_id_filter, &r.pivot, r.limit)
                .await?;
            Ok(pb::RoleBindingsListResponse {
                items: items.into_iter().map(binding_out).collect(),
            })
        },
    )
}

pub(crate) fn rolebindings_delete(api: Api) -> Api {
    api.rpc(
        routes::RoleBindingsDelete,
        |ctx: Ctx, r: pb::RoleBindingDeleteRequest| async move {
            ctx.auth
                .binding_delete(&r.namespace, &r.role_name, &r.user_id)
                .await?;
            Ok(Reply::ok())
        },
    )
}
