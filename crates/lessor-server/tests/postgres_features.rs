//! Two servers (two engines, each with its own connections) on one PostgreSQL database: the Lessor extensions stay
//! correct when the servers share queues.
//!
//! - idempotent produce: the same keys produced on both servers, into different partitions, are stored once;
//! - lease extension: a lease handed out by one server is extended through the other, and survives a lifecycle
//!   pass that would have expired it; an id the other server's lifecycle moved is fenced (400, nothing changed);
//! - redrive: a task started on one server that dies mid-move is taken over by the other and finishes, with every
//!   item moved exactly once.
//!
//! Needs the `postgres` feature and `LESSOR_TEST_DATABASE_URL` (skipped without it, failed when `CI` is set).
#![cfg(feature = "postgres")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, ProduceItem, RedriveRequest, RedriveStatus};
use lessor_core::error::QueueError;
use lessor_core::time::ManualClock;
use lessor_core::types::{QueueInfo, RetryItem};
use lessor_server::Config;
use lessor_testkit::eventually::poll_until;
use lessor_testkit::TestDatabase as Database;

const T: Option<Duration> = Some(Duration::from_secs(10));

async fn engine(db: &Database, clock: &ManualClock) -> Engine {
    let config = Config::from_yaml(&format!(
        "queue-storage:\n  driver: postgres\n  config:\n    connection-string: {url}\n\
         partition-storage:\n  - name: pg-0\n    driver: postgres\n    affinity: 1\n    \
         config:\n      connection-string: {url}\n",
        url = serde_json::to_string(db.url()).expect("url"),
    ))
    .expect("config");
    lessor_server::build_engine(&config, Arc::new(clock.clone()))
        .await
        .expect("engine")
}

fn queue(name: &str, dead: &str, partitions: u32) -> QueueInfo {
    QueueInfo {
        name: name.into(),
        dead_queue: dead.into(),
        lease_timeout: Duration::from_secs(30),
        expire_timeout: Duration::from_secs(3600),
        max_attempts: 1,
        requested_partitions: partitions,
        ..Default::default()
    }
}

fn keyed(payload: &str, key: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(payload.to_string()),
        dedup_id: key.into(),
        ..Default::default()
    }
}

/// Items stored in a queue, as every partition lists them (ready and leased, and scheduled).
async fn stored(e: &Engine, q: &str) -> Vec<String> {
    let info = e.queue_info(q).await.expect("info");
    let mut out = Vec::new();
    for p in 0..info.partitions.len() as u32 {
        for scheduled in [false, true] {
            for it in e.storage_list(q, p, None, 10_000, scheduled).await.expect("list") {
                out.push(String::from_utf8_lossy(&it.payload).into_owned());
            }
        }
    }
    out.sort();
    out
}

/// Two servers on a fresh database sharing queue `jobs` (defined by `q`), which server B has loaded (its queue task
/// caches the definition) by producing `first` into it. `None` when no database is configured.
async fn two_servers_with_jobs(q: QueueInfo, first: &str) -> Option<(Database, ManualClock, Engine, Engine)> {
    lessor_testkit::database_or_skip()?;
    let db = Database::create("lessor_feat").await;
    let clock = ManualClock::starting_now();
    let a = engine(&db, &clock).await;
    let b = engine(&db, &clock).await;
    a.create_queue(q).await.expect("create");
    b.produce("jobs", vec![keyed(first, "")], T)
        .await
        .expect("produce via B");
    Some((db, clock, a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_and_extension_across_two_servers() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_feat").await;
    let clock = ManualClock::starting_now();
    let a = engine(&db, &clock).await;
    let b = engine(&db, &clock).await;
    a.create_queue(QueueInfo {
        max_attempts: 0,
        ..queue("jobs", "", 4)
    })
    .await
    .expect("create");

    // The same 50 keys through both servers, concurrently and in several requests: each key stored once.
    let send = |e: Engine, tag: &'static str| async move {
        for chunk in 0..5 {
            let items = (0..10)
                .map(|i| {
                    let k = chunk * 10 + i;
                    keyed(&format!("item-{k}"), &format!("key-{k}"))
                })
                .collect();
            e.produce("jobs", items, T)
                .await
                .unwrap_or_else(|e| panic!("{tag}: {e}"));
        }
    };
    tokio::join!(send(a.clone(), "a"), send(b.clone(), "b"), send(a.clone(), "a2"));
    let items = stored(&a, "jobs").await;
    let distinct: HashSet<_> = items.iter().collect();
    assert_eq!(items.len(), 50, "each key stored once: {items:?}");
    assert_eq!(distinct.len(), 50);

    // Lease on A, extend through B: the lease outlives its original deadline.
    let l = a.lease("jobs", 5, "worker", T).await.expect("lease");
    let ids: Vec<_> = l.items.iter().map(|it| it.id).collect();
    clock.advance(Duration::from_secs(20));
    b.extend("jobs", l.partition, ids.clone(), Some(Duration::from_secs(60)), T)
        .await
        .expect("extend through the other server");
    clock.advance(Duration::from_secs(20)); // 40 s after the lease: past 30 s, within the extension
    a.reload("jobs").await.expect("reload A");
    b.reload("jobs").await.expect("reload B");
    a.complete("jobs", l.partition, ids, T)
        .await
        .expect("the extended lease is still held");

    // A lease that ran out is moved by a lifecycle pass (new id): extending its old id is fenced on both servers.
    let l = b.lease("jobs", 3, "slow", T).await.expect("lease");
    let ids: Vec<_> = l.items.iter().map(|it| it.id).collect();
    clock.advance(Duration::from_secs(31));
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || async {
        a.reload("jobs").await.map_err(|e| e.to_string())?;
        b.reload("jobs").await.map_err(|e| e.to_string())?;
        match a.extend("jobs", l.partition, ids.clone(), None, T).await {
            Err(QueueError::NoSuchId(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .expect("the expired lease's ids are fenced");
    assert_eq!(
        stored(&a, "jobs").await.len(),
        45,
        "nothing lost by the failed extension"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_taken_over_by_the_other_server() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_feat").await;
    let clock = ManualClock::starting_now();
    let a = engine(&db, &clock).await;
    a.create_queue(queue("dlq", "", 1)).await.expect("dlq");
    a.create_queue(queue("jobs", "dlq", 2)).await.expect("jobs");
    let n = 40;
    let items = (0..n).map(|i| keyed(&format!("item-{i}"), "")).collect();
    a.produce("jobs", items, T).await.expect("produce");
    let mut dead = 0;
    while dead < n {
        let l = a.lease("jobs", 100, "killer", T).await.expect("lease");
        dead += l.items.len();
        let items = l
            .items
            .iter()
            .map(|it| RetryItem {
                id: it.id,
                retry_at: Default::default(),
                dead: true,
            })
            .collect();
        a.retry("jobs", l.partition, items).await.expect("dead");
    }
    poll_until(Duration::from_secs(20), Duration::from_millis(20), || async {
        let s = a.stats("dlq").await.map_err(|e| e.to_string())?;
        let d: u64 = s.partitions.iter().map(|p| p.total).sum();
        if d == n as u64 {
            Ok(())
        } else {
            Err(format!("{d} dead"))
        }
    })
    .await
    .expect("dead items reach the dead-letter queue");

    // A moves 2 items a second, then "dies" (stops) after the first batches.
    let t = a
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            rate_per_sec: 2,
            ..Default::default()
        })
        .await
        .expect("start");
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || async {
        let t = a.redrive_get(&t.id).await.map_err(|e| e.to_string())?;
        if t.moved >= 2 {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await
    .expect("first batch");
    a.shutdown().await;

    // B starts later and finds the task silent: it takes it over (its clock is the shared manual clock).
    let b = engine(&db, &clock).await;
    assert_eq!(
        b.resume_redrives().await.expect("resume"),
        0,
        "A's task is recent: left alone"
    );
    clock.advance(Duration::from_secs(11));
    // Taken over now (or by B's own periodic look, whichever comes first).
    b.resume_redrives().await.expect("resume");
    let done = poll_until(Duration::from_secs(60), Duration::from_millis(20), || async {
        clock.advance(Duration::from_secs(1)); // the rate limit waits on the manual clock
        let t = b.redrive_get(&t.id).await.map_err(|e| e.to_string())?;
        if t.status == RedriveStatus::Running {
            Err(format!("{t:?}"))
        } else {
            Ok(t)
        }
    })
    .await
    .expect("B finishes the task");
    assert_eq!(done.status, RedriveStatus::Completed, "{done:?}");
    let back = stored(&b, "jobs").await;
    let distinct: HashSet<_> = back.iter().collect();
    assert_eq!(back.len(), n, "every item back once: {back:?}");
    assert_eq!(distinct.len(), n);
    assert!(stored(&b, "dlq").await.is_empty());
    b.shutdown().await;
}

/// A duplicate that the database answers (the key's record was written by the other server) does not extend the
/// key's window in the answering server's in-memory index: once the record's window has ended, a produce of that
/// key through either server is stored. (B's index used to keep its own claim for the skipped retry, a window of
/// its own, and answered the later produce "duplicate" without storing it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_answered_by_the_database_does_not_extend_the_window() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_feat").await;
    let clock = ManualClock::starting_now();
    let a = engine(&db, &clock).await;
    let b = engine(&db, &clock).await;
    a.create_queue(QueueInfo {
        max_attempts: 0,
        dedup_window: Duration::from_secs(60),
        ..queue("jobs", "", 1)
    })
    .await
    .expect("create");
    a.produce("jobs", vec![keyed("first", "k")], T)
        .await
        .expect("first via A");
    clock.advance(Duration::from_secs(50));
    b.produce("jobs", vec![keyed("retry", "k")], T)
        .await
        .expect("retry via B");
    assert_eq!(
        stored(&a, "jobs").await,
        vec!["first"],
        "the retry is a duplicate"
    );
    clock.advance(Duration::from_secs(11)); // 61 s after "first": its window (60 s) has ended
    b.produce("jobs", vec![keyed("second", "k")], T)
        .await
        .expect("second via B");
    assert_eq!(
        stored(&a, "jobs").await,
        vec!["first", "second"],
        "a produce after the window ended was acknowledged but not stored"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A queue grown on server A is served whole by server B, which loaded the queue before: B re-reads the definition
/// (it used to keep its first copy, so once A was gone the items in the new partition were never served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_on_one_server_are_served_by_the_other() {
    let q = QueueInfo {
        max_attempts: 0,
        ..queue("jobs", "", 1)
    };
    let Some((_db, _clock, a, b)) = two_servers_with_jobs(q, "p0").await else {
        return;
    };
    a.update_queue(lessor_core::engine::QueueUpdate {
        name: "jobs".into(),
        requested_partitions: Some(2),
        ..Default::default()
    })
    .await
    .expect("grow");
    a.reload("jobs").await.expect("reload A");
    a.produce("jobs", vec![keyed("p1", "")], T)
        .await
        .expect("produce via A");
    let on_a = a.stats("jobs").await.expect("stats").partitions.len();
    a.shutdown().await; // server A goes away
    b.reload("jobs").await.expect("reload B");
    let on_b = b.stats("jobs").await.expect("stats").partitions.len();
    let mut got = Vec::new();
    for _ in 0..2 {
        match tokio::time::timeout(Duration::from_secs(3), b.lease("jobs", 10, "w", T)).await {
            Ok(Ok(l)) => got.extend(
                l.items
                    .iter()
                    .map(|i| String::from_utf8_lossy(&i.payload).into_owned()),
            ),
            _ => break,
        }
    }
    got.sort();
    assert_eq!(
        (on_a, on_b, got),
        (2, 2, vec!["p0".to_string(), "p1".to_string()])
    );
    b.shutdown().await;
}

/// A queue paused through server A is not served by server B, which loaded it before (docs/compatibility.md: a
/// pause is seen by every server sharing the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_on_one_server_stops_leases_on_the_other() {
    let Some((_db, _clock, a, b)) = two_servers_with_jobs(queue("jobs", "", 1), "x").await else {
        return;
    };
    a.set_paused("jobs", true).await.expect("pause via A");
    b.reload("jobs").await.expect("reload B");
    let r = tokio::time::timeout(Duration::from_secs(3), b.lease("jobs", 1, "w", T)).await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "B leased from a queue paused on A: {:?}",
        r.map(|r| r.map(|l| l.items.len()))
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// A queue deleted through server A is not served by server B, which loaded it before: B's task stops, and B answers
/// "queue not found" instead of storing items into the deleted queue's partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_on_one_server_is_not_served_by_the_other() {
    let Some((_db, clock, a, b)) = two_servers_with_jobs(queue("jobs", "", 1), "x").await else {
        return;
    };
    a.delete_queue("jobs").await.expect("delete via A");
    // B's next pass after the refresh interval finds the definition gone. Until then a request may still be
    // served; after it, none is, and the answers settle on "queue not found".
    clock.advance(Duration::from_secs(1));
    let mut last = None;
    for _ in 0..50 {
        match b.produce("jobs", vec![keyed("y", "")], T).await {
            Err(QueueError::QueueNotFound(_)) => {
                last = Some(true);
                break;
            }
            Err(QueueError::QueueShuttingDown) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("B served a produce into a queue deleted on A: {other:?}"),
        }
    }
    assert_eq!(last, Some(true), "B never answered 'queue not found'");
    // Created anew under the same name: B serves the new queue, not the old task.
    a.create_queue(queue("jobs", "", 1)).await.expect("create again");
    b.produce("jobs", vec![keyed("z", "")], T)
        .await
        .expect("produce via B into the new queue");
    assert_eq!(stored(&a, "jobs").await, vec!["z"]);
    a.shutdown().await;
    b.shutdown().await;
}

/// Dead letters accepted into a dead-letter queue on PostgreSQL do not count the partition's rows: a count is a
/// statement whose cost grows with the partition's depth, and it ran for every batch of dead letters, so a deep
/// enough dead-letter queue answered its senders later than they wait, and they sent again without end. The counts
/// follow what the store reports stored (the periodic refresh re-reads them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_into_a_shared_store_do_not_count_its_rows() {
    use lessor_core::engine::{EngineConfig, NamedStore};
    use lessor_storage::postgres::{PgConfig, PgQueues, PgStore};
    use lessor_testkit::hooked::{before, HookedStore, Op};
    use std::sync::atomic::{AtomicUsize, Ordering};

    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_dlcount").await;
    let cfg = PgConfig::new(db.url().to_string()).with_max_conns(4);
    let counts = Arc::new(AtomicUsize::new(0));
    let seen = counts.clone();
    let hook = before(move |c| {
        if c.op == Op::Counts && c.queue == "dlq" {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    });
    let clock = ManualClock::starting_now();
    let e = Engine::new(EngineConfig {
        queues: Arc::new(PgQueues::new(&cfg).expect("queues")),
        stores: vec![NamedStore {
            name: "pg-0".into(),
            affinity: 1.0,
            store: Arc::new(HookedStore::new(
                Arc::new(PgStore::new(&cfg).expect("store")),
                hook,
            )),
        }],
        limits: Default::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(queue("dlq", "", 1)).await.expect("dlq");
    e.create_queue(queue("src", "dlq", 1)).await.expect("src");
    let depth = |q: &'static str| {
        let e = e.clone();
        async move {
            let s = e.stats(q).await.expect("stats");
            s.partitions.iter().map(|p| p.total).sum::<u64>()
        }
    };
    assert_eq!(depth("dlq").await, 0);
    let loaded = counts.load(Ordering::SeqCst);
    for round in 0..5 {
        let items = (0..20)
            .map(|i| ProduceItem {
                payload: bytes::Bytes::from(format!("r{round}-{i}")),
                ..Default::default()
            })
            .collect();
        e.produce("src", items, T).await.expect("produce");
        let l = e.lease("src", 20, "killer", T).await.expect("lease");
        let dead = l
            .items
            .iter()
            .map(|it| RetryItem {
                id: it.id,
                retry_at: Default::default(),
                dead: true,
            })
            .collect();
        e.retry("src", l.partition, dead).await.expect("retry dead");
        let want = 20 * (round + 1);
        poll_until(Duration::from_secs(10), Duration::from_millis(10), || async {
            match depth("dlq").await {
                n if n == want => Ok(()),
                n => Err(format!("{n} of {want} dead letters")),
            }
        })
        .await
        .expect("the batch reaches the dead-letter queue");
    }
    assert_eq!(
        counts.load(Ordering::SeqCst),
        loaded,
        "5 batches of dead letters counted the dead-letter queue's rows"
    );
}

/// Lifecycle passes on PostgreSQL do not count the partition's rows: a pass comes due at every lease end, schedule
/// and expiry, and a count is a statement whose cost grows with the partition's depth. The counts follow what the
/// pass reports it moved (the periodic refresh, here an hour away, and an explicit stats re-read them), and agree
/// with the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_passes_on_a_shared_store_do_not_count_its_rows() {
    use lessor_core::engine::{EngineConfig, NamedStore};
    use lessor_core::types::Limits;
    use lessor_storage::postgres::{PgConfig, PgQueues, PgStore};
    use lessor_testkit::hooked::{before, HookedStore, Op};
    use std::sync::atomic::{AtomicUsize, Ordering};

    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_lccount").await;
    let cfg = PgConfig::new(db.url().to_string()).with_max_conns(4);
    let counts = Arc::new(AtomicUsize::new(0));
    let seen = counts.clone();
    let hook = before(move |c| {
        if c.op == Op::Counts && c.queue == "jobs" {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    });
    let clock = ManualClock::starting_now();
    let e = Engine::new(EngineConfig {
        queues: Arc::new(PgQueues::new(&cfg).expect("queues")),
        stores: vec![NamedStore {
            name: "pg-0".into(),
            affinity: 1.0,
            store: Arc::new(HookedStore::new(
                Arc::new(PgStore::new(&cfg).expect("store")),
                hook,
            )),
        }],
        limits: Limits {
            shared_refresh: Duration::from_secs(3600),
            ..Default::default()
        },
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(QueueInfo {
        max_attempts: 3,
        ..queue("jobs", "", 1)
    })
    .await
    .expect("create");
    let items = (0..100)
        .map(|i| ProduceItem {
            payload: bytes::Bytes::from(format!("item-{i}")),
            ..Default::default()
        })
        .collect();
    e.produce("jobs", items, T).await.expect("produce");
    let loaded = counts.load(Ordering::SeqCst);
    // Each round leases 20 items and lets the lease run out; the next lease's pass expires them first (an item
    // leased a third time dies on its expiry: max_attempts 3).
    for round in 0..6 {
        let l = e.lease("jobs", 20, &format!("w{round}"), T).await.expect("lease");
        assert!(!l.items.is_empty(), "round {round} leased nothing");
        clock.advance(Duration::from_secs(31));
    }
    // One more pass for the last round's expiry.
    let l = e.lease("jobs", 5, "last", T).await.expect("lease");
    let passes_counted = counts.load(Ordering::SeqCst) - loaded;
    let metrics = e
        .queue_metrics()
        .into_iter()
        .find(|(n, _)| n == "jobs")
        .expect("metrics")
        .1;
    let s = e.stats("jobs").await.expect("stats");
    let p = &s.partitions[0];
    let rows = (p.total - p.total_leased, p.total_leased, p.scheduled);
    assert_eq!(rows.1, l.items.len() as u64, "the last lease holds its items");
    // The gauges are published at the end of a pass, after its replies.
    poll_until(Duration::from_secs(5), Duration::from_millis(10), || async {
        let followed = (
            metrics.ready.load(Ordering::Relaxed),
            metrics.leased_now.load(Ordering::Relaxed),
            metrics.scheduled.load(Ordering::Relaxed),
        );
        if followed == rows {
            Ok(())
        } else {
            Err(format!("followed {followed:?}, rows {rows:?}"))
        }
    })
    .await
    .expect("the counts followed through the lifecycle passes agree with the rows");
    assert_eq!(
        passes_counted, 0,
        "the lifecycle passes counted the partition's rows {passes_counted} times"
    );
}
