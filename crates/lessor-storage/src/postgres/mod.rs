//! The PostgreSQL backend: queue definitions ([`PgQueues`]) and partitions ([`PgStore`]) in a database that several
//! Lessor servers may share.
//!
//! Configuration is a [`PgConfig`] (`connection-string`, `max-conns`). Stores that name the same connection string
//! share one connection pool. Nothing connects until the first call, so a server starts while its database is down;
//! calls then fail with [`StorageErrorKind::Unavailable`](lessor_core::error::StorageErrorKind::Unavailable) until it
//! is back (the engine keeps such partitions marked failed and probes them again).
//!
//! # Layout
//! - `pool`: configuration, the process-wide pool registry, error mapping and the pipelined transaction helper.
//! - `schema`: versioned migrations under an advisory lock, item table naming and DDL.
//! - `queues`: [`PgQueues`].
//! - `auth`: [`PgAuth`], users, keys, roles and bindings shared by every server on the database.
//! - `partition`: [`PgStore`] and [`PgPartition`], the item state machine in SQL.
//! - `sql`: the statement texts of one partition.
//! - `dedup`: the keyed 128-bit hash that dedup records are stored under.
//! - [`tls`]: `sslmode`/`sslrootcert` of the connection string and the rustls connector.
//!
//! # Sharing a database between servers
//! Each call locks the rows it decides on in the statement that decides (`FOR UPDATE`, `SKIP LOCKED` where any due
//! row will do), so two servers never lease one item twice and never apply one lifecycle action twice. Ids come from
//! a per-table sequence, so they are unique across servers and only grow; items produced at the same time by two
//! servers may become visible slightly out of id order (a later id can commit first), which FIFO tolerates.
//!
//! # TLS
//! `sslmode=disable|prefer|require|verify-ca|verify-full` and `sslrootcert=<file>` in the connection string, with
//! libpq's meanings (see [`tls`]).
//!
//! Tables live in the first schema of the connection's `search_path`; to use another schema, set it in the
//! connection string (`options=-csearch_path%3Dmyschema`).

mod auth;
mod dedup;
mod notify;
mod partition;
mod pool;
mod queues;
mod schema;
mod sql;
pub mod tls;

pub use auth::PgAuth;
pub use partition::{PgPartition, PgStore, MAX_PARTITIONS};
pub use pool::PgConfig;
pub use queues::PgQueues;
pub use schema::{incarnation_table_name, migrations_up_to, table_name, PARTITION_LAYOUT, SCHEMA_VERSION};
