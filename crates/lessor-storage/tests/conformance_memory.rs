//! The storage conformance suite against the memory backend.

use std::sync::Arc;

use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_storage::testsuite::TestBackend;

async fn memory() -> Option<TestBackend> {
    let queues: Arc<MemoryQueues> = Arc::new(MemoryQueues::new());
    Some(TestBackend {
        partitions: Arc::new(MemoryStore::new()),
        // Another handle on the same store: what a second server would share, as far as RAM can be shared.
        peer: Some(queues.clone()),
        queues,
        guard: Box::new(()),
        private_auth: true,
        offload_threshold: None,
        memory_window: None,
    })
}

lessor_storage::conformance_tests!(memory);
