//! The storage conformance suite against the memory backend with cold segments on a real S3-compatible server
//! (`LESSOR_TEST_S3_ENDPOINT`): a window and cold depth of 4 and segments of 2 items in eager mode, so the backlog
//! of most cases goes to segments on every call and comes back: segments must not change any rule of the
//! contract.
#![cfg(feature = "s3")]

use std::sync::Arc;

use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_storage::offload::ObjectStoreConfig;
use lessor_storage::registry::ColdSettings;
use lessor_storage::testsuite::TestBackend;

const BUCKET: &str = "lessor-memcold-conformance";

async fn memory_cold() -> Option<TestBackend> {
    let endpoint = lessor_testkit::s3::bucket(BUCKET).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let partitions = MemoryStore::with_cold(
        ColdSettings {
            object_store: ObjectStoreConfig {
                name: "s3-0".into(),
                endpoint,
                bucket: BUCKET.into(),
                access_key_id: Some("test".into()),
                secret_access_key: Some("test".into()),
                path_style: true,
                prefix: format!("conf-{nanos}/"),
                ..Default::default()
            },
            after_depth: 4,
            segment_items: 2,
            segment_bytes: 1 << 20,
            prefetch_items: 1,
        },
        "mem-0",
    )
    .await
    .expect("cold segments");
    partitions.set_cold_eager(true);
    let queues: Arc<MemoryQueues> = Arc::new(MemoryQueues::new());
    Some(TestBackend {
        partitions: Arc::new(partitions),
        peer: Some(queues.clone()),
        queues,
        guard: Box::new(()),
        private_auth: true,
        offload_threshold: None,
        memory_window: None,
    })
}

lessor_storage::conformance_tests!(memory_cold);
