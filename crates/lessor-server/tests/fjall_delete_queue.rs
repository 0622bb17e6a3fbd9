//! Deleting a queue on fjall: a destroy that does not reach the disk fails the delete and keeps the queue, so a
//! queue created later under the same name never serves the deleted queue's items (it used to: the definition was
//! deleted first, and a failed destroy was only logged).

#![cfg(feature = "fjall")]

use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::storage::QueuesStore;
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_storage::fjall::{Durability, Fault, FjallStore};
use lessor_storage::memory::MemoryQueues;

const T: Option<Duration> = Some(Duration::from_secs(5));

fn info() -> QueueInfo {
    QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        ..Default::default()
    }
}

fn engine(queues: Arc<dyn QueuesStore>, store: Arc<FjallStore>) -> Engine {
    Engine::new(EngineConfig {
        queues,
        stores: vec![NamedStore {
            name: "disk".into(),
            affinity: 1.0,
            store,
        }],
        limits: Limits::default(),
        clock: Arc::new(ManualClock::starting_now()),
    })
    .expect("engine")
}

fn item(p: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(p.to_string()),
        ..Default::default()
    }
}

/// The destroy write fails (disk full): the delete fails and the queue stays, with its item; once the disk has
/// room, the delete succeeds, and a queue created again under the name is empty.
#[tokio::test]
async fn a_delete_whose_destroy_fails_keeps_the_queue_and_a_new_queue_is_empty() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(FjallStore::open(dir.path(), Durability::Sync).expect("open"));
    let e = engine(Arc::new(MemoryQueues::new()), store.clone());
    e.create_queue(info()).await.expect("create");
    e.produce("q", vec![item("old item")], T).await.expect("produce");

    store.inject_fault(Some(Fault::NoSpace));
    assert!(
        e.delete_queue("q").await.is_err(),
        "a destroy that failed fails the delete"
    );
    assert!(e.queue_info("q").await.is_ok(), "the queue is still defined");
    store.inject_fault(None);
    // The store reopens for writes after its backoff (a second, on the real clock): retry the delete until then.
    let mut deleted = false;
    for _ in 0..50 {
        if e.delete_queue("q").await.is_ok() {
            deleted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(deleted, "the delete succeeds once the disk has room");
    assert!(e.queue_info("q").await.is_err(), "the queue is gone");

    e.create_queue(info()).await.expect("create again");
    e.produce("q", vec![item("new item")], T).await.expect("produce");
    let got = e.lease("q", 10, "c", T).await.expect("lease");
    let texts: Vec<_> = got.items.iter().map(|i| i.payload.clone()).collect();
    assert_eq!(
        texts,
        [bytes::Bytes::from("new item")],
        "the new queue serves only its own item"
    );
}
