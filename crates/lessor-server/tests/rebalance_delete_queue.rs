//! A queue deleted while a rebalance moves one of its partitions, then created again under the same name: the new
//! queue starts empty, keeps the placement it was created with, and the old task fails instead of carrying its
//! move out on the new queue. The move's destination (a partition of the same queue and number in another store,
//! holding the items moved so far) is destroyed with the queue: the stores reuse a partition that exists, so a new
//! queue placed there, or a stale move finished into it, served the old queue's items.

use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{
    BrowseRequest, BrowseState, Engine, EngineConfig, NamedStore, PartitionMove, ProduceItem,
    RebalanceRequest, RebalanceStatus, RebalanceTask,
};
use lessor_core::storage::PartitionStore;
use lessor_core::time::SystemClock;
use lessor_core::types::{Item, Limits, PartitionInfo, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::eventually::poll_until;

const T: Option<Duration> = Some(Duration::from_secs(5));

/// Two memory stores: `a` (where queues are placed) and `b` (affinity 0: only moves put partitions there).
fn engine() -> Engine {
    let stores: Vec<(&str, f64, Arc<dyn PartitionStore>)> = vec![
        ("a", 1.0, Arc::new(MemoryStore::new())),
        ("b", 0.0, Arc::new(MemoryStore::new())),
    ];
    Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: stores
            .into_iter()
            .map(|(name, affinity, store)| NamedStore {
                name: name.into(),
                affinity,
                store,
            })
            .collect(),
        limits: Limits::default(),
        clock: Arc::new(SystemClock),
    })
    .expect("engine")
}

fn queue(partitions: u32) -> QueueInfo {
    QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: partitions,
        ..Default::default()
    }
}

async fn items_of(e: &Engine, partition: u32) -> Vec<Item> {
    let mut out = Vec::new();
    for state in [BrowseState::Queued, BrowseState::Scheduled] {
        let mut pivot = None;
        loop {
            let page = e
                .browse(
                    "q",
                    BrowseRequest {
                        partition,
                        state,
                        priority: None,
                        pivot,
                        limit: 1000,
                    },
                )
                .await
                .expect("browse");
            out.extend(page.items.into_iter().map(|b| b.item));
            match page.next_pivot {
                Some(p) => pivot = Some(p),
                None => break,
            }
        }
    }
    out
}

async fn wait_done(e: &Engine, id: &str) -> RebalanceTask {
    let e2 = e.clone();
    let id = id.to_string();
    poll_until(Duration::from_secs(30), Duration::from_millis(50), move || {
        let e = e2.clone();
        let id = id.clone();
        async move {
            let t = e.rebalance_get(&id).await.map_err(|e| e.to_string())?;
            match t.status {
                RebalanceStatus::Running | RebalanceStatus::Cancelling => {
                    Err(format!("still running: {t:?}"))
                }
                _ => Ok(t),
            }
        }
    })
    .await
    .expect("rebalance finishes")
}

/// Queue `q` with 1200 items in partition 0 and an empty partition 1, and a move of partition 0 to `b` paced at
/// one item a second: its first chunk (500 items) is in `b`, then it waits for minutes. Returns the task.
async fn move_under_way(e: &Engine) -> RebalanceTask {
    e.create_queue(queue(1)).await.expect("create");
    for c in 0..12 {
        let items: Vec<ProduceItem> = (0..100)
            .map(|i| ProduceItem {
                payload: bytes::Bytes::from(format!("old{:05}", c * 100 + i)),
                ..Default::default()
            })
            .collect();
        e.produce("q", items, T).await.expect("produce");
    }
    e.update_queue(lessor_core::engine::QueueUpdate {
        name: "q".into(),
        requested_partitions: Some(2),
        ..Default::default()
    })
    .await
    .expect("grow");
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            moves: vec![PartitionMove {
                partition: 0,
                to_store: "b".into(),
            }],
            max_items_per_sec: 1,
            ..Default::default()
        })
        .await
        .expect("start");
    let e2 = e.clone();
    let id = task.id.clone();
    poll_until(Duration::from_secs(30), Duration::from_millis(20), move || {
        let e = e2.clone();
        let id = id.clone();
        async move {
            let t = e.rebalance_get(&id).await.map_err(|e| e.to_string())?;
            if t.moved > 0 {
                Ok(())
            } else {
                Err(format!("nothing moved yet: {t:?}"))
            }
        }
    })
    .await
    .expect("the first chunk moves");
    let t = e.rebalance_get(&task.id).await.expect("task");
    assert_eq!(t.status, RebalanceStatus::Running, "{t:?}");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_created_again_during_a_move_does_not_get_the_old_move() {
    let e = engine();
    let task = move_under_way(&e).await;
    e.delete_queue("q").await.expect("delete");
    // Created again at once (before the watcher's next poll), placed as before: both partitions in `a`.
    e.create_queue(queue(2)).await.expect("create again");
    let done = wait_done(&e, &task.id).await;
    let info = e.queue_info("q").await.expect("info");
    let stores: Vec<&str> = info.partitions.iter().map(|p| p.storage_name.as_str()).collect();
    assert_eq!(stores, ["a", "a"], "the new queue keeps its placement");
    for p in 0..2 {
        let left = items_of(&e, p).await;
        assert!(
            left.is_empty(),
            "the new queue's partition {p} serves {} items of the deleted queue",
            left.len()
        );
    }
    assert_eq!(done.status, RebalanceStatus::Failed, "{done:?}");
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_created_again_in_the_old_moves_destination_starts_empty() {
    let e = engine();
    let task = move_under_way(&e).await;
    e.delete_queue("q").await.expect("delete");
    // Created again at once, with partition 0 where the deleted queue's move was putting it.
    let mut again = queue(2);
    again.partitions = vec![
        PartitionInfo {
            partition: 0,
            storage_name: "b".into(),
            read_only: false,
        },
        PartitionInfo {
            partition: 1,
            storage_name: "a".into(),
            read_only: false,
        },
    ];
    e.create_queue(again).await.expect("create again");
    for p in 0..2 {
        let left = items_of(&e, p).await;
        assert!(
            left.is_empty(),
            "the new queue's partition {p} serves {} items of the deleted queue",
            left.len()
        );
    }
    let done = wait_done(&e, &task.id).await;
    assert_eq!(done.status, RebalanceStatus::Failed, "{done:?}");
    e.shutdown().await;
}
