//! Backups and migrations taken while items move between queues, and partitions of large items (each case was a
//! review finding; each test fails without its fix).
//!
//! - `lessor migrate` copies dead-letter queues first, then the queues naming them, while the source engine runs
//!   its lifecycle: an item that died on the source (lease or expiry due while the server was stopped) is moved by
//!   the source into its dead-letter queue after that queue was copied and before its own queue is: in neither copy.
//! - An online backup snapshots a dead-letter queue before the queues naming it: an item dead-lettered in between
//!   (it dies on the running server) is in neither snapshot, although it was stored the whole time.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::time::Duration;

use lessor_client::{proto as pb, Client};
use lessor_proto::backup::{self as fmt, RecordKind};
use lessor_server::Config;

const BIN: &str = env!("CARGO_BIN_EXE_lessor");

async fn ok(endpoint: &str, args: &[&str]) -> String {
    let o = tokio::process::Command::new(BIN)
        .args(args)
        .env("LESSOR_ENDPOINT", endpoint)
        .env_remove("LESSOR_API_KEY")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run lessor");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "lessor {args:?} failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

async fn create(c: &Client, name: &str, partitions: i32, dead_queue: &str, expire: &str) {
    c.queues_create(&pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "1s".into(),
        expire_timeout: expire.into(),
        requested_partitions: partitions,
        dead_queue: dead_queue.into(),
        max_attempts: if dead_queue.is_empty() { 0 } else { 3 },
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn produce(c: &Client, queue: &str, tag: &str, n: usize) {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "30s".into(),
        items: (0..n)
            .map(|i| pb::QueueProduceItem {
                bytes: format!("{tag}-{i:04}").into_bytes(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap();
}

/// Items a queue holds (ready, leased and scheduled, every partition).
async fn total(c: &Client, queue: &str) -> i64 {
    let s = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: queue.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    s.logical_queues
        .iter()
        .flat_map(|l| &l.partitions)
        .map(|p| i64::from(p.total) + i64::from(p.scheduled))
        .sum()
}

/// Payloads per queue in a backup file.
fn payloads(path: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    fmt::verify(std::fs::File::open(path).unwrap(), |_, _| {}).unwrap();
    let mut r = fmt::Reader::new(std::io::BufReader::new(std::fs::File::open(path).unwrap())).unwrap();
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    while let Some(rec) = r.next_raw().unwrap() {
        if rec.kind == RecordKind::Items {
            let b: fmt::ItemBlock = fmt::decode_body(&rec.body).unwrap();
            out.entry(b.queue.clone()).or_default().extend(
                b.items
                    .iter()
                    .map(|i| String::from_utf8_lossy(&i.payload).into_owned()),
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_keeps_items_the_source_dead_letters_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = |d: &Path| {
        let d = serde_json::to_string(&d.to_string_lossy()).unwrap();
        format!(
            "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {d}\npartition-storage:\n  - name: disk-0\n    driver: fjall\n    affinity: 1\n    config:\n      storage-dir: {d}\n"
        )
    };
    let (from, to) = (dir.path().join("from"), dir.path().join("to"));
    std::fs::create_dir_all(&from).unwrap();
    std::fs::create_dir_all(&to).unwrap();
    let (from_yaml, to_yaml) = (dir.path().join("from.yaml"), dir.path().join("to.yaml"));
    std::fs::write(&from_yaml, yaml(&from)).unwrap();
    std::fs::write(&to_yaml, yaml(&to)).unwrap();

    let (srv, c) = lessor_testkit::server::start(&Config::from_yaml(&yaml(&from)).unwrap(), None).await;
    create(&c, "dlq", 1, "", "24h").await;
    // Items of `jobs` expire 3 s after they are produced, i.e. while the server is stopped.
    create(&c, "jobs", 4, "dlq", "3s").await;
    for p in 0..4 {
        produce(&c, "jobs", &format!("p{p}"), 10).await;
    }
    let have = total(&c, "jobs").await;
    assert_eq!(have, 40);
    srv.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    ok(
        "http://unused",
        &[
            "migrate",
            "--from",
            from_yaml.to_str().unwrap(),
            "--to",
            to_yaml.to_str().unwrap(),
        ],
    )
    .await;
    let (srv2, _c2) = lessor_testkit::server::start(&Config::from_yaml(&yaml(&to)).unwrap(), None).await;
    let file = dir.path().join("after.lbk");
    ok(&srv2.endpoint(), &["backup", "--output", file.to_str().unwrap()]).await;
    srv2.stop().await;
    let got = payloads(&file);
    let n: usize = got.values().map(Vec::len).sum();
    assert_eq!(
        n, 40,
        "every item of the source is in the target once (in jobs, or in dlq once it died): {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_keeps_items_dead_lettered_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, c) = lessor_testkit::server::memory().await;
    create(&c, "dlq", 1, "", "24h").await;
    produce(&c, "dlq", "old", 5).await;
    // Items of `jobs` expire (and move to dlq) 2 s from now, while the backup runs.
    create(&c, "jobs", 2, "dlq", "2s").await;
    produce(&c, "jobs", "jobs", 10).await;
    assert_eq!(total(&c, "jobs").await + total(&c, "dlq").await, 15);
    let file = dir.path().join("b.lbk");
    // Paced at 2 items/s: the 5 items of dlq take 2.5 s, the time for those of jobs to die.
    ok(
        &srv.endpoint(),
        &["backup", "--max-rate", "2", "--output", file.to_str().unwrap()],
    )
    .await;
    srv.stop().await;
    let got = payloads(&file);
    let n: usize = got.values().map(Vec::len).sum();
    assert!(
        n >= 15,
        "every item stored during the whole backup is in it (in jobs, or in dlq once it died): {got:?}"
    );
}

/// Incompressible bytes (xorshift), distinct per item.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_of_9_kb_items_can_be_backed_up_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, c) = lessor_testkit::server::memory().await;
    create(&c, "big", 1, "", "24h").await;
    // 8,000 items of 9 KB: 72 MB, more than a backup record may hold (64 MiB) if they all go in one block.
    for chunk in 0..32u64 {
        c.queue_produce(&pb::QueueProduceRequest {
            queue_name: "big".into(),
            request_timeout: "30s".into(),
            items: (0..250u64)
                .map(|i| pb::QueueProduceItem {
                    bytes: noise(chunk * 250 + i, 9000),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap();
    }
    assert_eq!(total(&c, "big").await, 8000);
    let file = dir.path().join("big.lbk");
    ok(&srv.endpoint(), &["backup", "--output", file.to_str().unwrap()]).await;
    srv.stop().await;
    let (dst, c2) = lessor_testkit::server::memory().await;
    ok(&dst.endpoint(), &["restore", "--input", file.to_str().unwrap()]).await;
    assert_eq!(total(&c2, "big").await, 8000);
    dst.stop().await;
}
