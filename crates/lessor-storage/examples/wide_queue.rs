//! Measures what one request costs the queue's task as the queue's partition count grows: single-item produce
//! calls one after another, then single-item lease + complete pairs, against an engine over the memory store (no
//! server, no HTTP). Each call is its own pass of the queue's task, so the figures are a pass's cost: its real work
//! (one storage call) plus whatever it does per partition.
//!
//! `cargo run --release -p lessor-storage --example wide_queue -- [PARTITIONS...] [--calls N]`
//!
//! The runtime is single-threaded, so the time is the CPU the caller and the queue's task spent together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::time::SystemClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};

/// The allocator the `lessor` binary ships with, so allocation costs are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every request's timeout (the engine requires one).
const T: Option<Duration> = Some(Duration::from_secs(30));

/// µs per produce call and per lease + complete pair for a queue of `partitions` partitions.
async fn run(partitions: u32, calls: usize) -> (f64, f64) {
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "memory".into(),
            affinity: 1.0,
            store: Arc::new(MemoryStore::new()),
        }],
        limits: Limits::default(),
        clock: Arc::new(SystemClock),
    })
    .expect("engine");
    engine
        .create_queue(QueueInfo {
            name: "q".into(),
            lease_timeout: Duration::from_secs(60),
            expire_timeout: Duration::from_secs(3600),
            requested_partitions: partitions,
            ..Default::default()
        })
        .await
        .expect("create");
    let item = || ProduceItem {
        payload: Bytes::from_static(b"0123456789"),
        ..Default::default()
    };
    // The first pass opens every partition: not what is measured.
    engine.produce("q", vec![item()], T).await.expect("warm-up");
    let l = engine.lease("q", 1, "c", T).await.expect("warm-up lease");
    let ids = l.items.iter().map(|it| it.id).collect();
    engine
        .complete("q", l.partition, ids, T)
        .await
        .expect("warm-up complete");

    let t0 = Instant::now();
    for _ in 0..calls {
        engine.produce("q", vec![item()], T).await.expect("produce");
    }
    let produce = t0.elapsed();
    let t0 = Instant::now();
    for _ in 0..calls {
        let l = engine.lease("q", 1, "c", T).await.expect("lease");
        let ids = l.items.iter().map(|it| it.id).collect();
        engine.complete("q", l.partition, ids, T).await.expect("complete");
    }
    let lease = t0.elapsed();
    engine.shutdown().await;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / calls as f64;
    (per(produce), per(lease))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut widths = Vec::new();
    let mut calls = 2000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--calls" {
            calls = args.next().and_then(|s| s.parse().ok()).expect("--calls N");
        } else {
            widths.push(a.parse::<u32>().expect("a partition count"));
        }
    }
    if widths.is_empty() {
        widths = vec![4, 65_535];
    }
    println!("partitions  produce µs/call  lease+complete µs/pair");
    for p in widths {
        let (produce, lease) = run(p, calls).await;
        println!("{p:>10}  {produce:>15.1}  {lease:>22.1}");
    }
}
