//! The storage conformance suite against the memory backend.

use std::sync::Arc;

use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_storage::testsuite::TestBackend;

async fn memory() -> Option<TestBackend> {
    Some(TestBackend {
        partitions: Arc::new(MemoryStore::new()),
        queues: Arc::new(MemoryQueues::new()),
        guard: Box::new(()),
    })
}

lessor_storage::conformance_tests!(memory);
