//! The storage conformance suite against the fjall backend with a memory window of 3 ready items per partition,
//! so nearly every case pages items out and back in (see `lessor_storage::state::paging`): paging must not change
//! any rule of the contract.
#![cfg(feature = "fjall")]

use std::sync::Arc;

use lessor_storage::fjall::{Durability, FjallQueues, FjallStore};
use lessor_storage::testsuite::TestBackend;

async fn fjall_paged() -> Option<TestBackend> {
    let dir = tempfile::tempdir().expect("temp dir");
    let partitions = FjallStore::open(dir.path(), Durability::None).expect("open partition store");
    partitions.set_memory_window(3);
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

lessor_storage::conformance_tests!(fjall_paged);
