//! Online rebalance through the engine (`queues.rebalance`): moving a partition to another store and shrinking a
//! queue while items are in every state (ready at several priorities, leased, scheduled, with dedup keys), with
//! leases in flight completed during the move; bad requests get 400s naming the field; a move interrupted by a
//! restart (fjall) resumes and finishes with nothing lost or doubled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{
    BrowseRequest, BrowseState, Engine, EngineConfig, NamedStore, PartitionMove, ProduceItem,
    RebalanceRequest, RebalanceStatus, RebalanceTask,
};
use lessor_core::error::{QueueError, StorageError};
use lessor_core::storage::{PartitionStore, QueuesStore};
use lessor_core::time::{SystemClock, Ts};
use lessor_core::types::{Item, Limits, QueueInfo, RetryItem};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::eventually::poll_until;
use lessor_testkit::hooked::{before, HookedStore, Op};

const T: Option<Duration> = Some(Duration::from_secs(5));

fn engine_on(queues: Arc<dyn QueuesStore>, stores: Vec<(&str, f64, Arc<dyn PartitionStore>)>) -> Engine {
    Engine::new(EngineConfig {
        queues,
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

/// Two memory stores: `a` (where queues are placed) and `b` (affinity 0: only moves put partitions there).
fn engine() -> Engine {
    engine_on(
        Arc::new(MemoryQueues::new()),
        vec![
            ("a", 1.0, Arc::new(MemoryStore::new())),
            ("b", 0.0, Arc::new(MemoryStore::new())),
        ],
    )
}

fn queue(name: &str, partitions: u32, lease: Duration) -> QueueInfo {
    QueueInfo {
        name: name.into(),
        lease_timeout: lease,
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: partitions,
        ..Default::default()
    }
}

fn item(payload: String, priority: u8, dedup: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(payload),
        priority,
        dedup_id: dedup.into(),
        kind: "k".into(),
        reference: "r".into(),
        ..Default::default()
    }
}

/// Every item of one partition, in id order: ready and leased, then scheduled.
async fn items_of(e: &Engine, q: &str, partition: u32) -> Vec<Item> {
    let mut out = Vec::new();
    for state in [BrowseState::Queued, BrowseState::Scheduled] {
        let mut pivot = None;
        loop {
            let page = e
                .browse(
                    q,
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

fn payload(it: &Item) -> String {
    String::from_utf8_lossy(&it.payload).into_owned()
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

/// Shrinks queue `q` to `partitions` and waits until the rebalance completed.
async fn shrink_to(e: &Engine, q: &str, partitions: u32) {
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: q.into(),
            partitions,
            ..Default::default()
        })
        .await
        .expect("start shrink");
    let t = wait_done(e, &task.id).await;
    assert_eq!(t.status, RebalanceStatus::Completed, "{t:?}");
}

/// What a partition's items look like apart from their ids: the move gives new ids, keeps the rest.
fn shape(it: &Item) -> (String, u8, u32, bool, Ts, Ts, Ts) {
    (
        payload(it),
        it.priority,
        it.attempts,
        it.is_scheduled(),
        it.enqueue_at,
        it.expire_deadline,
        it.created_at,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_keeps_items_in_every_state_and_leases_in_flight() {
    let e = engine();
    e.create_queue(queue("q", 1, Duration::from_secs(60)))
        .await
        .expect("create");
    // Partition 0 gets everything: ready items at three priorities, some with dedup keys, scheduled ones, leased
    // ones, and one that was leased and retried (attempts 1, ready again).
    let mut batch = Vec::new();
    for i in 0..1200 {
        let dedup = if i % 10 == 0 {
            format!("key-{i}")
        } else {
            String::new()
        };
        batch.push(item(format!("r{i:05}"), [0, 5, 9][i % 3], &dedup));
    }
    for chunk in batch.chunks(100) {
        e.produce("q", chunk.to_vec(), T).await.expect("produce");
    }
    let later = e.clock().now().add(Duration::from_secs(3000));
    let scheduled: Vec<ProduceItem> = (0..50)
        .map(|i| ProduceItem {
            enqueue_at: later,
            ..item(format!("s{i:03}"), 1, "")
        })
        .collect();
    e.produce("q", scheduled, T).await.expect("produce scheduled");
    let held = e.lease("q", 20, "holder", T).await.expect("lease");
    assert_eq!(held.items.len(), 20);
    let retried = e.lease("q", 1, "retrier", T).await.expect("lease");
    e.retry(
        "q",
        0,
        vec![RetryItem {
            id: retried.items[0].id,
            retry_at: Ts::ZERO,
            dead: false,
        }],
    )
    .await
    .expect("retry");
    // A second partition takes the traffic while partition 0 moves.
    e.update_queue(lessor_core::engine::QueueUpdate {
        name: "q".into(),
        requested_partitions: Some(2),
        ..Default::default()
    })
    .await
    .expect("grow");
    let before: Vec<Item> = items_of(&e, "q", 0).await;
    assert_eq!(before.len(), 1250);
    let before_free: Vec<_> = before.iter().filter(|it| !it.is_leased).map(shape).collect();

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
    assert_eq!(task.status, RebalanceStatus::Running);
    // Produce during the move lands in partition 1 only; the move waits for the leases in flight, which stay
    // valid: complete half of them, retry the other half (they come back and are moved too).
    e.produce("q", vec![item("during".into(), 0, "")], T)
        .await
        .expect("produce during move");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mid = e.rebalance_get(&task.id).await.expect("get");
    assert_eq!(
        mid.status,
        RebalanceStatus::Running,
        "waits for the leases in flight: {mid:?}"
    );
    let (done_ids, retry_ids) = held.items.split_at(10);
    e.complete("q", 0, done_ids.iter().map(|it| it.id).collect(), T)
        .await
        .expect("a lease taken before the move completes during it");
    e.retry(
        "q",
        0,
        retry_ids
            .iter()
            .map(|it| RetryItem {
                id: it.id,
                retry_at: Ts::ZERO,
                dead: false,
            })
            .collect(),
    )
    .await
    .expect("retry during the move");
    let t = wait_done(&e, &task.id).await;
    assert_eq!(t.status, RebalanceStatus::Completed, "{t:?}");
    assert!(t.moved >= 1230, "{t:?}");
    let info = e.queue_info("q").await.expect("info");
    assert_eq!(info.partitions[0].storage_name, "b");
    assert_eq!(info.partitions[1].storage_name, "a");

    // Every item not leased before the move is there with its state, priority, attempts and deadlines, in the
    // same order; the 10 retried ones follow; the 10 completed ones are gone.
    let after = items_of(&e, "q", 0).await;
    assert_eq!(after.len(), 1240, "1250 - 10 completed");
    assert!(after.iter().all(|it| !it.is_leased));
    let after_shapes: Vec<_> = after.iter().map(shape).collect();
    let (ready_before, sched_before): (Vec<_>, Vec<_>) = before_free.iter().cloned().partition(|s| !s.3);
    let (ready_after, sched_after): (Vec<_>, Vec<_>) = after_shapes.iter().cloned().partition(|s| !s.3);
    assert_eq!(sched_after, sched_before, "scheduled items kept as they were");
    assert_eq!(
        &ready_after[..ready_before.len()],
        &ready_before[..],
        "order and fields kept"
    );
    let back: Vec<String> = ready_after[ready_before.len()..]
        .iter()
        .map(|s| s.0.clone())
        .collect();
    let mut want: Vec<String> = retry_ids.iter().map(payload).collect();
    let mut got = back.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "retried leases come back after the rest");
    assert!(
        ready_after[ready_before.len()..].iter().all(|s| s.2 == 1),
        "attempts kept"
    );
    // The produce during the move went to partition 1.
    let p1 = items_of(&e, "q", 1).await;
    assert_eq!(
        p1.iter().map(payload).collect::<Vec<_>>(),
        vec!["during".to_string()]
    );

    // Dedup keys are kept: producing a key again stores nothing.
    e.produce("q", vec![item("again".into(), 0, "key-10")], T)
        .await
        .expect("produce dup");
    let total: usize = items_of(&e, "q", 0).await.len() + items_of(&e, "q", 1).await.len();
    assert_eq!(total, 1241, "the duplicate key was not stored again");

    // Leases are served from the moved partition, highest priority first.
    let l = e.lease("q", 5, "after", T).await.expect("lease after move");
    assert!(l.items.iter().all(|it| it.priority == 9), "{:?}", l.items);
    e.complete("q", l.partition, l.items.iter().map(|it| it.id).collect(), T)
        .await
        .expect("complete after move");
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_drains_removed_partitions_into_the_others() {
    let e = engine();
    e.create_queue(queue("q", 4, Duration::from_secs(60)))
        .await
        .expect("create");
    for i in 0..40 {
        let items = (0..10)
            .map(|j| item(format!("p{:04}", i * 10 + j), (j % 3) as u8, ""))
            .collect();
        e.produce("q", items, T).await.expect("produce");
    }
    let later = e.clock().now().add(Duration::from_secs(3000));
    e.produce(
        "q",
        vec![ProduceItem {
            enqueue_at: later,
            ..item("sched".into(), 0, "")
        }],
        T,
    )
    .await
    .expect("produce scheduled");
    // A lease on partition 3 (to be removed) is held through the drain and completed during it: lease whole
    // partitions until partition 3 comes up, put the others back.
    let mut others = Vec::new();
    let held = loop {
        let l = e.lease("q", 1000, "holder", T).await.expect("lease");
        if l.partition != 3 {
            others.push(l);
            continue;
        }
        // Keep 20 leased; put the rest, and the other partitions' items, back.
        others.push(lessor_core::engine::LeaseResult {
            partition: 3,
            items: l.items[20..].to_vec(),
        });
        break l.items[..20].to_vec();
    };
    for l in others {
        if l.items.is_empty() {
            continue;
        }
        let back: Vec<RetryItem> = l
            .items
            .iter()
            .map(|it| RetryItem {
                id: it.id,
                retry_at: Ts::ZERO,
                dead: false,
            })
            .collect();
        e.retry("q", l.partition, back).await.expect("retry");
    }
    let mut by_part: HashMap<u32, Vec<String>> = HashMap::new();
    for p in 0..4 {
        by_part.insert(p, items_of(&e, "q", p).await.iter().map(payload).collect());
    }
    let total: usize = by_part.values().map(Vec::len).sum();
    assert_eq!(total, 401);
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            partitions: 2,
            ..Default::default()
        })
        .await
        .expect("start shrink");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        e.rebalance_get(&task.id).await.expect("get").status,
        RebalanceStatus::Running
    );
    e.complete("q", 3, held.iter().map(|it| it.id).collect(), T)
        .await
        .expect("complete a held lease of a draining partition");
    let t = wait_done(&e, &task.id).await;
    assert_eq!(t.status, RebalanceStatus::Completed, "{t:?}");
    let info = e.queue_info("q").await.expect("info");
    assert_eq!(info.partitions.len(), 2);
    assert_eq!(info.requested_partitions, 2);
    // Every item but the completed ones is there exactly once; items of a removed partition keep their order.
    let p0: Vec<String> = items_of(&e, "q", 0).await.iter().map(payload).collect();
    let p1: Vec<String> = items_of(&e, "q", 1).await.iter().map(payload).collect();
    let mut all: Vec<String> = p0.iter().chain(p1.iter()).cloned().collect();
    all.sort();
    let mut want: Vec<String> = by_part.values().flatten().cloned().collect();
    let gone: Vec<String> = held.iter().map(payload).collect();
    want.retain(|p| !gone.contains(p));
    want.sort();
    assert_eq!(
        all, want,
        "nothing lost, nothing doubled, nothing completed brought back"
    );
    for (removed, target) in [(2u32, &p0), (3u32, &p1)] {
        let mine: Vec<&String> = by_part[&removed]
            .iter()
            .filter(|p| !gone.contains(p) && p.as_str() != "sched")
            .collect();
        let seen: Vec<&String> = target.iter().filter(|p| mine.contains(p)).collect();
        assert_eq!(
            seen, mine,
            "partition {removed}'s order kept in its new partition"
        );
    }
    let err = e.complete("q", 3, held.iter().map(|it| it.id).collect(), T).await;
    assert!(err.is_err(), "partition 3 is gone");
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let e = engine();
    e.create_queue(queue("one", 1, Duration::from_secs(60)))
        .await
        .expect("create");
    e.create_queue(queue("q", 2, Duration::from_secs(60)))
        .await
        .expect("create");
    let mv = |q: &str, p: u32, to: &str| RebalanceRequest {
        queue: q.into(),
        moves: vec![PartitionMove {
            partition: p,
            to_store: to.into(),
        }],
        ..Default::default()
    };
    let cases: Vec<(RebalanceRequest, &str)> = vec![
        (mv("q", 0, "nope"), "moves[0].to_store is invalid"),
        (
            mv("q", 0, "a"),
            "moves[0].to_store is invalid; partition 0 is already in 'a'",
        ),
        (mv("q", 7, "b"), "moves[0].partition is invalid"),
        (mv("one", 0, "b"), "moves is invalid; 'one' has one partition"),
        (
            RebalanceRequest {
                queue: "q".into(),
                ..Default::default()
            },
            "give exactly one of",
        ),
        (
            RebalanceRequest {
                queue: "q".into(),
                partitions: 2,
                ..Default::default()
            },
            "partitions is invalid; 'q' already has '2' partitions",
        ),
        (mv("missing", 0, "b"), "queue does not exist"),
    ];
    for (req, want) in cases {
        match e.rebalance_start(req.clone()).await {
            Err(err @ (QueueError::Invalid(_) | QueueError::QueueNotFound(_))) => {
                assert!(err.to_string().contains(want), "{req:?}: {err}")
            }
            other => panic!("{req:?}: {other:?}"),
        }
    }
    // Growth is applied at once; spreading with nothing to move is done at once.
    let t = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            partitions: 3,
            ..Default::default()
        })
        .await
        .expect("grow");
    assert_eq!(t.status, RebalanceStatus::Completed);
    assert_eq!(e.queue_info("q").await.expect("info").partitions.len(), 3);
    let t = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            spread: true,
            ..Default::default()
        })
        .await
        .expect("spread");
    assert_eq!(t.status, RebalanceStatus::Completed);
    assert!(t.moves.is_empty());
    // One running task per queue: hold a lease so the move waits.
    e.produce("q", vec![item("x".into(), 0, "")], T)
        .await
        .expect("produce");
    let l = e.lease("q", 1, "c", T).await.expect("lease");
    let first = e.rebalance_start(mv("q", l.partition, "b")).await.expect("move");
    let second = e.rebalance_start(mv("q", (l.partition + 1) % 3, "b")).await;
    assert!(
        matches!(&second, Err(QueueError::Invalid(m)) if m.contains("is already running")),
        "{second:?}"
    );
    let grow = e
        .update_queue(lessor_core::engine::QueueUpdate {
            name: "q".into(),
            requested_partitions: Some(5),
            ..Default::default()
        })
        .await;
    assert!(
        matches!(&grow, Err(QueueError::Invalid(m)) if m.contains("is running")),
        "{grow:?}"
    );
    e.complete("q", l.partition, vec![l.items[0].id], T)
        .await
        .expect("complete");
    assert_eq!(wait_done(&e, &first.id).await.status, RebalanceStatus::Completed);
    let listed = e.rebalance_list("q").await.expect("list");
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].id, first.id, "newest first");
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_moves_partitions_to_match_affinities() {
    let queues: Arc<dyn QueuesStore> = Arc::new(MemoryQueues::new());
    let a: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
    let b: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
    let e = engine_on(queues.clone(), vec![("a", 1.0, a.clone()), ("b", 0.0, b.clone())]);
    e.create_queue(queue("q", 4, Duration::from_secs(60)))
        .await
        .expect("create");
    for i in 0..20 {
        e.produce("q", vec![item(format!("i{i}"), 0, "")], T)
            .await
            .expect("produce");
    }
    e.shutdown().await;
    // The operator gives `b` an affinity: a spread moves half the partitions there.
    let e = engine_on(queues, vec![("a", 1.0, a), ("b", 1.0, b)]);
    let t = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            spread: true,
            ..Default::default()
        })
        .await
        .expect("spread");
    assert_eq!(t.moves.len(), 2, "{t:?}");
    let t = wait_done(&e, &t.id).await;
    assert_eq!(t.status, RebalanceStatus::Completed, "{t:?}");
    let info = e.queue_info("q").await.expect("info");
    let in_b = info.partitions.iter().filter(|p| p.storage_name == "b").count();
    assert_eq!(in_b, 2);
    let mut n = 0;
    for p in 0..4 {
        n += items_of(&e, "q", p).await.len();
    }
    assert_eq!(n, 20);
    e.shutdown().await;
}

#[cfg(feature = "fjall")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_interrupted_by_a_restart_resumes() {
    use lessor_storage::fjall::{Durability, FjallQueues, FjallStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        let queues: Arc<dyn QueuesStore> =
            Arc::new(FjallQueues::open(dir.path().join("q"), Durability::Sync).expect("queues"));
        let a: Arc<dyn PartitionStore> =
            Arc::new(FjallStore::open(dir.path().join("a"), Durability::Sync).expect("a"));
        let b: Arc<dyn PartitionStore> =
            Arc::new(FjallStore::open(dir.path().join("b"), Durability::Sync).expect("b"));
        engine_on(queues, vec![("a", 1.0, a), ("b", 0.0, b)])
    };
    let e = open();
    e.create_queue(queue("q", 2, Duration::from_secs(1)))
        .await
        .expect("create");
    for i in 0..30 {
        // One item in a hundred has a dedup key: the moved partition's records must survive a restart.
        let items = (0..100)
            .map(|j| {
                let dedup = if j == 0 { format!("key-{i}") } else { String::new() };
                item(format!("i{:05}", i * 100 + j), 0, &dedup)
            })
            .collect();
        e.produce("q", items, T).await.expect("produce");
    }
    let before: Vec<String> = items_of(&e, "q", 0).await.iter().map(payload).collect();
    // A lease held on partition 0 keeps the move from finishing before the restart.
    let held = loop {
        let l = e.lease("q", 1, "holder", T).await.expect("lease");
        if l.partition == 0 {
            break l;
        }
    };
    let t = e
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
    tokio::time::sleep(Duration::from_millis(100)).await;
    e.shutdown().await;
    drop(e);
    let e = open();
    assert_eq!(e.resume_rebalances().await.expect("resume"), 1);
    let done = wait_done(&e, &t.id).await;
    assert_eq!(done.status, RebalanceStatus::Completed, "{done:?}");
    assert_eq!(
        e.queue_info("q").await.expect("info").partitions[0].storage_name,
        "b"
    );
    let mut after: Vec<String> = items_of(&e, "q", 0).await.iter().map(payload).collect();
    // The held lease expired during the move and came back at the tail.
    assert_eq!(after.pop(), Some(payload(&held.items[0])));
    let mut want = before.clone();
    want.retain(|p| *p != payload(&held.items[0]));
    assert_eq!(after, want, "every item once, in order");
    e.shutdown().await;
    drop(e);
    // After one more restart the keys of the moved partition are still known (read back from its new store).
    let e = open();
    let count = |e: Engine| async move {
        let mut n = 0;
        for p in 0..2 {
            n += items_of(&e, "q", p).await.len();
        }
        n
    };
    let before = count(e.clone()).await;
    let again: Vec<ProduceItem> = (0..30)
        .map(|i| item(format!("dup{i}"), 0, &format!("key-{i}")))
        .collect();
    e.produce("q", again, T).await.expect("produce known keys");
    assert_eq!(count(e.clone()).await, before, "known keys are not stored again");
    e.shutdown().await;
}

/// Every item of the queue's `n` partitions by payload; a payload seen twice fails the test.
async fn payloads(e: &Engine, n: u32) -> Vec<String> {
    let mut all = Vec::new();
    for p in 0..n {
        all.extend(items_of(e, "q", p).await.iter().map(payload));
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len(), "an item is there twice");
    sorted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_shrink_where_it_is_and_keeps_every_item() {
    let e = engine();
    e.create_queue(queue("q", 4, Duration::from_secs(60)))
        .await
        .expect("create");
    for i in 0..40 {
        let items = (0..10)
            .map(|j| item(format!("p{:04}", i * 10 + j), (j % 3) as u8, ""))
            .collect();
        e.produce("q", items, T).await.expect("produce");
    }
    // A lease held on partition 3 keeps the drain from finishing (lease whole partitions until 3 comes up).
    let mut taken = Vec::new();
    let held = loop {
        let l = e.lease("q", 1000, "holder", T).await.expect("lease");
        if l.partition == 3 {
            break l;
        }
        taken.push(l);
    };
    for l in taken {
        let back = l
            .items
            .iter()
            .map(|it| RetryItem {
                id: it.id,
                retry_at: Ts::ZERO,
                dead: false,
            })
            .collect();
        e.retry("q", l.partition, back).await.expect("retry");
    }
    let before = payloads(&e, 4).await;
    assert_eq!(before.len(), 400);
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            partitions: 2,
            ..Default::default()
        })
        .await
        .expect("start shrink");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = e.rebalance_cancel(&task.id).await.expect("cancel");
    assert!(
        matches!(c.status, RebalanceStatus::Cancelling | RebalanceStatus::Cancelled),
        "{c:?}"
    );
    let t = wait_done(&e, &task.id).await;
    assert_eq!(t.status, RebalanceStatus::Cancelled, "{t:?}");
    // The partition count is unchanged, every item is there once (partition 2 was drained into 0 before the
    // cancel, or not), and partitions 2 and 3 serve again.
    let info = e.queue_info("q").await.expect("info");
    assert_eq!(info.partitions.len(), 4);
    assert_eq!(info.requested_partitions, 4);
    assert_eq!(payloads(&e, 4).await, before, "nothing lost or doubled");
    e.complete("q", 3, held.items.iter().map(|it| it.id).collect(), T)
        .await
        .expect("the held lease completes after the cancel");
    // Everything ready is leased, from every partition that holds some, including the ones that were draining.
    loop {
        let l = match e
            .lease("q", 1000, "after", Some(Duration::from_millis(200)))
            .await
        {
            Ok(l) if !l.items.is_empty() => l,
            Ok(_) | Err(QueueError::LeaseTimeout) => break,
            Err(err) => panic!("lease: {err}"),
        };
        e.complete("q", l.partition, l.items.iter().map(|it| it.id).collect(), T)
            .await
            .expect("complete");
    }
    for p in 2..4u32 {
        let left = items_of(&e, "q", p).await;
        assert!(
            left.is_empty(),
            "partition {p} served its items: {} left",
            left.len()
        );
    }
    // Produce reaches the formerly draining partitions again (they are the emptiest).
    for i in 0..8 {
        e.produce("q", vec![item(format!("new{i}"), 0, "")], T)
            .await
            .expect("produce");
    }
    assert!(
        !items_of(&e, "q", 3).await.is_empty(),
        "partition 3 takes produce again"
    );
    // Cancelling again changes nothing; an unknown task is a 400 naming the field.
    assert_eq!(
        e.rebalance_cancel(&task.id).await.expect("again").status,
        RebalanceStatus::Cancelled
    );
    let err = e.rebalance_cancel("rb-nope").await;
    assert!(
        matches!(&err, Err(QueueError::Invalid(m)) if m.contains("task_id is invalid")),
        "{err:?}"
    );
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_finishes_the_move_under_way_and_drops_the_others() {
    let e = engine();
    e.create_queue(queue("q", 2, Duration::from_secs(60)))
        .await
        .expect("create");
    for i in 0..6 {
        let items = (0..100)
            .map(|j| item(format!("m{:04}", i * 100 + j), 0, ""))
            .collect();
        e.produce("q", items, T).await.expect("produce");
    }
    let held = loop {
        let l = e.lease("q", 1, "holder", T).await.expect("lease");
        if l.partition == 0 {
            break l;
        }
        e.retry(
            "q",
            l.partition,
            vec![RetryItem {
                id: l.items[0].id,
                retry_at: Ts::ZERO,
                dead: false,
            }],
        )
        .await
        .expect("retry");
    };
    let before = payloads(&e, 2).await;
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            moves: vec![
                PartitionMove {
                    partition: 0,
                    to_store: "b".into(),
                },
                PartitionMove {
                    partition: 1,
                    to_store: "b".into(),
                },
            ],
            ..Default::default()
        })
        .await
        .expect("start");
    // Partition 0's free items reach `b`; the move then waits for the held lease.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = e.rebalance_cancel(&task.id).await.expect("cancel");
    assert_eq!(c.status, RebalanceStatus::Cancelling, "{c:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mid = e.rebalance_get(&task.id).await.expect("get");
    assert_eq!(
        mid.status,
        RebalanceStatus::Cancelling,
        "the started move finishes first: {mid:?}"
    );
    e.complete("q", 0, vec![held.items[0].id], T)
        .await
        .expect("the held lease completes during the cancel");
    let t = wait_done(&e, &task.id).await;
    assert_eq!(t.status, RebalanceStatus::Cancelled, "{t:?}");
    let info = e.queue_info("q").await.expect("info");
    assert_eq!(
        info.partitions[0].storage_name, "b",
        "the move under way finished"
    );
    assert_eq!(
        info.partitions[1].storage_name, "a",
        "the move not started was dropped"
    );
    let mut want = before.clone();
    want.retain(|p| *p != payload(&held.items[0]));
    assert_eq!(payloads(&e, 2).await, want, "nothing lost or doubled");
    e.shutdown().await;
}

/// A leased item whose priority's id block lies below the move's scan pivot (another priority's block was opened
/// after it) comes back ready with a new id from that older block, below the pivot. The scan used never to look
/// below its pivot again, so the move never saw it: the source never emptied and the move never finished (until a
/// restart reset the pivots), while the item waited in a partition that serves no lease. A scan that reaches the
/// end now starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_retried_during_a_move_into_an_older_id_block_is_moved() {
    let e = engine();
    e.create_queue(queue("q", 1, Duration::from_secs(60)))
        .await
        .expect("create");
    // Priority 5 opens the first id block, priority 0 the next one (higher ids).
    e.produce("q", vec![item("high".into(), 5, "")], T)
        .await
        .expect("produce high");
    let low: Vec<ProduceItem> = (0..10).map(|i| item(format!("low{i}"), 0, "")).collect();
    e.produce("q", low, T).await.expect("produce low");
    let held = e.lease("q", 1, "holder", T).await.expect("lease");
    assert_eq!(payload(&held.items[0]), "high");
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
            ..Default::default()
        })
        .await
        .expect("start");
    // The ten ready items move; the move then waits for the lease in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mid = e.rebalance_get(&task.id).await.expect("get");
    assert_eq!(mid.status, RebalanceStatus::Running, "{mid:?}");
    assert_eq!(mid.moved, 10, "{mid:?}");
    // The holder gives the item back: it is ready again in partition 0 (the source).
    e.retry(
        "q",
        held.partition,
        vec![RetryItem {
            id: held.items[0].id,
            retry_at: Ts::ZERO,
            dead: false,
        }],
    )
    .await
    .expect("retry during the move");
    let mut last = None;
    for _ in 0..100 {
        let t = e.rebalance_get(&task.id).await.expect("get");
        if t.status != RebalanceStatus::Running {
            last = Some(t);
            break;
        }
        last = Some(t);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = last.expect("task");
    assert_eq!(
        t.status,
        RebalanceStatus::Completed,
        "the move never finishes: the retried item is below the scan pivot: {t:?}"
    );
    let p0: Vec<String> = items_of(&e, "q", 0).await.iter().map(payload).collect();
    assert_eq!(p0.len(), 11, "{p0:?}");
    e.shutdown().await;
}

/// A memory store whose partitions fail the next `delete` while `fail_delete` is set (a transient storage error),
/// clearing it.
fn failing_delete(fail_delete: &Arc<AtomicBool>) -> Arc<HookedStore> {
    let fail_delete = fail_delete.clone();
    let hook = before(move |c| {
        if c.op == Op::Delete && fail_delete.swap(false, Ordering::SeqCst) {
            return Err(StorageError::other("injected: delete failed"));
        }
        Ok(())
    });
    Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), hook))
}

/// A shrink chunk whose import into the target succeeded but whose delete from the source failed (a transient
/// storage error) used to leave the copies servable in the target while the originals stayed in the source (below
/// the scan pivot, so the retried step never looked at them again); consumers completed the copies, and a cancel
/// or a restart served the originals: completed items came back. Now a failed step replays the chunk journal
/// before anything else, and a shrink's targets serve nothing until it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_source_delete_during_a_shrink_brings_no_completed_item_back() {
    let fail_delete = Arc::new(AtomicBool::new(false));
    let e = engine_on(
        Arc::new(MemoryQueues::new()),
        vec![("a", 1.0, failing_delete(&fail_delete))],
    );
    e.create_queue(queue("q", 2, Duration::from_secs(60)))
        .await
        .expect("create");
    // One produce per partition: the first lands in partition 0, the second in partition 1 (least loaded).
    e.produce("q", (0..10).map(|i| item(format!("a{i}"), 0, "")).collect(), T)
        .await
        .expect("produce a");
    e.produce("q", (0..10).map(|i| item(format!("b{i}"), 0, "")).collect(), T)
        .await
        .expect("produce b");
    assert_eq!(items_of(&e, "q", 1).await.len(), 10);
    fail_delete.store(true, Ordering::SeqCst);
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            partitions: 1,
            ..Default::default()
        })
        .await
        .expect("start");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fail_delete.load(Ordering::SeqCst),
        "the chunk's delete was tried"
    );
    // Consumers take everything partition 0 serves and complete it.
    let mut completed: Vec<String> = Vec::new();
    for w in 0..5 {
        let l = e
            .lease("q", 100, &format!("c{w}"), Some(Duration::from_millis(200)))
            .await;
        let Ok(l) = l else { break };
        if l.items.is_empty() {
            break;
        }
        completed.extend(l.items.iter().map(payload));
        e.complete("q", l.partition, l.items.iter().map(|it| it.id).collect(), T)
            .await
            .expect("complete");
    }
    completed.sort();
    let mid = e.rebalance_get(&task.id).await.expect("get");
    let left: Vec<String> = if e.queue_info("q").await.expect("info").partitions.len() == 2 {
        items_of(&e, "q", 1).await.iter().map(payload).collect()
    } else {
        Vec::new()
    };
    // Stop the stalled shrink: partition 1 serves again.
    e.rebalance_cancel(&task.id).await.expect("cancel");
    let t = wait_done(&e, &task.id).await;
    let mut again: Vec<String> = Vec::new();
    for w in 0..5 {
        let l = e
            .lease("q", 100, &format!("d{w}"), Some(Duration::from_millis(200)))
            .await;
        let Ok(l) = l else { break };
        if l.items.is_empty() {
            break;
        }
        again.extend(l.items.iter().map(payload));
    }
    let back: Vec<&String> = again.iter().filter(|p| completed.contains(p)).collect();
    assert!(
        back.is_empty(),
        "completed items served again: {back:?}\ncompleted: {completed:?}\nleft in partition 1 during the \
         shrink: {left:?}\ntask mid-way: {mid:?}\ntask at the end: {t:?}"
    );
    e.shutdown().await;
}

/// A shrink of fjall partitions whose schedules are mostly on disk only (a window of 8 keeps 2 scheduled items
/// resident per partition): the paged scheduled items of the removed partitions move too, each once, still
/// scheduled at their times, and nothing is left behind in the removed partitions' stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrink_moves_paged_scheduled_items() {
    use lessor_storage::fjall::{Durability, FjallQueues, FjallStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let queues: Arc<dyn QueuesStore> =
        Arc::new(FjallQueues::open(dir.path().join("q"), Durability::None).expect("queues"));
    let store = Arc::new(FjallStore::open(dir.path().join("a"), Durability::None).expect("a"));
    store.set_memory_window(8);
    let e = engine_on(queues, vec![("a", 1.0, store.clone() as Arc<dyn PartitionStore>)]);
    e.create_queue(queue("q", 4, Duration::from_secs(60)))
        .await
        .expect("create");
    let later = e.clock().now().add(Duration::from_secs(3000));
    let mut want: Vec<(String, Ts)> = Vec::new();
    for i in 0..20 {
        let items: Vec<ProduceItem> = (0..20)
            .map(|j| {
                let at = Ts(later.0 + ((i * 20 + j) % 7) as i64);
                want.push((format!("s{:04}", i * 20 + j), at));
                ProduceItem {
                    enqueue_at: at,
                    ..item(format!("s{:04}", i * 20 + j), (j % 3) as u8, "")
                }
            })
            .collect();
        e.produce("q", items, T).await.expect("produce scheduled");
    }
    let mut paged = 0;
    for p in 0..4 {
        paged += store.paging_counts("q", p).await.map_or(0, |c| c.paged_scheduled);
    }
    assert!(paged > 300, "the schedules page ({paged} paged)");
    shrink_to(&e, "q", 2).await;
    let mut got: Vec<(String, Ts)> = Vec::new();
    for p in 0..2 {
        for it in items_of(&e, "q", p).await {
            assert!(it.is_scheduled(), "{it:?}");
            got.push((payload(&it), it.enqueue_at));
        }
    }
    got.sort();
    want.sort();
    assert_eq!(got, want, "every scheduled item once, at its time");
    e.shutdown().await;
}

/// A shrink within one store that is at its memory budget (`max-memory`): the copies a move imports are deleted
/// from their source right after, so the move adds nothing and must not be refused as new items (it stalled,
/// retrying, until consumers made room). A move into *another* store that is full stops once that store is over
/// its budget (by one chunk at most) and waits, as any import would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_within_a_full_store_finishes_and_one_into_a_full_store_waits() {
    let full = Arc::new(MemoryStore::with_max_memory(1 << 20));
    let small = Arc::new(MemoryStore::with_max_memory(1 << 20));
    let e = engine_on(
        Arc::new(MemoryQueues::new()),
        vec![
            ("a", 1.0, full.clone() as Arc<dyn PartitionStore>),
            ("b", 0.0, small.clone() as Arc<dyn PartitionStore>),
        ],
    );
    e.create_queue(queue("q", 4, Duration::from_secs(60)))
        .await
        .expect("create");
    let mut stored = 0u32;
    loop {
        let items = (0..10)
            .map(|j| item(format!("{:06}{}", stored + j, "x".repeat(2000)), 0, ""))
            .collect();
        match e.produce("q", items, T).await {
            Ok(_) => stored += 10,
            Err(err) => {
                assert!(err.to_string().contains("max-memory"), "{err}");
                break;
            }
        }
        assert!(stored < 2000, "1 MiB took {stored} items of 2 kB");
    }
    let (used, max) = full.memory().expect("a budget");
    assert!(used > max - 40_000, "the store is full: {used} of {max}");
    shrink_to(&e, "q", 2).await;
    let mut left = Vec::new();
    for p in 0..2 {
        left.extend(items_of(&e, "q", p).await.iter().map(payload));
    }
    left.sort();
    left.dedup();
    assert_eq!(left.len() as u32, stored, "every item kept, once");

    // A move of more than one chunk (500 items) into store b, full: it goes over b's budget by one chunk at most,
    // then waits.
    e.delete_queue("q")
        .await
        .expect("delete q: store a has room again");
    e.create_queue(queue("r", 2, Duration::from_secs(60)))
        .await
        .expect("create");
    // Produce spreads over the partitions: enough that partition 0 holds more than one chunk.
    for i in 0..30 {
        let items = (0..100)
            .map(|j| item(format!("r{:06}", i * 100 + j), 0, ""))
            .collect();
        e.produce("r", items, T).await.expect("produce");
    }
    assert!(
        items_of(&e, "r", 0).await.len() > 1000,
        "partition 0 holds two chunks"
    );
    let filler = small.open("other", 0).await.expect("open");
    let mut n = 0;
    while filler
        .produce(vec![lessor_core::types::NewItem {
            payload: bytes::Bytes::from(vec![b'f'; 4000]),
            ..Default::default()
        }])
        .await
        .is_ok()
    {
        n += 1;
        assert!(n < 1000);
    }
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "r".into(),
            moves: vec![PartitionMove {
                partition: 0,
                to_store: "b".into(),
            }],
            ..Default::default()
        })
        .await
        .expect("start move");
    let moved = poll_until(Duration::from_secs(10), Duration::from_millis(20), || async {
        let t = e.rebalance_get(&task.id).await.map_err(|e| e.to_string())?;
        match t.moved {
            0 => Err(format!("nothing moved yet: {t:?}")),
            _ => Ok(t),
        }
    })
    .await
    .expect("the first chunk moves");
    assert_eq!(
        moved.moved, 500,
        "one chunk into a store that was not over its budget: {moved:?}"
    );
    // The next chunk was tried and refused: the task says why it waits (no sleep: the refusal is the event).
    let t = poll_until(Duration::from_secs(10), Duration::from_millis(20), || async {
        let t = e.rebalance_get(&task.id).await.map_err(|e| e.to_string())?;
        match t.error.contains("max-memory") {
            true => Ok(t),
            false => Err(format!("no refusal yet: {t:?}")),
        }
    })
    .await
    .expect("the second chunk is refused");
    assert_eq!(
        t.status,
        RebalanceStatus::Running,
        "the move into a full store waits: {t:?}"
    );
    assert_eq!(
        t.moved, 500,
        "nothing more while store b is over its budget: {t:?}"
    );
    let (used, max) = small.memory().expect("a budget");
    let chunk = 500 * (7 + lessor_storage::state::ITEM_COST);
    assert!(
        used <= max + chunk,
        "store b went {} bytes over its budget",
        used - max
    );
    e.rebalance_cancel(&task.id).await.expect("cancel");
}
