//! Measures the memory backend's partition alone (no server, no HTTP) at two depths, with items of priorities
//! 0..=9 in turn: produce and lease+complete rates with 1,000 and with 1,000,000 items queued, so the cost of
//! depth in the state itself shows without the wire's noise.
//!
//! `cargo run --release -p lessor-storage --example priority_depth -- [PRIORITIES]`
//!
//! Time is the thread's own CPU time where Linux reports it (`/proc/thread-self/schedstat`, nanoseconds), so other
//! processes on a shared machine do not skew the rates; elsewhere it is wall-clock time.

use std::time::{Duration, Instant};

use bytes::Bytes;
use lessor_core::storage::PartitionStore;
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::memory::MemoryStore;

/// The allocator the `lessor` binary ships with, so allocation costs are the server's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 100;
const ROUND: usize = 4_000;
const ROUNDS: usize = 500;

/// The calling thread's CPU time, else the wall-clock time since the first call.
fn now() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .unwrap_or_else(|| START.get_or_init(Instant::now).elapsed())
}

fn batch(first: usize, priorities: usize) -> Vec<NewItem> {
    (first..first + BATCH)
        .map(|k| NewItem {
            payload: Bytes::from(vec![b'x'; 100]),
            priority: (k % priorities) as u8,
            // As in the server: each batch is made at its own instant, so its items share one expiry entry.
            created_at: Ts(1_800_000_000_000_000 + first as i64),
            expire_deadline: Ts(1_900_000_000_000_000 + first as i64),
            ..Default::default()
        })
        .collect()
}

async fn run(depth: usize, priorities: usize) -> (f64, f64) {
    let store = MemoryStore::new();
    let p = store.open("q", 0).await.expect("open");
    let mut next = 0;
    while next < depth {
        p.produce(batch(next, priorities)).await.expect("fill");
        next += BATCH;
    }
    let (mut tp, mut tl) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        let reqs: Vec<Vec<NewItem>> = (0..ROUND / BATCH)
            .map(|i| batch(next + i * BATCH, priorities))
            .collect();
        next += ROUND;
        let t0 = now();
        for r in reqs {
            p.produce(r).await.expect("produce");
        }
        tp += now() - t0;
        let t0 = now();
        for _ in 0..ROUND / BATCH {
            let l = p.lease(BATCH, Ts(1_850_000_000_000_000)).await.expect("lease");
            p.complete(vec![l.iter().map(|i| i.id).collect()])
                .await
                .expect("complete");
        }
        tl += now() - t0;
    }
    let n = (ROUND * ROUNDS) as f64;
    (n / tp.as_secs_f64(), n / tl.as_secs_f64())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let priorities: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
        .clamp(1, 10);
    let (p1, l1) = run(1_000, priorities).await;
    let (p2, l2) = run(1_000_000, priorities).await;
    println!(
        "{priorities} priorities: depth 1k: produce {p1:.0}/s, lease+complete {l1:.0}/s; depth 1M: produce {p2:.0}/s, \
         lease+complete {l2:.0}/s; ratio {:.2} / {:.2}",
        p2 / p1,
        l2 / l1
    );
}
