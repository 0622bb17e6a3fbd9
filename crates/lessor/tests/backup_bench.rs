//! Benchmark of backup and restore (ignored; run in release, figures in docs/benchmarks.md):
//!
//! ```text
//! cargo test --release -p lessor --test backup_bench -- --ignored --nocapture
//! ```
//!
//! 1,000,000 items of 100 B in a fjall server (4 partitions) are backed up with the real `lessor backup` to a local
//! file, then restored with `lessor restore` into a fresh fjall server; and the serving path (produce, lease,
//! complete in a loop from several clients) is measured alone and while backups run back to back. Targets: backup
//! at least 500,000 items/s, restore at least 200,000 items/s, serving at least 70 % of its normal throughput
//! during a backup. `LESSOR_BENCH_ITEMS` changes the item count.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client};
use lessor_server::Config;

const BIN: &str = env!("CARGO_BIN_EXE_lessor");
/// Pairs of serving windows (alone, during backups) per mode.
const PAIRS: usize = 5;
/// Length of one serving window.
const WINDOW: Duration = Duration::from_secs(3);

fn fjall_config(dir: &std::path::Path) -> Config {
    let d = serde_json::to_string(&dir.to_string_lossy()).unwrap();
    Config::from_yaml(&format!(
        "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {d}\npartition-storage:\n  - name: disk-0\n    driver: fjall\n    affinity: 1\n    config:\n      storage-dir: {d}\n"
    ))
    .unwrap()
}

/// 100 bytes that compress about as well as typical JSON job payloads: a fixed shape with varying digits.
fn payload(n: u64) -> Vec<u8> {
    let mut z = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut s = format!("{{\"job\":{n},\"user\":\"u{}\",\"args\":\"", z % 100_000);
    while s.len() < 98 {
        z ^= z >> 29;
        z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        s.push(char::from(b'a' + (z % 26) as u8));
    }
    s.push_str("\"}");
    s.into_bytes()
}

fn run(endpoint: &str, args: &[&str]) -> Duration {
    let start = Instant::now();
    let o = std::process::Command::new(BIN)
        .args(args)
        .env("LESSOR_ENDPOINT", endpoint)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    start.elapsed()
}

/// Creates the two queues of the benchmarks (4 partitions each): `bulk`, which is backed up or moved, and `live`,
/// which the serving loop uses.
async fn create_bulk_and_live(c: &Client) {
    for q in ["bulk", "live"] {
        c.queues_create(&pb::QueueInfo {
            queue_name: q.into(),
            lease_timeout: "1h".into(),
            expire_timeout: "24h".into(),
            requested_partitions: 4,
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

/// Produces `n` JSON-like items into `bulk` from 8 clients, in batches of 1,000.
async fn fill_bulk(c: &Client, n: usize) {
    let mut tasks = Vec::new();
    let per = n / 8;
    for t in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut left = if t == 7 { n - per * 7 } else { per };
            while left > 0 {
                let k = left.min(1000);
                c.queue_produce(&pb::QueueProduceRequest {
                    queue_name: "bulk".into(),
                    request_timeout: "30s".into(),
                    items: (0..k)
                        .map(|i| pb::QueueProduceItem {
                            bytes: payload((t * per + left + i) as u64),
                            ..Default::default()
                        })
                        .collect(),
                })
                .await
                .unwrap();
                left -= k;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Produce/lease/complete operations per second from `workers` clients during `d`.
async fn serving_rate(c: &Client, queue: &str, d: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (c, stop, ops, queue) = (c.clone(), stop.clone(), ops.clone(), queue.to_string());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.queue_produce(&pb::QueueProduceRequest {
                    queue_name: queue.clone(),
                    request_timeout: "10s".into(),
                    items: (0..10)
                        .map(|_| pb::QueueProduceItem {
                            bytes: vec![1u8; 100],
                            ..Default::default()
                        })
                        .collect(),
                })
                .await
                .unwrap();
                let l = c
                    .queue_lease(&pb::QueueLeaseRequest {
                        queue_name: queue.clone(),
                        batch_size: 10,
                        client_id: format!("w{w}"),
                        request_timeout: "10s".into(),
                    })
                    .await
                    .unwrap();
                c.queue_complete(&pb::QueueCompleteRequest {
                    queue_name: queue.clone(),
                    partition: l.partition,
                    request_timeout: "10s".into(),
                    ids: l.items.iter().map(|i| i.id.clone()).collect(),
                })
                .await
                .unwrap();
                ops.fetch_add(3, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let n = ops.load(Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
async fn backup_and_restore_one_million_items() {
    let n: usize = std::env::var("LESSOR_BENCH_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let src_dir = dir.path().join("src");
    let (srv, c) = lessor_testkit::server::start(&fjall_config(&src_dir), None).await;
    create_bulk_and_live(&c).await;
    let fill = Instant::now();
    fill_bulk(&c, n).await;
    eprintln!("filled {n} items in {:.1}s", fill.elapsed().as_secs_f64());

    // Where backup files go (`LESSOR_BENCH_BACKUP_DIR`, e.g. /dev/shm to keep their writes off the server's disk).
    let out_dir = std::env::var("LESSOR_BENCH_BACKUP_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| dir.path().to_path_buf());
    let file = out_dir.join(format!("bench-{}.lbk", std::process::id()));
    let ep = srv.endpoint();
    let f = file.to_str().unwrap().to_string();
    let took = tokio::task::spawn_blocking({
        let (ep, f) = (ep.clone(), f.clone());
        move || run(&ep, &["backup", "--queue", "bulk", "--output", &f])
    })
    .await
    .unwrap();
    let size = std::fs::metadata(&file).unwrap().len();
    eprintln!(
        "backup: {n} items in {:.2}s = {:.0} items/s, file {:.1} MB",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        size as f64 / 1e6
    );

    // Serving alone and with backups running back to back, in alternating windows, so that a change in other load
    // on the machine (a shared one) hits both sides of a pair: the median of the pairs' ratios is the figure.
    for (label, extra) in [
        ("full-speed backups", Vec::new()),
        ("backups paced at 100,000 items/s", vec!["--max-rate", "100000"]),
    ] {
        let mut ratios = Vec::new();
        let mut backups_done = 0;
        for _ in 0..PAIRS {
            let alone = serving_rate(&c, "live", WINDOW).await;
            let busy = Arc::new(AtomicBool::new(true));
            let backups = {
                let (ep, busy, extra) = (ep.clone(), busy.clone(), extra.clone());
                let f2 = out_dir
                    .join(format!("loop-{}.lbk", std::process::id()))
                    .to_str()
                    .unwrap()
                    .to_string();
                tokio::task::spawn_blocking(move || {
                    let mut k = 0;
                    while busy.load(Ordering::Relaxed) {
                        let mut args = vec!["backup", "--queue", "bulk", "--output", &f2];
                        args.extend(extra.iter().copied());
                        run(&ep, &args);
                        k += 1;
                    }
                    k
                })
            };
            // Let the first backup start before counting.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let during = serving_rate(&c, "live", WINDOW).await;
            busy.store(false, Ordering::Relaxed);
            backups_done += backups.await.unwrap();
            eprintln!("  {label}: {alone:.0} ops/s alone, {during:.0} during");
            ratios.push(during / alone);
        }
        ratios.sort_by(f64::total_cmp);
        eprintln!(
            "serving during {label}: median {:.0} % of alone over {PAIRS} pairs (range {:.0}-{:.0} %, {backups_done} backups)",
            ratios[ratios.len() / 2] * 100.0,
            ratios[0] * 100.0,
            ratios[ratios.len() - 1] * 100.0
        );
    }
    srv.stop().await;

    let dst_dir = dir.path().join("dst");
    let (dst, _c2) = lessor_testkit::server::start(&fjall_config(&dst_dir), None).await;
    let ep2 = dst.endpoint();
    let took = tokio::task::spawn_blocking(move || run(&ep2, &["restore", "--input", &f]))
        .await
        .unwrap();
    eprintln!(
        "restore: {n} items in {:.2}s = {:.0} items/s",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    dst.stop().await;
    for f in ["bench", "loop"] {
        let _ = std::fs::remove_file(out_dir.join(format!("{f}-{}.lbk", std::process::id())));
    }
}

/// CPU seconds (user + system) this process has used: the in-process server and the load generator together.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th field, stime the 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Starts a rebalance of `queue` moving `partitions` to `store` and waits for it; returns (items moved, seconds).
async fn move_partitions(c: &Client, queue: &str, partitions: &[i32], store: &str, rate: i64) -> (i64, f64) {
    let start = Instant::now();
    let t = c
        .queues_rebalance(&pb::QueueRebalanceRequest {
            queue_name: queue.into(),
            moves: partitions
                .iter()
                .map(|&p| pb::PartitionMove {
                    partition: p,
                    to_store: store.into(),
                })
                .collect(),
            max_items_per_sec: rate,
            ..Default::default()
        })
        .await
        .unwrap();
    loop {
        let now = c
            .rebalance_get(&pb::RebalanceTaskRequest {
                task_id: t.task_id.clone(),
                queue_name: queue.into(),
            })
            .await
            .unwrap();
        if now.status != "running" {
            assert_eq!(now.status, "completed", "{now:?}");
            return (now.moved, start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serving throughput during an online partition move (`queues.rebalance`), and the move's own speed and CPU cost.
/// A fjall server with two stores holds `LESSOR_BENCH_ITEMS` (default 400,000) items of 100 B in a queue of 4
/// partitions; two of them move to the other store, first alone (items/s, CPU per item), then back and forth in
/// pairs of serving windows (alone, during a move) with the serving loop on another queue (target: at least 70 %
/// of its throughput alone, median over the pairs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
async fn serving_during_a_partition_move() {
    let n: usize = std::env::var("LESSOR_BENCH_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let dir = tempfile::tempdir().unwrap();
    let (a, b, m) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("m"));
    let q = |p: &std::path::Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
    let config = Config::from_yaml(&format!(
        "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {}\npartition-storage:\n  - name: a\n    driver: fjall\n    affinity: 1\n    config:\n      storage-dir: {}\n  - name: b\n    driver: fjall\n    affinity: 0\n    config:\n      storage-dir: {}\n",
        q(&m),
        q(&a),
        q(&b)
    ))
    .unwrap();
    let (srv, c) = lessor_testkit::server::start(&config, None).await;
    create_bulk_and_live(&c).await;
    fill_bulk(&c, n).await;
    let cpu0 = cpu_seconds();
    let alone = serving_rate(&c, "live", Duration::from_secs(5)).await;
    let cpu_serving = (cpu_seconds() - cpu0) / (alone * 5.0 / 3.0 * 10.0);
    let cpu0 = cpu_seconds();
    let (moved, secs) = move_partitions(&c, "bulk", &[0, 1], "b", 0).await;
    let cpu_move = cpu_seconds() - cpu0;
    eprintln!(
        "move alone: {moved} items in {secs:.2}s = {:.0} items/s, {:.1} µs CPU per item moved",
        moved as f64 / secs,
        cpu_move / moved as f64 * 1e6
    );
    eprintln!(
        "serving alone: {alone:.0} ops/s, {:.1} µs CPU per item (produce+lease+complete of one item, load generator included)",
        cpu_serving * 1e6
    );
    // Then moves back and forth while the serving loop runs (paced at `LESSOR_BENCH_MOVE_RATE` items/s when set),
    // in alternating windows like the backup benchmark: serving alone, then serving during a move, so that other
    // load on the (shared) machine hits both sides of a pair; the median of the pairs' ratios is the figure. Each
    // move is waited for before the next window alone.
    let rate: i64 = std::env::var("LESSOR_BENCH_MOVE_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut ratios = Vec::new();
    let mut to = "a";
    for pair in 0..PAIRS {
        let alone = serving_rate(&c, "live", WINDOW).await;
        let busy = {
            let c = c.clone();
            tokio::spawn(async move { move_partitions(&c, "bulk", &[0, 1], to, rate).await })
        };
        // Let the move start before counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let during = serving_rate(&c, "live", WINDOW).await;
        let whole = !busy.is_finished();
        let (moved, secs) = busy.await.unwrap();
        eprintln!(
            "  pair {pair}: {alone:.0} ops/s alone, {during:.0} during = {:.0} %; move of {moved} items to '{to}' in {secs:.2}s = {:.0} items/s{}",
            during / alone * 100.0,
            moved as f64 / secs,
            if whole { "" } else { " (ended inside the window: the ratio is diluted)" }
        );
        ratios.push(during / alone);
        to = if to == "a" { "b" } else { "a" };
    }
    ratios.sort_by(f64::total_cmp);
    eprintln!(
        "serving during a move (max rate {rate}): median {:.0} % of alone over {PAIRS} pairs (range {:.0}-{:.0} %)",
        ratios[ratios.len() / 2] * 100.0,
        ratios[0] * 100.0,
        ratios[ratios.len() - 1] * 100.0
    );
    srv.stop().await;
}
