//! Server-side tasks racing the requests around them, made deterministic by gates in the storage: a call the test
//! picks stops until the test lets it go, so the other side of the race runs exactly in that window.
//!
//! - A redrive moves a dead-letter item while a consumer of the dead-letter queue leases and completes it.
//! - Two rebalances of one queue are started at the same time; so are two redrives of one dead-letter queue.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::engine::{
    Engine, EngineConfig, NamedStore, PartitionMove, ProduceItem, RebalanceRequest, RedriveRequest,
    RedriveStatus, RedriveTask,
};
use lessor_core::time::ManualClock;
use lessor_core::types::{ItemId, Limits, QueueInfo, RetryItem};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::eventually::poll_until;
use lessor_testkit::hooked::{Gate, HookedQueues, HookedStore, Op};

const T: Option<Duration> = Some(Duration::from_secs(5));

/// A gate on produces into queue `queue`.
fn produce_gate(queue: &'static str) -> Arc<Gate> {
    Gate::on(move |c| c.op == Op::Produce && c.queue == queue)
}

/// A memory store whose calls pass `gate`.
fn gated_store(gate: &Arc<Gate>) -> Arc<HookedStore> {
    Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), gate.clone()))
}

/// Memory queue definitions whose metadata calls pass `gate`.
fn gated_queues(gate: &Arc<Gate>) -> Arc<HookedQueues> {
    Arc::new(HookedQueues::new(Arc::new(MemoryQueues::new()), gate.clone()))
}

fn queue(name: &str, dead: &str, partitions: u32) -> QueueInfo {
    QueueInfo {
        name: name.into(),
        dead_queue: dead.into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        max_attempts: 1,
        requested_partitions: partitions,
        ..Default::default()
    }
}

fn item(payload: String) -> ProduceItem {
    ProduceItem {
        payload: Bytes::from(payload),
        ..Default::default()
    }
}

/// Ready + leased + scheduled items of a queue.
async fn depth(e: &Engine, q: &str) -> u64 {
    let s = e.stats(q).await.expect("stats");
    s.partitions.iter().map(|p| p.total + p.scheduled).sum()
}

/// Ready + leased + scheduled items of one partition (0 when the queue has no such partition).
async fn depth_of(e: &Engine, q: &str, partition: u32) -> u64 {
    let s = e.stats(q).await.expect("stats");
    s.partitions
        .iter()
        .filter(|p| p.partition == partition)
        .map(|p| p.total + p.scheduled)
        .sum()
}

async fn redrive_done(e: &Engine, id: &str) -> RedriveTask {
    poll_until(Duration::from_secs(20), Duration::from_millis(10), || async {
        let t = e.redrive_get(id).await.expect("get");
        if t.status != RedriveStatus::Running {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await
    .expect("redrive finishes")
}

/// A consumer of the dead-letter queue leases and completes an item after the redrive read it and while its copy
/// is being written to the target. The complete must not succeed while the item is also redriven: either the
/// consumer learns it lost the race (its complete fails, as operations promise: "the consumer's complete or retry
/// gets the usual 400"), or the item is not moved. Before the fix the complete succeeded and the redrive delivered
/// the item again from its source queue: processed twice, and nobody told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_item_completed_during_its_redrive_is_not_also_redriven() {
    let clock = ManualClock::starting_now();
    let gate = produce_gate("a");
    let e = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "mem".into(),
            affinity: 1.0,
            store: gated_store(&gate),
        }],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("dlq", "", 1)).await.expect("dlq");
    e.create_queue(queue("a", "dlq", 1)).await.expect("a");
    e.produce("a", vec![item("x".into())], T).await.expect("produce");
    let l = e.lease("a", 1, "worker", T).await.expect("lease");
    let dead = l
        .items
        .iter()
        .map(|it| RetryItem {
            id: it.id,
            retry_at: Default::default(),
            dead: true,
        })
        .collect();
    e.retry("a", l.partition, dead).await.expect("retry dead");
    poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
        if depth(&e, "dlq").await == 1 {
            Ok(())
        } else {
            Err("not dead-lettered yet".to_string())
        }
    })
    .await
    .expect("the item reaches the dead-letter queue");

    // The redrive's write into `a` stops at the gate: the item was read from the dead-letter queue, its copy is on
    // its way, and it has not been deleted from the dead-letter queue yet.
    gate.arm(0);
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    gate.reached().await;
    let l = tokio::time::timeout(Duration::from_secs(5), e.lease("dlq", 1, "dlq-consumer", T))
        .await
        .expect("lease answers")
        .expect("lease the dead-letter queue");
    assert_eq!(l.items.len(), 1, "the item is still in the dead-letter queue");
    let ids: Vec<ItemId> = l.items.iter().map(|it| it.id).collect();
    let completed = e.complete("dlq", l.partition, ids, T).await;
    gate.release();
    let done = redrive_done(&e, &t.id).await;
    let redriven = depth(&e, "a").await;
    assert!(
        !(completed.is_ok() && redriven == 1),
        "the consumer completed the item ({completed:?}) and the redrive delivered it again ({redriven} in 'a', \
         {done:?})"
    );
    assert_eq!(depth(&e, "dlq").await, 0);
}

/// Two rebalances of one queue started at the same time (two operators, a retried request): one must be refused.
/// Before the fix both passed the "one task per queue" check (read, then a write later), and the second one
/// installed replaced the first in the queue task: a move had put a chunk into the new store when a shrink took
/// over, drained the rest of the partition into partition 0 and dropped it, leaving the chunk in a partition that
/// no longer belonged to the queue (lost), and the move retried a partition that no longer existed forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rebalances_started_at_once_lose_nothing() {
    let clock = ManualClock::starting_now();
    // Scans of the placement table.
    let gate = Gate::on(|c| c.op == Op::AuthScan && c.touches_table(b'P'));
    let e = Engine::new(EngineConfig {
        queues: gated_queues(&gate),
        stores: vec![
            NamedStore {
                name: "a".into(),
                affinity: 1.0,
                store: Arc::new(MemoryStore::new()),
            },
            NamedStore {
                name: "b".into(),
                affinity: 0.0,
                store: Arc::new(MemoryStore::new()),
            },
        ],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("q", "", 2)).await.expect("q");
    for b in 0..4 {
        let items = (0..500).map(|i| item(format!("{b}-{i}"))).collect();
        e.produce("q", items, T).await.expect("produce");
    }
    let total = depth(&e, "q").await;
    assert_eq!(total, 2000);
    let in_p1 = depth_of(&e, "q", 1).await;
    assert!(in_p1 > 500, "partition 1 holds more than a chunk ({in_p1})");

    // The shrink passes the check (the first scan of the task table), then stops at its next scan, before it
    // saved its task.
    gate.arm(1);
    let shrink = {
        let e = e.clone();
        tokio::spawn(async move {
            e.rebalance_start(RebalanceRequest {
                queue: "q".into(),
                partitions: 1,
                ..Default::default()
            })
            .await
        })
    };
    gate.reached().await;
    // Meanwhile a move of partition 1 starts, paced so that it moves one chunk and then waits (manual clock).
    let mv = {
        let e = e.clone();
        tokio::spawn(async move {
            e.rebalance_start(RebalanceRequest {
                queue: "q".into(),
                moves: vec![PartitionMove {
                    partition: 1,
                    to_store: "b".into(),
                }],
                max_items_per_sec: 100,
                ..Default::default()
            })
            .await
        })
    };
    // Give the move its chance to take its first chunk (it cannot when the start waits for the shrink's).
    let _ = poll_until(Duration::from_secs(3), Duration::from_millis(10), || async {
        if depth_of(&e, "q", 1).await == in_p1 - 500 {
            Ok(())
        } else {
            Err("no chunk moved".to_string())
        }
    })
    .await;
    gate.release();
    let shrink = shrink.await.expect("join");
    let mv = mv.await.expect("join");
    // Let the watchers and the queue task settle whatever runs.
    for _ in 0..100 {
        clock.advance(Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = depth(&e, "q").await;
    let tasks = e.rebalance_list("q").await.expect("list");
    assert_eq!(
        left, total,
        "items lost; started: {shrink:?} {mv:?}; now: {tasks:?}"
    );
    assert!(
        shrink.is_err() || mv.is_err(),
        "both rebalances were started: {shrink:?} {mv:?}"
    );
}

/// Two redrives of one dead-letter queue started at the same time: "one running task per dead-letter queue", so
/// one must be refused. Before the fix both passed the check (each read the tasks before the other saved) and
/// both ran (the targets' dedup kept items from doubling, but each applied its own `max_items`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redrives_started_at_once_do_not_both_run() {
    let clock = ManualClock::starting_now();
    // Writes of redrive task records.
    let gate = Gate::on(|c| c.op == Op::AuthCommit && c.touches_table(b'T'));
    let e = Engine::new(EngineConfig {
        queues: gated_queues(&gate),
        stores: vec![NamedStore {
            name: "mem".into(),
            affinity: 1.0,
            store: Arc::new(MemoryStore::new()),
        }],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("dlq", "", 1)).await.expect("dlq");
    e.create_queue(queue("a", "dlq", 1)).await.expect("a");
    let request = RedriveRequest {
        dead_queue: "dlq".into(),
        ..Default::default()
    };
    // The first start checked that none runs and stops as it saves its task.
    gate.arm(0);
    let first = {
        let e = e.clone();
        let request = request.clone();
        tokio::spawn(async move { e.redrive_start(request).await })
    };
    gate.reached().await;
    let second = {
        let e = e.clone();
        let request = request.clone();
        tokio::spawn(async move { e.redrive_start(request).await })
    };
    // The second start either finishes (before the fix) or waits for the first.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while !second.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    gate.release();
    let first = first.await.expect("join");
    let second = second.await.expect("join");
    assert!(
        first.is_err() || second.is_err(),
        "both redrives were started: {first:?} {second:?}"
    );
}

/// A redrive reads a batch of a dead-letter queue's partition that a rebalance is moving, and the rebalance moves
/// those items to the partition's new store (new ids) while the redrive writes its copies to the target. Items put
/// into the dead-letter queue directly (no source id) get the rebalance's source id on the way, so the redrive's
/// next look met them as new items and delivered them to the target a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_racing_a_move_of_its_dead_letter_partition_delivers_once() {
    let clock = ManualClock::starting_now();
    let gate = produce_gate("t");
    let e = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![
            NamedStore {
                name: "a".into(),
                affinity: 1.0,
                store: gated_store(&gate),
            },
            NamedStore {
                name: "b".into(),
                affinity: 0.0,
                store: Arc::new(MemoryStore::new()),
            },
        ],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("dlq", "", 2)).await.expect("dlq");
    e.create_queue(queue("src", "dlq", 1)).await.expect("src");
    e.create_queue(queue("t", "", 1)).await.expect("t");
    // An item produced straight into the dead-letter queue: it names no source.
    e.produce("dlq", vec![item("x".into())], T)
        .await
        .expect("produce");
    let p = if depth_of(&e, "dlq", 0).await == 1 { 0 } else { 1 };

    gate.arm(0);
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            target_queue: "t".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    gate.reached().await;
    // The copy is on its way to `t`; the partition moves to store b meanwhile.
    let rb = e
        .rebalance_start(RebalanceRequest {
            queue: "dlq".into(),
            moves: vec![PartitionMove {
                partition: p,
                to_store: "b".into(),
            }],
            ..Default::default()
        })
        .await
        .expect("rebalance");
    for _ in 0..50 {
        clock.advance(Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(20)).await;
        if e.rebalance_get(&rb.id).await.expect("get").status != lessor_core::engine::RebalanceStatus::Running
        {
            break;
        }
    }
    gate.release();
    for _ in 0..50 {
        clock.advance(Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = redrive_done(&e, &t.id).await;
    assert_eq!(
        (depth(&e, "t").await, depth(&e, "dlq").await),
        (1, 0),
        "the item is delivered once: {done:?}"
    );
}

/// After a rebalance moved a dead-letter queue's partition, an item put into it directly (it names no source
/// queue) carries the rebalance's source id. A redrive back to the sources read that id as naming a queue
/// ("\u{1}rb:<task>"), and retried the move to that invalid name every second for ever (the task never ended),
/// instead of leaving the item alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_after_a_move_leaves_items_without_a_source_alone() {
    let clock = ManualClock::starting_now();
    let e = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![
            NamedStore {
                name: "a".into(),
                affinity: 1.0,
                store: Arc::new(MemoryStore::new()),
            },
            NamedStore {
                name: "b".into(),
                affinity: 0.0,
                store: Arc::new(MemoryStore::new()),
            },
        ],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("dlq", "", 2)).await.expect("dlq");
    e.create_queue(queue("src", "dlq", 1)).await.expect("src");
    e.produce("dlq", vec![item("x".into())], T)
        .await
        .expect("produce");
    let p = if depth_of(&e, "dlq", 0).await == 1 { 0 } else { 1 };
    let rb = e
        .rebalance_start(RebalanceRequest {
            queue: "dlq".into(),
            moves: vec![PartitionMove {
                partition: p,
                to_store: "b".into(),
            }],
            ..Default::default()
        })
        .await
        .expect("rebalance");
    for _ in 0..50 {
        clock.advance(Duration::from_millis(300));
        tokio::time::sleep(Duration::from_millis(20)).await;
        if e.rebalance_get(&rb.id).await.expect("get").status != lessor_core::engine::RebalanceStatus::Running
        {
            break;
        }
    }
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    for _ in 0..20 {
        clock.advance(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = e.redrive_get(&t.id).await.expect("get");
    assert_eq!(
        (done.status, done.skipped, depth(&e, "dlq").await),
        (RedriveStatus::Completed, 1, 1),
        "{done:?}"
    );
}

/// A lease whose storage call is stuck past its caller's patience: the caller gets its 454 (request timeout) and
/// leaves, then storage comes back with the items leased. Nobody will ever complete them, so the queue must give
/// them back at once. Before the fix they stayed leased until their lease timeout (a minute here, which the manual
/// clock never reaches), and a consumer already waiting got nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_answer_whose_caller_left_gives_its_items_back() {
    let clock = ManualClock::starting_now();
    let gate = Gate::on(|c| c.op == Op::Lease && c.queue == "a");
    let e = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "mem".into(),
            affinity: 1.0,
            store: gated_store(&gate),
        }],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("a", "", 1)).await.expect("a");
    let payloads = ["x", "y", "z"].map(String::from);
    e.produce("a", payloads.iter().cloned().map(item).collect(), T)
        .await
        .expect("produce");

    gate.arm(0);
    let gone = {
        let e = e.clone();
        tokio::spawn(async move {
            e.lease("a", 2, "impatient", Some(Duration::from_millis(200)))
                .await
        })
    };
    gate.reached().await;
    let gone = gone.await.expect("join");
    assert!(
        gone.is_err(),
        "the stuck lease answers its caller with an error: {gone:?}"
    );

    // A second consumer waits while storage is still stuck; then storage comes back with two items leased for the
    // consumer that left.
    let waiting = {
        let e = e.clone();
        tokio::spawn(async move { e.lease("a", 3, "patient", T).await })
    };
    gate.release();
    let mut got: Vec<String> = waiting
        .await
        .expect("join")
        .expect("the waiting consumer is served")
        .items
        .iter()
        .map(|it| String::from_utf8_lossy(&it.payload).into_owned())
        .collect();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < 3 && tokio::time::Instant::now() < until {
        if let Ok(l) = e.lease("a", 3, "patient", Some(Duration::from_millis(100))).await {
            got.extend(
                l.items
                    .iter()
                    .map(|it| String::from_utf8_lossy(&it.payload).into_owned()),
            );
        }
    }
    assert_eq!(
        got.len(),
        3,
        "every item reaches the consumer still there, none waits for a lease nobody holds to end: {got:?}"
    );
    got.sort();
    assert_eq!(got, payloads, "each item once");
    let s = e.stats("a").await.expect("stats");
    let leased: u64 = s.partitions.iter().map(|p| p.total_leased).sum();
    assert_eq!(
        leased, 3,
        "the three leases the patient consumer holds, nothing else"
    );
}

/// An engine (queue definitions behind `gate`, idle queues unloading after 1 s) with queue `src` whose dead-letter
/// queue `dlq` has unloaded, and the lease of `src`'s one item.
async fn leased_from_a_queue_with_an_unloaded_dead_letter_queue(
    gate: &Arc<Gate>,
) -> (Engine, lessor_core::engine::LeaseResult) {
    let clock = ManualClock::starting_now();
    let limits = Limits {
        queue_idle_unload: Duration::from_secs(1),
        ..Limits::default()
    };
    let e = Engine::new(EngineConfig {
        queues: gated_queues(gate),
        stores: vec![NamedStore {
            name: "mem".into(),
            affinity: 1.0,
            store: Arc::new(MemoryStore::new()),
        }],
        limits,
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("dlq", "", 1)).await.expect("dlq");
    e.create_queue(queue("src", "dlq", 1)).await.expect("src");
    assert_eq!(depth(&e, "dlq").await, 0);
    e.produce("src", vec![item("x".into())], T)
        .await
        .expect("produce");
    // Both queues go idle and unload.
    clock.advance(Duration::from_secs(2));
    poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
        let e = e.clone();
        async move {
            let gone = e
                .queue_metrics()
                .iter()
                .any(|(n, m)| n == "dlq" && m.unloaded.load(std::sync::atomic::Ordering::SeqCst));
            if gone {
                Ok(())
            } else {
                Err("'dlq' still loaded".to_string())
            }
        }
    })
    .await
    .expect("'dlq' unloads");
    let leased = e.lease("src", 1, "c", T).await.expect("lease");
    (e, leased)
}

/// A definition update holds the engine's load lock while it waits for the queue's task to take the new definition.
/// When that task is moving a dead item into a dead-letter queue that is not loaded (idle queues unload, and a
/// dead-letter queue is the archetype of one), the move must load it, under the same lock: the task waited for the
/// lock, the update for the task, until the move gave up after its 5 s timeout. The update and the queue's every
/// request stalled for those 5 s, the dead item waited another retry, and no other queue could load meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_update_does_not_stall_a_dead_letter_move_into_an_unloaded_queue() {
    let gate = Gate::on(|c| c.op == Op::QueueUpdate && c.queue == "src");
    let (e, leased) = leased_from_a_queue_with_an_unloaded_dead_letter_queue(&gate).await;

    // An update of 'src' takes the load lock and stops at its write; meanwhile the consumer gives up on the item,
    // and the task starts moving it to 'dlq'.
    gate.arm(0);
    let update = {
        let e = e.clone();
        tokio::spawn(async move {
            e.update_queue(lessor_core::engine::QueueUpdate {
                name: "src".into(),
                lease_timeout: Some(Duration::from_secs(30)),
                ..Default::default()
            })
            .await
        })
    };
    gate.reached().await;
    e.retry(
        "src",
        leased.partition,
        vec![RetryItem {
            id: leased.items[0].id,
            retry_at: lessor_core::time::Ts::ZERO,
            dead: true,
        }],
    )
    .await
    .expect("retry");
    // The task is now in the move (the next pass), waiting to load 'dlq'.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    gate.release();
    update.await.expect("join").expect("update");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the update waited {took:?} for a task that waited for the update's lock"
    );
    let moved = async {
        while depth(&e, "dlq").await != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), moved)
        .await
        .expect("the dead item reaches the dead-letter queue at once");
    assert_eq!(depth(&e, "src").await, 0);
}

/// `a_definition_update_does_not_stall_a_dead_letter_move_into_an_unloaded_queue` for a delete (and so for a
/// shutdown, which stops every queue the same way): the delete holds the load lock while it stops the queue, whose
/// task was waiting for that lock to load its dead-letter queue for a move. The delete, and every queue load behind
/// it, stalled until the move gave up after 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_does_not_stall_on_a_dead_letter_move_into_an_unloaded_queue() {
    let gate = Gate::on(|c| c.op == Op::QueueGet && c.queue == "src");
    let (e, leased) = leased_from_a_queue_with_an_unloaded_dead_letter_queue(&gate).await;

    // The delete takes the load lock and stops at its read of the definition; the task starts moving the item.
    gate.arm(0);
    let delete = {
        let e = e.clone();
        tokio::spawn(async move { e.delete_queue("src").await })
    };
    gate.reached().await;
    e.retry(
        "src",
        leased.partition,
        vec![RetryItem {
            id: leased.items[0].id,
            retry_at: lessor_core::time::Ts::ZERO,
            dead: true,
        }],
    )
    .await
    .expect("retry");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    gate.release();
    delete.await.expect("join").expect("delete");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the delete waited {took:?} for a task that waited for the delete's lock"
    );
}
