//! What a dedup key costs in memory, counted exactly with a counting global allocator: 100,000 items produced with
//! distinct keys through the engine (memory backend), then all completed, so what stays allocated is the keys'
//! records (the queue-wide index and the partition's records) until their window ends. Then the window passes and
//! a produce prunes them, which must give the memory back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KEYS: usize = 100_000;
const T: Option<Duration> = Some(Duration::from_secs(30));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_costs_a_bounded_number_of_bytes() {
    let clock = ManualClock::starting_now();
    let e = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "mem".into(),
            affinity: 1.0,
            store: Arc::new(MemoryStore::new()),
        }],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    e.create_queue(QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(600),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        dedup_window: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .expect("create");
    // Warm up (the queue task, the partition's first chunks), then measure from an empty queue.
    let one = |k: String| ProduceItem {
        dedup_id: k,
        payload: bytes::Bytes::from_static(b"x"),
        ..Default::default()
    };
    e.produce("q", vec![one("warm".into())], T).await.expect("warm");
    let l = e.lease("q", 1, "c", T).await.expect("lease");
    e.complete("q", 0, vec![l.items[0].id], T).await.expect("complete");
    let base = LIVE.load(Ordering::Relaxed);
    for chunk in 0..KEYS / 1000 {
        let items = (0..1000).map(|i| one(format!("{:036}", chunk * 1000 + i))).collect();
        e.produce("q", items, T).await.expect("produce");
    }
    // The same keys again: acknowledged, not stored.
    let again = (0..1000).map(|i| one(format!("{i:036}"))).collect();
    e.produce("q", again, T).await.expect("produce duplicates");
    let mut done = 0;
    while done < KEYS {
        let l = e.lease("q", 1000, "c", T).await.expect("lease");
        done += l.items.len();
        e.complete("q", 0, l.items.iter().map(|i| i.id).collect(), T)
            .await
            .expect("complete");
    }
    let stats = e.stats("q").await.expect("stats");
    assert_eq!(stats.partitions[0].total, 0, "the duplicates were not stored");
    let held = LIVE.load(Ordering::Relaxed) - base;
    let per_key = held as f64 / KEYS as f64;
    println!("{KEYS} dedup keys of 36 bytes, items gone: {held} bytes held, {per_key:.1} bytes per key");
    assert!(per_key > 16.0, "the keys are held somewhere: {per_key:.1} bytes per key");
    assert!(per_key < 400.0, "a key costs a bounded amount: {per_key:.1} bytes per key");
    // Once the window has passed, produces prune the records and the memory comes back.
    clock.advance(Duration::from_secs(61));
    for chunk in 0..KEYS / 1000 {
        let items = (0..1000).map(|i| one(format!("n{:035}", chunk * 1000 + i))).collect();
        e.produce("q", items, T).await.expect("produce new keys");
    }
    let mut done = 0;
    while done < KEYS {
        let l = e.lease("q", 1000, "c", T).await.expect("lease");
        done += l.items.len();
        e.complete("q", 0, l.items.iter().map(|i| i.id).collect(), T)
            .await
            .expect("complete");
    }
    let after = LIVE.load(Ordering::Relaxed) - base;
    println!("after the window passed and {KEYS} new keys: {after} bytes held");
    assert!(
        (after as f64) < held as f64 * 1.5,
        "expired keys were pruned, not accumulated: {after} vs {held}"
    );
}
