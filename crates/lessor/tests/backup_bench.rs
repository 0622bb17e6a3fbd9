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
    let fill = Instant::now();
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
