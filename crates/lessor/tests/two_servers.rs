//! Real `lessor server` processes on PostgreSQL, under concurrent load, with failures injected from outside:
//!
//! - two servers sharing one database never lease one item to two consumers at once, and every item is completed
//!   exactly once, none lost;
//! - lease expiry and dead-lettering run on both servers but apply once per item;
//! - one of two servers killed with SIGKILL mid-load: the other keeps serving, nothing acknowledged is lost, and
//!   the items the dead server's consumers held come back after their lease expires (wall time, 2 s leases);
//! - PostgreSQL stopped and restarted mid-load: requests fail with 454 while it is down (never 500 or 453), nothing
//!   acknowledged is lost, and service resumes by itself;
//! - two servers under load through three database faults in turn (every connection killed with
//!   `pg_terminate_backend`, the listening ones included; the database stalled with SIGSTOP; a restart): nothing
//!   acknowledged lost, no double lease, service back on both servers without operator action after each, and
//!   consumers on both servers served afterwards (`lessor-server`'s `postgres_wakeups.rs` checks the wakeups
//!   themselves after each of these faults).
//!
//! Items are tracked by payload, since an item gets a new id each time it is leased. A [`Ledger`] records every
//! acknowledged produce, every lease (with its deadline) and every completion, and flags a lease of an item whose
//! previous lease had not expired when the new one arrived.
//!
//! The first three tests need `LESSOR_TEST_DATABASE_URL` and make a database of their own there; the restart test
//! runs a private cluster through `scripts/pg-test-cluster.sh`, like `lessor-storage`'s `postgres_restart.rs`, when
//! PostgreSQL is installed locally. Without them the tests are skipped with a message (or fail when `CI` is set). They run one at a time.
#![cfg(feature = "postgres")]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lessor_client::{proto as pb, Client, ClientError};
use tokio::task::JoinHandle;

/// The tests start processes and measure wall time: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// For a test that stops, restarts or stalls its database: the serial lock and a private cluster, or `None` (the
/// test is skipped) without a test database or a local PostgreSQL to start.
async fn fault_cluster(
    tag: &str,
    port: u16,
    db: &str,
) -> Option<(tokio::sync::MutexGuard<'static, ()>, Cluster, String)> {
    let serial = SERIAL.lock().await;
    database_or_skip()?;
    if !postgres_installed() {
        skip_or_fail("no local PostgreSQL to stop and start");
        return None;
    }
    let (cluster, url) = Cluster::start(tag, port, db);
    Some((serial, cluster, url))
}

// ---- databases ---------------------------------------------------------------------------------------------------

use lessor_testkit::process::{ServerCommand, ServerProcess};
use lessor_testkit::{
    database_or_skip, poll_until, postgres_installed, skip_or_fail, Cluster, TestDatabase as Database,
};

// ---- servers -----------------------------------------------------------------------------------------------------

/// A `lessor server` process with its name (for messages) and a client; killed (SIGKILL) on drop.
struct Server {
    name: String,
    process: ServerProcess,
    client: Client,
}

impl Server {
    /// Starts `lessor server` with queue definitions and items in the database at `url`, and waits until it answers.
    async fn start(name: &str, url: &str, dir: &Path) -> Server {
        let url = serde_json::to_string(url).expect("string");
        let config = format!(
            "logging:\n  level: warn\n\
             queue-storage:\n  driver: postgres\n  config:\n    connection-string: {url}\n    max-conns: 8\n\
             partition-storage:\n  - name: pg-0\n    driver: postgres\n    affinity: 1\n    config:\n      \
             connection-string: {url}\n      max-conns: 8\n"
        );
        let config_path = dir.join(format!("{name}.yaml"));
        std::fs::write(&config_path, config).expect("write config");
        let process = ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), dir.join(format!("{name}.log")))
            .config(&config_path)
            .startup_limit(Duration::from_secs(30))
            .start()
            .await;
        let client = process.client().clone();
        Server {
            name: name.to_string(),
            process,
            client,
        }
    }

    fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// SIGKILL: no graceful shutdown, no flush.
    fn kill(&mut self) {
        self.process.kill();
    }
}

async fn create_queue(c: &Client, name: &str, f: impl FnOnce(&mut pb::QueueInfo)) {
    let mut q = pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "2s".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 2,
        ..Default::default()
    };
    f(&mut q);
    c.queues_create(&q).await.expect("create queue");
}

/// Ready plus leased plus scheduled items of `queue`, as the server reads them from the database.
async fn remaining(c: &Client, queue: &str) -> Result<i64, ClientError> {
    let s = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: queue.into(),
            ..Default::default()
        })
        .await?;
    Ok(s.logical_queues[0]
        .partitions
        .iter()
        .map(|p| i64::from(p.total) + i64::from(p.scheduled))
        .sum())
}

// ---- the ledger --------------------------------------------------------------------------------------------------

fn now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
}

/// The current lease of one item.
struct Holder {
    consumer: String,
    deadline: i128,
}

/// Everything the workers saw, by payload.
#[derive(Default)]
struct Ledger {
    /// Produced with a 200.
    acked: HashSet<String>,
    /// Produce failed: the items may or may not be stored.
    unacked: HashSet<String>,
    /// Items whose current lease the ledger knows.
    holders: HashMap<String, Holder>,
    /// Leases per item, with the attempts the server reported.
    leases: HashMap<String, Vec<i32>>,
    /// Completes answered 200, per item.
    completed: HashMap<String, u32>,
    /// Completes answered "does not exist" (the lease expired first) or lost with a killed server.
    in_doubt: HashSet<String>,
    /// Leases by server name.
    leased_via: HashMap<String, u64>,
    /// A lease of an item whose previous lease was still running.
    violations: Vec<String>,
    /// Failures that are not allowed where they happened.
    bad: Vec<String>,
    /// 454 answers other than a long-poll that found nothing, with the phase they happened in.
    retryable: Vec<(u8, String)>,
    /// Long-polls that found nothing.
    empty_polls: u64,
}

impl Ledger {
    fn leased(&mut self, consumer: &str, server: &str, items: &[pb::QueueLeaseItem]) {
        let now = now_nanos();
        for it in items {
            let p = String::from_utf8_lossy(&it.bytes).into_owned();
            let deadline = it.lease_deadline.map_or(0, |d| d.unix_nanos());
            if let Some(h) = self.holders.get(&p) {
                if h.deadline > now {
                    self.violations.push(format!(
                        "{p} leased to {consumer} via {server} while {} held it for {} ms more",
                        h.consumer,
                        (h.deadline - now) / 1_000_000
                    ));
                }
            }
            self.holders.insert(
                p.clone(),
                Holder {
                    consumer: consumer.to_string(),
                    deadline,
                },
            );
            self.leases.entry(p).or_default().push(it.attempts);
        }
        *self.leased_via.entry(server.to_string()).or_default() += items.len() as u64;
    }

    fn completed(&mut self, consumer: &str, payloads: &[String]) {
        for p in payloads {
            *self.completed.entry(p.clone()).or_default() += 1;
            if self.holders.get(p).is_some_and(|h| h.consumer == consumer) {
                self.holders.remove(p);
            }
        }
    }

    /// What is wrong with the end state: a double lease, an unexpected failure, an acknowledged item never
    /// completed (nor its completion in doubt), an item completed twice, or an item leased that was never produced.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let some = |v: &[String]| v[..v.len().min(5)].join(" | ");
        if !self.violations.is_empty() {
            out.push(format!(
                "{} leases of items already leased, e.g. {}",
                self.violations.len(),
                some(&self.violations)
            ));
        }
        if !self.bad.is_empty() {
            out.push(format!(
                "{} unexpected failures, e.g. {}",
                self.bad.len(),
                some(&self.bad)
            ));
        }
        let twice: Vec<String> = self
            .completed
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(p, n)| format!("{p} x{n}"))
            .collect();
        if !twice.is_empty() {
            out.push(format!("completed more than once: {}", some(&twice)));
        }
        let lost: Vec<String> = self
            .acked
            .iter()
            .filter(|p| !self.completed.contains_key(*p) && !self.in_doubt.contains(*p))
            .cloned()
            .collect();
        if !lost.is_empty() {
            out.push(format!(
                "{} acknowledged items never completed, e.g. {}",
                lost.len(),
                some(&lost)
            ));
        }
        let unknown: Vec<String> = self
            .leases
            .keys()
            .filter(|p| !self.acked.contains(*p) && !self.unacked.contains(*p))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            out.push(format!("leased but never produced: {}", some(&unknown)));
        }
        out
    }

    fn check(&self) {
        let p = self.problems();
        assert!(p.is_empty(), "{}", p.join("\n"));
    }
}

// ---- workers -----------------------------------------------------------------------------------------------------

/// What the workers share.
#[derive(Clone)]
struct Run {
    ledger: Arc<Mutex<Ledger>>,
    queue: String,
    /// Producers stop.
    stop_producing: Arc<AtomicBool>,
    /// Consumers stop.
    stop_consuming: Arc<AtomicBool>,
    /// The test's phase, stamped on 454 answers (0 before any fault).
    phase: Arc<AtomicU8>,
}

impl Run {
    fn new(queue: &str) -> Run {
        Run {
            ledger: Arc::default(),
            queue: queue.into(),
            stop_producing: Arc::default(),
            stop_consuming: Arc::default(),
            phase: Arc::default(),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a failure: 454 is always allowed (and noted with the phase), a transport error only from a server
    /// that was killed on purpose, anything else never.
    fn failed(&self, what: &str, e: &ClientError, killed: &AtomicBool) {
        let mut l = self.ledger();
        match e.code() {
            Some(454) if e.message().is_some_and(|m| m.starts_with("request timeout")) => l.empty_polls += 1,
            Some(454) => {
                let phase = self.phase.load(Ordering::SeqCst);
                l.retryable.push((phase, format!("{what}: {e}")));
            }
            None if killed.load(Ordering::SeqCst) => {}
            _ => l.bad.push(format!("{what}: {e}")),
        }
    }

    /// Produces batches of `batch` items tagged `tag`, pausing `pause` between batches, until told to stop or until
    /// `limit` items were sent.
    /// The steady load of the fault tests: producers sending 10 items every 20 ms and consumers holding each lease
    /// for their given time, none of them ever killed.
    fn steady_load(
        &self,
        producers: &[(&Server, &str)],
        consumers: &[(&Server, &str, Duration)],
    ) -> (Vec<JoinHandle<()>>, Vec<JoinHandle<()>>) {
        let never = Arc::new(AtomicBool::new(false));
        let p = producers
            .iter()
            .map(|(s, tag)| self.producer(s, tag, 10, Duration::from_millis(20), usize::MAX, never.clone()))
            .collect();
        let c = consumers
            .iter()
            .map(|(s, name, hold)| self.consumer(s, name, *hold, never.clone()))
            .collect();
        (p, c)
    }

    fn producer(
        &self,
        server: &Server,
        tag: &str,
        batch: usize,
        pause: Duration,
        limit: usize,
        killed: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        let (run, c, tag) = (self.clone(), server.client.clone(), tag.to_string());
        tokio::spawn(async move {
            let mut n = 0;
            while !run.stop_producing.load(Ordering::SeqCst) && n < limit {
                let payloads: Vec<String> = (n..n + batch).map(|i| format!("{tag}-{i}")).collect();
                n += batch;
                let req = pb::QueueProduceRequest {
                    queue_name: run.queue.clone(),
                    request_timeout: "10s".into(),
                    items: payloads
                        .iter()
                        .map(|p| pb::QueueProduceItem {
                            bytes: p.as_bytes().to_vec(),
                            ..Default::default()
                        })
                        .collect(),
                };
                match c.queue_produce(&req).await {
                    Ok(()) => run.ledger().acked.extend(payloads),
                    Err(e) => {
                        run.ledger().unacked.extend(payloads);
                        run.failed(&format!("produce {tag}"), &e, &killed);
                        if killed.load(Ordering::SeqCst) && e.code().is_none() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(pause).await;
            }
        })
    }

    /// Leases batches of 10 and completes each after holding it for `hold`, until told to stop. A complete that
    /// gets 454 is retried; "does not exist" (the lease ran out first) puts the items in doubt.
    fn consumer(
        &self,
        server: &Server,
        name: &str,
        hold: Duration,
        killed: Arc<AtomicBool>,
    ) -> JoinHandle<()> {
        let (run, c, name) = (self.clone(), server.client.clone(), name.to_string());
        let server_name = server.name.clone();
        tokio::spawn(async move {
            while !run.stop_consuming.load(Ordering::SeqCst) {
                let lease = c
                    .queue_lease(&pb::QueueLeaseRequest {
                        queue_name: run.queue.clone(),
                        batch_size: 10,
                        client_id: name.clone(),
                        request_timeout: "1s".into(),
                    })
                    .await;
                let l = match lease {
                    Ok(l) => l,
                    Err(e) => {
                        run.failed(&format!("lease {name}"), &e, &killed);
                        if killed.load(Ordering::SeqCst) && e.code().is_none() {
                            return;
                        }
                        if e.code() != Some(454)
                            || !e.message().is_some_and(|m| m.starts_with("request timeout"))
                        {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                };
                run.ledger().leased(&name, &server_name, &l.items);
                tokio::time::sleep(hold).await;
                let payloads: Vec<String> = l
                    .items
                    .iter()
                    .map(|i| String::from_utf8_lossy(&i.bytes).into_owned())
                    .collect();
                let req = pb::QueueCompleteRequest {
                    queue_name: run.queue.clone(),
                    partition: l.partition,
                    request_timeout: "10s".into(),
                    ids: l.items.iter().map(|i| i.id.clone()).collect(),
                };
                loop {
                    match c.queue_complete(&req).await {
                        Ok(()) => {
                            run.ledger().completed(&name, &payloads);
                            break;
                        }
                        Err(e)
                            if e.code() == Some(400)
                                && e.message().is_some_and(|m| m.contains("does not exist")) =>
                        {
                            // The lease expired before the complete arrived (it comes back), or an earlier try
                            // that answered 454 was applied after all.
                            run.ledger().in_doubt.extend(payloads);
                            break;
                        }
                        Err(e) => {
                            run.failed(&format!("complete {name}"), &e, &killed);
                            if e.code() != Some(454) {
                                run.ledger().in_doubt.extend(payloads);
                                if killed.load(Ordering::SeqCst) && e.code().is_none() {
                                    return;
                                }
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        })
    }
}

/// Waits (bounded) until `server` reports nothing left in the queue and every acknowledged item is accounted for.
async fn drained(run: &Run, server: &Server, within: Duration) {
    let probe = move || async move {
        let left = remaining(&server.client, &run.queue).await;
        let missing = {
            let l = run.ledger();
            l.acked
                .iter()
                .filter(|p| !l.completed.contains_key(*p) && !l.in_doubt.contains(*p))
                .count()
        };
        match left {
            Ok(0) if missing == 0 => Ok(()),
            left => Err(format!(
                "{left:?} items left in the queue, {missing} acknowledged items not completed"
            )),
        }
    };
    if let Err(t) = poll_until(within, Duration::from_millis(100), probe).await {
        panic!("not drained: {t}; server log:\n{}", server.log_tail());
    }
}

async fn join_all(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        t.await.expect("worker panicked");
    }
}

// ---- tests -------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_never_lease_one_item_twice() {
    let _serial = SERIAL.lock().await;
    if database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_two").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Server::start("a", db.url(), dir.path()).await;
    let b = Server::start("b", db.url(), dir.path()).await;
    // Long leases: none can run out here, so any second lease of an item is a double delivery.
    create_queue(&a.client, "shared", |q| q.lease_timeout = "30s".into()).await;

    let run = Run::new("shared");
    let alive = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    let mut consumers = Vec::new();
    for (s, tag) in [(&a, "a0"), (&a, "a1"), (&b, "b0"), (&b, "b1")] {
        producers.push(run.producer(s, tag, 20, Duration::ZERO, 400, alive.clone()));
    }
    for (s, name) in [(&a, "ca0"), (&a, "ca1"), (&b, "cb0"), (&b, "cb1")] {
        consumers.push(run.consumer(s, name, Duration::ZERO, alive.clone()));
    }
    join_all(producers).await;
    drained(&run, &a, Duration::from_secs(60)).await;
    run.stop_consuming.store(true, Ordering::SeqCst);
    join_all(consumers).await;

    {
        let l = run.ledger();
        l.check();
        assert_eq!(l.acked.len(), 1600, "every produce was acknowledged");
        assert!(l.in_doubt.is_empty(), "no lease ran out: {:?}", l.in_doubt);
        assert!(l.retryable.is_empty(), "{:?}", l.retryable);
        for s in ["a", "b"] {
            assert!(
                l.leased_via.get(s).copied().unwrap_or(0) > 0,
                "server {s} leased nothing: {:?}",
                l.leased_via
            );
        }
        eprintln!("leased via {:?}", l.leased_via);
    }
    assert_eq!(remaining(&b.client, "shared").await.expect("stats"), 0);
}

/// Cross-server wakeup latency (issue 13's benchmark): items produced on server A at a steady 1,000 items/s (one
/// item per request), leased by consumers long-polling on server B; the latency of each item is from just before
/// its produce request to the lease answer that returns it. Prints the percentiles; run with
/// `cargo test --release -p lessor --test two_servers -- --ignored --nocapture --exact wakeup_latency_across_servers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run in release with --ignored --nocapture"]
async fn wakeup_latency_across_servers() {
    let _serial = SERIAL.lock().await;
    if database_or_skip().is_none() {
        return;
    }
    const RATE: u64 = 1000;
    const SECONDS: u64 = 10;
    let db = Database::create("lessor_wakeup").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Server::start("a", db.url(), dir.path()).await;
    let b = Server::start("b", db.url(), dir.path()).await;
    create_queue(&a.client, "wake", |q| q.lease_timeout = "30s".into()).await;
    let total = (RATE * SECONDS) as usize;
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for i in 0..4 {
        let (c, latencies, stop) = (b.client.clone(), latencies.clone(), stop.clone());
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let Ok(r) = c
                    .queue_lease(&pb::QueueLeaseRequest {
                        queue_name: "wake".into(),
                        batch_size: 100,
                        client_id: format!("wake-{i}"),
                        request_timeout: "1s".into(),
                    })
                    .await
                else {
                    continue;
                };
                let now = now_nanos();
                let mut ids = Vec::new();
                for it in &r.items {
                    let sent: i128 = String::from_utf8_lossy(&it.bytes).parse().unwrap_or(now);
                    latencies.lock().expect("lock").push((now - sent) as f64 / 1e6);
                    ids.push(it.id.clone());
                }
                if !ids.is_empty() {
                    let _ = c
                        .queue_complete(&pb::QueueCompleteRequest {
                            queue_name: "wake".into(),
                            partition: r.partition,
                            request_timeout: "5s".into(),
                            ids,
                        })
                        .await;
                }
            }
        }));
    }
    // Let the consumers wait on B first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = tokio::time::Instant::now();
    let mut producing = Vec::with_capacity(total);
    for i in 0..total as u64 {
        tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / RATE)).await;
        let c = a.client.clone();
        producing.push(tokio::spawn(async move {
            c.queue_produce(&pb::QueueProduceRequest {
                queue_name: "wake".into(),
                request_timeout: "10s".into(),
                items: vec![pb::QueueProduceItem {
                    bytes: now_nanos().to_string().into_bytes(),
                    ..Default::default()
                }],
            })
            .await
            .expect("produce");
        }));
    }
    for p in producing {
        p.await.expect("producer");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().expect("lock").len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in consumers {
        let _ = c.await;
    }
    let mut l = latencies.lock().expect("lock").clone();
    assert_eq!(l.len(), total, "every item was leased on B");
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    println!(
        "produce on A -> lease on B, {RATE} items/s for {SECONDS} s: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, \
         p99.9 {:.2} ms, max {:.2} ms",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        l[l.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_and_dead_lettering_apply_once_across_two_servers() {
    let _serial = SERIAL.lock().await;
    if database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_two").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Server::start("a", db.url(), dir.path()).await;
    let b = Server::start("b", db.url(), dir.path()).await;
    create_queue(&a.client, "life-dead", |_| {}).await;
    create_queue(&a.client, "life", |q| {
        q.max_attempts = 2;
        q.dead_queue = "life-dead".into();
    })
    .await;
    let expected: HashSet<String> = (0..100).map(|i| format!("l-{i}")).collect();
    for chunk in 0..5 {
        a.client
            .queue_produce(&pb::QueueProduceRequest {
                queue_name: "life".into(),
                request_timeout: "10s".into(),
                items: (chunk * 20..chunk * 20 + 20)
                    .map(|i| pb::QueueProduceItem {
                        bytes: format!("l-{i}").into_bytes(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .expect("produce");
    }

    // Leases everything from `queue` through both servers in turn; each item must come exactly once.
    let lease_all = |queue: &'static str, attempts: i32| {
        let (a, b) = (a.client.clone(), b.client.clone());
        let expected = expected.clone();
        async move {
            let mut got: HashMap<String, String> = HashMap::new();
            let t0 = Instant::now();
            let mut turn = 0;
            while got.len() < expected.len() {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{queue}: only {} of {} items came back",
                    got.len(),
                    expected.len()
                );
                let c = if turn % 2 == 0 { &a } else { &b };
                turn += 1;
                let r = c
                    .queue_lease(&pb::QueueLeaseRequest {
                        queue_name: queue.into(),
                        batch_size: 7,
                        client_id: format!("w{turn}"),
                        request_timeout: "1s".into(),
                    })
                    .await;
                match r {
                    Ok(r) => {
                        for it in r.items {
                            let p = String::from_utf8_lossy(&it.bytes).into_owned();
                            assert_eq!(it.attempts, attempts, "{queue}: {p}");
                            assert!(
                                got.insert(p.clone(), it.id).is_none(),
                                "{queue}: {p} leased twice"
                            );
                        }
                    }
                    Err(e) if e.code() == Some(454) => {}
                    Err(e) => panic!("{queue}: lease: {e}"),
                }
            }
            assert_eq!(got.keys().cloned().collect::<HashSet<_>>(), expected);
            // Nothing else is there to lease: no item was requeued twice.
            for c in [&a, &b] {
                let e = c
                    .queue_lease(&pb::QueueLeaseRequest {
                        queue_name: queue.into(),
                        batch_size: 100,
                        client_id: "probe".into(),
                        request_timeout: "200ms".into(),
                    })
                    .await
                    .expect_err("nothing left");
                assert_eq!(e.code(), Some(454), "{e}");
            }
            got
        }
    };
    let first = lease_all("life", 1).await;
    // The leases run out (2 s): both servers see the deadline, the item goes back once.
    let second = lease_all("life", 2).await;
    for (p, id) in &second {
        assert_ne!(first.get(p), Some(id), "{p} kept its id across a requeue");
    }
    // They run out again: max_attempts 2 sends each item to the dead-letter queue, once.
    let dead = lease_all("life-dead", 1).await;
    assert_eq!(dead.len(), 100);
    assert_eq!(remaining(&a.client, "life").await.expect("stats"), 0);
    assert_eq!(remaining(&b.client, "life-dead").await.expect("stats"), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_server_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    if database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_two").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Server::start("a", db.url(), dir.path()).await;
    let mut b = Server::start("b", db.url(), dir.path()).await;
    create_queue(&a.client, "k", |_| {}).await;

    let run = Run::new("k");
    let a_alive = Arc::new(AtomicBool::new(false));
    let b_killed = Arc::new(AtomicBool::new(false));
    let mut producers = vec![
        run.producer(
            &a,
            "pa",
            10,
            Duration::from_millis(20),
            usize::MAX,
            a_alive.clone(),
        ),
        run.producer(
            &b,
            "pb",
            10,
            Duration::from_millis(20),
            usize::MAX,
            b_killed.clone(),
        ),
    ];
    // B's consumers hold their leases a while, so some are held when B dies.
    let mut consumers = vec![
        run.consumer(&a, "ca0", Duration::ZERO, a_alive.clone()),
        run.consumer(&a, "ca1", Duration::from_millis(20), a_alive.clone()),
        run.consumer(&b, "cb0", Duration::from_millis(300), b_killed.clone()),
        run.consumer(&b, "cb1", Duration::from_millis(300), b_killed.clone()),
    ];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A lease through B that nobody will complete, so the kill surely strands some leases.
    let stranded = loop {
        let r = b
            .client
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: "k".into(),
                batch_size: 20,
                client_id: "stranded".into(),
                request_timeout: "1s".into(),
            })
            .await;
        match r {
            Ok(r) => break r,
            Err(e) if e.code() == Some(454) => continue,
            Err(e) => panic!("lease: {e}"),
        }
    };
    run.ledger().leased("stranded", "b", &stranded.items);
    b_killed.store(true, Ordering::SeqCst);
    b.kill();
    let held_by_b: HashSet<String> = {
        let l = run.ledger();
        l.holders
            .iter()
            .filter(|(_, h)| h.consumer.starts_with("cb") || h.consumer == "stranded")
            .map(|(p, _)| p.clone())
            .collect()
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    run.stop_producing.store(true, Ordering::SeqCst);
    for p in producers.drain(..) {
        p.await.expect("producer");
    }
    drained(&run, &a, Duration::from_secs(60)).await;
    run.stop_consuming.store(true, Ordering::SeqCst);
    for c in consumers.drain(..) {
        c.await.expect("consumer");
    }

    let l = run.ledger();
    l.check();
    assert!(
        l.retryable.is_empty(),
        "A kept serving without a retryable failure: {:?}",
        l.retryable
    );
    assert!(!held_by_b.is_empty());
    // What B's consumers held came back to A's consumers after the lease ran out, as a new attempt.
    for p in &held_by_b {
        let attempts = l.leases.get(p).expect("leased");
        if l.completed.contains_key(p) && attempts.len() == 1 {
            // B completed it before dying (its reply may have been lost).
            continue;
        }
        assert!(
            attempts.len() >= 2 && attempts.last() > attempts.first(),
            "{p} held through B: leases {attempts:?}"
        );
    }
    for it in &stranded.items {
        let p = String::from_utf8_lossy(&it.bytes).into_owned();
        assert_eq!(
            l.completed.get(&p),
            Some(&1),
            "stranded {p} was completed through A"
        );
    }
    eprintln!(
        "acked {}, completed {}, held by B at the kill {}, leased via {:?}",
        l.acked.len(),
        l.completed.len(),
        held_by_b.len(),
        l.leased_via
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restart_fails_requests_with_454_and_recovers() {
    let Some((_serial, cluster, url)) = fault_cluster("two-servers", 63470, "lessor_faults").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let s = Server::start("solo", &url, dir.path()).await;
    create_queue(&s.client, "f", |q| q.lease_timeout = "3s".into()).await;

    let run = Run::new("f");
    let (producers, consumers) = run.steady_load(
        &[(&s, "p0"), (&s, "p1")],
        &[(&s, "c0", Duration::ZERO), (&s, "c1", Duration::from_millis(50))],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = run.ledger().acked.len();
    assert!(before > 0, "nothing produced before the outage");

    // Down for three seconds under load.
    cluster.run("halt");
    run.phase.store(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked_down = run.ledger().acked.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        run.ledger().acked.len(),
        acked_down,
        "no produce can be acknowledged while the database is down"
    );

    // Back: service resumes without anyone touching the server.
    cluster.run("start");
    run.phase.store(2, Ordering::SeqCst);
    let back = Instant::now();
    let resumed = loop {
        if run.ledger().acked.len() > acked_down {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "service did not resume within 30 s; server log:\n{}",
            s.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A fast restart (connections cut, server back at once) under load.
    cluster.run("restart");
    run.phase.store(3, Ordering::SeqCst);
    let acked_restart = run.ledger().acked.len();
    let back = Instant::now();
    while run.ledger().acked.len() <= acked_restart {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "service did not resume after the restart; server log:\n{}",
            s.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed_restart = back.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.stop_producing.store(true, Ordering::SeqCst);
    join_all(producers).await;
    drained(&run, &s, Duration::from_secs(60)).await;
    run.stop_consuming.store(true, Ordering::SeqCst);
    join_all(consumers).await;

    let l = run.ledger();
    l.check();
    let down: Vec<&String> = l
        .retryable
        .iter()
        .filter(|(p, _)| *p == 1)
        .map(|(_, m)| m)
        .collect();
    assert!(
        !down.is_empty(),
        "requests failed with 454 while the database was down"
    );
    // The kinds of answers seen: "<call> <worker>: 454 Retry Request: <constant>".
    let kinds: std::collections::BTreeSet<String> = l
        .retryable
        .iter()
        .map(|(_, m)| {
            let call = m.split(' ').next().unwrap_or_default();
            let rest = m.split_once(": ").map_or("", |(_, r)| r);
            format!("{call}: {}", rest.split(';').next().unwrap_or_default())
        })
        .collect();
    eprintln!("454 answers seen: {kinds:?}");
    eprintln!(
        "acked {} ({} before the outage), completed {}, in doubt {}; 454s while down {}, after {} (e.g. {:?}); \
         resumed {resumed:?} after start, {resumed_restart:?} after restart",
        l.acked.len(),
        before,
        l.completed.len(),
        l.in_doubt.len(),
        down.len(),
        l.retryable.len() - down.len(),
        down.first()
    );
    drop(s);
    drop(cluster);
}

/// Waits until both servers acknowledged produce again after a fault (phase `phase`), and returns how long it took.
async fn both_resume(run: &Run, servers: &[&Server], tags: [&str; 2], phase: &str) -> Duration {
    let count = |tag: &str| {
        let prefix = format!("{tag}-");
        run.ledger()
            .acked
            .iter()
            .filter(|p| p.starts_with(&prefix))
            .count()
    };
    let before = [count(tags[0]), count(tags[1])];
    let t0 = Instant::now();
    while count(tags[0]) <= before[0] || count(tags[1]) <= before[1] {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "service did not resume on both servers within 30 s after {phase}; logs:\n{}\n{}",
            servers[0].log_tail(),
            servers[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_survive_connection_kills_stalls_and_restarts() {
    let Some((_serial, cluster, url)) = fault_cluster("two-faults", 63476, "lessor_faults2").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let a = Server::start("a", &url, dir.path()).await;
    let b = Server::start("b", &url, dir.path()).await;
    create_queue(&a.client, "f", |q| {
        q.lease_timeout = "3s".into();
        q.requested_partitions = 2;
    })
    .await;

    // Producers on A only and on B only, consumers on both: items produced on A are also leased through B.
    let run = Run::new("f");
    let (producers, consumers) = run.steady_load(
        &[(&a, "pa"), (&b, "pb")],
        &[(&a, "ca", Duration::ZERO), (&b, "cb", Duration::from_millis(20))],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 1. Every client connection of both servers ended by the database (pools and LISTEN connections).
    run.phase.store(1, Ordering::SeqCst);
    let ended = lessor_testkit::terminate_connections(&url).await;
    assert!(
        ended >= 2,
        "both servers' connections, listeners included ({ended})"
    );
    let after_kill = both_resume(&run, &[&a, &b], ["pa", "pb"], "pg_terminate_backend").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. A stall: every database process stopped for 3 s, as a network partition looks to the servers.
    run.phase.store(2, Ordering::SeqCst);
    cluster.signal("STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.signal("CONT");
    let after_stall = both_resume(&run, &[&a, &b], ["pa", "pb"], "the stall").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. A restart of PostgreSQL.
    run.phase.store(3, Ordering::SeqCst);
    cluster.run("restart");
    let after_restart = both_resume(&run, &[&a, &b], ["pa", "pb"], "the restart").await;

    // Consumers on both servers still served after the faults, the listening connections included.
    let leased_before: HashMap<String, u64> = run.ledger().leased_via.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let l = run.ledger();
        for s in ["a", "b"] {
            let (now, then) = (
                l.leased_via.get(s).copied().unwrap_or(0),
                leased_before.get(s).copied().unwrap_or(0),
            );
            assert!(
                now > then,
                "nothing leased through {s} after the faults ({then} -> {now})"
            );
        }
    }
    run.stop_producing.store(true, Ordering::SeqCst);
    join_all(producers).await;
    drained(&run, &a, Duration::from_secs(60)).await;
    run.stop_consuming.store(true, Ordering::SeqCst);
    join_all(consumers).await;

    let l = run.ledger();
    l.check();
    let cross = l.leases.keys().filter(|p| p.starts_with("pa-")).count();
    assert!(cross > 0, "items produced on A were leased");
    eprintln!(
        "acked {}, completed {}, in doubt {}, 454 answers {} (by phase: {:?}); leased via {:?}; service back \
         {after_kill:?} after pg_terminate_backend ({ended} connections), {after_stall:?} after the stall, \
         {after_restart:?} after the restart",
        l.acked.len(),
        l.completed.len(),
        l.in_doubt.len(),
        l.retryable.len(),
        (1..=3u8)
            .map(|p| l.retryable.iter().filter(|(x, _)| *x == p).count())
            .collect::<Vec<_>>(),
        l.leased_via
    );
    drop((a, b));
    drop(cluster);
}

/// The ledger itself: a second lease of an item whose lease is still running is flagged, one after expiry is not.
#[test]
fn ledger_flags_a_lease_of_a_held_item() {
    let item = |deadline_ms_from_now: i128, attempts: i32| pb::QueueLeaseItem {
        id: "1".into(),
        attempts,
        lease_deadline: Some(pb::Timestamp::from_unix_nanos(
            now_nanos() + deadline_ms_from_now * 1_000_000,
        )),
        bytes: b"x-1".to_vec(),
        ..Default::default()
    };
    let mut l = Ledger::default();
    l.acked.insert("x-1".into());
    l.leased("c1", "a", &[item(-1, 1)]);
    l.leased("c2", "b", &[item(60_000, 2)]);
    assert!(l.violations.is_empty(), "the first lease had expired");
    l.leased("c3", "a", &[item(60_000, 3)]);
    assert_eq!(l.violations.len(), 1, "c2 still held it");
    l.violations.clear();
    l.completed("c3", &["x-1".into()]);
    l.check();
    l.completed("c3", &["x-1".into()]);
    let p = l.problems();
    assert!(
        p.len() == 1 && p[0].starts_with("completed more than once"),
        "{p:?}"
    );
    l.acked.insert("x-2".into());
    assert_eq!(l.problems().len(), 2, "x-2 was never completed");
}
