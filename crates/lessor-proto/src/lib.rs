//! Wire types of the Querator v1 HTTP API, so Lessor speaks to Querator clients unchanged.
//!
//! Every message is a hand-written [`prost::Message`] with the field numbers of Querator's `.proto` files
//! (no protoc, no build script), and carries protojson-compatible `serde` implementations.
//!
//! # JSON rules (protojson)
//! * Output uses each field's `json_name` (`"queue_name"`; `QueueStatsResponse.logicalQueues` has none, so
//!   it is written in lowerCamelCase). Zero values are omitted.
//! * Input accepts the `json_name` and the proto field name (`"queue_name"` or `"queueName"`), treats `null`
//!   as the default, and rejects unknown or repeated fields with an error that names the field.
//! * `bytes` are standard base64 (input also takes URL-safe and unpadded forms); timestamps are RFC 3339
//!   strings in UTC; `int32` accepts a number or a numeric string. Durations are plain Go duration strings
//!   (see [`duration`]).
//!
//! # Layout
//! * [`queue`], [`queues`], [`storage`] — the queue messages, one module per Querator proto file.
//! * [`extensions`] — Lessor's own routes' messages (extend, pause, resume, browse, redrive) and
//!   [`RetryBackoff`]; the extension fields of Querator's messages are numbered from
//!   [`extensions::FIRST_EXTENSION_FIELD`] and omitted when zero.
//! * [`namespaces`], [`users`], [`apikeys`], [`roles`] — the access-control messages (namespaces, users, API keys,
//!   roles and role bindings), likewise.
//! * [`reply`] — the `duh.v1.Reply` envelope and standard code texts.
//! * [`timestamp`] — `google.protobuf.Timestamp`.
//! * [`codec`] — content negotiation and encode/decode of bodies.
//! * [`duration`] — Go duration strings.
//! * [`routes`] — the route table: path, messages, body limit and permission of every RPC, shared by the
//!   server's router and the client.
//!
//! This crate is *not* the HTTP layer: it describes the routes but serves and sends nothing.
//!
//! # Example
//! ```
//! use lessor_proto::{decode, encode, request_encoding, Encoding, QueueLeaseRequest};
//!
//! let enc = request_encoding(Some("application/json; charset=utf-8")).unwrap();
//! let req: QueueLeaseRequest = decode(enc, br#"{"queueName":"orders","batch_size":"10"}"#).unwrap();
//! assert_eq!((req.queue_name.as_str(), req.batch_size), ("orders", 10));
//! assert_eq!(encode(Encoding::Json, &req), br#"{"queue_name":"orders","batch_size":10}"#);
//!
//! let err = decode::<QueueLeaseRequest>(Encoding::Json, br#"{"foo":1}"#).unwrap_err();
//! assert_eq!(err.to_string(), "invalid JSON: unknown field 'foo' at line 1 column 6");
//! ```

#![deny(missing_docs)]

mod json;

pub mod apikeys;
pub mod backup;
pub mod codec;
pub mod duration;
pub mod extensions;
pub mod namespaces;
pub mod querator_keys;
pub mod queue;
pub mod queues;
pub mod reply;
pub mod roles;
pub mod routes;
pub mod storage;
pub mod timestamp;
pub mod users;

pub use apikeys::{
    APIKeyCreateRequest, APIKeyCreateResponse, APIKeyMetadata, APIKeysDeleteRequest, APIKeysListRequest,
    APIKeysListResponse,
};
pub use codec::{decode, encode, repeated_values, request_encoding, response_encoding, CodecError, Encoding};
pub use extensions::{
    AuthWhoamiRequest, AuthWhoamiResponse, NamespacePermissions, QueueOverview, QueuesOverviewRequest,
    QueuesOverviewResponse,
};
pub use extensions::{
    BrowseItem, HistorySample, PartitionMove, QueueBrowseRequest, QueueBrowseResponse, QueueExtendRequest,
    QueueHistoryRequest, QueueHistoryResponse, QueuePauseRequest, QueueRebalanceRequest, QueueRedriveRequest,
    QueueResumeRequest, RebalanceListRequest, RebalanceListResponse, RebalanceTask, RebalanceTaskRequest,
    RedriveListRequest, RedriveListResponse, RedriveTask, RedriveTaskRequest, RestoreBeginRequest,
    RestoreBeginResponse, RestoreFinishRequest, RestoreImportRequest, RestoreImportResponse, RetryBackoff,
    ServerInfoRequest, ServerInfoResponse, StorageBackupRequest, StoreSummary,
};
pub use extensions::{OffloadSweepRequest, OffloadSweepResponse, OffloadSweepStore};
pub use namespaces::{NamespaceInfo, NamespacesDeleteRequest, NamespacesListRequest, NamespacesListResponse};
pub use queue::{
    PartitionInfo, QueueClearRequest, QueueCompleteRequest, QueueInfo, QueueLeaseItem, QueueLeaseRequest,
    QueueLeaseResponse, QueueLogicalStats, QueuePartitionStats, QueueProduceItem, QueueProduceRequest,
    QueueReloadRequest, QueueRetryItem, QueueRetryRequest, QueueStatsRequest, QueueStatsResponse,
    QueueTierStats,
};
pub use queues::{QueuesDeleteRequest, QueuesInfoRequest, QueuesListRequest, QueuesListResponse};
pub use reply::{code_text, Reply};
pub use roles::{
    Role, RoleBinding, RoleBindingCreateRequest, RoleBindingCreateResponse, RoleBindingDeleteRequest,
    RoleBindingsListRequest, RoleBindingsListResponse, RoleCreateRequest, RoleCreateResponse,
    RoleUpdateRequest, RolesDeleteRequest, RolesListRequest, RolesListResponse,
};
pub use routes::{Rpc, ROUTES};
pub use storage::{
    StorageItem, StorageItemsDeleteRequest, StorageItemsImportRequest, StorageItemsImportResponse,
    StorageItemsListRequest, StorageItemsListResponse,
};
pub use timestamp::Timestamp;
pub use users::{
    User, UserCreateRequest, UserCreateResponse, UsersDeleteRequest, UsersListRequest, UsersListResponse,
};
