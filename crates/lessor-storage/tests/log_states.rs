//! The log store's state records: a lease or an extension logs each item's metadata without its payload (the
//! payload is in the log already, from the produce or a checkpoint), and replay lays it over the item's whole
//! record. Before, a lease logged every item whole again: for an item produced, leased and completed, half the
//! log's bytes were the second copy of its payload.
#![cfg(feature = "fjall")]

use bytes::Bytes;
use lessor_core::storage::PartitionStore;
use lessor_core::types::{Item, NewItem};

#[path = "support/log.rs"]
mod support;

use support::{item, open, reopen, segment_files, SEC, T0};

const ITEMS: usize = 200;
const PAYLOAD: usize = 4000;

fn log_bytes(dir: &std::path::Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|f| std::fs::metadata(f).expect("segment").len())
        .sum()
}

fn batch() -> Vec<NewItem> {
    (0..ITEMS)
        .map(|i| NewItem {
            payload: Bytes::from(vec![b'a' + (i % 26) as u8; PAYLOAD]),
            ..item(&format!("s{i}"))
        })
        .collect()
}

/// Every item of the partition, leased or not, in id order.
async fn all(p: &dyn lessor_core::storage::Partition) -> Vec<Item> {
    p.list(None, 10 * ITEMS, false).await.expect("list")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_extensions_log_metadata_and_replay_over_the_payloads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("st", 0).await.expect("open");
    let start = log_bytes(dir.path());
    p.produce(batch()).await.expect("produce");
    let produced = log_bytes(dir.path()) - start;
    assert!(
        produced > (ITEMS * PAYLOAD) as u64,
        "the produce logs the payloads: {produced} bytes"
    );

    let leased = p.lease(ITEMS, T0.add(SEC * 30)).await.expect("lease");
    assert_eq!(leased.len(), ITEMS);
    let lease_bytes = log_bytes(dir.path()) - start - produced;
    assert!(
        lease_bytes < (ITEMS * 100) as u64,
        "a lease of {ITEMS} items of {PAYLOAD} B logged {lease_bytes} bytes: payloads again?"
    );
    let half: Vec<_> = leased.iter().take(ITEMS / 2).map(|it| it.id).collect();
    let before = log_bytes(dir.path());
    p.extend(vec![(half.clone(), T0.add(SEC * 90))])
        .await
        .expect("extend");
    assert!(
        log_bytes(dir.path()) - before < (ITEMS * 50) as u64,
        "an extension logs metadata only"
    );
    p.complete(vec![vec![leased[ITEMS - 1].id]])
        .await
        .expect("complete");
    let expected = all(&*p).await;
    assert_eq!(expected.len(), ITEMS - 1);
    assert!(expected
        .iter()
        .all(|it| it.is_leased && it.payload.len() == PAYLOAD));

    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("st", 0).await.expect("open");
    let back = all(&*p).await;
    assert_eq!(
        back, expected,
        "replay gives every item's last metadata and its payload"
    );
    assert_eq!(
        back[0].lease_deadline,
        T0.add(SEC * 90),
        "the extension is replayed"
    );
    assert_eq!(
        back[ITEMS - 2].lease_deadline,
        T0.add(SEC * 30),
        "the lease is replayed"
    );

    // The same after a checkpoint, with state records logged on both sides of it.
    let more = p.lease(1, T0.add(SEC * 30)).await.expect("lease");
    assert!(more.is_empty(), "everything is leased already");
    store.checkpoint_now().expect("checkpoint");
    p.extend(vec![(half, T0.add(SEC * 120))]).await.expect("extend");
    let expected = all(&*p).await;
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("st", 0).await.expect("open");
    assert_eq!(all(&*p).await, expected);
    assert_eq!(all(&*p).await[0].lease_deadline, T0.add(SEC * 120));
    drop(p);
    store.close().await;
}
