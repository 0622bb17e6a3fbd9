//! A partition closed while a write is in flight and opened again at once: the new handle's state holds that
//! write (it used to load the state from disk before the write reached it, and then gave out ids again).
#![cfg(feature = "fjall")]

use std::collections::HashSet;

use bytes::Bytes;
use lessor_core::storage::PartitionStore;
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::fjall::{Durability, FjallStore};

fn items(n: usize) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            expire_deadline: Ts(1_900_000_000_000_000),
            created_at: Ts(1_800_000_000_000_000),
            payload: Bytes::from(format!("item-{i}")),
            ..Default::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_during_a_close_sees_the_write_in_flight() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let mut stored = 0usize;
    let mut in_flight = 0;
    for round in 0..30 {
        let p = store.open("q", 0).await.expect("partition");
        let writer = {
            let p = p.clone();
            tokio::spawn(async move { p.produce(items(2000)).await })
        };
        // Close and re-open at varying points of the produce: before it takes the partition's lock, while it
        // writes, after it is done.
        std::thread::sleep(std::time::Duration::from_micros(150 * round));
        p.close().await;
        let again = store.open("q", 0).await.expect("re-open");
        match writer.await.expect("join") {
            Ok(ids) => {
                in_flight += 1;
                stored += ids.len()
            }
            Err(e) => println!("round {round}: produce refused after close: {e}"),
        }
        stored += again.produce(items(1)).await.expect("produce").len();
        // The re-opened handle serves every item acknowledged so far, the one written across the close included.
        let seen = again.list(None, 1_000_000, false).await.expect("list").len();
        assert_eq!(seen, stored, "round {round}: items the re-opened handle sees");
        again.close().await;
    }
    println!("{in_flight} of 30 produces stored across a close");
    assert!(
        in_flight > 0,
        "no round closed the partition with a write under way"
    );
    let p = store.open("q", 0).await.expect("partition");
    let all = p.list(None, 1_000_000, false).await.expect("list");
    let ids: HashSet<_> = all.iter().map(|it| it.id).collect();
    assert_eq!(ids.len(), all.len(), "duplicate ids listed");
    assert_eq!(all.len(), stored, "items acknowledged vs items stored");
}
