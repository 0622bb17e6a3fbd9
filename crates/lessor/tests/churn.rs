//! Queue churn and wide queues against the real binary on the default (fjall) store: create / produce / delete
//! cycles must not leak disk, RAM or fjall metadata, a re-created queue starts empty, and a queue with thousands of
//! partitions is created and served without starving another queue.
//!
//! The CI run is short (a few hundred cycles). The soak of the issue runs the same code longer:
//! `LESSOR_CHURN_CYCLES=10000 cargo test --release -p lessor --test churn -- --nocapture` (figures in
//! docs/benchmarks.md).

use std::path::Path;
use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client};
use lessor_testkit::measure::{disk_usage as disk, rss_kib};
use lessor_testkit::process::{ServerCommand, ServerProcess};

fn cycles() -> usize {
    std::env::var("LESSOR_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

async fn start(dir: &Path) -> ServerProcess {
    ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), dir.join("server.log"))
        .data_dir(&dir.join("data"))
        .arg("--log-level")
        .arg("warn")
        .startup_limit(Duration::from_secs(60))
        .start()
        .await
}

async fn create(c: &Client, name: &str, partitions: i32) {
    c.queues_create(&pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: partitions,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create {name} with {partitions} partitions: {e}"));
}

async fn produce(c: &Client, name: &str, n: usize) {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: name.into(),
        request_timeout: "1m".into(),
        items: (0..n)
            .map(|i| pb::QueueProduceItem {
                bytes: format!("{i:0100}").into_bytes(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .unwrap_or_else(|e| panic!("produce to {name}: {e}"));
}

async fn delete(c: &Client, name: &str) {
    c.queues_delete(&pb::QueuesDeleteRequest {
        queue_name: name.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("delete {name}: {e}"));
}

async fn total_items(c: &Client, name: &str) -> i64 {
    let stats = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("stats of {name}: {e}"));
    stats
        .logical_queues
        .iter()
        .flat_map(|l| l.partitions.iter())
        .map(|p| i64::from(p.total))
        .sum()
}

/// Resident memory of process `pid` in bytes.
fn rss(pid: u32) -> u64 {
    rss_kib(&pid.to_string()) * 1024
}

/// fjall keyspace directories of the partition store: format 2 has exactly `items` plus fjall's own metadata.
fn keyspace_dirs(data: &Path) -> usize {
    std::fs::read_dir(data.join("~partitions").join("keyspaces"))
        .map(|d| d.count())
        .unwrap_or(0)
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_churn_gives_back_disk_and_memory_and_recreated_queues_start_empty() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let server = start(dir.path()).await;
    let c = server.client().clone();
    let n = cycles();
    for partitions in [1, 64] {
        let name = format!("churn-{partitions}");
        let mut window = Vec::new();
        let mut first_window = None;
        for i in 0..n {
            let t0 = Instant::now();
            create(&c, &name, partitions).await;
            // A re-created queue never shows the previous incarnation's items.
            assert_eq!(
                total_items(&c, &name).await,
                0,
                "cycle {i}: a new queue starts empty"
            );
            produce(&c, &name, 2).await;
            delete(&c, &name).await;
            window.push(t0.elapsed());
            if window.len() == 50 || i + 1 == n {
                let mean = window.iter().sum::<Duration>() / window.len() as u32;
                println!(
                    "partitions={partitions} cycles={} mean cycle {:.2} ms, disk {:.1} MiB, rss {:.1} MiB",
                    i + 1,
                    mean.as_secs_f64() * 1e3,
                    disk(&data) as f64 / MIB as f64,
                    rss(server.pid()) as f64 / MIB as f64
                );
                first_window.get_or_insert(mean);
                window.clear();
            }
        }
        // Keyspaces are never created per queue: the metadata that grew without bound under format 1 stays put.
        assert_eq!(keyspace_dirs(&data), 2, "only fjall's metadata and `items`");
    }
    // Bounds that format 1 broke by gigabytes within a few dozen 64-partition cycles: the journal (128 MiB at most)
    // plus the memtable (64 MiB) and a few tables is all the churn may occupy, whatever the cycle count.
    let used = disk(&data);
    assert!(
        used < 256 * MIB,
        "the data directory holds {} MiB after churn",
        used / MIB
    );
    let mem = rss(server.pid());
    assert!(mem < 512 * MIB, "the server holds {} MiB after churn", mem / MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_thousands_of_partitions_is_created_served_and_deleted() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = start(dir.path()).await;
    let c = server.client().clone();
    create(&c, "wide", 10_000).await;
    // Created before the answer: the first produce and lease open the partitions, nothing is created then.
    produce(&c, "wide", 50).await;
    let mut leased = 0;
    while leased < 50 {
        let r = c
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: "wide".into(),
                batch_size: 50,
                client_id: "w".into(),
                request_timeout: "5s".into(),
            })
            .await
            .expect("lease");
        leased += r.items.len();
    }
    assert_eq!(total_items(&c, "wide").await, 50);
    // Above every store's maximum: refused with a 400 that names the field, before anything is created.
    let e = c
        .queues_create(&pb::QueueInfo {
            queue_name: "too-wide".into(),
            lease_timeout: "1m".into(),
            expire_timeout: "1h".into(),
            requested_partitions: 65_537,
            ..Default::default()
        })
        .await
        .expect_err("over the maximum");
    assert!(e.to_string().contains("requested_partitions is invalid"), "{e}");
    delete(&c, "wide").await;
    create(&c, "wide", 10_000).await;
    assert_eq!(
        total_items(&c, "wide").await,
        0,
        "the re-created wide queue starts empty"
    );
    // And it all comes back after a restart.
    produce(&c, "wide", 10).await;
    drop(c);
    drop(server);
    let server = start(dir.path()).await;
    println!(
        "restart with 10,000 partitions: healthy after {:?}",
        server.startup()
    );
    let c = server.client().clone();
    let t0 = Instant::now();
    assert_eq!(total_items(&c, "wide").await, 10);
    println!(
        "first stats after the restart (opens 10,000 partitions): {:?}",
        t0.elapsed()
    );
}
