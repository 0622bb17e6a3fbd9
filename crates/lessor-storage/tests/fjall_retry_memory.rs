//! Memory a retry of many leased items with large payloads takes on the fjall backend (see "Payloads on disk" in
//! the state's module docs): leased payloads stay on disk only, and a retry that requeues them reads them back to
//! write them under their new ids. The peak resident size (`VmHWM`, reset before) during one retry call of
//! every leased item is measured.
#![cfg(feature = "fjall")]

use bytes::Bytes;
use lessor_core::storage::{LifecyclePolicy, PartitionStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};

#[path = "support/memory.rs"]
mod memory;

use memory::{reset_peak, status_bytes};

const T0: Ts = Ts(1_800_000_000_000_000);
const LEASE: Ts = Ts(1_800_000_100_000_000);
const FAR: Ts = Ts(1_900_000_000_000_000);
const POLICY: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 0,
    has_dead_queue: false,
    backoff: Backoff::OFF,
};

/// Items and payload size of the measurement (`LESSOR_RETRY_MEASURE=items,bytes`; 200 items of 1 MiB by default).
fn size() -> (usize, usize) {
    std::env::var("LESSOR_RETRY_MEASURE")
        .ok()
        .and_then(|v| {
            let (n, len) = v.split_once(',')?;
            Some((n.trim().parse().ok()?, len.trim().parse().ok()?))
        })
        .unwrap_or((200, 1 << 20))
}

/// One retry of every leased item: the memory it takes beyond what was resident before it must stay within a bound
/// that does not grow with the number of items retried (a retry requeues at most 16 MiB of payloads per write).
#[tokio::test(flavor = "current_thread")]
async fn a_retry_of_many_large_leased_items_takes_bounded_memory() {
    let (n, len) = size();
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    // Requeued items page out beyond a small byte window: the measure is the retry's own, not the window's.
    store.set_memory_window_bytes(4 << 20);
    let p = store.open("q", 0).await.expect("partition");
    for b in 0..n.div_ceil(8) {
        let batch = (b * 8..(b * 8 + 8).min(n))
            .map(|i| NewItem {
                created_at: T0,
                expire_deadline: FAR,
                payload: Bytes::from(vec![(i % 251) as u8; len]),
                ..Default::default()
            })
            .collect();
        p.produce(batch).await.expect("produce");
    }
    let mut ids = Vec::new();
    loop {
        let (got, _) = p.lease_within(n, LEASE, 16 << 20).await.expect("lease");
        if got.is_empty() {
            break;
        }
        ids.extend(got.iter().map(|it| it.id));
    }
    assert_eq!(ids.len(), n);
    let Some(before) = status_bytes("VmRSS:").filter(|_| reset_peak()) else {
        eprintln!("no /proc/self/status or clear_refs: skipped");
        return;
    };
    let ops = ids
        .iter()
        .map(|&id| RetryOp {
            id,
            action: RetryAction::Requeue,
        })
        .collect();
    let out = p.retry(vec![ops], POLICY).await.expect("retry");
    let peak = status_bytes("VmHWM:").expect("VmHWM").saturating_sub(before) as usize;
    assert!(out[0].is_ok(), "{out:?}");
    eprintln!(
        "retry of {n} leased items of {len} bytes ({} MB): resident peak +{} MB",
        (n * len) >> 20,
        peak >> 20
    );
    // Every item is back, whole.
    let mut back = 0;
    loop {
        let (got, _) = p.lease_within(n, FAR, 16 << 20).await.expect("lease");
        if got.is_empty() {
            break;
        }
        for it in &got {
            assert_eq!(it.payload.len(), len);
            assert!(it.payload.iter().all(|&b| b == it.payload[0]));
        }
        back += got.len();
    }
    assert_eq!(back, n);
    // The retry reads and writes at most 16 MiB of payloads per write; the rest of the figure is fjall's memtables
    // and journal buffers, which do not grow with the retry (measured: 50 items of 1 MiB +76 MB, 200 +96 MB, 1,000
    // of 1 MB +21 MB; unbounded, 200 took +479 MB and 1,000 +2,247 MB). The peak is RSS, memtables included, and
    // varies between runs: one local CI run of 6 Dec read +215 MB where others read under 100, so the bound sits
    // between that and the unbounded +479.
    let bound = 300 << 20;
    assert!(
        peak <= bound,
        "a retry of {n} items of {len} bytes took +{} MB resident at its peak (bound {} MB)",
        peak >> 20,
        bound >> 20
    );
    p.close().await;
    store.close().await;
}
