//! Engine tests that need a store the real backends cannot imitate: a partition whose produce hangs.
//!
//! The store here is a test double kept inside the core (which has no backend to wrap): partitions open, report
//! empty counts, and store produced items only once the test lets them; every other call is unused by these tests
//! and fails loudly if reached.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

use super::{Engine, EngineConfig, NamedStore, ProduceItem, QueueUpdate};
use crate::error::{ItemError, QueueError, StorageError, StorageErrorKind};
use crate::storage::{
    LifecycleOutcome, LifecyclePolicy, Partition, PartitionStore, QueuesStore, RetryOp, RetryOutcome,
};
use crate::time::{ManualClock, Ts};
use crate::types::{
    ClearRequest, Item, ItemId, Limits, NewItem, PartitionCounts, PartitionInfo, PartitionStats, QueueInfo,
};

/// Queue definitions in a map.
#[derive(Debug, Default)]
struct Queues(
    Mutex<BTreeMap<String, QueueInfo>>,
    Arc<crate::auth::memory::MemoryAuthStore>,
    /// Calls of `list`.
    AtomicUsize,
);

#[async_trait]
impl QueuesStore for Queues {
    fn auth(&self) -> Arc<dyn crate::auth::AuthStore> {
        self.1.clone()
    }
    async fn get(&self, name: &str) -> Result<Option<QueueInfo>, StorageError> {
        Ok(self.0.lock().expect("queues lock").get(name).cloned())
    }
    async fn add(&self, info: &QueueInfo) -> Result<(), StorageError> {
        self.0
            .lock()
            .expect("queues lock")
            .insert(info.name.clone(), info.clone());
        Ok(())
    }
    async fn update(&self, info: &QueueInfo) -> Result<(), StorageError> {
        self.add(info).await
    }
    async fn delete(&self, name: &str) -> Result<(), StorageError> {
        self.0.lock().expect("queues lock").remove(name);
        Ok(())
    }
    async fn list(&self, pivot: &str, limit: usize) -> Result<Vec<QueueInfo>, StorageError> {
        self.2.fetch_add(1, Ordering::Relaxed);
        let queues = self.0.lock().expect("queues lock");
        Ok(queues
            .range(pivot.to_string()..)
            .take(limit)
            .map(|(_, q)| q.clone())
            .collect())
    }
    async fn close(&self) {}
}

/// The test's side of a deferred write's durability.
type DurableTx = tokio::sync::oneshot::Sender<Result<(), StorageError>>;

/// A store whose produce calls wait for a permit from `gate` (none at first: they hang).
#[derive(Debug, Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    /// Set once a produce call has started waiting.
    entered: Arc<AtomicBool>,
    /// Items produce calls stored.
    stored: Arc<AtomicUsize>,
    /// Whether the store says other servers share it.
    shared: bool,
    /// Time each `counts` call takes, on the test's clock.
    counts_cost: Option<(ManualClock, Duration)>,
    /// `counts` calls so far.
    counts_calls: Arc<AtomicUsize>,
    /// `stats` calls so far.
    stats_calls: Arc<AtomicUsize>,
    /// The payloads of each produce call that stored, in order.
    calls: Arc<Mutex<Vec<Vec<bytes::Bytes>>>>,
    /// Produce calls let through the gate so far.
    produces: Arc<AtomicUsize>,
    /// The produce call (1 for the first let through, 0 for none) that fails, leaving the partition healthy.
    fail_produce: Arc<AtomicUsize>,
    /// When set, a produce inside a queue task's pass returns once written and defers its durability to the pass
    /// (as fjall does); the test makes each write durable (or not) through the senders collected here.
    durable: Option<Arc<Mutex<Vec<DurableTx>>>>,
    /// When set, `create` of a queue of this name waits for a permit from the semaphore (none at first).
    create_gate: Option<(&'static str, Arc<Semaphore>)>,
    /// Set once a gated `create` has started waiting.
    create_entered: Arc<AtomicBool>,
    /// What `next_deadline` reports (a ready item's expiry, say).
    deadline: Option<Ts>,
}

impl Gated {
    fn new() -> Self {
        Gated {
            gate: Arc::new(Semaphore::new(0)),
            entered: Arc::new(AtomicBool::new(false)),
            stored: Arc::new(AtomicUsize::new(0)),
            shared: false,
            counts_cost: None,
            counts_calls: Arc::new(AtomicUsize::new(0)),
            stats_calls: Arc::new(AtomicUsize::new(0)),
            calls: Arc::default(),
            produces: Arc::default(),
            fail_produce: Arc::default(),
            durable: None,
            create_gate: None,
            create_entered: Arc::default(),
            deadline: None,
        }
    }

    /// A shared store whose `counts` takes `cost` of `clock`'s time.
    fn shared_with_slow_counts(clock: &ManualClock, cost: Duration) -> Self {
        Gated {
            shared: true,
            counts_cost: Some((clock.clone(), cost)),
            ..Gated::new()
        }
    }
}

#[async_trait]
impl PartitionStore for Gated {
    fn driver(&self) -> &'static str {
        "gated"
    }
    fn shared(&self) -> bool {
        self.shared
    }
    async fn create(&self, queue: &str, _partitions: &[u32]) -> Result<(), StorageError> {
        if let Some((name, gate)) = &self.create_gate {
            if queue == *name {
                self.create_entered.store(true, Ordering::SeqCst);
                let _permit = gate.acquire().await.expect("create gate");
            }
        }
        Ok(())
    }
    async fn open(&self, _queue: &str, _partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        Ok(Arc::new(self.clone()))
    }
    async fn destroy(&self, _queue: &str, _partition: u32) -> Result<(), StorageError> {
        Ok(())
    }
    async fn close(&self) {}
}

fn unused<T>() -> Result<T, StorageError> {
    Err(StorageError::other("not used by these tests"))
}

#[async_trait]
impl Partition for Gated {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        self.entered.store(true, Ordering::SeqCst);
        let permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| StorageError::unavailable("gate closed"))?;
        permit.forget();
        if self.produces.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_produce.load(Ordering::SeqCst) {
            return Err(StorageError::new(
                StorageErrorKind::PayloadUnavailable,
                "injected",
            ));
        }
        self.calls
            .lock()
            .expect("calls lock")
            .push(items.iter().map(|it| it.payload.clone()).collect());
        let first = self.stored.fetch_add(items.len(), Ordering::SeqCst) as u64;
        if let Some(durable) = &self.durable {
            let (tx, rx) = tokio::sync::oneshot::channel();
            durable.lock().expect("durable lock").push(tx);
            if let Some(wait) = crate::durability::defer(rx) {
                wait.await
                    .map_err(|_| StorageError::unavailable("durability dropped"))??;
            }
        }
        Ok((0..items.len() as u64).map(|i| ItemId(first + i + 1)).collect())
    }
    async fn lease(&self, _n: usize, _deadline: Ts) -> Result<Vec<Item>, StorageError> {
        unused()
    }
    async fn complete(&self, _r: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        unused()
    }
    async fn extend(&self, _r: Vec<(Vec<ItemId>, Ts)>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        unused()
    }
    async fn dedup_records(&self, _now: Ts) -> Result<Vec<crate::types::DedupRecord>, StorageError> {
        Ok(Vec::new())
    }
    async fn retry(
        &self,
        _r: Vec<Vec<RetryOp>>,
        _p: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        unused()
    }
    async fn lifecycle(
        &self,
        _now: Ts,
        _p: LifecyclePolicy,
        _limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        unused()
    }
    async fn dead_items(&self, _limit: usize) -> Result<Vec<Item>, StorageError> {
        unused()
    }
    async fn remove_dead(&self, _ids: Vec<ItemId>) -> Result<(), StorageError> {
        unused()
    }
    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        Ok(self.deadline)
    }
    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        self.counts_calls.fetch_add(1, Ordering::SeqCst);
        if let Some((clock, cost)) = &self.counts_cost {
            clock.advance(*cost);
        }
        Ok(PartitionCounts::default())
    }
    async fn stats(&self, _now: Ts) -> Result<PartitionStats, StorageError> {
        self.stats_calls.fetch_add(1, Ordering::SeqCst);
        // Every stored item in memory, one byte each.
        let n = self.stored.load(Ordering::SeqCst) as u64;
        let mut s = PartitionStats::default();
        s.tiers.memory = crate::types::TierFigures { items: n, bytes: n };
        Ok(s)
    }
    async fn list(
        &self,
        _pivot: Option<ItemId>,
        _limit: usize,
        _scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        unused()
    }
    async fn import(&self, _items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        unused()
    }
    async fn delete(&self, _ids: Vec<ItemId>) -> Result<(), StorageError> {
        unused()
    }
    async fn clear(&self, _request: ClearRequest) -> Result<(), StorageError> {
        unused()
    }
    async fn close(&self) {}
}

async fn engine_over(store: &Gated, clock: &ManualClock) -> Engine {
    engine_with_limits(store, clock, Limits::default()).await
}

async fn engine_with_limits(store: &Gated, clock: &ManualClock, limits: Limits) -> Engine {
    engine_with_clock(store, Arc::new(clock.clone()), limits).await
}

async fn engine_with_clock(store: &Gated, clock: crate::time::SharedClock, limits: Limits) -> Engine {
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(Queues::default()),
        stores: vec![NamedStore {
            name: "gated".into(),
            affinity: 1.0,
            store: Arc::new(store.clone()),
        }],
        limits,
        clock,
    })
    .expect("engine");
    engine
        .create_queue(QueueInfo {
            name: "q".into(),
            lease_timeout: Duration::from_secs(60),
            expire_timeout: Duration::from_secs(3600),
            requested_partitions: 1,
            dedup_window: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("create");
    engine
}

fn item(p: &'static str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from_static(p.as_bytes()),
        ..Default::default()
    }
}

/// Waits (in real time, briefly) until `cond` holds; the engine runs on other tasks.
async fn until(cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition never held");
}

/// Bounds a wait that must finish, so a regression fails instead of hanging the test run.
async fn finishes<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("finished without the test waiting for it")
}

#[tokio::test]
async fn produce_gives_up_with_454_when_storage_hangs_past_request_timeout() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let engine = engine_over(&store, &clock).await;
    let produce = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .produce("q", vec![item("a")], Some(Duration::from_secs(5)))
                .await
        })
    };
    until(|| store.entered.load(Ordering::SeqCst)).await;

    // Within the timeout the produce keeps waiting for storage.
    clock.advance(Duration::from_secs(4));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!produce.is_finished(), "gave up before its request_timeout");

    clock.advance(Duration::from_secs(1));
    let err = finishes(produce)
        .await
        .expect("joined")
        .expect_err("a hung store must not answer 200");
    assert!(matches!(err, QueueError::RequestTimeout("produce")), "{err:?}");
    // The same constant part as the lease timeout: clients treat both as "retry the request".
    assert_eq!(
        err.to_string(),
        "request timeout; produce did not finish within request_timeout, try again"
    );
    assert_eq!(store.stored.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn produce_that_timed_out_in_the_inbox_is_not_stored_later() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let engine = engine_over(&store, &clock).await;
    let timeout = Some(Duration::from_secs(5));
    // The first produce holds the queue task in a hung storage call...
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.produce("q", vec![item("a")], timeout).await })
    };
    until(|| store.entered.load(Ordering::SeqCst)).await;
    // ...so the second waits in the inbox until both callers give up.
    let second = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.produce("q", vec![item("b"), item("c")], timeout).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    clock.advance(Duration::from_secs(6));
    for p in [first, second] {
        let err = finishes(p).await.expect("joined").expect_err("timed out");
        assert!(matches!(err, QueueError::RequestTimeout(_)), "{err:?}");
    }

    // Storage comes back: the call in flight finishes, the abandoned request is dropped, not stored.
    store.gate.add_permits(10);
    finishes(engine.stats("q")).await.expect("stats");
    assert_eq!(
        store.stored.load(Ordering::SeqCst),
        1,
        "only the call in flight stored"
    );

    // And a fresh produce is stored as usual.
    finishes(engine.produce("q", vec![item("d")], timeout))
        .await
        .expect("produce after recovery");
    assert_eq!(store.stored.load(Ordering::SeqCst), 2);
}

/// A store that holds at most 8 partitions of a queue and records what the engine asks it to create and destroy.
#[derive(Debug, Default)]
struct Small {
    created: Mutex<Vec<(String, Vec<u32>)>>,
    destroyed: Mutex<Vec<(String, Vec<u32>)>>,
}

#[async_trait]
impl PartitionStore for Small {
    fn driver(&self) -> &'static str {
        "small"
    }
    fn max_partitions(&self) -> u32 {
        8
    }
    async fn create(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.created
            .lock()
            .expect("lock")
            .push((queue.to_string(), partitions.to_vec()));
        Ok(())
    }
    async fn open(&self, _queue: &str, _partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        unused()
    }
    async fn destroy(&self, _queue: &str, _partition: u32) -> Result<(), StorageError> {
        unused()
    }
    async fn destroy_many(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.destroyed
            .lock()
            .expect("lock")
            .push((queue.to_string(), partitions.to_vec()));
        Ok(())
    }
    async fn close(&self) {}
}

#[tokio::test]
async fn partitions_are_created_before_the_answer_within_each_stores_maximum_and_destroyed_in_one_call() {
    let small = Arc::new(Small::default());
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(Queues::default()),
        stores: vec![NamedStore {
            name: "small-0".into(),
            affinity: 1.0,
            store: small.clone(),
        }],
        limits: Limits::default(),
        clock: Arc::new(ManualClock::starting_now()),
    })
    .expect("engine");
    let info = |n: u32| QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: n,
        ..Default::default()
    };
    let e = engine
        .create_queue(info(9))
        .await
        .expect_err("over the store's maximum");
    assert_eq!(
        e.to_string(),
        "requested_partitions is invalid; partition storage 'small-0' (small) holds at most '8' partitions of one \
         queue, this placement puts '9' there"
    );
    assert!(
        small.created.lock().expect("lock").is_empty(),
        "nothing created for a refused queue"
    );
    assert!(engine.queue_info("q").await.is_err(), "and no definition stored");

    engine.create_queue(info(3)).await.expect("create");
    assert_eq!(
        *small.created.lock().expect("lock"),
        vec![("q".to_string(), vec![0, 1, 2])]
    );
    let grow = |n: u32| QueueUpdate {
        name: "q".into(),
        requested_partitions: Some(n),
        ..Default::default()
    };
    engine
        .update_queue(grow(9))
        .await
        .expect_err("growth over the maximum");
    engine.update_queue(grow(5)).await.expect("grow");
    assert_eq!(
        small.created.lock().expect("lock").last(),
        Some(&("q".to_string(), vec![3, 4])),
        "only the new partitions"
    );
    engine.delete_queue("q").await.expect("delete");
    assert_eq!(
        *small.destroyed.lock().expect("lock"),
        vec![("q".to_string(), vec![0, 1, 2, 3, 4])],
        "one call for the whole queue"
    );
}

/// A shared partition is re-read every `limits.shared_refresh` (500 ms), but never sooner than 20 times what the last
/// re-read took: counting a deep partition in a database costs time that grows with its depth, and the queue waits.
#[tokio::test]
async fn a_slow_refresh_of_a_shared_partition_spaces_out_the_next() {
    let clock = ManualClock::starting_now();
    let store = Gated::shared_with_slow_counts(&clock, Duration::from_millis(100));
    let engine = engine_over(&store, &clock).await;
    store.gate.add_permits(1);
    finishes(engine.produce("q", vec![item("a")], Some(Duration::from_secs(5))))
        .await
        .expect("produce");
    let calls = || store.counts_calls.load(Ordering::SeqCst);
    until(|| calls() >= 1).await;
    let first = calls();
    // The re-read took 100 ms: the next one waits 2 s, not 500 ms.
    for _ in 0..17 {
        clock.advance(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        calls(),
        first,
        "re-read again within 20 times the cost of the last one"
    );
    clock.advance(Duration::from_millis(500));
    until(|| calls() > first).await;
}

fn keyed(key: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(format!("payload of {key}")),
        dedup_id: key.to_string(),
        ..Default::default()
    }
}

/// `limits.max_dedup_keys` bounds a queue's live keys: a produce that would add keys beyond it stores nothing and
/// gets 454 `DedupFull`; items without keys, and repeats of keys already held, still go through; once keys leave the
/// window, new ones are taken again.
#[tokio::test]
async fn dedup_keys_beyond_the_limit_are_refused_until_the_window_moves_on() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    store.gate.add_permits(100);
    let limits = Limits {
        max_dedup_keys: 3,
        ..Limits::default()
    };
    let engine = engine_with_limits(&store, &clock, limits).await;
    let t = Some(Duration::from_secs(5));
    finishes(engine.produce("q", vec![keyed("a"), keyed("b")], t))
        .await
        .expect("two keys");
    let err = finishes(engine.produce("q", vec![keyed("c"), keyed("d")], t))
        .await
        .expect_err("four keys are above the limit");
    assert!(matches!(err, QueueError::DedupFull(3)), "{err:?}");
    assert!(err.to_string().starts_with("queue is overloaded; "), "{err}");
    assert_eq!(
        store.stored.load(Ordering::SeqCst),
        2,
        "nothing of the refused request stored"
    );
    // A third key fits; a repeat of a held key and an item without a key need no room.
    finishes(engine.produce("q", vec![keyed("c")], t))
        .await
        .expect("third key");
    finishes(engine.produce("q", vec![keyed("a"), item("plain")], t))
        .await
        .expect("a duplicate and a plain item");
    assert_eq!(store.stored.load(Ordering::SeqCst), 4);
    assert!(matches!(
        finishes(engine.produce("q", vec![keyed("e")], t)).await,
        Err(QueueError::DedupFull(3))
    ));
    // The window (60 s) passes: the old keys leave and new ones fit.
    clock.advance(Duration::from_secs(61));
    finishes(engine.produce("q", vec![keyed("e"), keyed("f")], t))
        .await
        .expect("room again");
    assert_eq!(store.stored.load(Ordering::SeqCst), 6);
}

/// Produces `items` into queue "q" on a task of its own (timeout 5 s), so that the test can hold several in flight.
fn spawn_produce(
    engine: &Engine,
    items: Vec<ProduceItem>,
) -> tokio::task::JoinHandle<Result<(), QueueError>> {
    let engine = engine.clone();
    tokio::spawn(async move { engine.produce("q", items, Some(Duration::from_secs(5))).await })
}

/// Requests that reach the queue's task in one pass and share dedup keys: the first to claim a key stores it, one
/// that shares a key with it waits for that write and then finds the key stored (a duplicate: acknowledged, not
/// stored again), and a key repeated within one request is stored once. Every key is stored exactly once, and
/// every request is answered.
// Paused tokio time (the queue uses the manual clock): each sleep returns once the engine is idle.
#[tokio::test(start_paused = true)]
async fn requests_of_one_pass_that_share_keys_store_each_key_once() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let engine = engine_over(&store, &clock).await;
    // The first produce holds the queue's task in a hung storage call, so the next three wait in its inbox and
    // come in one pass.
    let produce = |items: Vec<ProduceItem>| spawn_produce(&engine, items);
    let hold = produce(vec![item("hold")]);
    until(|| store.entered.load(Ordering::SeqCst)).await;
    let a = produce(vec![keyed("k1"), keyed("k2")]);
    let b = produce(vec![keyed("k2"), keyed("k3")]);
    let c = produce(vec![keyed("k1"), keyed("k4"), keyed("k4"), item("plain")]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.gate.add_permits(10);
    for p in [hold, a, b, c] {
        finishes(p).await.expect("joined").expect("produce");
    }
    let calls = store.calls.lock().expect("calls lock").clone();
    let mut stored: Vec<&[u8]> = calls.iter().flatten().map(|p| p.as_ref()).collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            &b"hold"[..],
            b"payload of k1",
            b"payload of k2",
            b"payload of k3",
            b"payload of k4",
            b"plain"
        ],
        "each key once: {calls:?}"
    );
    // The requests that shared a key with an earlier one of the pass were stored in a later call: one call for
    // the held produce, one for each round of the pass.
    assert!(calls.len() >= 3, "{calls:?}");
    let dups = engine
        .queue_metrics()
        .into_iter()
        .find(|(q, _)| q == "q")
        .map(|(_, m)| m.deduplicated.load(Ordering::SeqCst))
        .expect("queue metrics");
    assert_eq!(dups, 3, "k1, k2 and the second k4 acknowledged as duplicates");
}

/// A request that shares a key with an earlier request of its pass waits for that request's write, and when the
/// write fails it stores the item itself: a key is never acknowledged as a duplicate of an item that was not
/// stored.
// Paused tokio time (the queue uses the manual clock): each sleep returns once the engine is idle.
#[tokio::test(start_paused = true)]
async fn a_request_sharing_a_key_stores_it_when_the_first_write_fails() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let engine = engine_over(&store, &clock).await;
    let produce = |items: Vec<ProduceItem>| spawn_produce(&engine, items);
    let hold = produce(vec![item("hold")]);
    until(|| store.entered.load(Ordering::SeqCst)).await;
    // The second call (the first of the pass: the request that claims k1 and k2 first) fails.
    store.fail_produce.store(2, Ordering::SeqCst);
    let a = produce(vec![keyed("k1"), keyed("k2")]);
    let b = produce(vec![keyed("k2"), keyed("k3")]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.gate.add_permits(10);
    finishes(hold).await.expect("joined").expect("produce");
    let a = finishes(a).await.expect("joined");
    let b = finishes(b).await.expect("joined");
    assert!(a.is_err(), "the first write failed: {a:?}");
    b.expect("the second request stores its items");
    let mut stored: Vec<bytes::Bytes> = store.calls.lock().expect("calls lock").concat();
    stored.sort();
    assert_eq!(
        stored,
        [&b"hold"[..], b"payload of k2", b"payload of k3"],
        "k2 stored by the second request"
    );
    // k1 was given back with the failed write: a retry of it is stored.
    finishes(engine.produce("q", vec![keyed("k1")], Some(Duration::from_secs(5))))
        .await
        .expect("retry");
    assert_eq!(store.stored.load(Ordering::SeqCst), 4);
}

/// A produce answered as a duplicate vouches for the item its key first came with. When that item's write is not
/// durable yet (its pass's fsync still runs while the queue's task goes on to the next pass), the duplicate's answer
/// waits for it, and fails when it fails: a crash in between cannot lose an item a duplicate was acknowledged for.
// Paused tokio time (the queue uses the manual clock): each sleep returns once the engine is idle.
#[tokio::test(start_paused = true)]
async fn a_duplicate_is_answered_once_the_original_is_durable() {
    let clock = ManualClock::starting_now();
    let mut store = Gated::new();
    let durable = Arc::new(Mutex::new(Vec::new()));
    store.durable = Some(durable.clone());
    store.gate.add_permits(100);
    let engine = engine_over(&store, &clock).await;
    let produce = |items: Vec<ProduceItem>| spawn_produce(&engine, items);
    let writes = || durable.lock().expect("durable lock").len();
    let settle = |i: usize, r: Result<(), StorageError>| {
        let tx = std::mem::replace(
            &mut durable.lock().expect("durable lock")[i],
            tokio::sync::oneshot::channel().0,
        );
        tx.send(r).expect("the pass waits");
    };

    // The original is written; its durability is pending.
    let a = produce(vec![keyed("k")]);
    until(|| writes() == 1).await;
    // A duplicate of it, and a request with a duplicate and a new key, come in later passes.
    let b = produce(vec![keyed("k")]);
    let c = produce(vec![keyed("k"), keyed("new")]);
    until(|| writes() == 2).await;
    settle(1, Ok(()));
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(
        !a.is_finished() && !b.is_finished() && !c.is_finished(),
        "answered before the original was durable"
    );
    settle(0, Ok(()));
    for p in [a, b, c] {
        finishes(p).await.expect("joined").expect("produce");
    }
    assert_eq!(store.stored.load(Ordering::SeqCst), 2, "k and new");

    // The original's fsync fails: the duplicate is not acknowledged either.
    let d = produce(vec![keyed("k2")]);
    until(|| writes() == 3).await;
    let e = produce(vec![keyed("k2")]);
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(!e.is_finished(), "answered before the original was durable");
    settle(2, Err(StorageError::unavailable("fsync failed")));
    let d = finishes(d).await.expect("joined");
    let e = finishes(e).await.expect("joined");
    assert!(d.is_err() && e.is_err(), "{d:?} {e:?}");
    // Nor later: the key is still claimed, but its item was never made durable.
    let f = finishes(engine.produce("q", vec![keyed("k2")], Some(Duration::from_secs(5)))).await;
    assert!(f.is_err(), "{f:?}");
}

/// The tier gauges of `/metrics` follow a queue that changes, read at most once per `TIER_REFRESH`, and a quiet
/// queue costs no stats call at all.
#[tokio::test]
async fn tier_gauges_refresh_at_most_every_tier_refresh_and_not_when_quiet() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    store.gate.add_permits(100);
    let engine = engine_over(&store, &clock).await;
    let memory_items = || {
        engine
            .queue_metrics()
            .into_iter()
            .find(|(q, _)| q == "q")
            .map(|(_, m)| m.tier_items[0].load(Ordering::SeqCst))
            .expect("queue metrics")
    };
    // A queue's task starts with its first request; its first pass reads the figures.
    finishes(engine.stats("q")).await.expect("stats");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let calls = store.stats_calls.load(Ordering::SeqCst);
    assert!(calls >= 1);
    assert_eq!(memory_items(), 0);
    let timeout = Some(Duration::from_secs(5));
    finishes(engine.produce("q", vec![item("a"), item("b")], timeout))
        .await
        .expect("produce");
    // Within TIER_REFRESH of the last read, nothing is read yet.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.stats_calls.load(Ordering::SeqCst),
        calls,
        "read again too soon"
    );
    assert_eq!(memory_items(), 0);
    // Once it is due, the task wakes by itself and reads them.
    clock.advance(super::TIER_REFRESH);
    until(|| memory_items() == 2).await;
    let calls = store.stats_calls.load(Ordering::SeqCst);
    // Nothing changes: no more reads, however long the queue stays quiet.
    for _ in 0..5 {
        clock.advance(super::TIER_REFRESH * 2);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store.stats_calls.load(Ordering::SeqCst),
        calls,
        "a quiet queue was read"
    );
    // A stats request refreshes them at once, for free.
    finishes(engine.produce("q", vec![item("c")], timeout))
        .await
        .expect("produce");
    finishes(engine.stats("q")).await.expect("stats");
    assert_eq!(memory_items(), 3);
}

/// An engine over a counting queue store (definitions added to it directly) and one small store, for the
/// listing tests.
fn listing_engine(limits: Limits) -> (Engine, Arc<Queues>) {
    let queues = Arc::new(Queues::default());
    let engine = Engine::new(EngineConfig {
        queues: queues.clone(),
        stores: vec![NamedStore {
            name: "small-0".into(),
            affinity: 1.0,
            store: Arc::new(Small::default()),
        }],
        limits,
        clock: Arc::new(ManualClock::starting_now()),
    })
    .expect("engine");
    (engine, queues)
}

/// A page of one namespace's queues reads the definitions in chunks of at least [`super::MIN_LIST_CHUNK`], however
/// small the page: `queues.list` with limit 1 for a namespace holding none of 100,000 queues read them two at a
/// time (50,000 store reads, 1.7 s on fjall, against 0.13 s with limit 65,536), and so did `has_queues_in`, which
/// a namespace deletion asks.
#[tokio::test]
async fn a_namespace_page_reads_the_definitions_in_chunks() {
    let (engine, queues) = listing_engine(Limits::default());
    let def = |name: String, namespace: &str| QueueInfo {
        name,
        namespace: namespace.into(),
        ..Default::default()
    };
    for i in 0..2000 {
        queues.add(&def(format!("a{i:05}"), "a")).await.expect("add");
    }
    queues.add(&def("b1".into(), "b")).await.expect("add");
    queues.add(&def("b2".into(), "b")).await.expect("add");
    let calls = || queues.2.load(Ordering::Relaxed);
    let before = calls();
    let names = |page: super::QueuePage| page.queues.into_iter().map(|q| q.name).collect::<Vec<_>>();
    assert_eq!(names(engine.list_queues("", 1, "b").await.expect("list")), ["b1"]);
    assert_eq!(
        names(engine.list_queues("b1\0", 5, "b").await.expect("list")),
        ["b2"]
    );
    assert!(engine.has_queues_in("b").await.expect("b"));
    assert!(!engine.has_queues_in("c").await.expect("c"));
    // Unfiltered pages still read what they return (and one more).
    assert_eq!(engine.list_queues("", 3, "").await.expect("list").queues.len(), 3);
    let reads = calls() - before;
    assert!(
        reads <= 4 * 21 + 1,
        "5 lists over 2,002 definitions made {reads} reads"
    );
}

/// A page of queues is bounded by the partitions its definitions name, not only by `limit`: 50 queues of 65,536
/// partitions made a 65 MB `queues.list` page, and `limit` goes up to 65,536. With a bound of 100 partitions, queues
/// of 40 partitions come two a page (at least one, however wide), and paging goes on to the end with nothing skipped
/// or repeated.
#[tokio::test]
async fn a_page_of_queues_is_bounded_by_the_partitions_it_names() {
    let (engine, queues) = listing_engine(Limits {
        max_list_partitions: 100,
        ..Limits::default()
    });
    let def = |name: String, partitions: u32| QueueInfo {
        name,
        partitions: (0..partitions)
            .map(|p| PartitionInfo {
                partition: p,
                storage_name: "small-0".into(),
                read_only: false,
            })
            .collect(),
        ..Default::default()
    };
    for i in 0..300 {
        queues.add(&def(format!("s{i:03}"), 1)).await.expect("add");
    }
    for i in 0..9 {
        queues.add(&def(format!("w{i}"), 40)).await.expect("add");
    }
    queues.add(&def("x".into(), 500)).await.expect("add");
    let mut pivot = String::new();
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    loop {
        let page = engine.list_queues(&pivot, 1000, "").await.expect("list");
        let named: usize = page.queues.iter().map(|q| q.partitions.len()).sum();
        assert!(
            named <= 100 || page.queues.len() == 1,
            "a page of {} queues names {named} partitions",
            page.queues.len()
        );
        pages.push(page.queues.len());
        if let Some(last) = page.queues.last() {
            pivot = format!("{}\0", last.name);
        }
        seen.extend(page.queues.into_iter().map(|q| q.name));
        if !page.more {
            break;
        }
    }
    let mut all: Vec<String> = (0..300).map(|i| format!("s{i:03}")).collect();
    all.extend((0..9).map(|i| format!("w{i}")));
    all.push("x".into());
    assert_eq!(seen, all, "every queue once, in order");
    // 300 narrow queues take three pages of 100, the nine wide ones pages of two (the last alone), the widest one
    // a page of its own.
    assert_eq!(pages, [100, 100, 100, 2, 2, 2, 2, 1, 1], "{pages:?}");
}

/// A manual clock that jumps by `jump` at the `n`th reading after it is armed: a deterministic stand-in for time
/// passing at any instant of the task's loop.
#[derive(Clone, Debug)]
struct JumpClock {
    inner: ManualClock,
    countdown: Arc<std::sync::atomic::AtomicI64>,
    jump: Duration,
}

impl crate::time::Clock for JumpClock {
    fn now(&self) -> Ts {
        if self.countdown.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.advance(self.jump);
        }
        self.inner.now()
    }
    fn sleep_until(&self, deadline: Ts) -> crate::time::BoxFuture<'static, ()> {
        self.inner.sleep_until(deadline)
    }
}

/// The idle time passing at any point of the task's loop unloads the queue. It used to be lost when it passed
/// between the check after a pass and the loop's next reading of the clock: the loop then left the idle deadline out
/// of its wake-ups as already passed, without checking it, and the queue stayed loaded until its next request (a CI
/// failure of `idle_unload::a_queue_created_again_while_unloaded_here_counts_from_zero`).
#[tokio::test]
async fn the_idle_time_passing_anywhere_in_the_loop_unloads_the_queue() {
    let limits = Limits {
        queue_idle_unload: Duration::from_secs(60),
        ..Default::default()
    };
    let mut covered = 0;
    for n in 1..=200 {
        let clock = JumpClock {
            inner: ManualClock::starting_now(),
            countdown: Arc::new(std::sync::atomic::AtomicI64::new(0)),
            jump: Duration::from_secs(61),
        };
        let store = Gated::new();
        let engine = engine_with_clock(&store, Arc::new(clock.clone()), limits.clone()).await;
        finishes(engine.stats("q")).await.expect("stats loads the queue");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // The clock jumps at the `n`th reading from here: in the engine's delivery of a stats request, its pass,
        // the check after it or the loop that follows. (A stats request is a request, and changes nothing that
        // would wake the task again.)
        clock.countdown.store(n, Ordering::SeqCst);
        finishes(engine.stats("q")).await.expect("stats");
        for _ in 0..2000 {
            if engine.loaded_queues().0 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if clock.countdown.load(Ordering::SeqCst) > 0 {
            // Fewer readings than `n`: every reading has had its jump.
            engine.shutdown().await;
            break;
        }
        if engine.loaded_queues().0 == 1 {
            // A jump before the pass read the clock made the request a new one: the queue is idle one idle time
            // after it, and must wake for that.
            clock.inner.advance(Duration::from_secs(61));
            for _ in 0..2000 {
                if engine.loaded_queues().0 == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(
            engine.loaded_queues().0,
            0,
            "the clock jumped at reading {n}, and the idle queue did not unload"
        );
        covered = n;
        engine.shutdown().await;
    }
    assert!(covered >= 2, "the jump landed at {covered} readings only");
}

/// A sender that took the queue's handle just before the queue unloaded for being idle finds its inbox closed:
/// the engine loads the queue again and delivers the request there. (Before unloading existed, a closed inbox meant
/// the queue was going away, and the request was answered 454 "queue is shutting down".)
#[tokio::test]
async fn a_request_meeting_an_inbox_closed_by_an_unload_is_served_by_the_next_load() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let limits = Limits {
        queue_idle_unload: Duration::from_secs(60),
        ..Default::default()
    };
    let engine = engine_with_limits(&store, &clock, limits).await;
    finishes(engine.stats("q")).await.expect("stats loads the queue");
    let stale = finishes(engine.handle("q")).await.expect("handle");
    assert_eq!(engine.loaded_queues(), (1, 1));
    // Just short of the idle time: still loaded; past it, the task closes its inbox and goes.
    clock.advance(Duration::from_secs(59));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!stale.tx.is_closed());
    clock.advance(Duration::from_secs(2));
    until(|| stale.tx.is_closed()).await;
    until(|| engine.loaded_queues().0 == 0).await;
    let metrics = engine.queue_metrics();
    assert_eq!(metrics.len(), 1, "the unloaded queue is still reported");
    assert!(metrics[0].1.unloaded.load(Ordering::SeqCst));

    let (reply, answer) = super::queue::reply();
    let msg = super::Msg::Cold(super::queue::Cold::Stats(reply));
    let Err(tokio::sync::mpsc::error::TrySendError::Closed(msg)) = stale.tx.try_send(msg) else {
        panic!("the old inbox took the request");
    };
    assert!(finishes(engine.deliver("q", msg, None)).await.is_ok());
    let stats = finishes(answer.recv()).await.expect("answered");
    assert_eq!(stats.expect("stats").partitions.len(), 1);
    assert_eq!(engine.loaded_queues(), (1, 2), "loaded again, once");
    assert!(!engine.queue_metrics()[0].1.unloaded.load(Ordering::SeqCst));
}

/// [`Engine::forget_deleted_elsewhere`]: of 2,500 queues unloaded here, among 2,500 more never loaded here, every
/// third is deleted behind the engine's back (as another server sharing the store would): one sweep forgets exactly
/// those, over several pages of definitions, and keeps the rest; a second forgets nothing.
#[tokio::test]
async fn a_sweep_forgets_exactly_the_unloaded_queues_deleted_elsewhere() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let queues = Arc::new(Queues::default());
    let engine = Engine::new(EngineConfig {
        queues: queues.clone(),
        stores: vec![NamedStore {
            name: "gated".into(),
            affinity: 1.0,
            store: Arc::new(store.clone()),
        }],
        limits: Limits {
            queue_idle_unload: Duration::from_secs(60),
            ..Default::default()
        },
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    let info = |name: String| QueueInfo {
        name,
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        ..Default::default()
    };
    const N: usize = 2500;
    for i in 0..N {
        let name = format!("q{i:05}");
        engine.create_queue(info(name.clone())).await.expect("create");
        finishes(engine.stats(&name))
            .await
            .expect("stats loads the queue");
        // Never loaded here: the sweep must step over these.
        queues.add(&info(format!("q{i:05}-other"))).await.expect("add");
    }
    clock.advance(Duration::from_secs(61));
    for _ in 0..10_000 {
        if engine.loaded_queues().0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(engine.loaded_queues().0, 0, "every queue unloaded");
    assert_eq!(engine.queue_metrics().len(), N);
    let mut deleted = 0;
    for i in (0..N).step_by(3) {
        queues.delete(&format!("q{i:05}")).await.expect("delete");
        deleted += 1;
    }
    let lists = queues.2.load(Ordering::Relaxed);
    assert_eq!(
        finishes(engine.forget_deleted_elsewhere()).await.expect("sweep"),
        deleted
    );
    let pages = queues.2.load(Ordering::Relaxed) - lists;
    assert!(
        (4..=8).contains(&pages),
        "{pages} pages for about 4,200 definitions"
    );
    let mut left: Vec<String> = engine.queue_metrics().into_iter().map(|(q, _)| q).collect();
    left.sort();
    let expected: Vec<String> = (0..N)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("q{i:05}"))
        .collect();
    assert_eq!(left, expected);
    assert_eq!(
        finishes(engine.forget_deleted_elsewhere()).await.expect("sweep"),
        0
    );
}

/// The error of a call that must fail (its success value need not be `Debug`).
fn failed<T>(r: Result<T, QueueError>) -> QueueError {
    match r {
        Ok(_) => panic!("a call to a stuck queue succeeded"),
        Err(e) => e,
    }
}

/// Holds queue `q`'s task in a produce whose storage call hangs, and returns the produce's task (it succeeds once
/// the store's gate opens).
async fn stick(engine: &Engine, store: &Gated) -> tokio::task::JoinHandle<Result<(), QueueError>> {
    let produce = {
        let engine = engine.clone();
        // A request_timeout on the engine's (manual) clock, which the test never moves: the produce waits.
        tokio::spawn(async move {
            engine
                .produce("q", vec![item("a")], Some(Duration::from_secs(60)))
                .await
        })
    };
    until(|| store.entered.load(Ordering::SeqCst)).await;
    produce
}

/// Every admin call that waits for a queue's task gives up after `limits.default_request_timeout` with 454
/// `Untimed` when the task is stuck in a storage call, instead of waiting for as long as the call hangs (before:
/// clear, reload, the storage API, snapshots, restore pages, updates and deletes waited without bound). Time is
/// tokio's, paused: the bound passes without a real wait. The stuck queue is intact afterwards, and a delete
/// retried once storage answers deletes it.
#[tokio::test(start_paused = true)]
async fn admin_calls_to_a_stuck_queue_give_up_with_454_after_the_default_request_timeout() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let limit = Duration::from_secs(2);
    let limits = Limits {
        default_request_timeout: limit,
        ..Default::default()
    };
    let engine = engine_with_limits(&store, &clock, limits).await;
    let produce = stick(&engine, &store).await;

    let clear = ClearRequest {
        queue: true,
        ..Default::default()
    };
    let id = ItemId(1);
    let calls: Vec<(&str, QueueError)> = vec![
        ("clear", failed(finishes(engine.clear("q", clear)).await)),
        ("reload", failed(finishes(engine.reload("q")).await)),
        (
            "storage list",
            failed(finishes(engine.storage_list("q", 0, None, 10, false)).await),
        ),
        (
            "storage import",
            failed(finishes(engine.storage_import("q", 0, vec![Item::default()])).await),
        ),
        (
            "storage delete",
            failed(finishes(engine.storage_delete("q", 0, vec![id])).await),
        ),
        ("snapshot", failed(finishes(engine.snapshot("q", 0)).await)),
        (
            "restore import",
            failed(finishes(engine.restore_import("q", 0, 0, vec![Item::default()])).await),
        ),
        ("stats", failed(finishes(engine.stats("q")).await)),
        (
            "update",
            failed(
                finishes(engine.update_queue(QueueUpdate {
                    name: "q".into(),
                    max_attempts: Some(3),
                    ..Default::default()
                }))
                .await,
            ),
        ),
        ("update", failed(finishes(engine.set_paused("q", true)).await)),
        ("delete", failed(finishes(engine.delete_queue("q")).await)),
    ];
    for (what, err) in calls {
        assert!(
            matches!(err, QueueError::Untimed(w, l) if w == what && l == limit),
            "{what}: {err:?}"
        );
        // Querator's constant part: clients retry a "request timeout".
        assert!(err.to_string().starts_with("request timeout; "), "{err}");
    }

    // Storage answers: the stuck produce is stored and acknowledged, and the queue is still there, with the
    // definitions stored meanwhile. The delete that timed out got its shutdown into the inbox: the task stops, and
    // the next request loads the queue afresh.
    store.gate.add_permits(100);
    finishes(produce)
        .await
        .expect("joined")
        .expect("the stuck produce is stored");
    let info = finishes(engine.queue_info("q")).await.expect("still defined");
    assert_eq!(info.max_attempts, 3);
    assert!(info.paused);
    until(|| engine.loaded_queues().0 == 0).await;
    finishes(engine.produce("q", vec![item("b")], Some(Duration::from_secs(5))))
        .await
        .expect("served by the next load");
    assert_eq!(store.stored.load(Ordering::SeqCst), 2);
    let stats = finishes(engine.stats("q")).await.expect("stats");
    assert_eq!(stats.partitions.len(), 1);
    finishes(engine.delete_queue("q"))
        .await
        .expect("delete once storage answers");
    assert!(matches!(
        finishes(engine.queue_info("q")).await,
        Err(QueueError::QueueNotFound(_))
    ));
}

/// A queue whose task is stuck in a storage call, with its delete waiting for the task to stop, holds up nothing
/// of any other queue: another one is created, loaded, updated, paused and deleted meanwhile. (Before, the delete
/// waited for the stuck task under the engine-wide load lock, and every other queue's load, update and delete
/// waited behind it for as long as the storage call hung.) The stuck queue's delete itself ends with 454 at its
/// bound, and a queue can no longer name it as its dead-letter queue while it is being deleted.
#[tokio::test(start_paused = true)]
async fn a_stuck_queue_holds_no_other_queue_while_its_delete_waits() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let limit = Duration::from_secs(600);
    let limits = Limits {
        default_request_timeout: limit,
        ..Default::default()
    };
    let engine = engine_with_limits(&store, &clock, limits).await;
    let _produce = stick(&engine, &store).await;
    let delete = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.delete_queue("q").await })
    };
    // The delete took the queue's handle out of the table: it is waiting for the stuck task to stop.
    until(|| engine.inner.queues.read().expect("table").get("q").is_none()).await;

    let others = async {
        let info = QueueInfo {
            name: "other".into(),
            lease_timeout: Duration::from_secs(60),
            expire_timeout: Duration::from_secs(3600),
            requested_partitions: 1,
            ..Default::default()
        };
        engine.create_queue(info).await.expect("create");
        // Loads it.
        engine.stats("other").await.expect("stats");
        engine
            .update_queue(QueueUpdate {
                name: "other".into(),
                max_attempts: Some(5),
                ..Default::default()
            })
            .await
            .expect("update");
        engine.set_paused("other", true).await.expect("pause");
        assert_eq!(engine.queue_info("other").await.expect("info").max_attempts, 5);
        let err = engine
            .update_queue(QueueUpdate {
                name: "other".into(),
                dead_queue: Some("q".into()),
                ..Default::default()
            })
            .await
            .expect_err("q is being deleted");
        assert!(
            err.to_string().starts_with("dead_queue does not exist; "),
            "{err}"
        );
        engine.delete_queue("other").await.expect("delete");
    };
    // Well within the stuck delete's bound: none of it waits for the stuck queue.
    tokio::time::timeout(limit / 10, others)
        .await
        .expect("another queue's create, load, update and delete wait for a stuck one");
    assert!(!delete.is_finished(), "the stuck queue's delete gave up early");

    let err = tokio::time::timeout(limit * 2, delete)
        .await
        .expect("the delete gives up at its bound")
        .expect("joined")
        .expect_err("the task never stopped");
    assert!(
        matches!(err, QueueError::Untimed("delete", l) if l == limit),
        "{err:?}"
    );
    assert!(finishes(engine.queue_info("q")).await.is_ok(), "not deleted");
    store.gate.add_permits(100);
}

/// A create naming a dead-letter queue that is deleted while the create prepares its partitions fails, instead of
/// storing a queue that names a deleted one (a queue created later under that name, in any namespace, would receive
/// its dead letters). The dead-letter check ran before the partitions were prepared, outside the lock the delete's
/// check for users takes, so the delete found no user and went on.
#[tokio::test]
async fn a_create_naming_a_dead_letter_queue_deleted_meanwhile_fails() {
    let clock = ManualClock::starting_now();
    let gate = Arc::new(Semaphore::new(0));
    let store = Gated {
        create_gate: Some(("user", gate.clone())),
        ..Gated::new()
    };
    let engine = engine_over(&store, &clock).await;
    let queue = |name: &str, dead_queue: &str| QueueInfo {
        name: name.into(),
        dead_queue: dead_queue.into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        ..Default::default()
    };
    engine.create_queue(queue("dlq", "")).await.expect("dlq");
    let create = {
        let engine = engine.clone();
        let info = queue("user", "dlq");
        tokio::spawn(async move { engine.create_queue(info).await })
    };
    // The create checked its dead-letter queue and waits in its partitions' preparation.
    until(|| store.create_entered.load(Ordering::SeqCst)).await;
    finishes(engine.delete_queue("dlq"))
        .await
        .expect("no queue names dlq yet");
    gate.add_permits(1);
    let created = finishes(create).await.expect("create task");
    match created {
        Err(QueueError::Invalid(m)) => assert!(m.starts_with("dead_queue does not exist;"), "{m}"),
        other => panic!("a create naming a queue deleted meanwhile answered {other:?}"),
    }
    assert!(
        matches!(engine.queue_info("user").await, Err(QueueError::QueueNotFound(_))),
        "no definition of 'user' is left"
    );
}

/// Requests an unloading queue hands on to its next task wait for room in that task's inbox by
/// `limits.default-request-timeout`, then get 454: the task may be stuck in a storage call with a full inbox. The
/// wait was unbounded, so they (and the task forwarding them) stayed for as long as the storage call hung.
#[tokio::test(start_paused = true)]
async fn requests_handed_on_by_an_unloaded_queue_give_up_on_a_stuck_next_task() {
    let clock = ManualClock::starting_now();
    let store = Gated::new();
    let limit = Duration::from_secs(2);
    let limits = Limits {
        default_request_timeout: limit,
        max_requests_per_queue: 1,
        ..Default::default()
    };
    let engine = engine_with_limits(&store, &clock, limits).await;
    let _produce = stick(&engine, &store).await;
    let handle = engine
        .inner
        .queues
        .read()
        .expect("table")
        .get("q")
        .cloned()
        .expect("loaded");
    // One request fills the stuck task's inbox (room for one).
    let _fill = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.stats("q").await })
    };
    until(|| handle.tx.capacity() == 0).await;

    // As an unload hands them on (load 0 is no load's: the table is left alone).
    let (reply, answer) = super::queue::reply();
    engine.unloaded(
        "q",
        0,
        vec![super::Msg::Cold(super::queue::Cold::Stats(reply))],
        None,
    );
    let answered = finishes(answer.recv()).await.expect("answered");
    let err = failed(answered);
    assert!(
        matches!(err, QueueError::Untimed("delivery", l) if l == limit),
        "{err:?}"
    );
    store.gate.add_permits(100);
}

/// A queue whose earliest deadline passes while it unloads is loaded again at once, with no request. Its wake task
/// used to start before the queue's entry in the unloaded table existed: with the deadline past, it could run on
/// the other worker in between, find no entry, and end, so the queue was not loaded at its deadline (nor ever,
/// unless asked for). The window was a few instructions wide; the test widens it on purpose with a hook that runs
/// right before the tables are changed: it moves the clock past the deadline, then waits for any wake task started
/// so far to end. The wake task now starts under the unloaded table's lock, after the entry exists, and loads the
/// queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passed_during_the_unload_still_loads_the_queue() {
    let clock = ManualClock::starting_now();
    let store = Gated {
        deadline: Some(crate::time::Clock::now(&clock).add(Duration::from_secs(3600))),
        ..Gated::new()
    };
    let limits = Limits {
        queue_idle_unload: Duration::from_secs(60),
        ..Default::default()
    };
    let engine = engine_with_limits(&store, &clock, limits).await;
    finishes(engine.stats("q")).await.expect("stats loads the queue");
    assert_eq!(engine.loaded_queues(), (1, 1));
    let hook = {
        let clock = clock.clone();
        let inner = Arc::downgrade(&engine.inner);
        move || {
            clock.advance(Duration::from_secs(3600));
            let Some(inner) = inner.upgrade() else { return };
            // On this worker, blocking it: a wake task started before this point runs on the other one, and looks
            // for the queue's entry before it exists.
            let started = std::time::Instant::now();
            while inner.wake_tasks.load(Ordering::SeqCst) > 0 {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "a wake task never ended"
                );
                std::thread::yield_now();
            }
        }
    };
    *engine.inner.unload_hook.lock().expect("hook") = Some(super::TestHook(Arc::new(hook)));
    clock.advance(Duration::from_secs(61));
    until(|| engine.loaded_queues() == (1, 2)).await;
}
