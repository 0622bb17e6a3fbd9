//! The storage conformance suite against the offload wrapper: fjall partitions whose payloads longer than 8 bytes
//! go to a real S3-compatible server (`LESSOR_TEST_S3_ENDPOINT`, started by `scripts/s3-test-server.sh`) and whose
//! inline payloads are zstd-compressed. The wrapper must be invisible: every case passes as on the bare store.
#![cfg(all(feature = "s3", feature = "fjall"))]

use std::sync::Arc;

use lessor_storage::fjall::{Durability, FjallQueues, FjallStore};
use lessor_storage::offload::{Compression, ObjectStoreConfig, OffloadSettings, OffloadStore};
use lessor_storage::testsuite::TestBackend;

const BUCKET: &str = "lessor-conformance";

async fn offload_backend() -> Option<TestBackend> {
    let endpoint = lessor_testkit::s3::bucket(BUCKET).await?;
    let dir = tempfile::tempdir().expect("temp dir");
    let inner = FjallStore::open(dir.path(), Durability::Sync).expect("open partition store");
    let queues = FjallQueues::open(dir.path(), Durability::Sync).expect("open queue store");
    let mut unique = [0u8; 8];
    time_and_pid(&mut unique);
    let settings = OffloadSettings {
        object_store: Some(ObjectStoreConfig {
            name: "s3-0".into(),
            endpoint,
            bucket: BUCKET.into(),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            path_style: true,
            prefix: format!("conf-{}/", u64::from_le_bytes(unique)),
            ..Default::default()
        }),
        threshold: 8,
        compression: Compression::Zstd,
        ..Default::default()
    };
    let store = OffloadStore::new(Arc::new(inner), "disk-0", settings).expect("wrap");
    Some(TestBackend {
        partitions: store,
        queues: Arc::new(queues),
        guard: Box::new(dir),
        peer: None,
        private_auth: true,
        offload_threshold: Some(8),
        memory_window: None,
    })
}

fn time_and_pid(b: &mut [u8]) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64;
    b.copy_from_slice(&(t ^ u64::from(std::process::id())).to_le_bytes());
}

lessor_storage::conformance_tests!(offload_backend);
