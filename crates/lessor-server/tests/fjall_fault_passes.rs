//! Storage failures seen through the queue engine on fjall: a request whose write failed is never acknowledged,
//! a lease whose write failed hands nothing out, a complete whose write failed leaves the item leased, and the
//! queue serves again once the disk has room.

#![cfg(feature = "fjall")]

use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, LeaseResult, NamedStore, ProduceItem};
use lessor_core::error::QueueError;
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo, RetryItem};
use lessor_storage::fjall::{Durability, Fault, FjallStore};
use lessor_storage::memory::MemoryQueues;

const T: Option<Duration> = Some(Duration::from_secs(5));

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<FjallStore>,
    clock: ManualClock,
    engine: Engine,
}

async fn setup(info: QueueInfo) -> Setup {
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
    engine.create_queue(info).await.expect("create");
    // The manual clock moves on its own, so long-polls end and failed partitions are probed again.
    let c = clock.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.advance(Duration::from_millis(100));
        }
    });
    Setup {
        _dir: dir,
        store,
        clock,
        engine,
    }
}

fn info(partitions: u32) -> QueueInfo {
    QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(3600),
        expire_timeout: Duration::from_secs(36_000),
        requested_partitions: partitions,
        ..Default::default()
    }
}

fn item(p: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(p.to_string()),
        ..Default::default()
    }
}

async fn lease(e: &Engine, n: usize) -> Result<LeaseResult, QueueError> {
    e.lease("q", n, "c", Some(Duration::from_millis(300))).await
}

/// Retries `f` until it succeeds (the store reopens for writes a second after a failure, on the real clock).
async fn until_ok<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut last = None;
    for _ in 0..100 {
        match f().await {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never succeeded: {last:?}");
}

/// A lease whose write fails (disk full) hands nothing out; once the disk has room, the item is leased again
/// (it was not left leased in memory only), exactly once.
#[tokio::test]
async fn a_lease_whose_write_fails_hands_nothing_out() {
    let s = setup(info(1)).await;
    s.engine.produce("q", vec![item("x")], T).await.expect("produce");
    s.store.inject_fault(Some(Fault::NoSpace));
    let r = lease(&s.engine, 10).await;
    assert!(r.is_err(), "the lease's write failed: {r:?}");
    s.store.inject_fault(None);
    let got = until_ok(|| lease(&s.engine, 10)).await;
    assert_eq!(got.items.len(), 1, "the item is served after the failure");
    let ids = got.items.iter().map(|it| it.id).collect();
    s.engine
        .complete("q", got.partition, ids, T)
        .await
        .expect("complete");
    let again = lease(&s.engine, 10).await;
    assert!(again.is_err(), "nothing left: {again:?}");
}

/// A complete whose write fails leaves the item leased: once the disk has room, completing it again works.
#[tokio::test]
async fn a_complete_whose_write_fails_leaves_the_item_leased() {
    let s = setup(info(1)).await;
    s.engine.produce("q", vec![item("x")], T).await.expect("produce");
    let got = lease(&s.engine, 1).await.expect("lease");
    let ids: Vec<_> = got.items.iter().map(|it| it.id).collect();
    s.store.inject_fault(Some(Fault::NoSpace));
    let r = s.engine.complete("q", got.partition, ids.clone(), T).await;
    assert!(r.is_err(), "the complete's write failed: {r:?}");
    s.store.inject_fault(None);
    until_ok(|| s.engine.complete("q", got.partition, ids.clone(), T)).await;
    let again = lease(&s.engine, 10).await;
    assert!(again.is_err(), "the item is completed once: {again:?}");
}

/// One pass mixing produce, complete, retry and extend over two partitions while the disk is full: every
/// request is an error; afterwards every item is still there, leased or ready, exactly once.
#[tokio::test]
async fn a_failed_write_fails_every_request_of_a_mixed_pass() {
    let s = setup(info(2)).await;
    for i in 0..4 {
        s.engine
            .produce("q", vec![item(&format!("x{i}"))], T)
            .await
            .expect("produce");
    }
    let mut leased = Vec::new();
    for i in 0..4 {
        let got = s
            .engine
            .lease("q", 1, &format!("c{i}"), Some(Duration::from_millis(300)))
            .await
            .expect("lease");
        leased.push((got.partition, got.items[0].id));
    }
    s.store.inject_fault(Some(Fault::NoSpace));
    let e = &s.engine;
    let (p, c, r, x) = tokio::join!(
        e.produce("q", vec![item("new")], T),
        e.complete("q", leased[0].0, vec![leased[0].1], T),
        e.retry(
            "q",
            leased[1].0,
            vec![RetryItem {
                id: leased[1].1,
                retry_at: lessor_core::time::Ts::ZERO,
                dead: false,
            }]
        ),
        e.extend("q", leased[2].0, vec![leased[2].1], None, T),
    );
    assert!(p.is_err(), "produce: {p:?}");
    assert!(c.is_err(), "complete: {c:?}");
    assert!(r.is_err(), "retry: {r:?}");
    assert!(x.is_err(), "extend: {x:?}");
    s.store.inject_fault(None);
    // Every leased item is still leased: each can be completed once.
    for (part, id) in &leased {
        until_ok(|| s.engine.complete("q", *part, vec![*id], T)).await;
    }
    let left = lease(&s.engine, 10).await;
    assert!(left.is_err(), "nothing was produced or requeued: {left:?}");
    let _ = &s.clock;
}

/// A lease expiry whose write fails: once the disk has room, the item is served again, exactly once.
#[tokio::test]
async fn a_failed_lease_expiry_neither_loses_nor_doubles_the_item() {
    let mut i = info(1);
    i.lease_timeout = Duration::from_secs(2);
    let s = setup(i).await;
    s.engine.produce("q", vec![item("x")], T).await.expect("produce");
    let got = lease(&s.engine, 1).await.expect("lease");
    s.store.inject_fault(Some(Fault::NoSpace));
    // The lease ends (the clock moves 5 s per real second) while the disk is full.
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.store.inject_fault(None);
    let again = until_ok(|| lease(&s.engine, 10)).await;
    assert_eq!(again.items.len(), 1, "the expired item is served again");
    // A requeued item takes a fresh id at the tail: the payload tells it is the same item.
    assert_eq!(again.items[0].payload, got.items[0].payload);
    let old = s
        .engine
        .complete("q", got.partition, vec![got.items[0].id], T)
        .await;
    assert!(old.is_err(), "the expired lease is gone: {old:?}");
    s.engine
        .complete("q", again.partition, vec![again.items[0].id], T)
        .await
        .expect("complete");
    let left = lease(&s.engine, 10).await;
    assert!(left.is_err(), "nothing left: {left:?}");
}

/// The fsync of a pass mixing produce, lease and complete fails: no request of it is acknowledged.
#[tokio::test]
async fn a_failed_fsync_fails_every_request_of_a_mixed_pass() {
    let s = setup(info(2)).await;
    for i in 0..4 {
        s.engine
            .produce("q", vec![item(&format!("x{i}"))], T)
            .await
            .expect("produce");
    }
    let got = lease(&s.engine, 1).await.expect("lease");
    s.store.inject_fault(Some(Fault::SyncFails));
    let e = &s.engine;
    let (p, c, l) = tokio::join!(
        e.produce("q", vec![item("new")], T),
        e.complete("q", got.partition, vec![got.items[0].id], T),
        e.lease("q", 1, "other", Some(Duration::from_millis(300))),
    );
    assert!(p.is_err(), "produce: {p:?}");
    assert!(c.is_err(), "complete: {c:?}");
    assert!(l.is_err(), "lease: {l:?}");
    for _ in 0..3 {
        let p = e.produce("q", vec![item("later")], T).await;
        assert!(p.is_err(), "a poisoned store acknowledges nothing: {p:?}");
        let l = lease(e, 1).await;
        assert!(l.is_err(), "a poisoned store leases nothing: {l:?}");
    }
}

/// A queue "q" on store `a` whose dead-letter queue "dlq" lives on store `b`.
struct TwoStores {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    a: Arc<FjallStore>,
    b: Arc<FjallStore>,
    engine: Engine,
}

async fn two_stores() -> TwoStores {
    let da = tempfile::tempdir().expect("temp dir");
    let db = tempfile::tempdir().expect("temp dir");
    let a = Arc::new(FjallStore::open(da.path(), Durability::Sync).expect("open"));
    let b = Arc::new(FjallStore::open(db.path(), Durability::Sync).expect("open"));
    let clock = ManualClock::starting_now();
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![
            NamedStore {
                name: "a".into(),
                affinity: 1.0,
                store: a.clone(),
            },
            NamedStore {
                name: "b".into(),
                affinity: 1.0,
                store: b.clone(),
            },
        ],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    let on = |store: &str| {
        vec![lessor_core::types::PartitionInfo {
            partition: 0,
            storage_name: store.into(),
            read_only: false,
        }]
    };
    let mut dlq = info(0);
    dlq.name = "dlq".into();
    dlq.partitions = on("b");
    engine.create_queue(dlq).await.expect("create dlq");
    let mut q = info(0);
    q.partitions = on("a");
    q.dead_queue = "dlq".into();
    engine.create_queue(q).await.expect("create q");
    let c = clock.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.advance(Duration::from_millis(100));
        }
    });
    TwoStores {
        _dirs: (da, db),
        a,
        b,
        engine,
    }
}

/// Every item of `queue`, leased and completed, until none is left.
async fn drain(e: &Engine, queue: &str) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    while let Ok(got) = e
        .lease(queue, 100, "drain", Some(Duration::from_millis(500)))
        .await
    {
        let ids = got.items.iter().map(|it| it.id).collect();
        out.extend(got.items.into_iter().map(|it| it.payload));
        e.complete(queue, got.partition, ids, T).await.expect("complete");
    }
    out
}

async fn kill(e: &Engine) {
    e.produce("q", vec![item("x")], T).await.expect("produce");
    let got = e
        .lease("q", 1, "c", Some(Duration::from_millis(300)))
        .await
        .expect("lease");
    e.retry(
        "q",
        got.partition,
        vec![RetryItem {
            id: got.items[0].id,
            retry_at: lessor_core::time::Ts::ZERO,
            dead: true,
        }],
    )
    .await
    .expect("dead-letter it");
}

/// The dead-letter queue's write fails (its disk is full): the item stays dead in its queue and moves once the
/// disk has room, exactly once.
#[tokio::test]
async fn a_dead_letter_move_whose_target_write_fails_moves_later_once() {
    let s = two_stores().await;
    s.b.inject_fault(Some(Fault::NoSpace));
    kill(&s.engine).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.b.inject_fault(None);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(drain(&s.engine, "dlq").await, vec![bytes::Bytes::from("x")]);
    assert!(drain(&s.engine, "q").await.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(drain(&s.engine, "dlq").await.is_empty(), "moved once");
}

/// The dead-letter queue took the item but its removal from the source fails (the source's disk is full): once
/// the disk has room, the move is completed without a second copy.
#[tokio::test]
async fn a_dead_letter_move_whose_removal_fails_is_not_doubled() {
    let s = two_stores().await;
    s.b.inject_fault(Some(Fault::NoSpace));
    kill(&s.engine).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The item is dead in q (the move failed). Now q's disk fills up and the dead-letter queue's has room: the
    // next move writes the copy and fails to remove the original.
    s.a.inject_fault(Some(Fault::NoSpace));
    s.b.inject_fault(None);
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.a.inject_fault(None);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(drain(&s.engine, "dlq").await, vec![bytes::Bytes::from("x")]);
    assert!(drain(&s.engine, "q").await.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(drain(&s.engine, "dlq").await.is_empty(), "moved once");
}

/// As above, but the dead-letter queue's consumer takes and completes the copy while the source's disk is still
/// full: a retried move must not deliver the item a second time. (It did: the dead-letter queue recognises a
/// repeated move by the copy's source id only while the copy exists, so every retry of the failing removal wrote a
/// new copy once the last one was completed, one per retry for as long as the disk stayed full.)
#[tokio::test]
async fn a_dead_letter_copy_consumed_before_the_removal_is_retried_is_not_delivered_again() {
    let s = two_stores().await;
    s.b.inject_fault(Some(Fault::NoSpace));
    kill(&s.engine).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.a.inject_fault(Some(Fault::NoSpace));
    s.b.inject_fault(None);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        drain(&s.engine, "dlq").await,
        vec![bytes::Bytes::from("x")],
        "the item is delivered once by the dead-letter queue, however often its removal from q fails"
    );
    s.a.inject_fault(None);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(drain(&s.engine, "q").await.is_empty());
    let again = drain(&s.engine, "dlq").await;
    assert!(again.is_empty(), "delivered again: {again:?}");
}

/// A keyed produce whose write fails on every partition gives its key back: the retry once the disk has room is
/// stored (not answered as a duplicate of nothing), and a further retry is a duplicate.
#[tokio::test]
async fn a_keyed_produce_whose_write_fails_is_stored_by_its_retry_once() {
    let mut i = info(2);
    i.dedup_window = Duration::from_secs(300);
    let s = setup(i).await;
    let keyed = || ProduceItem {
        payload: bytes::Bytes::from("k"),
        dedup_id: "k".into(),
        ..Default::default()
    };
    s.store.inject_fault(Some(Fault::NoSpace));
    let r = s.engine.produce("q", vec![keyed()], T).await;
    assert!(r.is_err(), "the write failed: {r:?}");
    s.store.inject_fault(None);
    until_ok(|| s.engine.produce("q", vec![keyed()], T)).await;
    s.engine
        .produce("q", vec![keyed()], T)
        .await
        .expect("a duplicate");
    let got = lease(&s.engine, 10).await.expect("lease");
    assert_eq!(got.items.len(), 1);
    let more = lease(&s.engine, 10).await;
    assert!(more.is_err(), "stored once: {more:?}");
}
