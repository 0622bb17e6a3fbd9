//! Memory a delete by id and a clear of a paged schedule of large items take on the fjall backend (see "Paging the
//! schedule" in the state's module docs): the paged scheduled items are on disk only, and both read them back by id
//! to count them out. The peak resident size (`VmHWM`, reset before) during one call of each is measured.
#![cfg(feature = "fjall")]

use bytes::Bytes;
use lessor_core::storage::PartitionStore;
use lessor_core::time::Ts;
use lessor_core::types::{ClearRequest, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};

#[path = "support/memory.rs"]
mod memory;

use memory::{reset_peak, status_bytes};

const T0: Ts = Ts(1_800_000_000_000_000);
const FAR: Ts = Ts(1_900_000_000_000_000);

/// The peak resident size `call` adds to what was resident before it, or `None` where it cannot be measured.
async fn peak_of<F: std::future::Future<Output = ()>>(call: F) -> Option<usize> {
    let before = status_bytes("VmRSS:").filter(|_| reset_peak())?;
    call.await;
    Some(status_bytes("VmHWM:")?.saturating_sub(before) as usize)
}

/// A delete by id of 300 and a clear of 300 paged scheduled items of 1 MiB: the memory each takes beyond what was
/// resident before it must stay within a bound that does not grow with the number of items (each read back holds
/// at most 16 MiB of payloads, as a lifecycle pass's page does).
#[tokio::test(flavor = "current_thread")]
async fn a_delete_or_clear_of_a_paged_schedule_of_large_items_takes_bounded_memory() {
    const N: usize = 600;
    const LEN: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    // Two scheduled items resident: the rest is paged.
    store.set_memory_window(8);
    let p = store.open("q", 0).await.expect("partition");
    let mut ids = Vec::new();
    for b in 0..N / 8 {
        let batch = (b * 8..b * 8 + 8)
            .map(|i| NewItem {
                created_at: T0,
                expire_deadline: FAR,
                enqueue_at: Ts(T0.0 + 1_000 + i as i64),
                payload: Bytes::from(vec![(i % 251) as u8; LEN]),
                ..Default::default()
            })
            .collect();
        ids.extend(p.produce(batch).await.expect("produce"));
    }
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
    // Reading 16 MiB of payloads per chunk; the rest of the figure is fjall's block cache and memtables (see
    // `fjall_retry_memory`), which do not grow with the items cleared.
    let bound = 160 << 20;
    for (what, peak) in [("delete", deleted), ("clear", cleared)] {
        assert!(
            peak <= bound,
            "a {what} of {} paged items of {LEN} bytes took +{} MB resident at its peak (bound {} MB)",
            N / 2,
            peak >> 20,
            bound >> 20
        );
    }
    p.close().await;
    store.close().await;
}
