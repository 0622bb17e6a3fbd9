//! Idempotent produce and durability on the fjall backend, through the engine: a duplicate is acknowledged only
//! for an item that is durable.

#![cfg(feature = "fjall")]

use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_storage::fjall::{Durability, Fault, FjallStore};
use lessor_storage::memory::MemoryQueues;

const T: Option<Duration> = Some(Duration::from_secs(5));

fn keyed(key: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(format!("payload of {key}")),
        dedup_id: key.into(),
        ..Default::default()
    }
}

/// The first produce of a key is written but its fsync fails: it gets an error, and so does every retry of the
/// same key afterwards (the key is still claimed in the queue's index, but its item never became durable, and the
/// store stores nothing more until a restart rebuilds the index from the disk). Acknowledging the retry as a
/// duplicate would report stored an item that a crash loses.
#[tokio::test]
async fn a_retry_of_an_item_whose_fsync_failed_is_not_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(FjallStore::open(dir.path(), Durability::Sync).expect("open"));
    let clock = ManualClock::starting_now();
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "disk".into(),
            affinity: 1.0,
            store: store.clone(),
        }],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    engine
        .create_queue(QueueInfo {
            name: "q".into(),
            lease_timeout: Duration::from_secs(60),
            expire_timeout: Duration::from_secs(3600),
            requested_partitions: 1,
            dedup_window: Duration::from_secs(300),
            ..Default::default()
        })
        .await
        .expect("create");
    engine
        .produce("q", vec![keyed("stored")], T)
        .await
        .expect("a durable produce");
    engine
        .produce("q", vec![keyed("stored")], T)
        .await
        .expect("its duplicate is acknowledged");

    store.inject_fault(Some(Fault::SyncFails));
    let first = engine.produce("q", vec![keyed("k")], T).await;
    assert!(first.is_err(), "the fsync failed: {first:?}");
    for _ in 0..3 {
        let retry = engine.produce("q", vec![keyed("k")], T).await;
        assert!(
            retry.is_err(),
            "a retry is not a duplicate of a durable item: {retry:?}"
        );
    }
}
