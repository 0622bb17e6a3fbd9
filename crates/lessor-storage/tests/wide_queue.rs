//! A queue of 4,096 partitions through the engine over the memory store (wrapped to fail one partition on demand),
//! on a manual clock: what the queue task keeps over all its partitions instead of scanning them each pass (count
//! totals, the earliest deadline, the failing partitions, the load and lease orders) must say what a scan would.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem, QueueMetrics};
use lessor_core::error::StorageError;
use lessor_core::time::ManualClock;
use lessor_core::types::{ItemId, Limits, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::hooked::{before, HookedStore, Op};

/// Every request's timeout (the engine requires one).
const T: Option<Duration> = Some(Duration::from_secs(30));
const PARTITIONS: u32 = 4096;
/// The partition the test breaks.
const BROKEN: u32 = 4000;

fn metrics(engine: &Engine) -> Arc<QueueMetrics> {
    engine
        .queue_metrics()
        .into_iter()
        .find(|(n, _)| n == "q")
        .map(|(_, m)| m)
        .expect("the queue's metrics")
}

/// Ready, leased and scheduled items as `/metrics` reads them.
fn gauges(m: &QueueMetrics) -> (u64, u64, u64) {
    (
        m.ready.load(Ordering::Relaxed),
        m.leased_now.load(Ordering::Relaxed),
        m.scheduled.load(Ordering::Relaxed),
    )
}

/// Waits for the gauges to read `want`: they are published at the end of the pass that answered the request.
async fn gauges_reach(m: &QueueMetrics, want: (u64, u64, u64)) {
    eventually(&format!("the gauges read {want:?}"), || gauges(m) == want).await;
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    lessor_testkit::eventually(what, Duration::from_secs(30), || {
        let held = cond();
        async move {
            if held {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_many_partitions_counts_wakes_recovers_and_unloads() {
    let clock = ManualClock::starting_now();
    let broken = Arc::new(AtomicBool::new(false));
    // Calls made to the broken partition's open handle: its probes re-read its counts.
    let counts_calls = Arc::new(AtomicUsize::new(0));
    let hook = {
        let (broken, counts_calls) = (broken.clone(), counts_calls.clone());
        before(move |c| {
            if c.partition != Some(BROKEN) {
                return Ok(());
            }
            if c.op == Op::Counts {
                counts_calls.fetch_add(1, Ordering::SeqCst);
            }
            if broken.load(Ordering::SeqCst) {
                return Err(StorageError::unavailable("broken by the test"));
            }
            Ok(())
        })
    };
    let store = HookedStore::new(Arc::new(MemoryStore::new()), hook);
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "memory".into(),
            affinity: 1.0,
            store: Arc::new(store),
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
            requested_partitions: PARTITIONS,
            ..Default::default()
        })
        .await
        .expect("create");

    // One item per call: each goes to the least loaded partition (ties: the lowest number), so one to each.
    for k in 0..PARTITIONS {
        let item = ProduceItem {
            payload: Bytes::from(k.to_string()),
            ..Default::default()
        };
        engine.produce("q", vec![item], T).await.expect("produce");
    }
    let m = metrics(&engine);
    gauges_reach(&m, (u64::from(PARTITIONS), 0, 0)).await;
    let stats = engine.stats("q").await.expect("stats");
    assert!(
        stats.partitions.iter().all(|p| p.total == 1),
        "every partition took one item"
    );

    // Leases take the partitions in order (the fullest first, ties: the lowest number): one item from each.
    let mut leased: Vec<(u32, ItemId)> = Vec::new();
    for k in 0..PARTITIONS {
        let l = engine.lease("q", 1, "c", T).await.expect("lease");
        assert_eq!(l.partition, k, "lease {k} came from partition {}", l.partition);
        assert_eq!(l.items.len(), 1);
        leased.push((l.partition, l.items[0].id));
    }
    gauges_reach(&m, (0, u64::from(PARTITIONS), 0)).await;

    // The earliest deadline of any partition wakes the queue: the last partition's lease is cut to 5 s, and its
    // item comes back then, without a request, and only its.
    let (last, last_id) = leased[PARTITIONS as usize - 1];
    engine
        .extend("q", last, vec![last_id], Some(Duration::from_secs(5)), T)
        .await
        .expect("extend");
    clock.advance(Duration::from_secs(5));
    eventually("the shortened lease expires on its own", || {
        m.lease_expired.load(Ordering::Relaxed) == 1
    })
    .await;
    gauges_reach(&m, (1, u64::from(PARTITIONS) - 1, 0)).await;
    let l = engine.lease("q", 1, "c", T).await.expect("lease again");
    assert_eq!((l.partition, l.items.len()), (last, 1));
    leased[PARTITIONS as usize - 1] = (last, l.items[0].id);

    // A failing partition is probed again on its backoff, on its own, and serves again once it answers.
    broken.store(true, Ordering::SeqCst);
    let (b, b_id) = leased[BROKEN as usize];
    engine
        .complete("q", b, vec![b_id], T)
        .await
        .expect_err("the broken partition fails the complete");
    let probes = counts_calls.load(Ordering::SeqCst);
    broken.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_millis(500));
    eventually("the failed partition is probed on its backoff", || {
        counts_calls.load(Ordering::SeqCst) > probes
    })
    .await;
    let stats = engine.stats("q").await.expect("stats");
    assert!(
        stats.partitions.iter().all(|p| p.failures == 0),
        "every partition healthy"
    );

    // Every item completed: the counts follow.
    for (p, id) in &leased {
        engine.complete("q", *p, vec![*id], T).await.expect("complete");
    }
    gauges_reach(&m, (0, 0, 0)).await;
    assert_eq!(m.completed.load(Ordering::Relaxed), u64::from(PARTITIONS));

    // Nothing left to do: the queue unloads once idle (its partitions' stale lease deadlines are visited on the
    // way, each once), and the next request loads it again with the same counts.
    let (loaded, _) = engine.loaded_queues();
    assert_eq!(loaded, 1);
    clock.advance(Duration::from_secs(301));
    eventually("the idle queue unloads", || engine.loaded_queues().0 == 0).await;
    gauges_reach(&m, (0, 0, 0)).await;
    engine
        .produce(
            "q",
            vec![ProduceItem {
                payload: Bytes::from_static(b"again"),
                ..Default::default()
            }],
            T,
        )
        .await
        .expect("produce after the unload");
    let m = metrics(&engine);
    gauges_reach(&m, (1, 0, 0)).await;
    engine.shutdown().await;
}
