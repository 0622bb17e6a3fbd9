//! Dead-letter redrive through the engine, on the memory backend with a manual clock: items go back to their
//! source queues (or a named one) with attempts reset, filters and limits apply, cancellation stops the task, bad
//! requests get 400s naming the field, and a repeated move is not doubled.

use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{
    Engine, EngineConfig, NamedStore, ProduceItem, RedriveRequest, RedriveStatus, RedriveTask,
};
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo, RetryItem};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::eventually::poll_until;

const T: Option<Duration> = Some(Duration::from_secs(5));

fn engine(clock: &ManualClock) -> Engine {
    Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "mem".into(),
            affinity: 1.0,
            store: Arc::new(MemoryStore::new()),
        }],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine")
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

fn item(payload: &str, kind: &str) -> ProduceItem {
    ProduceItem {
        kind: kind.into(),
        payload: bytes::Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

/// Ready + leased + scheduled items of a queue.
async fn depth(e: &Engine, q: &str) -> u64 {
    let s = e.stats(q).await.expect("stats");
    s.partitions.iter().map(|p| p.total + p.scheduled).sum()
}

/// Leases everything in `q` and kills it (retry dead), so it lands in the dead-letter queue.
async fn kill_all(e: &Engine, q: &str, n: usize) {
    let mut left = n;
    while left > 0 {
        let l = e.lease(q, left.min(1000), "killer", T).await.expect("lease");
        left -= l.items.len();
        let items = l
            .items
            .iter()
            .map(|it| RetryItem {
                id: it.id,
                retry_at: Default::default(),
                dead: true,
            })
            .collect();
        e.retry(q, l.partition, items).await.expect("retry dead");
    }
}

/// Sets up queues `a` and `b` whose dead-letter queue is `dlq`, with `na` and `nb` dead items there.
async fn setup(e: &Engine, na: usize, nb: usize) {
    e.create_queue(queue("dlq", "", 2)).await.expect("dlq");
    e.create_queue(queue("a", "dlq", 2)).await.expect("a");
    e.create_queue(queue("b", "dlq", 1)).await.expect("b");
    let a: Vec<_> = (0..na).map(|i| item(&format!("a{i}"), "x")).collect();
    let b: Vec<_> = (0..nb).map(|i| item(&format!("b{i}"), "y")).collect();
    if !a.is_empty() {
        e.produce("a", a, T).await.expect("produce a");
        kill_all(e, "a", na).await;
    }
    if !b.is_empty() {
        e.produce("b", b, T).await.expect("produce b");
        kill_all(e, "b", nb).await;
    }
    let want = (na + nb) as u64;
    poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
        if depth(e, "dlq").await == want {
            Ok(())
        } else {
            Err(format!("dlq {}", depth(e, "dlq").await))
        }
    })
    .await
    .expect("dead items reach the dead-letter queue");
}

async fn wait_done(e: &Engine, id: &str) -> RedriveTask {
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

/// Every payload of a queue, leasing them (attempts checked by the caller). Leases long-poll on the manual clock,
/// so each lease is bounded by a real-time timeout instead.
async fn drain(e: &Engine, q: &str) -> Vec<(String, u32, String)> {
    let mut out = Vec::new();
    loop {
        let lease = e.lease(q, 1000, "drain", T);
        match tokio::time::timeout(Duration::from_millis(300), lease).await {
            Ok(Ok(l)) => {
                for it in &l.items {
                    out.push((
                        String::from_utf8_lossy(&it.payload).into_owned(),
                        it.attempts,
                        it.kind.clone(),
                    ));
                }
                let ids = l.items.iter().map(|it| it.id).collect();
                e.complete(q, l.partition, ids, T).await.expect("complete");
            }
            Ok(Err(err)) => panic!("lease: {err}"),
            Err(_) => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_go_back_to_their_sources_with_attempts_reset() {
    let clock = ManualClock::starting_now();
    let e = engine(&clock);
    setup(&e, 30, 20).await;
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    assert_eq!(t.status, RedriveStatus::Running);
    assert!(t.id.starts_with("rd-"), "{}", t.id);
    let done = wait_done(&e, &t.id).await;
    assert_eq!(done.status, RedriveStatus::Completed, "{done:?}");
    assert_eq!((done.moved, done.skipped, done.remaining), (50, 0, 0));
    assert_eq!(depth(&e, "dlq").await, 0);
    let mut a = drain(&e, "a").await;
    let mut b = drain(&e, "b").await;
    a.sort();
    b.sort();
    assert_eq!(a.len(), 30);
    assert_eq!(b.len(), 20);
    assert!(a
        .iter()
        .all(|(p, attempts, kind)| p.starts_with('a') && *attempts == 1 && kind == "x"));
    assert!(b
        .iter()
        .all(|(p, attempts, kind)| p.starts_with('b') && *attempts == 1 && kind == "y"));
    let distinct: std::collections::HashSet<_> = a.iter().map(|x| &x.0).collect();
    assert_eq!(distinct.len(), 30, "no item doubled");
    let listed = e.redrive_list("dlq").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, t.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_target_and_limit_apply() {
    let clock = ManualClock::starting_now();
    let e = engine(&clock);
    setup(&e, 10, 10).await;
    e.create_queue(queue("elsewhere", "", 1)).await.expect("target");
    // Only b's items (kind y), to another queue, at most 4.
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            target_queue: "elsewhere".into(),
            kind: "y".into(),
            max_items: 4,
            ..Default::default()
        })
        .await
        .expect("start");
    let done = wait_done(&e, &t.id).await;
    assert_eq!((done.status, done.moved), (RedriveStatus::Completed, 4));
    assert_eq!(depth(&e, "elsewhere").await, 4);
    assert_eq!(depth(&e, "dlq").await, 16);
    // By source queue: a's items back to a.
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            source_queue: "a".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    let done = wait_done(&e, &t.id).await;
    assert_eq!((done.status, done.moved), (RedriveStatus::Completed, 10));
    assert_eq!(done.skipped, 6, "b's items were looked at and left");
    assert_eq!(depth(&e, "a").await, 10);
    assert_eq!(depth(&e, "b").await, 0);
    assert_eq!(depth(&e, "dlq").await, 6);
    let drained = drain(&e, "elsewhere").await;
    assert!(drained.iter().all(|(p, _, k)| p.starts_with('b') && k == "y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_cancel() {
    let clock = ManualClock::starting_now();
    let e = engine(&clock);
    setup(&e, 10, 0).await;
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            rate_per_sec: 2,
            ..Default::default()
        })
        .await
        .expect("start");
    // At 2 items/s the first batch is 2 items, then the task waits for the (manual) clock.
    let first = poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
        let t = e.redrive_get(&t.id).await.expect("get");
        if t.moved >= 2 {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await
    .expect("first batch");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(e.redrive_get(&t.id).await.expect("get").moved, 2, "{first:?}");
    // A second task on the same dead-letter queue is refused while this one runs.
    let err = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect_err("one at a time");
    assert!(err.to_string().starts_with("dead_queue is invalid;"), "{err}");
    clock.advance(Duration::from_secs(1));
    poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
        {
            let t = e.redrive_get(&t.id).await.expect("get");
            if t.moved >= 4 {
                Ok(())
            } else {
                Err(format!("{t:?}"))
            }
        }
    })
    .await
    .expect("second batch after a second");
    let c = e.redrive_cancel(&t.id).await.expect("cancel");
    assert_eq!(c.status, RedriveStatus::Cancelled);
    clock.advance(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = e.redrive_get(&t.id).await.expect("get");
    assert_eq!(after.status, RedriveStatus::Cancelled);
    let moved = depth(&e, "a").await;
    assert_eq!(moved + depth(&e, "dlq").await, 10, "nothing lost or doubled");
    assert!((4..=6).contains(&moved), "stopped after the cancel: {moved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let clock = ManualClock::starting_now();
    let e = engine(&clock);
    setup(&e, 1, 0).await;
    let start = |dead: &str, target: &str| {
        let e = e.clone();
        let r = RedriveRequest {
            dead_queue: dead.into(),
            target_queue: target.into(),
            ..Default::default()
        };
        async move { e.redrive_start(r).await.expect_err("refused").to_string() }
    };
    let m = start("a", "").await;
    assert!(
        m.starts_with("dead_queue is invalid;") && m.contains("not the dead_queue of any queue"),
        "{m}"
    );
    let m = start("nope", "").await;
    assert!(m.starts_with("queue does not exist;"), "{m}");
    let m = start("dlq", "dlq").await;
    assert!(m.starts_with("target_queue is invalid;"), "{m}");
    let m = start("dlq", "missing").await;
    assert!(
        m.starts_with("target_queue is invalid;") && m.contains("does not exist"),
        "{m}"
    );
    let m = e.redrive_get("rd-nope").await.expect_err("unknown").to_string();
    assert!(m.starts_with("task_id is invalid;"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_move_is_not_doubled() {
    // What a killed server's restart does: the same dead item is moved again after the first copy reached the
    // target (and even after a consumer completed it). The source id and the dedup record make the second move
    // a no-op in the target.
    let clock = ManualClock::starting_now();
    let e = engine(&clock);
    setup(&e, 5, 0).await;
    let dead = e.storage_list("dlq", 0, None, 100, false).await.expect("list");
    let dead1 = e.storage_list("dlq", 1, None, 100, false).await.expect("list");
    assert_eq!(dead.len() + dead1.len(), 5);
    // Copy the dead-letter queue's items aside, redrive, consume, then put the copies back and redrive again.
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    assert_eq!(wait_done(&e, &t.id).await.moved, 5);
    assert_eq!(drain(&e, "a").await.len(), 5);
    for (p, items) in [(0u32, dead), (1, dead1)] {
        if !items.is_empty() {
            e.storage_import("dlq", p, items).await.expect("import back");
        }
    }
    assert_eq!(depth(&e, "dlq").await, 5);
    // The restart comes after the target's own dedup window (5 minutes): a redriven key is remembered for at
    // least an hour whatever the target's window.
    clock.advance(Duration::from_secs(6 * 60));
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("start again");
    let done = wait_done(&e, &t.id).await;
    assert_eq!(done.status, RedriveStatus::Completed);
    assert_eq!(depth(&e, "dlq").await, 0);
    assert_eq!(depth(&e, "a").await, 0, "the repeated move stored nothing");
}

/// A batch whose items go to two targets, one of them deleted: the live target's items leave the dead-letter
/// queue as soon as it took them, and the failed task counts them. (They used to stay in the dead-letter queue as
/// well, so a later redrive, past the target's dedup window, delivered items consumers had completed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_at_its_second_target_keeps_what_the_first_took() {
    // The order of a batch's targets is a HashMap's (random per map): try until `a` goes first.
    for _ in 0..32 {
        let clock = ManualClock::starting_now();
        let e = engine(&clock);
        setup(&e, 3, 3).await;
        e.delete_queue("b").await.expect("delete b");
        let t = e
            .redrive_start(RedriveRequest {
                dead_queue: "dlq".into(),
                ..Default::default()
            })
            .await
            .expect("start");
        let done = wait_done(&e, &t.id).await;
        assert_eq!(done.status, RedriveStatus::Failed, "{done:?}");
        let in_a = depth(&e, "a").await;
        if in_a == 0 {
            continue; // b's items were tried first: nothing moved
        }
        assert_eq!((in_a, done.moved), (3, 3), "{done:?}");
        assert_eq!(
            depth(&e, "dlq").await,
            3,
            "only b's items stay in the dead-letter queue"
        );
        assert_eq!(drain(&e, "a").await.len(), 3);
        clock.advance(Duration::from_secs(2 * 3600));
        let t = e
            .redrive_start(RedriveRequest {
                dead_queue: "dlq".into(),
                source_queue: "a".into(),
                ..Default::default()
            })
            .await
            .expect("start again");
        wait_done(&e, &t.id).await;
        assert!(drain(&e, "a").await.is_empty(), "completed items delivered again");
        return;
    }
    panic!("a was never tried first");
}

/// A redrive whose target refuses its batches, then cancelled: the claim it held on the dead-letter queue's items
/// goes with it. The claim used to stay for as long as the queue stayed loaded: consumers of the dead-letter queue
/// had their completes of those items answered as for ids that are gone, and the queue never unloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redrive_leaves_no_claim_behind() {
    let clock = ManualClock::starting_now();
    let e = engine(&clock);
    setup(&e, 3, 0).await;
    // A queue being restored refuses every write, a redrive's batch included (a retry, not a failure).
    e.restore_begin(queue("t", "", 1), false)
        .await
        .expect("restoring target");
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            target_queue: "t".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    // The first round claims the items, fails its move and saves the task (its `remaining`, 0 until then) before
    // it sleeps until the next: waited for on that save rather than for a guessed real time.
    poll_until(Duration::from_secs(10), Duration::from_millis(5), || async {
        let now = e.redrive_get(&t.id).await.map_err(|err| err.to_string())?;
        if now.remaining == 3 {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await
    .expect("the first round ends");
    let c = e.redrive_cancel(&t.id).await.expect("cancel");
    assert_eq!(c.status, RedriveStatus::Cancelled);
    // The runner sees the cancel at its next round, and stops.
    clock.advance(Duration::from_secs(10));
    let l = e.lease("dlq", 10, "worker", T).await.expect("lease");
    assert_eq!(l.items.len(), 3);
    let ids: Vec<_> = l.items.iter().map(|it| it.id).collect();
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || async {
        e.complete("dlq", l.partition, ids.clone(), T)
            .await
            .map_err(|err| err.to_string())
    })
    .await
    .expect("a consumer of the dead-letter queue completes what it leased");
    assert_eq!(depth(&e, "dlq").await, 0);
}

/// `max_items` holds across the partitions of one round: a round takes up to a batch from each partition, and took
/// it from each whatever the others had moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_items_holds_across_partitions() {
    let clock = ManualClock::starting_now();
    let e = engine(&clock);
    setup(&e, 0, 0).await;
    // Items straight into both partitions of the dead-letter queue (dead-letter moves all go to partition 0).
    for p in 0..2 {
        let items: Vec<lessor_core::types::Item> = (0..6)
            .map(|i| lessor_core::types::Item {
                payload: bytes::Bytes::from(format!("p{p}-{i}")),
                ..Default::default()
            })
            .collect();
        e.storage_import("dlq", p, items).await.expect("import");
    }
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            target_queue: "a".into(),
            max_items: 8,
            ..Default::default()
        })
        .await
        .expect("start");
    let done = wait_done(&e, &t.id).await;
    assert_eq!(done.status, RedriveStatus::Completed, "{done:?}");
    assert_eq!(done.moved, 8, "{done:?}");
    assert_eq!(depth(&e, "a").await, 8);
    assert_eq!(depth(&e, "dlq").await, 4);
}

/// An item goes back to the queue its source id names only when that queue names this dead-letter queue; a read of
/// that queue's definition that fails (a store error) decides nothing: the item waits for the next round. It was
/// taken as a yes, so a forged source id (from `storage/items.import`) reached a queue that never named this
/// dead-letter queue whenever the queue store failed a read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_of_the_source_queue_moves_nothing() {
    use lessor_core::error::StorageError;
    use lessor_testkit::hooked::{before, HookedQueues, Op};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let clock = ManualClock::starting_now();
    let failing = Arc::new(AtomicUsize::new(0));
    let fail = failing.clone();
    let hook = before(move |c| {
        if c.op == Op::QueueGet && c.queue == "victim" && fail.load(Ordering::SeqCst) > 0 {
            fail.fetch_sub(1, Ordering::SeqCst);
            return Err(StorageError::unavailable("injected: queue store down"));
        }
        Ok(())
    });
    let e = Engine::new(EngineConfig {
        queues: Arc::new(HookedQueues::new(Arc::new(MemoryQueues::new()), hook)),
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
    // Another queue, which does not name dlq as its dead-letter queue.
    e.create_queue(queue("victim", "", 1)).await.expect("victim");
    let forged = lessor_core::types::Item {
        source_id: "victim/0/0000000000000001".into(),
        payload: bytes::Bytes::from_static(b"forged"),
        ..Default::default()
    };
    e.storage_import("dlq", 0, vec![forged]).await.expect("import");
    failing.store(1, Ordering::SeqCst);
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("start");
    // The first round's read fails; the next round (after the retry delay) reads it and skips the item.
    poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
        if failing.load(Ordering::SeqCst) == 0 {
            Ok(())
        } else {
            Err("no read of victim yet".to_string())
        }
    })
    .await
    .expect("the runner read victim's definition");
    // The runner sleeps for the retry delay on the manual clock, from whenever it got there: move time on until
    // it has finished.
    let done = poll_until(Duration::from_secs(20), Duration::from_millis(20), || async {
        clock.advance(Duration::from_secs(2));
        let t = e.redrive_get(&t.id).await.expect("get");
        if t.status != RedriveStatus::Running {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await
    .expect("redrive finishes");
    assert_eq!(done.status, RedriveStatus::Completed, "{done:?}");
    assert_eq!(done.moved, 0, "{done:?}");
    assert_eq!(depth(&e, "victim").await, 0, "the forged item reached victim");
    assert_eq!(depth(&e, "dlq").await, 1);
}
