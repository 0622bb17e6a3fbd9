//! Idle queues unload (`limits.queue-idle-unload`): black-box tests through the real server on port 0 with an
//! injected clock. A queue touched once used to keep its task and state for the life of the process (about 17 KB
//! each on fjall, plus a 12 KB history ring): a sweep of `queue.stats` over 100,000 queues took the server from
//! 65 MiB to 2 GB for good. Now a queue that has had no request for the idle time, and holds nothing that needs
//! its task, unloads; the next request loads it again and finds everything it held.
//!
//! Run on memory with protobuf and JSON, and on fjall (feature `fjall`); the race test on memory and fjall.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lessor_client::{proto as pb, Client, Encoding};
use lessor_core::engine::Engine;
use lessor_core::time::{Clock, ManualClock};
use lessor_server::Config;

lessor_testkit::every_backend!(
    idle_queues_unload_and_serve_what_they_held_when_loaded_again,
    an_unloaded_queue_is_loaded_again_when_its_items_expire,
    a_queue_unloaded_many_times_keeps_one_task_waiting_for_its_deadline,
    a_key_whose_item_was_completed_is_still_known_after_an_unload,
);

fn item(text: &str) -> pb::QueueProduceItem {
    pb::QueueProduceItem {
        bytes: text.as_bytes().to_vec(),
        ..Default::default()
    }
}

async fn produce(c: &Client, q: &str, items: Vec<pb::QueueProduceItem>) {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: q.into(),
        request_timeout: "10m".into(),
        items,
    })
    .await
    .unwrap_or_else(|e| panic!("produce to {q}: {e}"));
}

fn texts(items: &[pb::QueueLeaseItem]) -> BTreeSet<String> {
    items
        .iter()
        .map(|i| String::from_utf8_lossy(&i.bytes).into_owned())
        .collect()
}

/// Whether `queue` is unloaded, from the metrics `/metrics` reads (`None`: not reported at all).
fn unloaded(engine: &Engine, queue: &str) -> Option<bool> {
    engine
        .queue_metrics()
        .into_iter()
        .find(|(q, _)| q == queue)
        .map(|(_, m)| m.unloaded.load(Ordering::Relaxed))
}

fn gauge(engine: &Engine, queue: &str, pick: fn(&lessor_core::engine::QueueMetrics) -> u64) -> u64 {
    engine
        .queue_metrics()
        .into_iter()
        .find(|(q, _)| q == queue)
        .map(|(_, m)| pick(&m))
        .unwrap_or_else(|| panic!("{queue} is not in the metrics"))
}

/// Five queues touched, the clock moved past the default idle time (5m): the queue holding only ready items and the
/// queue only asked for its stats unload, keeping their depth in the metrics; the queues holding a leased item, a
/// waiting consumer or a scheduled item stay loaded. Loaded again by the next request, the first queue still knows
/// its dedup key and serves the items it held, once each.
async fn idle_queues_unload_and_serve_what_they_held_when_loaded_again(enc: Encoding) {
    let b = lessor_testkit::server::on_backend(enc).await;
    let c = b.client.clone();
    let engine = b.server.as_ref().expect("server").engine.clone();
    let create = |name: &'static str, f: fn(&mut pb::QueueInfo)| {
        let c = c.clone();
        async move { lessor_testkit::server::create_queue(&c, name, f).await }
    };
    create("idle", |q| q.dedup_window = "1h".into()).await;
    create("touched", |_| {}).await;
    create("leased", |q| q.lease_timeout = "1h".into()).await;
    create("waiting", |_| {}).await;
    create("scheduled", |_| {}).await;

    let keyed = pb::QueueProduceItem {
        dedup_id: "k1".into(),
        ..item("b")
    };
    produce(&c, "idle", vec![item("a"), keyed.clone(), item("c")]).await;
    c.queue_stats(&pb::QueueStatsRequest {
        queue_name: "touched".into(),
        ..Default::default()
    })
    .await
    .expect("stats");
    produce(&c, "leased", vec![item("x")]).await;
    let held = lessor_testkit::server::lease(&c, "leased", 1, "holder")
        .await
        .expect("lease");
    assert_eq!(held.items.len(), 1);
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.queue_lease(&pb::QueueLeaseRequest {
                queue_name: "waiting".into(),
                batch_size: 1,
                client_id: "patient".into(),
                request_timeout: "14m".into(),
            })
            .await
        })
    };
    let now = b.clock.now();
    produce(
        &c,
        "scheduled",
        vec![pb::QueueProduceItem {
            enqueue_at: Some(pb::Timestamp::from_unix_nanos(
                i128::from(now.add(Duration::from_secs(3600)).0) * 1000,
            )),
            ..item("later")
        }],
    )
    .await;
    lessor_testkit::eventually("the consumer waits", Duration::from_secs(5), || async {
        // Not in the metrics at all until the long-poll has loaded the queue.
        let waiting = engine
            .queue_metrics()
            .into_iter()
            .find(|(q, _)| q == "waiting")
            .map(|(_, m)| m.lease_waiting.load(Ordering::Relaxed));
        match waiting {
            Some(1) => Ok(()),
            n => Err(format!("{n:?} waiting")),
        }
    })
    .await;
    let (loaded, loads) = engine.loaded_queues();
    assert_eq!((loaded, loads), (5, 5));

    // Just before the idle time nothing unloads; past it, the two idle queues do.
    b.clock.advance(Duration::from_secs(299));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        engine.loaded_queues().0,
        5,
        "nothing unloads before the idle time"
    );
    b.clock.advance(Duration::from_secs(2));
    lessor_testkit::eventually("the idle queues unload", Duration::from_secs(5), || async {
        match (unloaded(&engine, "idle"), unloaded(&engine, "touched")) {
            (Some(true), Some(true)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Give the others a chance to unload wrongly.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for q in ["leased", "waiting", "scheduled"] {
        assert_eq!(unloaded(&engine, q), Some(false), "{q} stays loaded");
    }
    assert_eq!(engine.loaded_queues(), (3, 5));
    // The depth of the unloaded queue is still reported, its in-memory figures are not.
    assert_eq!(gauge(&engine, "idle", |m| m.ready.load(Ordering::Relaxed)), 3);
    assert_eq!(gauge(&engine, "idle", |m| m.produced.load(Ordering::Relaxed)), 3);
    assert_eq!(
        gauge(&engine, "idle", |m| m.dedup_keys.load(Ordering::Relaxed)),
        0
    );

    // Loaded again: the key is still known (the index is rebuilt from the partition), the items are all there.
    produce(&c, "idle", vec![keyed]).await;
    assert_eq!(unloaded(&engine, "idle"), Some(false));
    assert_eq!(engine.loaded_queues(), (4, 6));
    assert_eq!(
        gauge(&engine, "idle", |m| m.deduplicated.load(Ordering::Relaxed)),
        1,
        "the same key after the unload is a duplicate"
    );
    assert_eq!(
        gauge(&engine, "idle", |m| m.produced.load(Ordering::Relaxed)),
        3,
        "the counters go on from where they were"
    );
    let got = lessor_testkit::server::lease(&c, "idle", 10, "after")
        .await
        .expect("lease");
    assert_eq!(
        texts(&got.items),
        ["a", "b", "c"].map(String::from).into(),
        "the items held before the unload, once each"
    );
    let stats = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: "touched".into(),
            ..Default::default()
        })
        .await
        .expect("stats after the unload");
    assert_eq!(stats.logical_queues[0].partitions.len(), 1);

    // The waiting consumer was kept, and is served.
    produce(&c, "waiting", vec![item("w")]).await;
    let served = waiter.await.expect("join").expect("the long-poll");
    assert_eq!(texts(&served.items), ["w".to_string()].into());
}

/// A server on `backend` with `limits.queue-idle-unload: 1s` and a manual clock.
async fn short_idle(
    backend: &str,
) -> (
    lessor_server::RunningServer,
    Client,
    ManualClock,
    Option<tempfile::TempDir>,
) {
    let (mut config, dir) = match backend {
        "fjall" => {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().to_str().expect("utf-8 path").to_string();
            (Config::default_persistent(&path), Some(dir))
        }
        _ => (Config::memory(), None),
    };
    config.limits.queue_idle_unload = Some("1s".into());
    let clock = ManualClock::starting_now();
    let (srv, client) = lessor_testkit::server::start(&config, Some(Arc::new(clock.clone()))).await;
    (srv, client, clock, dir)
}

/// Producers and stats requests stream into one queue while the clock jumps past the idle time again and again, so
/// the queue unloads between (and while) requests arrive: a request that finds the inbox closed loads the queue
/// again, one that got into the inbox just before the close is handed to the next task. Every request succeeds,
/// and every item produced is leased afterwards exactly once.
async fn requests_racing_the_unload_all_succeed_and_nothing_is_lost(backend: &str) {
    let (srv, c, clock, _dir) = short_idle(backend).await;
    let engine = srv.engine.clone();
    lessor_testkit::server::create_queue(&c, "race", |q| q.requested_partitions = 2).await;
    const PRODUCERS: usize = 6;
    const EACH: usize = 40;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let (c, done, engine) = (c.clone(), done.clone(), engine.clone());
        tasks.push(tokio::spawn(async move {
            // At least EACH items; more (up to ten times as many) until the queue has been loaded four times, so
            // that a fast machine, which sends everything between two clock jumps, still races the unloads.
            let mut i = 0;
            while i < EACH || (engine.loaded_queues().1 < 4 && i < 10 * EACH) {
                produce(&c, "race", vec![item(&format!("{p}-{i}"))]).await;
                if i % 4 == 0 {
                    c.queue_stats(&pb::QueueStatsRequest {
                        queue_name: "race".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("stats: {e}"));
                }
                i += 1;
            }
            done.fetch_add(1, Ordering::Relaxed);
            i
        }));
    }
    while done.load(Ordering::Relaxed) < PRODUCERS {
        clock.advance(Duration::from_millis(1100));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.expect("a producer failed"));
    }
    let (_, loads) = engine.loaded_queues();
    assert!(
        loads > 2,
        "the queue unloaded while requests came in (loads: {loads})"
    );
    let want: BTreeSet<String> = sent
        .iter()
        .enumerate()
        .flat_map(|(p, &n)| (0..n).map(move |i| format!("{p}-{i}")))
        .collect();
    // Leases answer at once while items are ready (a lease waiting for a missing item would wait on the manual
    // clock forever: the timeout says what is missing).
    let mut seen = BTreeSet::new();
    let drain = async {
        while seen.len() < want.len() {
            let got = lessor_testkit::server::lease(&c, "race", 100, "drain")
                .await
                .expect("lease");
            for t in texts(&got.items) {
                assert!(seen.insert(t.clone()), "{t} leased twice");
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(20), drain)
        .await
        .is_err()
    {
        panic!("items lost: {:?}", want.difference(&seen).collect::<Vec<_>>());
    }
    let stats = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: "race".into(),
            ..Default::default()
        })
        .await
        .expect("stats");
    let stored: i64 = stats.logical_queues[0]
        .partitions
        .iter()
        .map(|p| i64::from(p.total))
        .sum();
    assert_eq!(stored as usize, want.len(), "nothing stored twice");
    assert_eq!(seen, want, "every item produced is leased once (loads: {loads})");
    srv.stop().await;
}

mod race {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory() {
        super::requests_racing_the_unload_all_succeed_and_nothing_is_lost("memory").await
    }

    #[cfg(feature = "fjall")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fjall() {
        super::requests_racing_the_unload_all_succeed_and_nothing_is_lost("fjall").await
    }
}

/// A queue holding only ready items unloads, but its items still expire on time: the server loads it again at the
/// earliest expiry, with no request, and the expired items go to its dead-letter queue (before, they waited for the
/// next request to the queue, however far off).
async fn an_unloaded_queue_is_loaded_again_when_its_items_expire(enc: Encoding) {
    let b = lessor_testkit::server::on_backend(enc).await;
    let c = b.client.clone();
    let engine = b.server.as_ref().expect("server").engine.clone();
    lessor_testkit::server::create_queue(&c, "expiring-dlq", |_| {}).await;
    lessor_testkit::server::create_queue(&c, "expiring", |q| {
        q.expire_timeout = "10m".into();
        q.dead_queue = "expiring-dlq".into();
    })
    .await;
    produce(&c, "expiring", vec![item("old")]).await;
    b.clock.advance(Duration::from_secs(301));
    lessor_testkit::eventually("the queue unloads", Duration::from_secs(5), || async {
        match unloaded(&engine, "expiring") {
            Some(true) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let loads = engine.loaded_queues().1;
    // Past the item's expiry, with no request to either queue.
    b.clock.advance(Duration::from_secs(300));
    lessor_testkit::eventually(
        "the expired item reaches the dead-letter queue",
        Duration::from_secs(5),
        || async {
            let dead = gauge(&engine, "expiring", |m| m.dead_lettered.load(Ordering::Relaxed));
            let ready = gauge(&engine, "expiring", |m| m.ready.load(Ordering::Relaxed));
            match (ready, dead) {
                (0, 1) => Ok(()),
                other => Err(format!("(ready, dead-lettered) {other:?}")),
            }
        },
    )
    .await;
    assert!(engine.loaded_queues().1 > loads, "loaded again by its deadline");
    let got = lessor_testkit::server::lease(&c, "expiring-dlq", 10, "dlq")
        .await
        .expect("lease from the dead-letter queue");
    assert_eq!(texts(&got.items), ["old".to_string()].into());
}

/// Each unload of a queue holding ready items starts a task that loads it again at the earliest expiry. A queue
/// loaded by a request and unloaded again every few minutes while its oldest item waits (a dead-letter queue's
/// items wait for days) used to gather one such task per cycle, each sleeping until that far deadline: now the
/// task goes when the queue loads again, and one is left however many cycles passed, which still loads the
/// queue at the expiry.
async fn a_queue_unloaded_many_times_keeps_one_task_waiting_for_its_deadline(enc: Encoding) {
    let b = lessor_testkit::server::on_backend(enc).await;
    let c = b.client.clone();
    let engine = b.server.as_ref().expect("server").engine.clone();
    lessor_testkit::server::create_queue(&c, "cycling-dlq", |_| {}).await;
    lessor_testkit::server::create_queue(&c, "cycling", |q| {
        q.expire_timeout = "24h".into();
        q.dead_queue = "cycling-dlq".into();
    })
    .await;
    produce(&c, "cycling", vec![item("waits")]).await;
    const CYCLES: usize = 20;
    for cycle in 0..CYCLES {
        b.clock.advance(Duration::from_secs(301));
        lessor_testkit::eventually("the queue unloads", Duration::from_secs(5), || async {
            match unloaded(&engine, "cycling") {
                Some(true) => Ok(()),
                other => Err(format!("cycle {cycle}: {other:?}")),
            }
        })
        .await;
        let stats = c
            .queue_stats(&pb::QueueStatsRequest {
                queue_name: "cycling".into(),
                ..Default::default()
            })
            .await
            .expect("stats loads the queue again");
        let total: i32 = stats
            .logical_queues
            .iter()
            .flat_map(|l| &l.partitions)
            .map(|p| p.total)
            .sum();
        assert_eq!(total, 1, "cycle {cycle}");
    }
    b.clock.advance(Duration::from_secs(301));
    lessor_testkit::eventually("the queue unloads", Duration::from_secs(5), || async {
        match (unloaded(&engine, "cycling"), engine.wake_tasks()) {
            (Some(true), 1) => Ok(()),
            other => Err(format!("(unloaded, wake tasks) {other:?} after {CYCLES} cycles")),
        }
    })
    .await;
    // The task left still loads the queue at the item's expiry, with no request.
    b.clock.advance(Duration::from_secs(24 * 3600));
    lessor_testkit::eventually(
        "the expired item reaches the dead-letter queue",
        Duration::from_secs(5),
        || async {
            match gauge(&engine, "cycling", |m| m.dead_lettered.load(Ordering::Relaxed)) {
                1 => Ok(()),
                n => Err(format!("dead-lettered {n}")),
            }
        },
    )
    .await;
    lessor_testkit::eventually("no task waits", Duration::from_secs(5), || async {
        match engine.wake_tasks() {
            0 => Ok(()),
            n => Err(format!("{n} wake tasks")),
        }
    })
    .await;
}

/// A dedup key outlives its item: within the window, a produce with the key of an item already completed is a
/// duplicate. That must hold across an unload too, when the next task rebuilds its index from the partitions'
/// records: a key forgotten there would store the item a second time.
async fn a_key_whose_item_was_completed_is_still_known_after_an_unload(enc: Encoding) {
    let b = lessor_testkit::server::on_backend(enc).await;
    let c = b.client.clone();
    let engine = b.server.as_ref().expect("server").engine.clone();
    lessor_testkit::server::create_queue(&c, "keys", |q| {
        q.dedup_window = "1h".into();
        q.requested_partitions = 2;
    })
    .await;
    let keyed = |text: &str| pb::QueueProduceItem {
        dedup_id: format!("key-{text}"),
        ..item(text)
    };
    produce(&c, "keys", (0..6).map(|i| keyed(&format!("k{i}"))).collect()).await;
    let mut done = 0;
    while done < 6 {
        let got = lessor_testkit::server::lease(&c, "keys", 6, "c")
            .await
            .expect("lease");
        for it in &got.items {
            c.queue_complete(&pb::QueueCompleteRequest {
                queue_name: "keys".into(),
                partition: got.partition,
                request_timeout: "5s".into(),
                ids: vec![it.id.clone()],
            })
            .await
            .expect("complete");
            done += 1;
        }
    }
    b.clock.advance(Duration::from_secs(301));
    lessor_testkit::eventually("the queue unloads", Duration::from_secs(5), || async {
        match unloaded(&engine, "keys") {
            Some(true) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Within the hour: every key is a duplicate, the new one is not.
    produce(
        &c,
        "keys",
        (0..6)
            .map(|i| keyed(&format!("k{i}")))
            .chain([keyed("new")])
            .collect(),
    )
    .await;
    let got = lessor_testkit::server::lease(&c, "keys", 10, "c")
        .await
        .expect("lease");
    assert_eq!(
        texts(&got.items),
        ["new".to_string()].into(),
        "only the new key is stored after the unload"
    );
}

/// Two engines over one memory store stand for two servers sharing PostgreSQL: a queue of the same name is
/// deleted and created again on B while unloaded on A. Loaded on A again, it is a new queue: its per-queue counters
/// start from 0, and the old queue's counts go to the deleted queues' totals (so the total counters neither lose
/// nor double them). A local delete of an unloaded queue must do the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_created_again_while_unloaded_here_counts_from_zero() {
    use lessor_core::engine::{EngineConfig, NamedStore, ProduceItem};
    use lessor_core::types::{Limits, QueueInfo};
    use lessor_storage::memory::{MemoryQueues, MemoryStore};

    let clock = ManualClock::starting_now();
    let queues = Arc::new(MemoryQueues::new());
    let store = Arc::new(MemoryStore::new());
    let engine = || {
        Engine::new(EngineConfig {
            queues: queues.clone(),
            stores: vec![NamedStore {
                name: "mem".into(),
                affinity: 1.0,
                store: store.clone(),
            }],
            limits: Limits::default(),
            clock: Arc::new(clock.clone()),
        })
        .expect("engine")
    };
    let (a, b) = (engine(), engine());
    let info = || QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        ..Default::default()
    };
    let items = |n: usize| {
        (0..n)
            .map(|_| ProduceItem {
                payload: bytes::Bytes::from_static(b"x"),
                ..Default::default()
            })
            .collect::<Vec<_>>()
    };
    let t = Some(Duration::from_secs(30));
    let produced = |e: &Engine| {
        let s = e.metrics_snapshot();
        let q = s
            .queues
            .iter()
            .find(|q| q.name == "q")
            .map(|q| q.metrics.produced.load(Ordering::Relaxed));
        (q, s.deleted.produced.load(Ordering::Relaxed))
    };
    // A task publishes its counters after the pass that answered the request.
    let settles = |e: &Engine, want: (Option<u64>, u64), what: &'static str| {
        let e = e.clone();
        async move {
            lessor_testkit::eventually(what, Duration::from_secs(5), || async {
                match produced(&e) {
                    got if got == want => Ok(()),
                    got => Err(format!(
                        "(queue's produced, deleted queues' produced) = {got:?}, want {want:?}"
                    )),
                }
            })
            .await
        }
    };
    let unload = |e: &Engine| {
        let e = e.clone();
        let clock = clock.clone();
        async move {
            clock.advance(Duration::from_secs(301));
            lessor_testkit::eventually("the queue unloads", Duration::from_secs(5), || async {
                match e.loaded_queues().0 {
                    0 => Ok(()),
                    n => Err(format!("{n} loaded")),
                }
            })
            .await;
        }
    };

    // Deleted and created again by the other server.
    a.create_queue(info()).await.expect("create");
    a.produce("q", items(3), t).await.expect("produce");
    unload(&a).await;
    settles(&a, (Some(3), 0), "the unloaded queue keeps its figures").await;
    b.delete_queue("q").await.expect("delete on B");
    clock.advance(Duration::from_secs(1));
    b.create_queue(info()).await.expect("create again on B");
    a.produce("q", items(1), t)
        .await
        .expect("produce to the new queue");
    settles(
        &a,
        (Some(1), 3),
        "the new queue counts from 0; the old one's counts are the deleted queues'",
    )
    .await;

    // Deleted and created again here.
    unload(&a).await;
    a.delete_queue("q").await.expect("delete");
    clock.advance(Duration::from_secs(1));
    a.create_queue(info()).await.expect("create again");
    a.produce("q", items(2), t)
        .await
        .expect("produce to the newer queue");
    settles(&a, (Some(2), 4), "the newer queue counts from 0 too").await;
    a.shutdown().await;
    b.shutdown().await;
}
