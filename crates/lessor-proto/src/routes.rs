//! The route table of the v1 API: for every RPC its path, request and response messages, body limit and the
//! permission it needs, in one place that the server's router and the client's calls are both built from.
//!
//! Each RPC is a type implementing [`Rpc`] (for example [`QueueProduce`]), so a caller names the route once and the
//! compiler checks that the request and response it passes match it. [`ROUTES`] lists them all for code that has to
//! enumerate the API (building a router, checking that every route is served, documentation).
//!
//! Every RPC is `POST`; the health and metrics documents are plain `GET`s at [`HEALTH`] and [`METRICS`].

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::apikeys::{
    APIKeyCreateRequest, APIKeyCreateResponse, APIKeysDeleteRequest, APIKeysListRequest, APIKeysListResponse,
};
use crate::extensions::{
    AuthWhoamiRequest, AuthWhoamiResponse, OffloadSweepRequest, OffloadSweepResponse, QueueBrowseRequest,
    QueueBrowseResponse, QueueExtendRequest, QueueHistoryRequest, QueueHistoryResponse, QueuePauseRequest,
    QueueRebalanceRequest, QueueRedriveRequest, QueueResumeRequest, QueuesOverviewRequest,
    QueuesOverviewResponse, RebalanceListRequest, RebalanceListResponse, RebalanceTask, RebalanceTaskRequest,
    RedriveListRequest, RedriveListResponse, RedriveTask, RedriveTaskRequest, RestoreBeginRequest,
    RestoreBeginResponse, RestoreFinishRequest, RestoreImportRequest, RestoreImportResponse,
    ServerInfoRequest, ServerInfoResponse,
};
use crate::namespaces::{
    NamespaceInfo, NamespacesDeleteRequest, NamespacesListRequest, NamespacesListResponse,
};
use crate::queue::{
    QueueClearRequest, QueueCompleteRequest, QueueInfo, QueueLeaseRequest, QueueLeaseResponse,
    QueueProduceRequest, QueueReloadRequest, QueueRetryRequest, QueueStatsRequest, QueueStatsResponse,
};
use crate::queues::{QueuesDeleteRequest, QueuesInfoRequest, QueuesListRequest, QueuesListResponse};
use crate::reply::Reply;
use crate::roles::{
    RoleBindingCreateRequest, RoleBindingCreateResponse, RoleBindingDeleteRequest, RoleBindingsListRequest,
    RoleBindingsListResponse, RoleCreateRequest, RoleCreateResponse, RoleUpdateRequest, RolesDeleteRequest,
    RolesListRequest, RolesListResponse,
};
use crate::storage::{
    StorageItemsDeleteRequest, StorageItemsImportRequest, StorageItemsImportResponse,
    StorageItemsListRequest, StorageItemsListResponse,
};
use crate::users::{
    UserCreateRequest, UserCreateResponse, UsersDeleteRequest, UsersListRequest, UsersListResponse,
};

/// `GET`: the health document.
pub const HEALTH: &str = "/health";
/// `GET`: the Prometheus/OpenMetrics text.
pub const METRICS: &str = "/metrics";
/// `POST` (Lessor extension): a backup of the queues a [`crate::extensions::StorageBackupRequest`] names, streamed
/// as the reply body in the [`crate::backup`] format. Not in [`ROUTES`]: its reply is a file, not a message.
/// Needs `queue.stats` in the namespace of every queue it covers.
pub const STORAGE_BACKUP: &str = "/v1/storage.backup";

/// Request header by which a client says it reads Lessor's extension fields in JSON replies to Querator's routes
/// (`Lessor-Extensions: 1`). Without it, a JSON reply to a Querator route carries Querator's fields only, whatever
/// other clients stored (a priority, a dedup window, a pause): Querator's clients decode JSON with a strict
/// protojson decoder that refuses a reply holding a field their message lacks. Protobuf replies always carry the
/// fields, since protobuf decoders skip numbers they do not know. Lessor's client sends the header on every call.
pub const EXTENSIONS_HEADER: &str = "lessor-extensions";

/// Whether the value of [`EXTENSIONS_HEADER`] turns the extension fields on (`1` or `true`, any case).
pub fn extensions_requested(value: &str) -> bool {
    let v = value.trim();
    v == "1" || v.eq_ignore_ascii_case("true")
}

/// Body limits in bytes, SI units as Querator's. Querator's lease/stats/clear/reload limit is 512 B, which a long
/// queue name in JSON can exceed; 4 KB keeps the protection without rejecting valid requests.
pub const SMALL_BODY: usize = 4 * 1024;
/// Limit of most RPCs (256 KB).
pub const DEFAULT_BODY: usize = 256 * 1000;
/// Limit of `queues.update` (512 KB).
pub const UPDATE_BODY: usize = 512 * 1000;
/// Limit of `storage/items.import` (64 MB).
pub const IMPORT_BODY: usize = 64 * 1000 * 1000;
/// Default of the configurable produce limit (`limits.max-produce-body`, 5 MB).
pub const DEFAULT_MAX_PRODUCE_BODY: usize = 5_000_000;
/// Room a restore page needs beyond the payload of its item: the item's other fields (a few strings the produce
/// body held too, and what the server adds, such as a dead letter's source id), the block and the request around
/// it. See [`BodyLimit::RestorePage`].
pub const RESTORE_PAGE_SLACK: usize = 1024 * 1024;

/// How large a request body a route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLimit {
    /// A fixed number of bytes.
    Fixed(usize),
    /// The server's configured produce limit (`limits.max-produce-body`, [`DEFAULT_MAX_PRODUCE_BODY`] unless set).
    MaxProduceBody,
    /// A restore page (`storage.restore.import`): [`IMPORT_BODY`], or the largest produce body the server takes
    /// if larger, plus [`RESTORE_PAGE_SLACK`]. A page holding one item too large for a compressed page is sent
    /// uncompressed (in protobuf, as Lessor's client does), so every item the server accepted can be restored
    /// into a server configured alike, whatever `limits.max-offload-produce-body` allows.
    RestorePage,
}

impl BodyLimit {
    /// The limit in bytes, given the server's largest produce limit (the one for queues whose payloads are
    /// offloaded, when it is larger).
    pub const fn bytes(self, max_produce_body: usize) -> usize {
        match self {
            BodyLimit::Fixed(n) => n,
            BodyLimit::MaxProduceBody => max_produce_body,
            BodyLimit::RestorePage => {
                let largest = if max_produce_body > IMPORT_BODY {
                    max_produce_body
                } else {
                    IMPORT_BODY
                };
                largest.saturating_add(RESTORE_PAGE_SLACK)
            }
        }
    }
}

/// The permission a route needs, as Querator names them (`service/service.go`).
pub use lessor_core::auth::Permission;

/// Where a route's permission is checked: the namespace the request acts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The namespace of the named queue (known only once the queue has been looked up).
    Queue(&'a str),
    /// The named namespace (`_system` when empty).
    Namespace(&'a str),
    /// `_system`.
    System,
    /// None: the route tells the caller only about itself (`auth.whoami`), so any caller whose key authenticates
    /// may use it, whatever its permissions. [`Rpc::PERMISSION`] is not checked for such a route.
    Caller,
}

/// A wire message as both ends need it: protobuf and protojson, in both directions, movable across tasks.
pub trait WireMessage:
    prost::Message + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
}

impl<T> WireMessage for T where
    T: prost::Message + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
}

/// One RPC of the v1 API: `POST PATH` with a [`Rpc::Request`] body, answered with a [`Rpc::Response`] (or the
/// [`Reply`] error envelope).
pub trait Rpc {
    /// The request body.
    type Request: WireMessage;
    /// The body of a successful (200) reply; [`Reply`] for RPCs that return nothing.
    type Response: WireMessage;
    /// The path, e.g. `/v1/queue.produce`.
    const PATH: &'static str;
    /// How large a request body the server reads before refusing it.
    const BODY_LIMIT: BodyLimit;
    /// The permission the caller needs.
    const PERMISSION: Permission;
    /// Where the permission is checked for `request`.
    fn target(request: &Self::Request) -> Target<'_>;
    /// The route as a value, for [`ROUTES`].
    const ROUTE: Route = Route {
        path: Self::PATH,
        body_limit: Self::BODY_LIMIT,
        permission: Self::PERMISSION,
    };
}

/// The untyped part of an [`Rpc`], for enumerating the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The path.
    pub path: &'static str,
    /// The body limit.
    pub body_limit: BodyLimit,
    /// The permission it needs.
    pub permission: Permission,
}

/// Declares the route types and [`ROUTES`] from one table, so a route cannot be declared without being listed.
macro_rules! routes {
    ($(
        $(#[$doc:meta])*
        $name:ident => $path:literal, $req:ty => $res:ty, $limit:expr, $perm:ident, |$r:ident| $target:expr;
    )*) => {
        $(
            $(#[$doc])*
            #[derive(Debug, Clone, Copy, Default)]
            pub struct $name;

            impl Rpc for $name {
                type Request = $req;
                type Response = $res;
                const PATH: &'static str = $path;
                const BODY_LIMIT: BodyLimit = $limit;
                const PERMISSION: Permission = Permission::$perm;
                fn target($r: &Self::Request) -> Target<'_> {
                    $target
                }
            }
        )*

        /// Every RPC of the table, in Querator's order, Lessor's extensions after Querator's queue routes.
        pub const ROUTES: &[Route] = &[$(<$name as Rpc>::ROUTE),*];
    };
}

routes! {
    /// Adds items to a queue.
    QueueProduce => "/v1/queue.produce", QueueProduceRequest => Reply,
        BodyLimit::MaxProduceBody, QueueProduce, |r| Target::Queue(&r.queue_name);
    /// Leases items (long-poll).
    QueueLease => "/v1/queue.lease", QueueLeaseRequest => QueueLeaseResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueLease, |r| Target::Queue(&r.queue_name);
    /// Completes leased items.
    QueueComplete => "/v1/queue.complete", QueueCompleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), QueueComplete, |r| Target::Queue(&r.queue_name);
    /// Retries or dead-letters leased items.
    QueueRetry => "/v1/queue.retry", QueueRetryRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), QueueRetry, |r| Target::Queue(&r.queue_name);
    /// Per-partition statistics of a queue.
    QueueStats => "/v1/queue.stats", QueueStatsRequest => QueueStatsResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueStats, |r| Target::Queue(&r.queue_name);
    /// Clears a queue.
    QueueClear => "/v1/queue.clear", QueueClearRequest => Reply,
        BodyLimit::Fixed(SMALL_BODY), QueueClear, |r| Target::Queue(&r.queue_name);
    /// Reloads a queue's partitions.
    QueueReload => "/v1/queue.reload", QueueReloadRequest => Reply,
        BodyLimit::Fixed(SMALL_BODY), QueueUpdate, |r| Target::Queue(&r.queue_name);
    /// Creates a queue.
    QueuesCreate => "/v1/queues.create", QueueInfo => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), QueueCreate, |r| Target::Namespace(&r.namespace);
    /// Lists queues.
    QueuesList => "/v1/queues.list", QueuesListRequest => QueuesListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), QueueList, |r| Target::Namespace(&r.namespace);
    /// Updates a queue.
    QueuesUpdate => "/v1/queues.update", QueueInfo => Reply,
        BodyLimit::Fixed(UPDATE_BODY), QueueUpdate, |r| Target::Queue(&r.queue_name);
    /// Deletes a queue.
    QueuesDelete => "/v1/queues.delete", QueuesDeleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), QueueDelete, |r| Target::Queue(&r.queue_name);
    /// One queue's configuration.
    QueuesInfo => "/v1/queues.info", QueuesInfoRequest => QueueInfo,
        BodyLimit::Fixed(DEFAULT_BODY), QueueStats, |r| Target::Queue(&r.queue_name);
    /// Lists raw items of a partition.
    StorageItemsList => "/v1/storage/items.list", StorageItemsListRequest => StorageItemsListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), QueueStats, |r| Target::Queue(&r.queue_name);
    /// Lists scheduled items of a partition.
    StorageScheduledList => "/v1/storage/scheduled.list", StorageItemsListRequest => StorageItemsListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), QueueStats, |r| Target::Queue(&r.queue_name);
    /// Imports raw items.
    StorageItemsImport => "/v1/storage/items.import", StorageItemsImportRequest => StorageItemsImportResponse,
        BodyLimit::Fixed(IMPORT_BODY), QueueProduce, |r| Target::Queue(&r.queue_name);
    /// Deletes raw items.
    StorageItemsDelete => "/v1/storage/items.delete", StorageItemsDeleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), QueueClear, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: extends held leases (heartbeat). `queue.lease`, as it keeps what a lease took.
    QueueExtend => "/v1/queue.extend", QueueExtendRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), QueueLease, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: pauses a queue (produce still accepted, leases wait).
    QueuePause => "/v1/queue.pause", QueuePauseRequest => Reply,
        BodyLimit::Fixed(SMALL_BODY), QueueUpdate, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: resumes a paused queue.
    QueueResume => "/v1/queue.resume", QueueResumeRequest => Reply,
        BodyLimit::Fixed(SMALL_BODY), QueueUpdate, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: one page of a partition's items by state, without leasing them. `queue.stats`, like
    /// `storage/items.list`, which shows the same payloads.
    QueueBrowse => "/v1/queue.browse", QueueBrowseRequest => QueueBrowseResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueStats, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: the recent rates and depths of a queue from the server's in-memory ring (the
    /// dashboard's charts). `queue.stats`, as it shows less than `queue.stats` does.
    QueueHistory => "/v1/queue.history", QueueHistoryRequest => QueueHistoryResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueStats, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: the server's version and a configuration summary without secrets (the dashboard's server
    /// page). `queue.list` in `_system`: it describes the whole server, as listing every queue does.
    ServerInfo => "/v1/server.info", ServerInfoRequest => ServerInfoResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueList, |_r| Target::System;
    /// Lessor extension: one page of a namespace's queues with their depths, rates, oldest age and dead-letter
    /// depth (the dashboard's overview, one request per refresh). `queue.list` in the namespace, as `queues.list`;
    /// the figures also need `queue.stats` there (and the dead-letter depth `queue.stats` in the dead-letter
    /// queue's namespace), checked by the server.
    QueuesOverview => "/v1/queues.overview", QueuesOverviewRequest => QueuesOverviewResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueList, |r| Target::Namespace(&r.namespace);
    /// Lessor extension: who the caller is (user, key id, namespace scope, permissions per namespace), without
    /// secrets. Any authenticated caller: it describes only the caller ([`Target::Caller`]; the permission
    /// named here is never checked).
    AuthWhoami => "/v1/auth.whoami", AuthWhoamiRequest => AuthWhoamiResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueList, |_r| Target::Caller;
    /// Lessor extension: starts a dead-letter redrive task. `queue.update` on the dead-letter queue (the server
    /// also checks `queue.produce` on a named `target_queue`).
    QueueRedrive => "/v1/queue.redrive", QueueRedriveRequest => RedriveTask,
        BodyLimit::Fixed(SMALL_BODY), QueueUpdate, |r| Target::Queue(&r.dead_queue);
    /// Lessor extension: lists redrive tasks (of one dead-letter queue, or all of them in `_system`).
    RedriveList => "/v1/redrive.list", RedriveListRequest => RedriveListResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueStats, |r| queue_or_system(&r.dead_queue);
    /// Lessor extension: one redrive task.
    RedriveGet => "/v1/redrive.get", RedriveTaskRequest => RedriveTask,
        BodyLimit::Fixed(SMALL_BODY), QueueStats, |r| queue_or_system(&r.dead_queue);
    /// Lessor extension: cancels a running redrive task.
    RedriveCancel => "/v1/redrive.cancel", RedriveTaskRequest => RedriveTask,
        BodyLimit::Fixed(SMALL_BODY), QueueUpdate, |r| queue_or_system(&r.dead_queue);
    /// Declared by Querator but never routed there: starts an online rebalance task (partition moves between
    /// stores, shrinking, spreading by affinity). `queue.update` on the queue.
    QueuesRebalance => "/v1/queues.rebalance", QueueRebalanceRequest => RebalanceTask,
        BodyLimit::Fixed(DEFAULT_BODY), QueueUpdate, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: lists rebalance tasks (of one queue, or all of them in `_system`).
    RebalanceList => "/v1/rebalance.list", RebalanceListRequest => RebalanceListResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueStats, |r| queue_or_system(&r.queue_name);
    /// Lessor extension: one rebalance task.
    RebalanceGet => "/v1/rebalance.get", RebalanceTaskRequest => RebalanceTask,
        BodyLimit::Fixed(SMALL_BODY), QueueStats, |r| queue_or_system(&r.queue_name);
    /// Lessor extension: cancels a running rebalance task (`queue.update`, like starting one).
    RebalanceCancel => "/v1/rebalance.cancel", RebalanceTaskRequest => RebalanceTask,
        BodyLimit::Fixed(SMALL_BODY), QueueUpdate, |r| queue_or_system(&r.queue_name);
    /// Lessor extension: starts (or resumes) restoring a queue from a backup: creates it in the restoring state.
    /// `queue.create` in the queue's namespace (the server also checks `queue.produce` there).
    StorageRestoreBegin => "/v1/storage.restore.begin", RestoreBeginRequest => RestoreBeginResponse,
        BodyLimit::Fixed(DEFAULT_BODY), QueueCreate, |r| Target::Namespace(&r.namespace);
    /// Lessor extension: imports one backup block into a restoring queue, exactly once.
    StorageRestoreImport => "/v1/storage.restore.import", RestoreImportRequest => RestoreImportResponse,
        BodyLimit::RestorePage, QueueProduce, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: ends a restore; the queue takes traffic again.
    StorageRestoreFinish => "/v1/storage.restore.finish", RestoreFinishRequest => Reply,
        BodyLimit::Fixed(SMALL_BODY), QueueProduce, |r| Target::Queue(&r.queue_name);
    /// Lessor extension: runs the sweeper of orphaned payload objects (object storage) now. `queue.clear` in
    /// `_system`: it deletes objects of every queue of the stores it sweeps, a server-wide operation.
    OffloadSweep => "/v1/offload.sweep", OffloadSweepRequest => OffloadSweepResponse,
        BodyLimit::Fixed(SMALL_BODY), QueueClear, |_r| Target::System;
    /// Creates a namespace.
    NamespacesCreate => "/v1/namespaces.create", NamespaceInfo => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), NamespaceCreate, |_r| Target::System;
    /// Replaces a namespace's description and key tag.
    NamespacesUpdate => "/v1/namespaces.update", NamespaceInfo => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), NamespaceUpdate, |_r| Target::System;
    /// Lists namespaces.
    NamespacesList => "/v1/namespaces.list", NamespacesListRequest => NamespacesListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), NamespaceList, |_r| Target::System;
    /// Deletes an empty namespace.
    NamespacesDelete => "/v1/namespaces.delete", NamespacesDeleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), NamespaceDelete, |_r| Target::System;
    /// Creates a user.
    UsersCreate => "/v1/users.create", UserCreateRequest => UserCreateResponse,
        BodyLimit::Fixed(DEFAULT_BODY), UserCreate, |_r| Target::System;
    /// Lists users.
    UsersList => "/v1/users.list", UsersListRequest => UsersListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), UserList, |_r| Target::System;
    /// Deletes a user with its keys and bindings.
    UsersDelete => "/v1/users.delete", UsersDeleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), UserDelete, |_r| Target::System;
    /// Mints an API key (the reply is the only time the key is sent).
    ApiKeysCreate => "/v1/apikeys.create", APIKeyCreateRequest => APIKeyCreateResponse,
        BodyLimit::Fixed(DEFAULT_BODY), ApiKeyCreate, |_r| Target::System;
    /// Lists API keys (metadata only).
    ApiKeysList => "/v1/apikeys.list", APIKeysListRequest => APIKeysListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), ApiKeyList, |_r| Target::System;
    /// Revokes an API key.
    ApiKeysDelete => "/v1/apikeys.delete", APIKeysDeleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), ApiKeyDelete, |_r| Target::System;
    /// Creates a role in a namespace.
    RolesCreate => "/v1/roles.create", RoleCreateRequest => RoleCreateResponse,
        BodyLimit::Fixed(DEFAULT_BODY), RoleCreate, |r| Target::Namespace(&r.namespace);
    /// Lists a namespace's roles.
    RolesList => "/v1/roles.list", RolesListRequest => RolesListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), RoleList, |r| Target::Namespace(&r.namespace);
    /// Replaces a role's permissions.
    RolesUpdate => "/v1/roles.update", RoleUpdateRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), RoleUpdate, |r| Target::Namespace(&r.namespace);
    /// Deletes a role nobody is bound to.
    RolesDelete => "/v1/roles.delete", RolesDeleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), RoleDelete, |r| Target::Namespace(&r.namespace);
    /// Binds a user to a role of a namespace.
    RoleBindingsCreate => "/v1/rolebindings.create", RoleBindingCreateRequest => RoleBindingCreateResponse,
        BodyLimit::Fixed(DEFAULT_BODY), RoleBindingCreate, |r| Target::Namespace(&r.namespace);
    /// Lists a namespace's role bindings (one user's when filtered).
    RoleBindingsList => "/v1/rolebindings.list", RoleBindingsListRequest => RoleBindingsListResponse,
        BodyLimit::Fixed(DEFAULT_BODY), RoleBindingList, |r| Target::Namespace(&r.namespace);
    /// Removes a role binding.
    RoleBindingsDelete => "/v1/rolebindings.delete", RoleBindingDeleteRequest => Reply,
        BodyLimit::Fixed(DEFAULT_BODY), RoleBindingDelete, |r| Target::Namespace(&r.namespace);
}

/// The target of the redrive task routes: the dead-letter queue when the request names one, else `_system` (a task
/// id alone says nothing about whose it is before it is looked up, so only a principal allowed everywhere may
/// use it bare).
fn queue_or_system(dead_queue: &str) -> Target<'_> {
    if dead_queue.is_empty() {
        Target::System
    } else {
        Target::Queue(dead_queue)
    }
}

/// Lessor's own routes (Querator has none of them), for documentation and tests that must tell them apart.
pub const EXTENSION_PATHS: &[&str] = &[
    QueueExtend::PATH,
    QueuePause::PATH,
    QueueResume::PATH,
    QueueBrowse::PATH,
    QueueHistory::PATH,
    ServerInfo::PATH,
    QueuesOverview::PATH,
    AuthWhoami::PATH,
    QueueRedrive::PATH,
    RedriveList::PATH,
    RedriveGet::PATH,
    RedriveCancel::PATH,
    RebalanceList::PATH,
    RebalanceGet::PATH,
    RebalanceCancel::PATH,
    OffloadSweep::PATH,
];

/// The route at `path`, if there is one.
pub fn route(path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unique_and_versioned() {
        let mut paths: Vec<&str> = ROUTES.iter().map(|r| r.path).collect();
        assert_eq!(paths.len(), 53);
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), 53, "a path is listed twice");
        assert!(paths.iter().all(|p| p.starts_with("/v1/")));
    }

    #[test]
    fn table_matches_querator() {
        assert_eq!(
            route("/v1/queue.lease").map(|r| r.body_limit),
            Some(BodyLimit::Fixed(4096))
        );
        assert_eq!(QueueProduce::BODY_LIMIT.bytes(1000), 1000);
        assert_eq!(StorageItemsImport::BODY_LIMIT.bytes(1000), 64_000_000);
        // A restore page takes the largest item the server accepts, with room around it.
        assert_eq!(
            StorageRestoreImport::BODY_LIMIT.bytes(1000),
            64_000_000 + RESTORE_PAGE_SLACK
        );
        assert_eq!(
            StorageRestoreImport::BODY_LIMIT.bytes(200_000_000),
            200_000_000 + RESTORE_PAGE_SLACK
        );
        assert_eq!(QueueReload::PERMISSION.as_str(), "queue.update");
        assert_eq!(StorageItemsDelete::PERMISSION.as_str(), "queue.clear");
        assert_eq!(route("/v1/queue.nope"), None);
    }

    #[test]
    fn auth_routes_match_querator() {
        let expect = [
            ("/v1/namespaces.create", "namespace.create"),
            ("/v1/namespaces.update", "namespace.update"),
            ("/v1/namespaces.list", "namespace.list"),
            ("/v1/namespaces.delete", "namespace.delete"),
            ("/v1/users.create", "user.create"),
            ("/v1/users.list", "user.list"),
            ("/v1/users.delete", "user.delete"),
            ("/v1/apikeys.create", "apikey.create"),
            ("/v1/apikeys.list", "apikey.list"),
            ("/v1/apikeys.delete", "apikey.delete"),
            ("/v1/roles.create", "role.create"),
            ("/v1/roles.update", "role.update"),
            ("/v1/roles.list", "role.list"),
            ("/v1/roles.delete", "role.delete"),
            ("/v1/rolebindings.create", "rolebinding.create"),
            ("/v1/rolebindings.list", "rolebinding.list"),
            ("/v1/rolebindings.delete", "rolebinding.delete"),
        ];
        for (path, perm) in expect {
            let r = route(path).unwrap_or_else(|| panic!("{path} is not routed"));
            assert_eq!(r.permission.as_str(), perm, "{path}");
            assert_eq!(r.body_limit, BodyLimit::Fixed(256_000), "{path}");
        }
    }

    #[test]
    fn extension_routes_have_limits_permissions_and_targets() {
        use crate::{QueueRedriveRequest, RedriveTaskRequest};
        let expect = [
            ("/v1/queue.extend", "queue.lease", DEFAULT_BODY),
            ("/v1/queue.pause", "queue.update", SMALL_BODY),
            ("/v1/queue.resume", "queue.update", SMALL_BODY),
            ("/v1/queue.browse", "queue.stats", SMALL_BODY),
            ("/v1/queue.history", "queue.stats", SMALL_BODY),
            ("/v1/server.info", "queue.list", SMALL_BODY),
            ("/v1/queues.overview", "queue.list", SMALL_BODY),
            ("/v1/auth.whoami", "queue.list", SMALL_BODY),
            ("/v1/queue.redrive", "queue.update", SMALL_BODY),
            ("/v1/redrive.list", "queue.stats", SMALL_BODY),
            ("/v1/redrive.get", "queue.stats", SMALL_BODY),
            ("/v1/redrive.cancel", "queue.update", SMALL_BODY),
            ("/v1/rebalance.list", "queue.stats", SMALL_BODY),
            ("/v1/rebalance.get", "queue.stats", SMALL_BODY),
            ("/v1/rebalance.cancel", "queue.update", SMALL_BODY),
            ("/v1/offload.sweep", "queue.clear", SMALL_BODY),
        ];
        assert_eq!(EXTENSION_PATHS.len(), expect.len());
        for (path, perm, limit) in expect {
            assert!(EXTENSION_PATHS.contains(&path), "{path}");
            let r = route(path).unwrap_or_else(|| panic!("{path} is not routed"));
            assert_eq!(r.permission.as_str(), perm, "{path}");
            assert_eq!(r.body_limit, BodyLimit::Fixed(limit), "{path}");
        }
        let start = QueueRedriveRequest {
            dead_queue: "dlq".into(),
            target_queue: "other".into(),
            ..Default::default()
        };
        assert_eq!(QueueRedrive::target(&start), Target::Queue("dlq"));
        let bare = RedriveTaskRequest {
            task_id: "t".into(),
            dead_queue: String::new(),
        };
        assert_eq!(RedriveGet::target(&bare), Target::System);
        assert_eq!(RedriveCancel::target(&bare), Target::System);
        let named = RedriveTaskRequest {
            dead_queue: "dlq".into(),
            ..bare
        };
        assert_eq!(RedriveCancel::target(&named), Target::Queue("dlq"));
        // Querator's declared rebalance route: queue.update on the queue it names.
        let r = route("/v1/queues.rebalance").unwrap_or_else(|| panic!("queues.rebalance is not routed"));
        assert_eq!(r.permission.as_str(), "queue.update");
        let bare = crate::RebalanceTaskRequest {
            task_id: "t".into(),
            queue_name: String::new(),
        };
        assert_eq!(RebalanceGet::target(&bare), Target::System);
        let named = crate::RebalanceTaskRequest {
            queue_name: "q".into(),
            ..bare
        };
        assert_eq!(RebalanceGet::target(&named), Target::Queue("q"));
        // The overview is checked where queues.list is; whoami nowhere.
        let overview = QueuesOverviewRequest {
            namespace: "team-a".into(),
            ..Default::default()
        };
        assert_eq!(QueuesOverview::target(&overview), Target::Namespace("team-a"));
        assert_eq!(AuthWhoami::target(&AuthWhoamiRequest {}), Target::Caller);
        assert_eq!(RebalanceCancel::target(&named), Target::Queue("q"));
        // Sweeping is server-wide, whatever store it names.
        let sweep = OffloadSweepRequest { store: "s3".into() };
        assert_eq!(OffloadSweep::target(&sweep), Target::System);
    }

    #[test]
    fn auth_routes_name_their_target() {
        use crate::{NamespaceInfo, RoleBindingsListRequest, RoleCreateRequest, UsersDeleteRequest};
        let ns = NamespaceInfo {
            name: "team-a".into(),
            ..Default::default()
        };
        // A namespace's own routes are checked in `_system`, not in the namespace they name.
        assert_eq!(NamespacesCreate::target(&ns), Target::System);
        assert_eq!(
            UsersDelete::target(&UsersDeleteRequest::default()),
            Target::System
        );
        let role = RoleCreateRequest {
            namespace: "team-a".into(),
            ..Default::default()
        };
        assert_eq!(RolesCreate::target(&role), Target::Namespace("team-a"));
        assert_eq!(
            RoleBindingsList::target(&RoleBindingsListRequest::default()),
            Target::Namespace("")
        );
    }
}
