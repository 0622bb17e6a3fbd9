//! The storage conformance suite against the log store (partitions in RAM, an append-only log), each case in its
//! own temporary storage-dir, with a fjall queue store beside it as the `log` driver opens them.
#![cfg(feature = "fjall")]

use std::sync::Arc;

use lessor_storage::fjall::{Durability, FjallQueues};
use lessor_storage::log::LogStore;
use lessor_storage::testsuite::TestBackend;

async fn log_backend() -> Option<TestBackend> {
    let dir = tempfile::tempdir().expect("temp dir");
    let partitions = LogStore::open(dir.path(), Durability::Sync).expect("open log store");
    let queues = FjallQueues::open(dir.path(), Durability::Sync).expect("open queue store");
    Some(TestBackend {
        partitions: Arc::new(partitions),
        queues: Arc::new(queues),
        guard: Box::new(dir),
        // The log's lock file keeps a second process out of the directory.
        peer: None,
        private_auth: true,
        offload_threshold: None,
        memory_window: None,
    })
}

lessor_storage::conformance_tests!(log_backend);
