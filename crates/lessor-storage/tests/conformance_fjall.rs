//! The storage conformance suite against the fjall backend, each case in its own temporary storage-dir.
#![cfg(feature = "fjall")]

use std::sync::Arc;

use lessor_storage::fjall::{Durability, FjallQueues, FjallStore};
use lessor_storage::testsuite::TestBackend;

async fn fjall_backend() -> Option<TestBackend> {
    let dir = tempfile::tempdir().expect("temp dir");
    // Queues and partitions share one storage-dir, as in the default configuration.
    let partitions = FjallStore::open(dir.path(), Durability::Sync).expect("open partition store");
    let queues = FjallQueues::open(dir.path(), Durability::Sync).expect("open queue store");
    Some(TestBackend {
        partitions: Arc::new(partitions),
        queues: Arc::new(queues),
        guard: Box::new(dir),
        // fjall's lock file keeps a second handle (another process) out of the directory.
        peer: None,
        private_auth: true,
        offload_threshold: None,
        memory_window: None,
    })
}

lessor_storage::conformance_tests!(fjall_backend);
