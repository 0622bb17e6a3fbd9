//! Start-up and memory figures of the fjall backend, ignored by default because they take a while. Run them in
//! release mode, one at a time (they read the process's RSS):
//!
//! ```text
//! cargo test --release -p lessor-storage --features fjall --test fjall_scale -- --ignored --nocapture --test-threads 1
//! ```
#![cfg(feature = "fjall")]

use std::time::{Duration, Instant};

use bytes::Bytes;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::fjall::{Durability, FjallStore};

const T0: Ts = Ts(1_800_000_000_000_000);

fn item(i: usize, payload: usize) -> NewItem {
    NewItem {
        expire_deadline: T0.add(Duration::from_secs(3600)),
        created_at: T0,
        reference: format!("ref-{i}"),
        payload: Bytes::from(format!("{i:0payload$}")),
        ..Default::default()
    }
}

/// Resident memory of this process in KiB.
fn rss_kib() -> u64 {
    lessor_testkit::measure::rss_kib("self")
}

fn disk_bytes(dir: &std::path::Path) -> u64 {
    lessor_testkit::measure::disk_usage(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes about a minute; run in release mode to measure"]
async fn open_time_of_a_partition_with_a_million_items() {
    const N: usize = 1_000_000;
    const BATCH: usize = 10_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let p = store.open("deep", 0).await.expect("open");
    let started = Instant::now();
    for b in 0..N / BATCH {
        let items = (0..BATCH).map(|i| item(b * BATCH + i, 100)).collect();
        p.produce(items).await.expect("produce");
    }
    let write = started.elapsed();
    p.close().await;
    store.close().await;
    drop((p, store));

    let rss_before = rss_kib();
    let started = Instant::now();
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let store_open = started.elapsed();
    let started = Instant::now();
    let p = store.open("deep", 0).await.expect("open");
    let partition_open = started.elapsed();
    assert_eq!(p.counts().await.expect("counts").ready, N as u64);
    let rss_after = rss_kib();
    eprintln!(
        "fjall, {N} items of 100-byte payloads: produced in {write:.2?} ({:.0} items/s, batches of {BATCH}); \
         store open (journal replay) {store_open:.2?}; partition open (load + index) {partition_open:.2?}; \
         RSS +{} MiB; on disk {} MiB",
        N as f64 / write.as_secs_f64(),
        rss_after.saturating_sub(rss_before) / 1024,
        disk_bytes(dir.path()) / (1024 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "creates 1,000 keyspaces (about 15 s); run in release mode to measure"]
async fn idle_memory_of_a_thousand_partitions() {
    const PARTS: u32 = 1000;
    const ITEMS: usize = 10;
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        let started = Instant::now();
        for i in 0..PARTS {
            let p = store.open("idle", i).await.expect("open");
            p.produce((0..ITEMS).map(|n| item(n, 100)).collect())
                .await
                .expect("produce");
        }
        eprintln!(
            "created {PARTS} partitions with {ITEMS} items each in {:.2?}",
            started.elapsed()
        );
        store.close().await;
    }
    // Measure in a steady state: the store reopened, every partition open and idle.
    let base = rss_kib();
    let started = Instant::now();
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let store_open = started.elapsed();
    let after_store = rss_kib();
    let started = Instant::now();
    let mut parts: Vec<std::sync::Arc<dyn Partition>> = Vec::new();
    for i in 0..PARTS {
        parts.push(store.open("idle", i).await.expect("open"));
    }
    let open_all = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib();
    for p in &parts {
        assert_eq!(p.counts().await.expect("counts").ready, ITEMS as u64);
    }
    let per = (after.saturating_sub(after_store)) as f64 / f64::from(PARTS);
    eprintln!(
        "store open {store_open:.2?} (+{} KiB RSS); {PARTS} partitions opened in {open_all:.2?}; idle RSS \
         {} KiB total = {per:.1} KiB per partition ({ITEMS} items of 100 bytes each)",
        after_store.saturating_sub(base),
        after.saturating_sub(base),
    );
    assert!(
        per < 1024.0,
        "idle memory per partition must stay under 1 MiB, got {per:.1} KiB"
    );
}

/// The memory a million items scheduled an hour ahead hold (or, with `LESSOR_MEASURE_READY=1`, the same items
/// ready), 100-byte payloads produced 1,000 a call under the default window: RSS after producing, and the produce
/// rate. With `LESSOR_MEASURE_DIR` the store stays there, and `LESSOR_MEASURE_REOPEN=1` (a second run, a fresh
/// process) only opens it again and reports the RSS after a restart; `LESSOR_MEASURE_WINDOW` sets
/// `memory-window-items`, and `LESSOR_MEASURE_DUE=1` then makes every item come due and times the lifecycle
/// passes that requeue them. docs/benchmarks.md, "The schedule paged"
/// (7 Dec 2026).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes about a minute; run in release mode to measure"]
async fn memory_of_a_million_scheduled_items() {
    const N: usize = 1_000_000;
    const BATCH: usize = 1_000;
    let env = |k: &str| std::env::var(k).ok();
    let ready = env("LESSOR_MEASURE_READY").is_some_and(|v| v == "1");
    let reopen = env("LESSOR_MEASURE_REOPEN").is_some_and(|v| v == "1");
    let at = if ready {
        Ts::ZERO
    } else {
        T0.add(Duration::from_secs(3600))
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = env("LESSOR_MEASURE_DIR").map_or_else(|| tmp.path().to_path_buf(), std::path::PathBuf::from);
    let base = rss_kib();
    let store = FjallStore::open(&dir, Durability::Sync).expect("open");
    if let Some(w) = env("LESSOR_MEASURE_WINDOW").and_then(|v| v.parse().ok()) {
        store.set_memory_window(w);
    }
    let p = store.open("sched", 0).await.expect("open");
    if reopen {
        let c = p.counts().await.expect("counts");
        assert_eq!(c.scheduled + c.ready, N as u64);
        eprintln!(
            "fjall, {N} items of 100 bytes ({c:?}): RSS +{} MiB after a restart",
            rss_kib().saturating_sub(base) / 1024
        );
        return;
    }
    let started = Instant::now();
    for b in 0..N / BATCH {
        let items = (0..BATCH)
            .map(|i| NewItem {
                enqueue_at: at,
                reference: String::new(),
                ..item(b * BATCH + i, 100)
            })
            .collect();
        p.produce(items).await.expect("produce");
    }
    let write = started.elapsed();
    let produced = rss_kib();
    let c = p.counts().await.expect("counts");
    assert_eq!(c.scheduled + c.ready, N as u64);
    eprintln!(
        "fjall, {N} {} items of 100 bytes: produced in {write:.2?} ({:.0} items/s, calls of {BATCH}); RSS +{} MiB",
        if ready { "ready" } else { "scheduled" },
        N as f64 / write.as_secs_f64(),
        produced.saturating_sub(base) / 1024,
    );
    if env("LESSOR_MEASURE_DUE").is_some_and(|v| v == "1") {
        // Everything comes due at once: lifecycle passes of 10,000 (the engine's passes are bounded the same way)
        // until none is left, then leases drain the queue.
        let policy = lessor_core::storage::LifecyclePolicy {
            max_attempts: 0,
            has_dead_queue: false,
            backoff: lessor_core::types::Backoff::OFF,
        };
        let due = at.add(Duration::from_secs(1));
        let started = Instant::now();
        let mut requeued = 0;
        loop {
            let o = p.lifecycle(due, policy, 10_000).await.expect("lifecycle");
            requeued += o.enqueued;
            if !o.more {
                break;
            }
        }
        let passes = started.elapsed();
        assert_eq!(requeued + c.ready, N as u64);
        let peak = rss_kib();
        eprintln!(
            "  came due: requeued {requeued} in {passes:.2?} ({:.0} items/s); RSS +{} MiB",
            requeued as f64 / passes.as_secs_f64(),
            peak.saturating_sub(base) / 1024
        );
    }
    p.close().await;
    store.close().await;
}
