//! PostgreSQL restarted (`pg_ctl restart -m fast`: every connection cut) while producers, consumers and
//! long-polling leases are active against a real server: clients see only 200s and 454s (never a 500 or a hang),
//! the server recovers by itself (its pool reconnects), and every acknowledged item is still there afterwards.
//!
//! Needs feature `postgres` and PostgreSQL installed (the test starts a cluster of its own with
//! `scripts/pg-test-cluster.sh`; skipped with a message without it, failed when `CI` is set).
#![cfg(feature = "postgres")]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client, ClientError};
use lessor_testkit::server::postgres_config;
use lessor_testkit::{postgres_installed, skip_or_fail, Cluster};

/// What the clients saw.
#[derive(Default)]
struct Seen {
    /// Payloads whose produce got a 200.
    acked: HashSet<String>,
    /// Payloads whose complete got a 200.
    completed: HashSet<String>,
    /// Answers other than 200, by code (0: no answer within 10 s, or a transport error), with one example each.
    errors: BTreeMap<i32, (u64, String)>,
}

impl Seen {
    fn error(&mut self, e: Option<&ClientError>) {
        let code = e.and_then(ClientError::code).unwrap_or(0);
        let text = e.map_or_else(|| "no answer within 10 s".to_string(), ToString::to_string);
        self.errors.entry(code).or_insert((0, text)).0 += 1;
    }
}

/// Runs `f` for at most 10 s: a request that takes longer counts as a hang.
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Option<Result<T, ClientError>> {
    tokio::time::timeout(Duration::from_secs(10), f).await.ok()
}

async fn producer(c: Client, id: usize, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let payloads: Vec<String> = (0..10).map(|i| format!("p{id}-{n}-{i}")).collect();
        n += 1;
        let req = pb::QueueProduceRequest {
            queue_name: "jobs".into(),
            request_timeout: "2s".into(),
            items: payloads
                .iter()
                .map(|p| pb::QueueProduceItem {
                    bytes: p.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        };
        match bounded(c.queue_produce(&req)).await {
            Some(Ok(_)) => seen.lock().expect("seen").acked.extend(payloads),
            Some(Err(e)) => {
                seen.lock().expect("seen").error(Some(&e));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => seen.lock().expect("seen").error(None),
        }
    }
}

async fn consumer(c: Client, id: usize, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    while !stop.load(Ordering::Relaxed) {
        let req = pb::QueueLeaseRequest {
            queue_name: "jobs".into(),
            batch_size: 10,
            client_id: format!("consumer-{id}"),
            request_timeout: "1s".into(),
        };
        let r = match bounded(c.queue_lease(&req)).await {
            Some(Ok(r)) => r,
            // An empty long-poll ends with 454 too; only other codes are of interest.
            Some(Err(e)) if e.code() == Some(454) => continue,
            Some(Err(e)) => {
                seen.lock().expect("seen").error(Some(&e));
                continue;
            }
            None => {
                seen.lock().expect("seen").error(None);
                continue;
            }
        };
        let done = pb::QueueCompleteRequest {
            queue_name: "jobs".into(),
            partition: r.partition,
            request_timeout: "2s".into(),
            ids: r.items.iter().map(|it| it.id.clone()).collect(),
        };
        match bounded(c.queue_complete(&done)).await {
            Some(Ok(_)) => seen.lock().expect("seen").completed.extend(
                r.items
                    .iter()
                    .map(|it| String::from_utf8_lossy(&it.bytes).into_owned()),
            ),
            Some(Err(e)) => seen.lock().expect("seen").error(Some(&e)),
            None => seen.lock().expect("seen").error(None),
        }
    }
}

/// PostgreSQL restarted at once (`pg_ctl restart -m fast`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_loses_nothing_and_answers_only_200_or_454() {
    if !postgres_installed() {
        skip_or_fail("PostgreSQL is not installed; skipping the outage test");
        return;
    }
    let (cluster, url) = Cluster::start("outage", 63492, "lessor_outage");
    outage(&cluster, &url, || cluster.run("restart")).await;
}

/// PostgreSQL stopped for 5 s, then started again on the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_for_5s_under_load_loses_nothing_and_answers_only_200_or_454() {
    if !postgres_installed() {
        skip_or_fail("PostgreSQL is not installed; skipping the outage test");
        return;
    }
    let (cluster, url) = Cluster::start("outage-down", 63494, "lessor_outage_down");
    outage(&cluster, &url, || {
        cluster.run("halt");
        std::thread::sleep(Duration::from_secs(5));
        cluster.run("start")
    })
    .await;
}

/// Producers, consumers and long-polling leases on a queue of two partitions; `outage` run 2 s in; 4 s more of load
/// once the database is back; then everything left is drained. Every acknowledged item is completed, during the
/// load or in the drain, and every answer is a 200 or a 454 within 10 s.
async fn outage(_cluster: &Cluster, url: &str, outage: impl FnOnce() -> String) {
    let (_server, c) = lessor_testkit::server::start(&postgres_config(url), None).await;
    c.queues_create(&pb::QueueInfo {
        queue_name: "jobs".into(),
        // Short, so items whose complete was lost in the restart come back within the drain.
        lease_timeout: "3s".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 2,
        ..Default::default()
    })
    .await
    .expect("create");

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::new();
    for id in 0..2 {
        tasks.push(tokio::spawn(producer(c.clone(), id, stop.clone(), seen.clone())));
        tasks.push(tokio::spawn(consumer(c.clone(), id, stop.clone(), seen.clone())));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t0 = Instant::now();
    outage();
    let restart = t0.elapsed();
    // Recovery: 100 more items acknowledged once the database is back.
    let before = seen.lock().expect("seen").acked.len();
    let recovered = loop {
        let n = seen.lock().expect("seen").acked.len();
        if n >= before + 100 {
            break t0.elapsed() - restart;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no produce acknowledged 30 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }

    // Drain: whatever is left, including items whose lease must run out first.
    let mut drained: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (acked, completed) = {
            let s = seen.lock().expect("seen");
            (s.acked.clone(), s.completed.clone())
        };
        let missing: Vec<&String> = acked
            .iter()
            .filter(|p| !completed.contains(*p) && !drained.contains(*p))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} acknowledged items never served again, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        let req = pb::QueueLeaseRequest {
            queue_name: "jobs".into(),
            batch_size: 1000,
            client_id: "drain".into(),
            request_timeout: "500ms".into(),
        };
        if let Ok(r) = c.queue_lease(&req).await {
            drained.extend(
                r.items
                    .iter()
                    .map(|it| String::from_utf8_lossy(&it.bytes).into_owned()),
            );
            c.queue_complete(&pb::QueueCompleteRequest {
                queue_name: "jobs".into(),
                partition: r.partition,
                request_timeout: "5s".into(),
                ids: r.items.iter().map(|it| it.id.clone()).collect(),
            })
            .await
            .expect("complete in the drain");
        }
    }
    let s = seen.lock().expect("seen");
    println!(
        "outage took {restart:?}; 100 more items acknowledged {recovered:?} after it; acked {}, \
         completed under load {}, drained {}; answers other than 200 (code: count, example): {:?}",
        s.acked.len(),
        s.completed.len(),
        drained.len(),
        s.errors
    );
    let bad: Vec<_> = s.errors.iter().filter(|(code, _)| **code != 454).collect();
    assert!(bad.is_empty(), "answers other than 200 and 454: {bad:?}");
}
