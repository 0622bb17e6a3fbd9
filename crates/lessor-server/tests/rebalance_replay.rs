//! Deterministic crash replay of online rebalance: the engine runs over memory stores wrapped so that, at a chosen
//! step of a chunk (after its ids are journalled, after the import into the target, after the delete from the
//! source, after the new placement is saved, before the old partition is destroyed), the "process" stops dead:
//! that call and every later call of the old engine hang forever, as if it were killed there. A second engine then
//! starts on the same storage (as a restarted server would) and resumes the task; every item must be there exactly
//! once with its state, the task must complete, and the old partition must be gone (the destroy is part of the
//! persisted task, so a crash before it is finished after the restart). The clock is a manual one: the watcher's
//! polls and the queue's waits happen when the test moves it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::engine::{
    BrowseRequest, BrowseState, Engine, EngineConfig, NamedStore, PartitionMove, ProduceItem,
    RebalanceRequest, RebalanceStatus,
};
use lessor_core::error::StorageError;
use lessor_core::storage::PartitionStore;
use lessor_core::time::{Clock, ManualClock, Ts};
use lessor_core::types::{Item, ItemId, Limits, QueueInfo, RetryItem};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::hooked::{Call, Hook, HookedQueues, HookedStore, Op};

const T: Option<Duration> = Some(Duration::from_secs(5));

/// Where the old process stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    /// The chunk's ids were written to the journal (nothing imported yet).
    AfterJournal,
    /// The chunk was imported into the target (still in the source too).
    AfterImport,
    /// The chunk was deleted from the source.
    AfterDelete,
    /// The new placement was saved (the old partition not destroyed yet).
    AfterPlacement,
    /// The watcher is about to destroy the old partition.
    BeforeDestroy,
}

/// The kill switch: trips at the `nth` occurrence of its step; once tripped, every wrapped call hangs.
#[derive(Debug, Default)]
struct Crash {
    armed: Option<(Step, usize)>,
    seen: Mutex<HashMap<Step, usize>>,
    tripped: AtomicBool,
}

impl Crash {
    fn at(step: Step, nth: usize) -> Arc<Crash> {
        Arc::new(Crash {
            armed: Some((step, nth)),
            ..Default::default()
        })
    }

    /// A dead process does nothing more: wait forever.
    async fn gate(&self) {
        if self.tripped.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    /// `step` just happened (or is about to): trips on the armed occurrence.
    async fn step(&self, step: Step) {
        let trip = {
            let mut seen = self.seen.lock().expect("seen");
            let n = seen.entry(step).or_default();
            *n += 1;
            self.armed == Some((step, *n))
        };
        if trip {
            self.tripped.store(true, Ordering::SeqCst);
        }
        self.gate().await;
    }

    fn tripped(&self) -> bool {
        self.tripped.load(Ordering::SeqCst)
    }
}

/// What makes a wrapped store die with its process: once `crash` tripped, every call waits forever; the calls
/// that end a step count it (after the wrapped store answered, as the step is what happened).
struct Dies {
    crash: Arc<Crash>,
    /// Destroys here count as [`Step::BeforeDestroy`] (the store the task empties).
    source: bool,
}

#[async_trait]
impl Hook for Dies {
    async fn before(&self, call: &Call) -> Result<(), StorageError> {
        if self.source && matches!(call.op, Op::Destroy | Op::DestroyMany) {
            self.crash.step(Step::BeforeDestroy).await;
        }
        self.crash.gate().await;
        Ok(())
    }

    async fn after(&self, call: &Call) {
        let step = match call.op {
            // The rebalance journal lives under tag 'J' (one record per task, rewritten per chunk).
            Op::AuthCommit if call.touches_table(b'J') => Step::AfterJournal,
            // Only the rebalance watcher updates definitions in these tests: this is the placement being saved.
            Op::QueueUpdate => Step::AfterPlacement,
            Op::Import => Step::AfterImport,
            Op::Delete => Step::AfterDelete,
            _ => return,
        };
        self.crash.step(step).await;
    }
}

/// The storage a "server" starts on: survives the engines built over it.
struct Disk {
    queues: Arc<MemoryQueues>,
    a: Arc<MemoryStore>,
    b: Arc<MemoryStore>,
}

impl Disk {
    fn new() -> Disk {
        Disk {
            queues: Arc::new(MemoryQueues::new()),
            a: Arc::new(MemoryStore::new()),
            b: Arc::new(MemoryStore::new()),
        }
    }

    /// An engine over this storage that dies as `crash` says. Store `a` (where queues are placed) is the source
    /// of every move and shrink; `b` (affinity 0) only receives moves.
    fn engine(&self, clock: &ManualClock, crash: &Arc<Crash>) -> Engine {
        let dies = |source: bool| -> Arc<dyn Hook> {
            Arc::new(Dies {
                crash: crash.clone(),
                source,
            })
        };
        let store = |inner: &Arc<MemoryStore>, source: bool| -> Arc<dyn PartitionStore> {
            Arc::new(HookedStore::new(inner.clone(), dies(source)))
        };
        Engine::new(EngineConfig {
            queues: Arc::new(HookedQueues::new(self.queues.clone(), dies(false))),
            stores: vec![
                NamedStore {
                    name: "a".into(),
                    affinity: 1.0,
                    store: store(&self.a, true),
                },
                NamedStore {
                    name: "b".into(),
                    affinity: 0.0,
                    store: store(&self.b, false),
                },
            ],
            limits: Limits::default(),
            clock: Arc::new(clock.clone()),
        })
        .expect("engine")
    }
}

/// An item's state apart from its id (a move gives new ids): priority, attempts, scheduled.
type Shape = (u8, u32, bool);

/// Every item of the queue by payload, with its state; panics on a payload seen twice.
async fn every_item(e: &Engine, partitions: u32) -> BTreeMap<String, Shape> {
    let mut out = BTreeMap::new();
    for partition in 0..partitions {
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
                for b in page.items {
                    let it = b.item;
                    let p = String::from_utf8_lossy(&it.payload).into_owned();
                    let shape = (it.priority, it.attempts, it.is_scheduled());
                    assert!(out.insert(p.clone(), shape).is_none(), "item {p} is there twice");
                }
                match page.next_pivot {
                    Some(p) => pivot = Some(p),
                    None => break,
                }
            }
        }
    }
    out
}

type Check = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Moves the clock in steps (the watcher polls every 200 ms, the queue waits 100 ms for leases) until `done`.
async fn run_until(clock: &ManualClock, what: &str, mut done: impl FnMut() -> Check) {
    for _ in 0..3000 {
        if done().await {
            return;
        }
        clock.advance(Duration::from_millis(250));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{what}: never happened");
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Partition 0 of 2 moves from `a` to `b`.
    Move,
    /// 3 partitions shrink to 2: partition 2 drains into partition 0.
    Shrink,
}

/// One crash at `step` (its `nth` occurrence) during a rebalance of `kind`, a restart, and the checks.
async fn crash_and_replay(kind: Kind, step: Step, nth: usize, cancel: bool) {
    let label = format!("{kind:?} (cancelled: {cancel}) crashing {step:?} #{nth}");
    let disk = Disk::new();
    let clock = ManualClock::starting_now();
    let crash = Crash::at(step, nth);
    let e = disk.engine(&clock, &crash);
    let (parts, source) = match kind {
        Kind::Move => (2, 0),
        Kind::Shrink => (3, 2),
    };
    e.create_queue(QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(24 * 3600),
        dedup_window: Duration::from_secs(3600),
        requested_partitions: parts,
        ..Default::default()
    })
    .await
    .expect("create");
    // About 1,300 items per partition (three chunks of the source): three priorities, one in ten scheduled, one in
    // fifty with a dedup key.
    let later = clock.now().add(Duration::from_secs(3600));
    let mut n = 0;
    for _ in 0..(13 * parts) {
        let batch: Vec<ProduceItem> = (0..100)
            .map(|_| {
                n += 1;
                ProduceItem {
                    payload: Bytes::from(format!("i{n:05}")),
                    priority: [0u8, 4, 9][n % 3],
                    dedup_id: if n % 50 == 0 {
                        format!("key-{n}")
                    } else {
                        String::new()
                    },
                    enqueue_at: if n % 10 == 0 { later } else { Ts::ZERO },
                    ..Default::default()
                }
            })
            .collect();
        e.produce("q", batch, T).await.expect("produce");
    }
    // Leases in flight on the source: five held (completed while the task runs), and items that were leased and
    // retried (attempts 1, ready again); leases that landed on other partitions go back the same way.
    // Leases go to the fullest partition first: lease whole batches (holding them, so the next one comes from
    // another partition) until one comes from the source, then put back all but five.
    let mut held: Vec<Item> = Vec::new();
    let mut taken = Vec::new();
    for w in 0..20 {
        let l = e.lease("q", 1000, &format!("c{w}"), T).await.expect("lease");
        let mut back = l.items.clone();
        if l.partition == source {
            held = back.drain(..5).collect();
        }
        taken.push((l.partition, back));
        if !held.is_empty() {
            break;
        }
    }
    for (partition, items) in taken {
        let back: Vec<RetryItem> = items
            .iter()
            .map(|it| RetryItem {
                id: it.id,
                retry_at: Ts::ZERO,
                dead: false,
            })
            .collect();
        for chunk in back.chunks(500) {
            e.retry("q", partition, chunk.to_vec()).await.expect("retry");
        }
    }
    assert!(!held.is_empty(), "{label}: no lease came from the source");
    let before = every_item(&e, parts).await;
    let held_payloads: Vec<String> = held
        .iter()
        .map(|it| String::from_utf8_lossy(&it.payload).into_owned())
        .collect();
    let held: Vec<ItemId> = held.iter().map(|it| it.id).collect();
    let request = match kind {
        Kind::Move => RebalanceRequest {
            queue: "q".into(),
            moves: vec![PartitionMove {
                partition: 0,
                to_store: "b".into(),
            }],
            ..Default::default()
        },
        Kind::Shrink => RebalanceRequest {
            queue: "q".into(),
            partitions: 2,
            ..Default::default()
        },
    };
    let task = e.rebalance_start(request).await.expect("start");
    // Cancelled at once: the old engine may die before it answers, or before it applies the cancel; the new one
    // must finish the job as a cancel either way (the operator asks again when there was no answer).
    let cancel_try = cancel.then(|| {
        let (e, id) = (e.clone(), task.id.clone());
        tokio::spawn(async move { e.rebalance_cancel(&id).await })
    });
    // The holder completes its leases during the move (the move waits for them before it switches). The process
    // may die before it answers: the holder then tries again after the restart.
    let first_try = {
        let (e, held) = (e.clone(), held.clone());
        tokio::spawn(async move { e.complete("q", source, held, T).await })
    };
    let c = crash.clone();
    run_until(&clock, &label, move || {
        let c = c.clone();
        Box::pin(async move { c.tripped() })
    })
    .await;

    // "Restart": a new engine on the same storage; the old one is dead (every call it makes hangs).
    let alive = Arc::new(Crash::default());
    let e2 = disk.engine(&clock, &alive);
    if let Some(c) = cancel_try {
        if c.is_finished() {
            c.await.expect("join").expect("cancel");
        } else {
            c.abort();
            e2.rebalance_cancel(&task.id).await.expect("cancel again");
        }
    }
    assert_eq!(e2.resume_rebalances().await.expect("resume"), 1, "{label}");
    if !first_try.is_finished() {
        // No answer before the "crash": complete again; either the first try reached storage (the ids are
        // unknown now) or this one completes them.
        first_try.abort();
        let _ = e2.complete("q", source, held.clone(), T).await;
    } else {
        first_try.await.expect("join").expect("complete during the move");
    }
    // A consumer takes and completes a batch at once (the queue serves as soon as it loads): none of it may come
    // back, so the chunk in flight must be settled before anything is served.
    let mut done_after: Vec<String> = Vec::new();
    for w in 0..4 {
        let l = e2
            .lease("q", 250, &format!("after{w}"), T)
            .await
            .expect("lease after restart");
        done_after.extend(
            l.items
                .iter()
                .map(|it| String::from_utf8_lossy(&it.payload).into_owned()),
        );
        e2.complete("q", l.partition, l.items.iter().map(|it| it.id).collect(), T)
            .await
            .expect("complete after restart");
    }
    let (e3, id) = (e2.clone(), task.id.clone());
    run_until(&clock, &label, move || {
        let (e, id) = (e3.clone(), id.clone());
        Box::pin(async move {
            e.rebalance_get(&id)
                .await
                .is_ok_and(|t| !matches!(t.status, RebalanceStatus::Running | RebalanceStatus::Cancelling))
        })
    })
    .await;
    let t = e2.rebalance_get(&task.id).await.expect("get");
    let want_status = if cancel {
        RebalanceStatus::Cancelled
    } else {
        RebalanceStatus::Completed
    };
    assert_eq!(t.status, want_status, "{label}: {t:?}");

    // Every item once, in the state it had; the completed ones gone.
    let info = e2.queue_info("q").await.expect("info");
    let after = every_item(&e2, info.partitions.len() as u32).await;
    let mut want = before.clone();
    for p in held_payloads.iter().chain(done_after.iter()) {
        want.remove(p);
    }
    // Held items were leased when `before` was read (browse shows them); they are gone now.
    let missing: Vec<_> = want.keys().filter(|k| !after.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = after.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{label}: missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(after, want, "{label}: states kept");
    match kind {
        // A cancelled move that had started (its first chunk was journalled) finishes too.
        Kind::Move => {
            assert_eq!(info.partitions.len(), 2, "{label}");
            assert_eq!(info.partitions[0].storage_name, "b", "{label}");
            assert_eq!(info.partitions[1].storage_name, "a", "{label}");
        }
        // A cancelled shrink keeps its partitions (and the items partition 2 still holds).
        Kind::Shrink if cancel => assert_eq!(info.partitions.len(), 3, "{label}"),
        Kind::Shrink => assert_eq!(info.partitions.len(), 2, "{label}"),
    }
    if !(cancel && matches!(kind, Kind::Shrink)) {
        // The old partition is gone from `a`: opening it again finds a new, empty one, without the dedup records
        // the old one kept.
        let old = disk.a.open("q", source).await.expect("open");
        let c = old.counts().await.expect("counts");
        assert_eq!(c.ready + c.leased + c.scheduled, 0, "{label}");
        assert!(
            old.dedup_records(clock.now()).await.expect("dedup").is_empty(),
            "{label}: the old partition was left behind"
        );
    }
    // The keys of the moved items are still known: producing one again stores nothing.
    let total = after.len();
    let key_of_source: Vec<ProduceItem> = (1..=n)
        .filter(|i| i % 50 == 0)
        .map(|i| ProduceItem {
            payload: Bytes::from(format!("dup{i}")),
            dedup_id: format!("key-{i}"),
            ..Default::default()
        })
        .collect();
    for chunk in key_of_source.chunks(100) {
        e2.produce("q", chunk.to_vec(), T)
            .await
            .expect("produce known keys");
    }
    assert_eq!(
        every_item(&e2, info.partitions.len() as u32).await.len(),
        total,
        "{label}: known keys were stored again"
    );
    e2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_killed_at_each_step_of_a_chunk_resumes_with_every_item_once() {
    for (step, nth) in [
        (Step::AfterJournal, 2),
        (Step::AfterImport, 2),
        (Step::AfterDelete, 2),
        (Step::AfterPlacement, 1),
        (Step::BeforeDestroy, 1),
    ] {
        crash_and_replay(Kind::Move, step, nth, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_killed_at_each_step_of_a_chunk_resumes_with_every_item_once() {
    for (step, nth) in [
        (Step::AfterJournal, 2),
        (Step::AfterImport, 2),
        (Step::AfterDelete, 2),
        (Step::AfterPlacement, 1),
        (Step::BeforeDestroy, 1),
    ] {
        crash_and_replay(Kind::Shrink, step, nth, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rebalance_killed_mid_chunk_resumes_as_a_cancel() {
    for kind in [Kind::Move, Kind::Shrink] {
        for step in [Step::AfterJournal, Step::AfterImport, Step::AfterDelete] {
            crash_and_replay(kind, step, 1, true).await;
        }
    }
}

/// A chunk whose delete from the source fails (a storage error, no crash) is settled by the replay of its journal
/// at the next step, 500 ms later; the source's lifecycle must not run in between. It did: a scheduled item of the
/// chunk (already copied to the destination) that came due was requeued in the source with a new id, so the
/// replay, which looks the chunk up by id, found nothing to settle, and the move then carried the requeued item
/// over a second time: every such item was served twice from the partition's new store. (The same for a shrink's
/// source, and after a crash whose replay failed once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_whose_delete_failed_is_not_doubled_by_a_schedule_coming_due_before_its_replay() {
    let clock = ManualClock::starting_now();
    let failing = Arc::new(AtomicBool::new(false));
    let fail = failing.clone();
    let hook = lessor_testkit::hooked::before(move |c| {
        if c.op == Op::Delete && fail.load(Ordering::SeqCst) {
            Err(StorageError::other(
                "injected: the source's disk refused the delete",
            ))
        } else {
            Ok(())
        }
    });
    let b = Arc::new(MemoryStore::new());
    let e = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![
            NamedStore {
                name: "a".into(),
                affinity: 1.0,
                store: Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), hook)),
            },
            NamedStore {
                name: "b".into(),
                affinity: 0.0,
                store: b.clone(),
            },
        ],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("create");
    // Ten items scheduled a second from now, in partition 0 (the only one while they are produced).
    let due = clock.now().add(Duration::from_secs(1));
    let items: Vec<ProduceItem> = (0..10)
        .map(|i| ProduceItem {
            payload: Bytes::from(format!("s{i}")),
            enqueue_at: due,
            ..Default::default()
        })
        .collect();
    e.produce("q", items, T).await.expect("produce");
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
    // The chunk reached `b`; its delete from `a` fails, and is tried again every 500 ms.
    run_until(&clock, "the chunk is imported", || {
        let b = b.clone();
        Box::pin(async move {
            let c = b
                .open("q", 0)
                .await
                .expect("open")
                .counts()
                .await
                .expect("counts");
            c.scheduled == 10
        })
    })
    .await;
    // The schedule comes due while the delete still fails.
    for _ in 0..8 {
        clock.advance(Duration::from_millis(250));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    failing.store(false, Ordering::SeqCst);
    let (e2, id) = (e.clone(), task.id.clone());
    run_until(&clock, "the move completes", move || {
        let (e, id) = (e2.clone(), id.clone());
        Box::pin(async move {
            e.rebalance_get(&id)
                .await
                .is_ok_and(|t| t.status == RebalanceStatus::Completed)
        })
    })
    .await;
    // `every_item` panics on an item seen twice.
    let all = every_item(&e, 2).await;
    assert_eq!(all.len(), 10, "{all:?}");
    e.shutdown().await;
}

/// The task's `moved` counts every item moved, across a crash too. The watcher saves the queue task's count every
/// 200 ms; a chunk moved after its last save and before the kill was counted by nobody after the restart (the replay
/// found it gone from the source, so it added nothing), and the finished task reported fewer items moved than it
/// moved (800 or 300 of 1,300 here). The chunk's journal now carries the count it reaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_killed_after_a_chunk_left_the_source_still_counts_it() {
    let disk = Disk::new();
    let clock = ManualClock::starting_now();
    let crash = Crash::at(Step::AfterDelete, 2);
    let e = disk.engine(&clock, &crash);
    e.create_queue(QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(24 * 3600),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("create");
    for c in 0..13 {
        let batch: Vec<ProduceItem> = (0..100)
            .map(|i| ProduceItem {
                payload: Bytes::from(format!("i{:05}", c * 100 + i)),
                ..Default::default()
            })
            .collect();
        e.produce("q", batch, T).await.expect("produce");
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
            ..Default::default()
        })
        .await
        .expect("start");
    let c = crash.clone();
    run_until(&clock, "the crash", move || {
        let c = c.clone();
        Box::pin(async move { c.tripped() })
    })
    .await;
    let alive = Arc::new(Crash::default());
    let e2 = disk.engine(&clock, &alive);
    assert_eq!(e2.resume_rebalances().await.expect("resume"), 1);
    let (e3, id) = (e2.clone(), task.id.clone());
    run_until(&clock, "the move completes", move || {
        let (e, id) = (e3.clone(), id.clone());
        Box::pin(async move {
            e.rebalance_get(&id)
                .await
                .is_ok_and(|t| t.status == RebalanceStatus::Completed)
        })
    })
    .await;
    assert_eq!(every_item(&e2, 2).await.len(), 1300);
    let t = e2.rebalance_get(&task.id).await.expect("get");
    assert_eq!(t.moved, 1300, "{t:?}");
    e2.shutdown().await;
}
