//! Cross-server wakeups on PostgreSQL: two servers share one database, a consumer waits on one of them, items are
//! made ready through the other. The servers re-read shared partitions only every hour here
//! (`limits.shared-refresh: 1h`), so a consumer served within its request timeout was woken by a notification;
//! the fault cases use a short refresh to show that a lost notification only delays an item.
//!
//! The two servers run in this process; each gets its own connection string (an `application_name`), so they do
//! not share a pool or a notification listener, as two processes would not.
#![cfg(feature = "postgres")]

use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client};
use lessor_server::{Config, RunningServer};
use lessor_testkit::{connect, eventually, postgres_installed, skip_or_fail, Cluster, TestDatabase};

/// The database's URL with an `application_name`, so each server has a pool (and listener) of its own.
fn url_for(db: &str, name: &str) -> String {
    let sep = if db.contains('?') { '&' } else { '?' };
    format!("{db}{sep}application_name={name}")
}

fn config(url: &str, refresh: &str) -> Config {
    let url = format!("'{}'", url.replace('\'', "''"));
    Config::from_yaml(&format!(
        "queue-storage:\n  driver: postgres\n  config:\n    connection-string: {url}\n\
         partition-storage:\n  - name: pg-0\n    driver: postgres\n    affinity: 1\n    \
         config:\n      connection-string: {url}\n\
         limits:\n  shared-refresh: {refresh}\n"
    ))
    .expect("config")
}

async fn two_servers(db: &str, refresh: &str) -> [(RunningServer, Client); 2] {
    let a = lessor_testkit::server::start(&config(&url_for(db, "lessor-a"), refresh), None).await;
    let b = lessor_testkit::server::start(&config(&url_for(db, "lessor-b"), refresh), None).await;
    [a, b]
}

async fn create(c: &Client, queue: &str) {
    c.queues_create(&pb::QueueInfo {
        queue_name: queue.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("create");
}

async fn produce(c: &Client, queue: &str, payload: &str) {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "10s".into(),
        items: vec![pb::QueueProduceItem {
            bytes: payload.as_bytes().to_vec(),
            ..Default::default()
        }],
    })
    .await
    .expect("produce");
}

/// A lease waiting on `c` (up to `wait`), started now.
fn lease_later(
    c: &Client,
    queue: &str,
    wait: &str,
) -> tokio::task::JoinHandle<Result<pb::QueueLeaseResponse, lessor_client::ClientError>> {
    let c = c.clone();
    let req = pb::QueueLeaseRequest {
        queue_name: queue.into(),
        batch_size: 1,
        client_id: format!("waiter-{}", rand_suffix()),
        request_timeout: wait.into(),
    };
    tokio::spawn(async move { c.queue_lease(&req).await })
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Loads the queue on `c`'s server (an empty lease), so the notice finds its queue task.
async fn warm(c: &Client, queue: &str) {
    let r = lease_later(c, queue, "20ms").await.expect("join");
    assert!(
        r.map(|r| r.items.is_empty()).unwrap_or(true),
        "nothing to lease yet"
    );
}

/// The listening connections of the two servers (their application names), by pid.
async fn listeners(db: &str) -> Vec<i32> {
    let c = connect(db).await;
    c.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %' \
         AND application_name LIKE 'lessor-%'",
        &[],
    )
    .await
    .expect("pg_stat_activity")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

async fn wait_for_listeners(db: &str, n: usize) -> Vec<i32> {
    eventually("the servers listen", Duration::from_secs(20), || async {
        let l = listeners(db).await;
        if l.len() == n {
            Ok(l)
        } else {
            Err(format!("{} listening connections", l.len()))
        }
    })
    .await
}

/// Two servers on the database at `url` with the queue "jobs" created on A and loaded on B, both listening;
/// returns them (servers first, to keep them alive) with their clients and the listeners' pids.
async fn ready_pair(url: &str, refresh: &str) -> ([RunningServer; 2], Client, Client, Vec<i32>) {
    let [(sa, a), (sb, b)] = two_servers(url, refresh).await;
    create(&a, "jobs").await;
    warm(&b, "jobs").await;
    let pids = wait_for_listeners(url, 2).await;
    ([sa, sb], a, b, pids)
}

/// A consumer waits on `b`, then `payload` is produced on `a`: returns what the consumer got.
async fn produce_while_waiting(a: &Client, b: &Client, payload: &str) -> pb::QueueLeaseResponse {
    let waiting = lease_later(b, "jobs", "30s");
    // Let the lease reach B's queue task before the item exists, as a consumer already waiting would.
    tokio::time::sleep(Duration::from_millis(50)).await;
    produce(a, "jobs", payload).await;
    let got = waiting.await.expect("join").expect("lease on B");
    assert_eq!(got.items.len(), 1, "B's waiting consumer got the item");
    assert_eq!(got.items[0].bytes, payload.as_bytes().to_vec());
    got
}

/// A produce on A wakes a consumer long-polling on B at once, with B's periodic refresh an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_on_one_server_wakes_a_consumer_waiting_on_the_other() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_wake").await;
    let (_servers, a, b, _) = ready_pair(db.url(), "1h").await;
    for round in 0..5 {
        let t0 = Instant::now();
        let got = produce_while_waiting(&a, &b, &format!("item-{round}")).await;
        println!(
            "round {round}: produced on A, leased on B after {:?}",
            t0.elapsed()
        );
        b.queue_complete(&pb::QueueCompleteRequest {
            queue_name: "jobs".into(),
            partition: got.partition,
            request_timeout: "5s".into(),
            ids: vec![got.items[0].id.clone()],
        })
        .await
        .expect("complete");
    }
}

/// The listening connection killed by `pg_terminate_backend` comes back on its own, and wakeups with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_resume_after_the_listening_connection_is_killed() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_wake").await;
    let (_servers, a, b, before) = ready_pair(db.url(), "1h").await;
    let admin = connect(db.url()).await;
    for pid in &before {
        admin
            .execute("SELECT pg_terminate_backend($1)", &[pid])
            .await
            .expect("terminate");
    }
    let after = eventually("new listening connections", Duration::from_secs(20), || async {
        let l = listeners(db.url()).await;
        if l.len() == 2 && l.iter().all(|p| !before.contains(p)) {
            Ok(l)
        } else {
            Err(format!("listeners {l:?}, killed {before:?}"))
        }
    })
    .await;
    assert_eq!(after.len(), 2);
    produce_while_waiting(&a, &b, "after-kill").await;
}

/// A notification lost while B cannot hear it (its listener is being killed over and over) only delays the item
/// until B's periodic refresh: nothing is stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_notification_only_waits_for_the_refresh() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_wake").await;
    let (_servers, a, b, _) = ready_pair(db.url(), "1s").await;
    // Keep B deaf: kill its listener as soon as it appears, for the whole test.
    let killer = {
        let url = db.url().to_string();
        tokio::spawn(async move {
            let c = connect(&url).await;
            loop {
                let _ = c
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = current_database() AND query LIKE 'LISTEN %' \
                         AND application_name = 'lessor-b'",
                        &[],
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiting = lease_later(&b, "jobs", "30s");
    tokio::time::sleep(Duration::from_millis(50)).await;
    produce(&a, "jobs", "unheard").await;
    let got = waiting.await.expect("join").expect("lease on B");
    killer.abort();
    assert_eq!(got.items.len(), 1, "the refresh found the item");
    assert_eq!(got.items[0].bytes, b"unheard".to_vec());
}

/// PostgreSQL restarted (every connection cut, the server back at once): the listeners reconnect by themselves
/// and wakeups resume; an item produced while B could not hear is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_resume_after_a_database_restart() {
    if !postgres_installed() {
        skip_or_fail("PostgreSQL is not installed; skipping the restart test");
        return;
    }
    let (cluster, url) = Cluster::start("wakeups", 63486, "lessor_wake");
    let (_servers, a, b, before) = ready_pair(&url, "2s").await;
    cluster.run("restart");
    // Produced once the database is back but perhaps before B listens again: the refresh finds it.
    eventually("A produces again", Duration::from_secs(30), || async {
        a.queue_produce(&pb::QueueProduceRequest {
            queue_name: "jobs".into(),
            request_timeout: "2s".into(),
            items: vec![pb::QueueProduceItem {
                bytes: b"during".to_vec(),
                ..Default::default()
            }],
        })
        .await
        .map_err(|e| e.to_string())
    })
    .await;
    let got = eventually(
        "B serves the item produced across the restart",
        Duration::from_secs(30),
        || async {
            match lease_later(&b, "jobs", "1s").await.expect("join") {
                Ok(r) if !r.items.is_empty() => Ok(r),
                Ok(_) => Err("nothing yet".to_string()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    assert_eq!(got.items[0].bytes, b"during".to_vec());
    // Both listen again, on new connections; a produce on A wakes B's waiting consumer at once.
    let after = eventually("new listening connections", Duration::from_secs(30), || async {
        let l = listeners(&url).await;
        if l.len() == 2 && l.iter().all(|p| !before.contains(p)) {
            Ok(l)
        } else {
            Err(format!("listeners {l:?}, before the restart {before:?}"))
        }
    })
    .await;
    assert_eq!(after.len(), 2);
    produce_while_waiting(&a, &b, "after").await;
}

/// The database stalls (every process stopped with SIGSTOP for 3 s, as a network stall would look): requests in
/// that time fail or wait, nothing acknowledged is lost, and once it resumes consumers on B are woken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_loses_nothing_and_wakeups_resume() {
    if !postgres_installed() {
        skip_or_fail("PostgreSQL is not installed; skipping the stall test");
        return;
    }
    let (cluster, url) = Cluster::start("stall", 63488, "lessor_stall");
    let (_servers, a, b, _) = ready_pair(&url, "1s").await;
    produce(&a, "jobs", "before").await;
    cluster.signal("STOP");
    // A produce during the stall: it may fail or time out, but if it is acknowledged it must be served later.
    let during = a
        .queue_produce(&pb::QueueProduceRequest {
            queue_name: "jobs".into(),
            request_timeout: "1s".into(),
            items: vec![pb::QueueProduceItem {
                bytes: b"during".to_vec(),
                ..Default::default()
            }],
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.signal("CONT");
    let mut expected = vec![b"before".to_vec()];
    if during.is_ok() {
        expected.push(b"during".to_vec());
    }
    // Everything acknowledged is served once the database is back.
    let mut got: Vec<Vec<u8>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < expected.len() {
        assert!(Instant::now() < deadline, "served {got:?}, expected {expected:?}");
        if let Ok(Ok(r)) = lease_later(&b, "jobs", "1s").await {
            for it in r.items {
                got.push(it.bytes.clone());
                let _ = b
                    .queue_complete(&pb::QueueCompleteRequest {
                        queue_name: "jobs".into(),
                        partition: r.partition,
                        request_timeout: "5s".into(),
                        ids: vec![it.id],
                    })
                    .await;
            }
        }
    }
    // A produce that failed (timed out in the stall) is in doubt: its item may have been stored after all.
    if during.is_err() {
        if let Ok(Ok(r)) = lease_later(&b, "jobs", "1s").await {
            got.extend(r.items.iter().map(|it| it.bytes.clone()));
            if let Some(it) = r.items.first() {
                let _ = b
                    .queue_complete(&pb::QueueCompleteRequest {
                        queue_name: "jobs".into(),
                        partition: r.partition,
                        request_timeout: "5s".into(),
                        ids: r.items.iter().map(|i| i.id.clone()).collect(),
                    })
                    .await;
                assert_eq!(it.bytes, b"during".to_vec());
            }
        }
        got.retain(|g| g.as_slice() != b"during");
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "every acknowledged item, once");
    // And a consumer waiting on B is woken by a produce on A again.
    produce_while_waiting(&a, &b, "after").await;
}

/// A stopped server closes its listening connection (nothing lingers on the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_stops_listening() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_wake").await;
    let [(a, _), (b, _)] = two_servers(db.url(), "1h").await;
    wait_for_listeners(db.url(), 2).await;
    b.stop().await;
    wait_for_listeners(db.url(), 1).await;
    a.stop().await;
    wait_for_listeners(db.url(), 0).await;
}

/// Idle queues unload on both servers (`limits.queue-idle-unload: 1s`, real time): a consumer long-polling on B is
/// still woken by a produce on A after A's queue unloaded between two produces, and after B's unloaded between two
/// consumers, with B's periodic refresh an hour away. An unloaded queue has no task to hand a notification to, so
/// this holds only if the request that loads it again reads the partition afresh and the producing server notifies
/// whether or not its queue was loaded before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_reach_a_consumer_across_unloads_on_both_servers() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_wake").await;
    let config = |name: &str| {
        let mut c = config(&url_for(db.url(), name), "1h");
        c.limits.queue_idle_unload = Some("1s".into());
        c
    };
    let (sa, a) = lessor_testkit::server::start(&config("lessor-a"), None).await;
    let (sb, b) = lessor_testkit::server::start(&config("lessor-b"), None).await;
    create(&a, "jobs").await;
    warm(&b, "jobs").await;
    wait_for_listeners(db.url(), 2).await;
    // Not loaded: never loaded on that server, or unloaded since.
    let unloaded = |s: &RunningServer| {
        !s.engine
            .queue_metrics()
            .iter()
            .any(|(q, m)| q == "jobs" && !m.unloaded.load(std::sync::atomic::Ordering::Relaxed))
    };
    for round in 0..3 {
        // Both queues idle past the unload time (B's consumer of the last round was answered).
        eventually("both queues unload", Duration::from_secs(10), || async {
            if unloaded(&sa) && unloaded(&sb) {
                Ok(())
            } else {
                Err(format!("unloaded: A {}, B {}", unloaded(&sa), unloaded(&sb)))
            }
        })
        .await;
        let t0 = Instant::now();
        let got = produce_while_waiting(&a, &b, &format!("item-{round}")).await;
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "round {round}: served by a wakeup, not a refresh ({:?})",
            t0.elapsed()
        );
        b.queue_complete(&pb::QueueCompleteRequest {
            queue_name: "jobs".into(),
            partition: got.partition,
            request_timeout: "5s".into(),
            ids: vec![got.items[0].id.clone()],
        })
        .await
        .expect("complete");
    }
    drop((sa, sb));
}
