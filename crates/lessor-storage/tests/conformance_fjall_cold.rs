//! The storage conformance suite against the fjall backend with a memory window of 3 ready items and cold
//! segments on a real S3-compatible server (`LESSOR_TEST_S3_ENDPOINT`) with a depth of 4 and segments of 2 items,
//! so the backlog of most cases goes cold on every lifecycle call and comes back: segments must not change any
//! rule of the contract.
#![cfg(all(feature = "fjall", feature = "s3"))]

use std::sync::Arc;

use lessor_storage::fjall::{Durability, FjallQueues, FjallStore};
use lessor_storage::offload::ObjectStoreConfig;
use lessor_storage::registry::ColdSettings;
use lessor_storage::testsuite::TestBackend;

const BUCKET: &str = "lessor-cold-conformance";

async fn fjall_cold() -> Option<TestBackend> {
    let endpoint = lessor_testkit::s3::bucket(BUCKET).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = tempfile::tempdir().expect("temp dir");
    let partitions = FjallStore::open(dir.path(), Durability::None).expect("open partition store");
    partitions.set_memory_window(3);
    partitions
        .set_cold(
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
            "disk-0",
        )
        .expect("cold segments");
    partitions.set_cold_eager(true);
    let queues = FjallQueues::open(dir.path(), Durability::None).expect("open queue store");
    Some(TestBackend {
        partitions: Arc::new(partitions),
        queues: Arc::new(queues),
        guard: Box::new(dir),
        peer: None,
        private_auth: true,
        offload_threshold: None,
        memory_window: Some(3),
    })
}

lessor_storage::conformance_tests!(fjall_cold);
