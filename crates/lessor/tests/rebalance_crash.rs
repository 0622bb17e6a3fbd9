//! Online rebalance under load, with SIGKILL of the real binary mid-move (fjall, `durability: sync`): producers,
//! consumers and a ledger run throughout while two partitions move to another store and the queue then shrinks
//! from 4 partitions to 2, the server being killed during each. In the end every acknowledged item was completed
//! exactly once, none is lost, none was leased while another lease on it was still valid, and no completed item
//! came back.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use lessor_client::{proto as pb, Client};
use lessor_testkit::process::{ServerCommand, ServerProcess};

const QUEUE: &str = "rb";
/// Items in the queue before the rebalance starts, so that it takes long enough to be killed mid-way.
const PRELOAD: usize = 30_000;
/// Lease length: leases held by a consumer when the server dies expire soon after.
const LEASE: &str = "3s";

fn server(root: &Path) -> ServerCommand {
    let config = root.join("lessor.yaml");
    std::fs::write(
        &config,
        format!(
            "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {m}\npartition-storage:\n  \
             - name: a\n    driver: fjall\n    affinity: 1\n    config:\n      storage-dir: {a}\n  \
             - name: b\n    driver: fjall\n    affinity: 0\n    config:\n      storage-dir: {b}\n",
            m = root.join("meta").display(),
            a = root.join("a").display(),
            b = root.join("b").display(),
        ),
    )
    .expect("write config");
    ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), root.join("server.log"))
        .startup_limit(Duration::from_secs(30))
        .config(&config)
        .arg("--log-level")
        .arg("info")
}

/// What the load saw.
#[derive(Default)]
struct Ledger {
    /// Payloads whose produce was acknowledged.
    produced: HashSet<String>,
    /// Payloads whose produce failed (may or may not be stored).
    maybe_produced: HashSet<String>,
    /// Payloads whose complete was acknowledged.
    completed: HashSet<String>,
    /// Payloads whose complete failed without an answer (may or may not be done).
    maybe_completed: HashSet<String>,
    /// Per payload: when its current lease ends (wall clock, from the server's lease_deadline).
    leased_until: HashMap<String, SystemTime>,
    /// Violations seen.
    errors: Vec<String>,
}

struct Shared {
    client: RwLock<Client>,
    ledger: Mutex<Ledger>,
    stop: AtomicBool,
    next: AtomicU64,
}

impl Shared {
    fn client(&self) -> Client {
        self.client.read().expect("client lock").clone()
    }
}

fn deadline(ts: &Option<pb::Timestamp>) -> SystemTime {
    let t = (*ts).unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}

/// A produce of one item per payload (UTF-8 bodies).
fn produce_req(payloads: &[String], timeout: &str) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: QUEUE.into(),
        request_timeout: timeout.into(),
        items: payloads
            .iter()
            .map(|p| pb::QueueProduceItem {
                utf8: p.clone(),
                ..Default::default()
            })
            .collect(),
    }
}

async fn producer(sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::Relaxed) {
        let first = sh.next.fetch_add(20, Ordering::Relaxed);
        let payloads: Vec<String> = (first..first + 20).map(|i| format!("item-{i:08}")).collect();
        let r = sh.client().queue_produce(&produce_req(&payloads, "5s")).await;
        {
            let mut l = sh.ledger.lock().expect("ledger");
            match r {
                Ok(_) => l.produced.extend(payloads),
                Err(_) => l.maybe_produced.extend(payloads),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn consumer(sh: Arc<Shared>, id: usize, hold: Duration) {
    let client_id = format!("consumer-{id}");
    while !sh.stop.load(Ordering::Relaxed) {
        let Ok(l) = sh
            .client()
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: QUEUE.into(),
                batch_size: 20,
                client_id: client_id.clone(),
                request_timeout: "1s".into(),
            })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if l.items.is_empty() {
            continue;
        }
        let now = SystemTime::now();
        let payloads: Vec<String> = l
            .items
            .iter()
            .map(|it| String::from_utf8_lossy(&it.bytes).into_owned())
            .collect();
        {
            let mut led = sh.ledger.lock().expect("ledger");
            for (it, p) in l.items.iter().zip(&payloads) {
                if led.completed.contains(p) {
                    led.errors
                        .push(format!("{p}: leased again after its complete was acknowledged"));
                }
                if let Some(until) = led.leased_until.get(p).copied() {
                    // A lease may be handed out again only once the previous one ended (with some slack for
                    // clock reading).
                    if until > now + Duration::from_millis(300) {
                        led.errors.push(format!(
                            "{p}: leased twice (previous lease valid until {until:?})"
                        ));
                    }
                }
                led.leased_until.insert(p.clone(), deadline(&it.lease_deadline));
            }
        }
        // A slow consumer holds its leases through much of a move: they must stay valid (or be fenced and come
        // back), never vanish with the partition's old home.
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
        let r = sh
            .client()
            .queue_complete(&pb::QueueCompleteRequest {
                queue_name: QUEUE.into(),
                partition: l.partition,
                request_timeout: "5s".into(),
                ids: l.items.iter().map(|it| it.id.clone()).collect(),
            })
            .await;
        let mut led = sh.ledger.lock().expect("ledger");
        match r {
            Ok(_) => {
                for p in payloads {
                    led.leased_until.remove(&p);
                    if !led.completed.insert(p.clone()) {
                        led.errors.push(format!("{p}: completed twice"));
                    }
                }
            }
            // A 400 (fenced: the lease ended) leaves the item to come back; no answer may have completed it.
            Err(lessor_client::ClientError::Api { .. }) => {
                for p in payloads {
                    led.leased_until.remove(&p);
                }
            }
            Err(_) => {
                for p in payloads {
                    led.leased_until.remove(&p);
                    led.maybe_completed.insert(p);
                }
            }
        }
    }
}

/// Produces [`PRELOAD`] items named `<tag>-<n>` in batches of 1,000, recorded in the ledger.
async fn preload(c: &Client, sh: &Shared, tag: &str) {
    for chunk in 0..PRELOAD / 1000 {
        let payloads: Vec<String> = (0..1000)
            .map(|i| format!("{tag}-{:06}", chunk * 1000 + i))
            .collect();
        c.queue_produce(&produce_req(&payloads, "30s"))
            .await
            .expect("preload");
        sh.ledger.lock().expect("ledger").produced.extend(payloads);
    }
}

async fn rebalance_get(c: &Client, id: &str) -> Option<pb::RebalanceTask> {
    c.rebalance_get(&pb::RebalanceTaskRequest {
        task_id: id.into(),
        queue_name: QUEUE.into(),
    })
    .await
    .ok()
}

/// Waits until the task moved something (it is mid-way), kills the server, restarts it and hands the load the new
/// client. Returns the new server.
async fn kill_mid_way(cmd: &ServerCommand, mut srv: ServerProcess, sh: &Shared, id: &str) -> ServerProcess {
    let t0 = Instant::now();
    loop {
        let t = rebalance_get(srv.client(), id).await.expect("rebalance.get");
        assert_eq!(
            t.status, "running",
            "killed mid-way: the task must still run: {t:?}"
        );
        if t.moved > 0 {
            println!("killing mid-way: {t:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the task makes progress: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.kill();
    let srv = cmd.start().await;
    *sh.client.write().expect("client lock") = srv.client().clone();
    srv
}

async fn wait_done(srv: &ServerProcess, id: &str) -> pb::RebalanceTask {
    let t0 = Instant::now();
    loop {
        if let Some(t) = rebalance_get(srv.client(), id).await {
            if t.status != "running" && t.status != "cancelling" {
                return t;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "the task finishes: {t:?}\n{}",
                srv.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_under_load_survives_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cmd = server(dir.path());
    let mut srv = cmd.start().await;
    let c = srv.client().clone();
    c.queues_create(&pb::QueueInfo {
        queue_name: QUEUE.into(),
        lease_timeout: LEASE.into(),
        expire_timeout: "24h".into(),
        requested_partitions: 4,
        ..Default::default()
    })
    .await
    .expect("create");
    let sh = Arc::new(Shared {
        client: RwLock::new(c.clone()),
        ledger: Mutex::new(Ledger::default()),
        stop: AtomicBool::new(false),
        next: AtomicU64::new(0),
    });
    preload(&c, &sh, "pre").await;
    let mut load = Vec::new();
    load.push(tokio::spawn(producer(sh.clone())));
    for i in 0..3 {
        load.push(tokio::spawn(consumer(sh.clone(), i, Duration::ZERO)));
    }
    for i in 3..5 {
        load.push(tokio::spawn(consumer(sh.clone(), i, Duration::from_millis(2500))));
    }

    // Move partitions 0 and 1 to store b, killing the server mid-move.
    let mv = c
        .queues_rebalance(&pb::QueueRebalanceRequest {
            queue_name: QUEUE.into(),
            moves: vec![
                pb::PartitionMove {
                    partition: 0,
                    to_store: "b".into(),
                },
                pb::PartitionMove {
                    partition: 1,
                    to_store: "b".into(),
                },
            ],
            ..Default::default()
        })
        .await
        .expect("start move");
    srv = kill_mid_way(&cmd, srv, &sh, &mv.task_id).await;
    let done = wait_done(&srv, &mv.task_id).await;
    assert_eq!(done.status, "completed", "{done:?}\n{}", srv.log_tail());
    let info = srv
        .client()
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: QUEUE.into(),
        })
        .await
        .expect("info");
    println!("after the move: {:?}", info.partitions);

    // Shrink from 4 partitions to 2, killing the server mid-drain. A backlog first: the consumers may have caught
    // up by now, and a drain of empty partitions ends before it can be killed mid-way.
    preload(srv.client(), &sh, "pre2").await;
    let shrink = srv
        .client()
        .queues_rebalance(&pb::QueueRebalanceRequest {
            queue_name: QUEUE.into(),
            partitions: 2,
            ..Default::default()
        })
        .await
        .expect("start shrink");
    srv = kill_mid_way(&cmd, srv, &sh, &shrink.task_id).await;
    let done = wait_done(&srv, &shrink.task_id).await;
    assert_eq!(done.status, "completed", "{done:?}\n{}", srv.log_tail());
    let info = srv
        .client()
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: QUEUE.into(),
        })
        .await
        .expect("info");
    assert_eq!(info.requested_partitions, 2, "{info:?}");

    // Stop producing; the consumers drain the queue (leases held when the server died expire and come back).
    sh.stop.store(true, Ordering::Relaxed);
    for h in load {
        h.await.expect("load task");
    }
    // The flag must be down before the drain consumer starts: it exits at once when it sees it up.
    sh.stop.store(false, Ordering::Relaxed);
    let drain = tokio::spawn(consumer(sh.clone(), 99, Duration::ZERO));
    let c = srv.client().clone();
    let t0 = Instant::now();
    loop {
        let s = c
            .queue_stats(&pb::QueueStatsRequest {
                queue_name: QUEUE.into(),
                ..Default::default()
            })
            .await
            .expect("stats");
        let left: i64 = s
            .logical_queues
            .iter()
            .flat_map(|l| &l.partitions)
            .map(|p| i64::from(p.total) + i64::from(p.scheduled))
            .sum();
        if left == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the queue drains: {left} left: {:?}\n{}",
            s.logical_queues,
            srv.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sh.stop.store(true, Ordering::Relaxed);
    drain.await.expect("drain");

    let led = sh.ledger.lock().expect("ledger");
    assert!(led.errors.is_empty(), "violations:\n{}", led.errors.join("\n"));
    let lost: Vec<&String> = led
        .produced
        .iter()
        .filter(|p| !led.completed.contains(*p) && !led.maybe_completed.contains(*p))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged items lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    let unknown: Vec<&String> = led
        .completed
        .iter()
        .filter(|p| !led.produced.contains(*p) && !led.maybe_produced.contains(*p))
        .collect();
    assert!(unknown.is_empty(), "items nobody produced: {unknown:?}");
    println!(
        "produced {} (+{} unacknowledged), completed {} (+{} without an answer)",
        led.produced.len(),
        led.maybe_produced.len(),
        led.completed.len(),
        led.maybe_completed.len()
    );
    drop(led);
    srv.kill();
}

async fn lessor(endpoint: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(args)
        .env("LESSOR_ENDPOINT", endpoint)
        .env_remove("LESSOR_API_KEY")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run lessor")
}

/// The CLI: `lessor rebalance QUEUE --move P=STORE` waits for the task and prints it (`--json`), `list` and `get`
/// show it, and a bad request exits non-zero with the server's message naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rebalance_waits_and_reports() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut srv = server(dir.path()).start().await;
    let c = srv.client().clone();
    c.queues_create(&pb::QueueInfo {
        queue_name: QUEUE.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 2,
        ..Default::default()
    })
    .await
    .expect("create");
    for b in 0..2 {
        c.queue_produce(&pb::QueueProduceRequest {
            queue_name: QUEUE.into(),
            request_timeout: "30s".into(),
            items: (0..1000)
                .map(|i| pb::QueueProduceItem {
                    utf8: format!("x{b}-{i}"),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("produce");
    }
    let e = srv.endpoint().to_string();
    let t0 = Instant::now();
    let out = lessor(
        &e,
        &[
            "--json",
            "rebalance",
            QUEUE,
            "--move",
            "0=b",
            "--move",
            "1=b",
            "--max-rate",
            "4000",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 2,000 items at most 4,000 a second: half a second at least (the first chunk of 500 goes at once).
    assert!(
        t0.elapsed() >= Duration::from_millis(350),
        "paced: {:?}",
        t0.elapsed()
    );
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["moved"], "2000", "{task}");
    assert_eq!(task["max_items_per_sec"], "4000", "{task}");
    let id = task["task_id"].as_str().expect("task id").to_string();
    let out = lessor(&e, &["--json", "rebalance", "get", &id, "--queue", QUEUE]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lessor(&e, &["rebalance", "list", QUEUE]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&id) && table.contains("0->b,1->b"), "{table}");
    let out = lessor(&e, &["rebalance", QUEUE, "--move", "0=nowhere"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("moves[0].to_store is invalid"), "{err}");
    let out = lessor(&e, &["rebalance", QUEUE, "--move", "zero=b"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a partition number"));
    srv.kill();
}

/// The CLI's cancel: `lessor rebalance --cancel ID` (and `rebalance cancel ID`) stops a paced two-partition move:
/// the partition under way finishes, the other stays where it was, and every item is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rebalance_cancel() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut srv = server(dir.path()).start().await;
    let c = srv.client().clone();
    c.queues_create(&pb::QueueInfo {
        queue_name: QUEUE.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 2,
        ..Default::default()
    })
    .await
    .expect("create");
    for b in 0..2 {
        c.queue_produce(&pb::QueueProduceRequest {
            queue_name: QUEUE.into(),
            request_timeout: "30s".into(),
            items: (0..1000)
                .map(|i| pb::QueueProduceItem {
                    utf8: format!("x{b}-{i}"),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("produce");
    }
    let e = srv.endpoint().to_string();
    let out = lessor(
        &e,
        &[
            "--json",
            "rebalance",
            QUEUE,
            "--move",
            "0=b",
            "--move",
            "1=b",
            "--max-rate",
            "1000",
            "--detach",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = task["task_id"].as_str().expect("task id").to_string();
    // The first chunk goes at once, so partition 0's move has started when the cancel arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = lessor(&e, &["--json", "rebalance", "--cancel", &id, QUEUE]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(t["status"] == "cancelling" || t["status"] == "cancelled", "{t}");
    let done = wait_done(&srv, &id).await;
    assert_eq!(done.status, "cancelled", "{done:?}");
    let out = lessor(&e, &["rebalance", "cancel", &id, "--queue", QUEUE]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    // Partition 0 (1,000 items) was under way and finished; partition 1's move was dropped.
    assert_eq!(done.moved, 1000, "{done:?}");
    let stats = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: QUEUE.into(),
            ..Default::default()
        })
        .await
        .expect("stats");
    let total: i64 = stats
        .logical_queues
        .iter()
        .flat_map(|l| &l.partitions)
        .map(|p| i64::from(p.total))
        .sum();
    assert_eq!(total, 2000, "nothing lost or doubled: {stats:?}");
    let out = lessor(&e, &["rebalance", "cancel", "rb-nope", "--queue", QUEUE]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("task_id is invalid"));
    srv.kill();
}
