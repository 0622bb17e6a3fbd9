//! What a dedup key costs in memory, counted exactly with a counting global allocator: 100,000 items produced with
//! distinct keys through the engine (memory backend), then all completed, so what stays allocated is the keys'
//! records (the queue-wide index and the partition's records) until their window ends. Then the window passes and
//! a produce prunes them, which must give the memory back.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed by the whole process. (`stats_alloc` already adds a realloc's growth to
/// `bytes_allocated` and its shrinking to `bytes_deallocated`; its `bytes_reallocated` is the same change again, so
/// adding it counted every buffer grown by realloc twice.)
fn live() -> isize {
    let s = ALLOC.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

const KEYS: usize = 100_000;
const T: Option<Duration> = Some(Duration::from_secs(30));

/// Produces `KEYS` items (with distinct keys or none), completes them all, and returns the bytes still held, and
/// (with keys) checks that a second produce of the keys stores nothing and that expired keys are pruned.
async fn run(keys: bool, without: isize) -> isize {
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
        dedup_id: if keys { k } else { String::new() },
        payload: bytes::Bytes::from_static(b"x"),
        ..Default::default()
    };
    e.produce("q", vec![one("warm".into())], T).await.expect("warm");
    let l = e.lease("q", 1, "c", T).await.expect("lease");
    e.complete("q", 0, vec![l.items[0].id], T)
        .await
        .expect("complete");
    let base = live();
    for chunk in 0..KEYS / 1000 {
        let items = (0..1000)
            .map(|i| one(format!("{:036}", chunk * 1000 + i)))
            .collect();
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
    let held = live() - base;
    if !keys {
        // The 1,000 "duplicates" were stored as ordinary items: take them out so both runs end empty.
        let l = e.lease("q", 1000, "c", T).await.expect("lease");
        e.complete("q", 0, l.items.iter().map(|i| i.id).collect(), T)
            .await
            .expect("complete");
        e.shutdown().await;
        return held;
    }
    assert_eq!(stats.partitions[0].total, 0, "the duplicates were not stored");
    // Once the window has passed, produces prune the records and the memory comes back.
    clock.advance(Duration::from_secs(61));
    for chunk in 0..KEYS / 1000 {
        let items = (0..1000)
            .map(|i| one(format!("n{:035}", chunk * 1000 + i)))
            .collect();
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
    let after = live() - base;
    println!("after the window passed and {KEYS} new keys: {after} bytes held");
    // Held now: the first batch's key-less leftovers, the second batch's leftovers and keys. Without pruning the
    // first batch's keys would still be there too.
    let keys_cost = held - without;
    assert!(
        after < held + without + keys_cost / 2,
        "expired keys were pruned, not accumulated: {after} bytes held, {held} after the first batch"
    );
    e.shutdown().await;
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_costs_a_bounded_number_of_bytes() {
    // What an item leaves behind for a while without a key (lazily pruned deadline indexes, lease holders), then
    // the same with keys: the difference is what the keys cost.
    let without = run(false, 0).await;
    let with = run(true, without).await;
    let per_key = (with - without) as f64 / KEYS as f64;
    println!(
        "{KEYS} items completed: {without} bytes held without keys, {with} with 36-byte keys: {per_key:.0} bytes per key"
    );
    assert!(
        per_key > 16.0,
        "the keys are held somewhere: {per_key:.1} bytes per key"
    );
    assert!(
        per_key < 512.0,
        "a key costs a bounded amount: {per_key:.1} bytes per key"
    );
}
