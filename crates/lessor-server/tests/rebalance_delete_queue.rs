//! A queue deleted while a rebalance moves one of its partitions, then created again under the same name: the new
//! queue starts empty, keeps the placement it was created with, and the old task fails instead of carrying its
//! move out on the new queue. The move's destination (a partition of the same queue and number in another store,
//! holding the items moved so far) is destroyed with the queue: the stores reuse a partition that exists, so a new
//! queue placed there, or a stale move finished into it, served the old queue's items. The delete's write of the
//! failed task and a progress save of the move's watcher are serialised: neither undoes the other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lessor_core::engine::{
    BrowseRequest, BrowseState, Engine, EngineConfig, NamedStore, PartitionMove, ProduceItem,
    RebalanceRequest, RebalanceStatus, RebalanceTask,
};
use lessor_core::error::StorageError;
use lessor_core::storage::PartitionStore;
use lessor_core::time::{ManualClock, SystemClock};
use lessor_core::types::{Item, Limits, PartitionInfo, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::eventually::poll_until;
use lessor_testkit::hooked::{Call, Gate, Hook, HookedQueues, Op};

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

/// A write of a rebalance task record (the table under tag 'P').
fn task_write(c: &Call) -> bool {
    c.op == Op::AuthCommit && c.touches_table(b'P')
}

/// Stops a chosen write of a rebalance task record at `gate`, and counts the ones written.
struct TaskWrites {
    gate: Arc<Gate>,
    written: AtomicUsize,
}

#[async_trait]
impl Hook for TaskWrites {
    async fn before(&self, call: &Call) -> Result<(), StorageError> {
        self.gate.before(call).await
    }

    async fn after(&self, call: &Call) {
        if task_write(call) {
            self.written.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The delete marks the task failed while the watcher saves its progress: the watcher loaded the record (still
/// running) under the task lock and is about to write it back. Written without that lock, the failed status was
/// overwritten by the watcher's copy, and the task of the deleted queue read "running" again (until the watcher's
/// next poll noticed the queue was gone): a queue created again under the name could not be rebalanced, nor its
/// partition count changed, meanwhile. The clock is a manual one, so that next poll never comes here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_save_racing_the_delete_does_not_put_the_task_back_to_running() {
    let clock = ManualClock::starting_now();
    let hook = Arc::new(TaskWrites {
        gate: Gate::on(task_write),
        written: AtomicUsize::new(0),
    });
    let stores: Vec<(&str, f64, Arc<dyn PartitionStore>)> = vec![
        ("a", 1.0, Arc::new(MemoryStore::new())),
        ("b", 0.0, Arc::new(MemoryStore::new())),
    ];
    let e = Engine::new(EngineConfig {
        queues: Arc::new(HookedQueues::new(Arc::new(MemoryQueues::new()), hook.clone())),
        stores: stores
            .into_iter()
            .map(|(name, affinity, store)| NamedStore {
                name: name.into(),
                affinity,
                store,
            })
            .collect(),
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    // Partition 0, which the move empties, gets 1200 items (the queue has one partition while they are
    // produced). Paced at one item a second on a clock that does not move, the move does not get past its first
    // chunk (500 items): the task is running at every save this test makes.
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
    // The start's own write passes; the watcher's first progress save stops at the gate, holding the task lock,
    // with the record it loaded (running) in hand.
    hook.gate.arm(1);
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
    hook.gate.reached().await;
    let e2 = e.clone();
    let mut delete = tokio::spawn(async move { e2.delete_queue("q").await });
    // Without the task lock the delete finishes here, its failed record written before the watcher's save. Taking
    // the lock, it cannot finish before the watcher's save is let go: the wait ends at its deadline then, and the
    // order of the two writes no longer depends on when the save is let go.
    let finished = tokio::time::timeout(Duration::from_secs(3), &mut delete).await;
    hook.gate.release();
    match finished {
        Ok(r) => r.expect("delete task").expect("delete"),
        Err(_) => delete.await.expect("delete task").expect("delete"),
    }
    // The start's write, the watcher's and the delete's.
    poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
        match hook.written.load(Ordering::SeqCst) {
            n if n >= 3 => Ok(()),
            n => Err(format!("{n} task writes done")),
        }
    })
    .await
    .expect("both writes are done");
    let t = e.rebalance_get(&task.id).await.expect("task");
    assert_eq!(
        t.status,
        RebalanceStatus::Failed,
        "the deleted queue's task reads as running again: the watcher's progress save undid the delete's: {t:?}"
    );
    e.shutdown().await;
}

/// A queue deleted after a move switched its partition (the new placement is stored) but before the old partition
/// was destroyed (the watcher's destroy failed, and is retried; a delete can also come between the two writes): the
/// delete destroys the stored placement and the move's destination, and it left the old partition in `a`, with
/// the dedup records it kept. A queue created again under the name with its partition 0 in `a` reopened it, and
/// producing one of those keys was answered as a duplicate and stored nothing: the item was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_before_the_old_partition_is_destroyed_leaves_no_dedup_key_behind() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fail = failing.clone();
    // Store 'a' refuses the watcher's destroys until the delete's own destroy of the queue's partitions (one call
    // per store) reaches it: from there it works again, so the delete goes through.
    let hook = lessor_testkit::hooked::before(move |c| {
        if c.op == Op::DestroyMany {
            fail.store(false, Ordering::SeqCst);
        }
        if c.op == Op::Destroy && fail.load(Ordering::SeqCst) {
            Err(StorageError::other("injected: store 'a' refused the destroy"))
        } else {
            Ok(())
        }
    });
    let stores: Vec<(&str, f64, Arc<dyn PartitionStore>)> = vec![
        (
            "a",
            1.0,
            Arc::new(lessor_testkit::hooked::HookedStore::new(
                Arc::new(MemoryStore::new()),
                hook,
            )),
        ),
        ("b", 0.0, Arc::new(MemoryStore::new())),
    ];
    let e = Engine::new(EngineConfig {
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
    .expect("engine");
    let keyed = |key: &str| ProduceItem {
        payload: bytes::Bytes::from(format!("payload of {key}")),
        dedup_id: key.to_string(),
        ..Default::default()
    };
    let keys = ["k1", "k2", "k3"];
    let mut q = queue(1);
    q.dedup_window = Duration::from_secs(3600);
    e.create_queue(q.clone()).await.expect("create");
    e.produce("q", keys.iter().map(|k| keyed(k)).collect(), T)
        .await
        .expect("produce");
    e.update_queue(lessor_core::engine::QueueUpdate {
        name: "q".into(),
        requested_partitions: Some(2),
        ..Default::default()
    })
    .await
    .expect("grow");
    failing.store(true, Ordering::SeqCst);
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            moves: vec![PartitionMove {
                partition: 0,
                to_store: "b".into(),
            }],
            ..Default::default()
        })
        .await
        .expect("start");
    // The partition is switched and the placement stored; the old partition's destroy fails, so the task waits.
    let e2 = e.clone();
    poll_until(Duration::from_secs(30), Duration::from_millis(20), move || {
        let e = e2.clone();
        async move {
            let info = e.queue_info("q").await.map_err(|e| e.to_string())?;
            if info.partitions[0].storage_name == "b" {
                Ok(())
            } else {
                Err("partition 0 not switched yet".to_string())
            }
        }
    })
    .await
    .expect("the placement is stored");
    let t = e.rebalance_get(&task.id).await.expect("task");
    assert_eq!(t.status, RebalanceStatus::Running, "{t:?}");
    e.delete_queue("q").await.expect("delete");
    // Created again, placed as queues are (both partitions in `a`).
    let mut again = queue(2);
    again.dedup_window = Duration::from_secs(3600);
    e.create_queue(again).await.expect("create again");
    e.produce("q", keys.iter().map(|k| keyed(k)).collect(), T)
        .await
        .expect("produce into the new queue");
    let stored = items_of(&e, 0).await.len() + items_of(&e, 1).await.len();
    assert_eq!(
        stored,
        keys.len(),
        "the new queue took the deleted queue's dedup keys for its own: its produce stored {stored} of {} items",
        keys.len()
    );
    let done = wait_done(&e, &task.id).await;
    assert_eq!(done.status, RebalanceStatus::Failed, "{done:?}");
    e.shutdown().await;
}
