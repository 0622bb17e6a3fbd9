//! Lessor's core: the types every other layer speaks, the storage traits backends implement, and the queue
//! engine that drives them.
//!
//! It is not: a transport (see `lessor-server`), a storage backend (see `lessor-storage`), or a wire format
//! (see `lessor-proto`). Nothing here touches a socket or a file; backends are reached only through the traits
//! in [`storage`].
//!
//! # Layout
//! - [`time`]: timestamps and the injectable [`time::Clock`] (tests advance time instead of sleeping).
//! - [`types`]: items, item ids, queue definitions, partition placement, limits.
//! - [`error`]: [`error::StorageError`] (backends) and [`error::QueueError`] (engine, mapped to wire codes by the
//!   server in one place).
//! - [`storage`]: the [`storage::QueuesStore`], [`storage::PartitionStore`] and [`storage::Partition`] traits and
//!   their contracts.
//! - [`durability`]: deferred durability, so that a queue task's passes overlap the fsyncs of the ones before.
//! - [`auth`]: namespaces, users, API keys, roles and bindings; authentication and authorisation.
//! - [`shrink`]: giving back the room of maps and queues that have emptied.
//! - [`engine`]: the queue manager and the one task per queue that batches concurrent requests into one storage
//!   call per partition per kind.

pub mod auth;
pub mod durability;
pub mod engine;
pub mod error;
pub mod shrink;
pub mod storage;
pub mod time;
pub mod types;
pub mod validate;
