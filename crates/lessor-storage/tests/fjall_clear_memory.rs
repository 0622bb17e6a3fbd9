//! Memory a delete by id and a clear of paged items of large payloads take on the fjall backend, for the paged
//! schedule (see "Paging the schedule" in the state's module docs) and the paged ready backlog, and an expiry pass
//! over the paged ready backlog: the paged items are on disk only (a segment an expiry reaches is loaded back to
//! disk first), and each reads them back to count them out. The peak resident size (`VmHWM`, reset before) during
//! one call of each is measured; the tests take [`SERIAL`] so that no other test's allocations meet a peak.
#![cfg(feature = "fjall")]

use bytes::Bytes;
use lessor_core::storage::LifecyclePolicy;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, ClearRequest, ItemId, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};

#[path = "support/memory.rs"]
mod memory;

use memory::{reset_peak, status_bytes};

const T0: Ts = Ts(1_800_000_000_000_000);
const FAR: Ts = Ts(1_900_000_000_000_000);
/// Items each test writes (half deleted by id, then the rest cleared) and their payload size.
const N: usize = 600;
const LEN: usize = 1 << 20;
/// Most a delete or a clear may add to the resident size at its peak: reading 16 MiB of payloads per chunk; the
/// rest of the figure is fjall's block cache and memtables (see `fjall_retry_memory`), which do not grow with the
/// items cleared.
const BOUND: usize = 160 << 20;

/// Held by each test for its whole run: `VmHWM` is the process's, and the test harness runs tests in parallel.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The peak resident size `call` adds to what was resident before it, or `None` where it cannot be measured.
async fn peak_of<F: std::future::Future<Output = ()>>(call: F) -> Option<usize> {
    let before = status_bytes("VmRSS:").filter(|_| reset_peak())?;
    call.await;
    Some(status_bytes("VmHWM:")?.saturating_sub(before) as usize)
}

/// Fails the test if a `what` of `n` paged items took more than [`BOUND`] at its `peak`.
fn assert_bounded(what: &str, n: usize, peak: usize) {
    assert!(
        peak <= BOUND,
        "a {what} of {n} paged items of {LEN} bytes took +{} MB resident at its peak (bound {} MB)",
        peak >> 20,
        BOUND >> 20
    );
}

/// Writes `n` items of [`LEN`] bytes to `p` (scheduled when `enqueue_at` is not zero, one microsecond apart),
/// eight at a time; returns their ids.
async fn produce(p: &dyn Partition, n: usize, enqueue_at: Ts) -> Vec<ItemId> {
    let mut ids = Vec::with_capacity(n);
    for b in (0..n).step_by(8) {
        let batch = (b..(b + 8).min(n))
            .map(|i| NewItem {
                created_at: T0,
                expire_deadline: FAR,
                enqueue_at: if enqueue_at.is_zero() {
                    enqueue_at
                } else {
                    Ts(enqueue_at.0 + i as i64)
                },
                payload: Bytes::from(vec![(i % 251) as u8; LEN]),
                ..Default::default()
            })
            .collect();
        ids.extend(p.produce(batch).await.expect("produce"));
    }
    ids
}

/// A delete by id of 300 and a clear of 300 paged scheduled items of 1 MiB: the memory each takes beyond what was
/// resident before it must stay within a bound that does not grow with the number of items (each read back holds
/// at most 16 MiB of payloads, as a lifecycle pass's page does).
#[tokio::test(flavor = "current_thread")]
async fn a_delete_or_clear_of_a_paged_schedule_of_large_items_takes_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    // Two scheduled items resident: the rest is paged.
    store.set_memory_window(8);
    let p = store.open("q", 0).await.expect("partition");
    let ids = produce(&*p, N, Ts(T0.0 + 1_000)).await;
    let paged = store.paging_counts("q", 0).await.expect("open").paged_scheduled;
    assert!(paged >= (N - 8) as u64, "{paged} paged");
    let Some(deleted) = peak_of(async {
        p.delete(ids[N / 2..].to_vec()).await.expect("delete");
    })
    .await
    else {
        eprintln!("no /proc/self/status or clear_refs: skipped");
        return;
    };
    eprintln!(
        "delete of {} paged scheduled items of {LEN} bytes: resident peak +{} MB",
        N / 2,
        deleted >> 20
    );
    assert_eq!(p.counts().await.expect("counts").scheduled, (N / 2) as u64);
    let cleared = peak_of(async {
        p.clear(ClearRequest {
            scheduled: true,
            ..Default::default()
        })
        .await
        .expect("clear");
    })
    .await
    .expect("measured before");
    eprintln!(
        "clear of {} paged scheduled items of {LEN} bytes: resident peak +{} MB",
        N / 2,
        cleared >> 20
    );
    assert_eq!(p.counts().await.expect("counts").scheduled, 0);
    assert_eq!(store.paged_keys("q", 0).await.expect("scan"), Some(0));
    assert_bounded("delete", N / 2, deleted);
    assert_bounded("clear", N / 2, cleared);
    p.close().await;
    store.close().await;
}

/// The same for the paged ready backlog: a delete by id of 300 paged ready items of 1 MiB (one of them named twice,
/// counted once), then a clear of 600 (300 more written first: what the allocator kept of the delete's reads is
/// resident before the clear, and a clear of 300 would reuse it).
#[tokio::test(flavor = "current_thread")]
async fn a_delete_or_clear_of_paged_ready_items_of_large_payloads_takes_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    // Eight ready items resident: the rest is paged.
    store.set_memory_window(8);
    let p = store.open("q", 0).await.expect("partition");
    let ids = produce(&*p, N, Ts(0)).await;
    let paged = store.paging_counts("q", 0).await.expect("open").paged_ready;
    assert!(paged >= (N - 8) as u64, "{paged} paged");
    let mut named = ids[N / 2..].to_vec();
    named.push(ids[N - 1]);
    let Some(deleted) = peak_of(async {
        p.delete(named).await.expect("delete");
    })
    .await
    else {
        eprintln!("no /proc/self/status or clear_refs: skipped");
        return;
    };
    eprintln!(
        "delete of {} paged ready items of {LEN} bytes: resident peak +{} MB",
        N / 2,
        deleted >> 20
    );
    assert_eq!(p.counts().await.expect("counts").ready, (N / 2) as u64);
    produce(&*p, N / 2, Ts(0)).await;
    assert_eq!(p.counts().await.expect("counts").ready, N as u64);
    let cleared = peak_of(async {
        p.clear(ClearRequest {
            queue: true,
            ..Default::default()
        })
        .await
        .expect("clear");
    })
    .await
    .expect("measured before");
    eprintln!(
        "clear of {N} ready items of {LEN} bytes, all but 8 paged: resident peak +{} MB",
        cleared >> 20
    );
    assert_eq!(p.counts().await.expect("counts").ready, 0);
    assert_eq!(store.paged_keys("q", 0).await.expect("scan"), Some(0));
    assert_bounded("delete", N / 2, deleted);
    assert_bounded("clear", N, cleared);
    p.close().await;
    store.close().await;
}

/// An expiry pass over 600 paged ready items of 1 MiB, all due: the memory the lifecycle calls that expire them take
/// beyond what was resident before must stay within the same bound (the sweep reads items back to count them out,
/// as a clear does, and may not hold more than 16 MiB of their payloads at a time).
#[tokio::test(flavor = "current_thread")]
async fn an_expiry_of_paged_ready_items_of_large_payloads_takes_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    // Eight ready items resident: the rest is paged.
    store.set_memory_window(8);
    let p = store.open("q", 0).await.expect("partition");
    for b in (0..N).step_by(8) {
        let batch = (b..(b + 8).min(N))
            .map(|i| NewItem {
                created_at: T0,
                expire_deadline: Ts(T0.0 + 1_000),
                payload: Bytes::from(vec![(i % 251) as u8; LEN]),
                ..Default::default()
            })
            .collect();
        p.produce(batch).await.expect("produce");
    }
    let paged = store.paging_counts("q", 0).await.expect("open").paged_ready;
    assert!(paged >= (N - 8) as u64, "{paged} paged");
    let policy = LifecyclePolicy {
        max_attempts: 0,
        has_dead_queue: false,
        backoff: Backoff::OFF,
    };
    let mut calls = 0;
    let Some(expired) = peak_of(async {
        while p.counts().await.expect("counts").ready > 0 {
            calls += 1;
            assert!(calls <= N, "the expiry makes no progress");
            p.lifecycle(Ts(T0.0 + 2_000), policy, 1000)
                .await
                .expect("lifecycle");
        }
    })
    .await
    else {
        eprintln!("no /proc/self/status or clear_refs: skipped");
        return;
    };
    eprintln!(
        "expiry of {N} ready items of {LEN} bytes, all but 8 paged, in {calls} lifecycle calls: resident peak +{} MB",
        expired >> 20
    );
    assert_eq!(store.paged_keys("q", 0).await.expect("scan"), Some(0));
    assert_bounded("expiry", N, expired);
    p.close().await;
    store.close().await;
}
