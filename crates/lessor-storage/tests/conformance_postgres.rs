//! The storage conformance suite against PostgreSQL.
//!
//! Needs a database: `eval "$(scripts/pg-test-cluster.sh start)"` sets `LESSOR_TEST_DATABASE_URL`. Without it every
//! case is skipped (and says so), or fails when `CI` is set. Cases share the database; each uses its own queue names.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lessor_storage::postgres::{PgConfig, PgQueues, PgStore};
use lessor_storage::testsuite::TestBackend;

/// The test database's URL with a per-call `application_name`.
///
/// Every `#[tokio::test]` runs its own runtime, and a pooled connection lives on the runtime that opened it, so
/// cases must not share a pool: stores share pools by connection string, and the distinct name keeps them apart.
fn unique_url(base: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "lessor-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    if base.contains("://") {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}application_name={name}")
    } else {
        format!("{base} application_name={name}")
    }
}

async fn pg_backend() -> Option<TestBackend> {
    let url = lessor_testkit::database_or_skip()?;
    Some(backend_on(&url, Box::new(()), false))
}

/// Stores on the database at `url`, with a peer queue store on a pool of its own (another server).
fn backend_on(url: &str, guard: Box<dyn std::any::Any + Send>, private_auth: bool) -> TestBackend {
    let cfg = PgConfig::new(unique_url(url)).with_max_conns(4);
    let peer = PgConfig::new(unique_url(url)).with_max_conns(4);
    TestBackend {
        partitions: Arc::new(PgStore::new(&cfg).expect("postgres partition store")),
        queues: Arc::new(PgQueues::new(&cfg).expect("postgres queue store")),
        guard,
        peer: Some(Arc::new(PgQueues::new(&peer).expect("postgres queue store"))),
        private_auth,
        offload_threshold: None,
        memory_window: None,
    }
}

lessor_storage::conformance_tests!(pg_backend);

/// Every case above shares one database, so the one-time bootstrap (the `admin` user) and exact generations are
/// asserted here, on databases of their own.
mod fresh_database {
    use super::*;

    async fn fresh() -> Option<(TestBackend, lessor_testkit::TestDatabase)> {
        lessor_testkit::database_or_skip()?;
        let db = lessor_testkit::TestDatabase::create("lessor_auth").await;
        Some((backend_on(db.url(), Box::new(()), true), db))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auth_service_bootstrap_on_a_fresh_database() {
        let Some((b, _db)) = fresh().await else { return };
        lessor_storage::testsuite::auth::auth_service_bootstrap(b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auth_kv_commit_is_atomic_on_a_fresh_database() {
        let Some((b, _db)) = fresh().await else { return };
        lessor_storage::testsuite::auth::auth_kv_commit_is_atomic(b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auth_kv_generation_is_shared_on_a_fresh_database() {
        let Some((b, _db)) = fresh().await else { return };
        lessor_storage::testsuite::auth::auth_kv_generation_is_shared(b).await;
    }
}
