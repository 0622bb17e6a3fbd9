//! The storage conformance suite against PostgreSQL partitions behind the offload wrapper: payloads longer than 8
//! bytes go to a real S3-compatible server (`LESSOR_TEST_S3_ENDPOINT`), shorter ones are lz4-compressed inline when
//! that shrinks them. Needs `LESSOR_TEST_DATABASE_URL` too; cases share the database, each with its own queues.
#![cfg(all(feature = "s3", feature = "postgres"))]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lessor_storage::offload::{Compression, ObjectStoreConfig, OffloadSettings, OffloadStore};
use lessor_storage::postgres::{PgConfig, PgQueues, PgStore};
use lessor_storage::testsuite::TestBackend;

const BUCKET: &str = "lessor-conformance-pg";

/// A pool per case (pooled connections live on the runtime that opened them).
fn unique_url(base: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "lessor-offload-{}-{}",
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

async fn offload_pg_backend() -> Option<TestBackend> {
    let url = lessor_testkit::database_or_skip()?;
    let endpoint = lessor_testkit::s3::bucket(BUCKET).await?;
    let cfg = PgConfig::new(unique_url(&url)).with_max_conns(4);
    let peer = PgConfig::new(unique_url(&url)).with_max_conns(4);
    let settings = OffloadSettings {
        object_store: Some(ObjectStoreConfig {
            name: "s3-0".into(),
            endpoint,
            bucket: BUCKET.into(),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            path_style: true,
            prefix: format!("pg-{}/", std::process::id()),
            ..Default::default()
        }),
        threshold: 8,
        compression: Compression::Lz4,
        ..Default::default()
    };
    let inner = PgStore::new(&cfg).expect("postgres partition store");
    Some(TestBackend {
        partitions: OffloadStore::new(Arc::new(inner), "pg-0", settings).expect("wrap"),
        queues: Arc::new(PgQueues::new(&cfg).expect("postgres queue store")),
        guard: Box::new(()),
        peer: Some(Arc::new(PgQueues::new(&peer).expect("postgres queue store"))),
        private_auth: false,
        offload_threshold: Some(8),
        memory_window: None,
    })
}

lessor_storage::conformance_tests!(offload_pg_backend);
