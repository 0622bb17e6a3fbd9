//! What the tests that bound a queue's memory share (`loaded_memory.rs`, `unload_memory.rs`): exact readings of
//! the bytes the process holds, and many queues created and loaded through the real server.
//!
//! Each of those test binaries installs `stats_alloc`'s instrumented system allocator as its global allocator
//! (`#[global_allocator] static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;`); these read the same static.
//! What they count is what the process really holds, not its RSS: a freed block the allocator keeps for reuse is
//! not counted.

use std::time::Duration;

use lessor_client::{proto as pb, Client};
use stats_alloc::INSTRUMENTED_SYSTEM;

/// Requests in flight at once while creating and touching queues.
const CONCURRENCY: usize = 16;

/// Bytes allocated and not yet freed by the whole process (see `dedup_memory.rs` on `bytes_reallocated`).
pub fn live() -> isize {
    let s = INSTRUMENTED_SYSTEM.stats();
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

/// [`live`] once what the server has in flight settled: the least of ten readings 100 ms apart, so that a buffer
/// briefly alive at one reading (a response or a scrape's text on its way out, a background flush of the store) is
/// not counted.
pub async fn settled() -> isize {
    let mut least = live();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        least = least.min(live());
    }
    least
}

/// `n` queue names starting with `prefix`.
pub fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:06}")).collect()
}

/// Runs `f` on every name, [`CONCURRENCY`] at a time.
async fn each<F, Fut>(names: &[String], f: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    for chunk in names.chunks(CONCURRENCY) {
        let tasks: Vec<_> = chunk.iter().map(|n| tokio::spawn(f(n.clone()))).collect();
        for t in tasks {
            t.await.expect("join");
        }
    }
}

/// Creates a queue of `partitions` partitions under each name.
pub async fn create(c: &Client, names: &[String], partitions: i32) {
    each(names, |name| {
        let c = c.clone();
        async move {
            lessor_testkit::server::create_queue(&c, &name, |q| q.requested_partitions = partitions).await
        }
    })
    .await;
}

/// Asks each queue for its stats once, which loads it.
pub async fn touch(c: &Client, names: &[String]) {
    each(names, |name| {
        let c = c.clone();
        async move {
            c.queue_stats(&pb::QueueStatsRequest {
                queue_name: name.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("stats of {name}: {e}"));
        }
    })
    .await;
}
