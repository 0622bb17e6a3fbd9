//! The log store's memory budget (`max-memory`): every item is in RAM, so a backlog that outgrew memory used to be
//! stopped only by the kernel's OOM killer, and the next start replayed the same log into the same memory. Now
//! calls that add items are refused with `Full` once the partitions hold the budget (by estimate), everything else
//! goes on, and what consumers take makes room again; the budget counts what replay rebuilds.
#![cfg(feature = "fjall")]

use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::types::NewItem;
use lessor_storage::fjall::Durability;
use lessor_storage::log::LogStore;
use lessor_storage::state::ITEM_COST;

#[path = "support/log.rs"]
mod support;

use support::{item, SEC, T0};

const BUDGET: u64 = 1 << 20;

fn batch(n: usize, tag: &str) -> Vec<NewItem> {
    (0..n)
        .map(|i| {
            let mut it = item(&format!("{tag}-{i}"));
            it.payload = bytes::Bytes::from(vec![b'x'; 1000]);
            it
        })
        .collect()
}

/// Produces batches of 100 items of 1,000 bytes into `p` until one is refused; how many were stored.
async fn fill(p: &dyn Partition, tag: &str) -> usize {
    let mut stored = 0;
    for round in 0..1000 {
        match p.produce(batch(100, &format!("{tag}{round}"))).await {
            Ok(ids) => stored += ids.len(),
            Err(e) => {
                assert_eq!(e.kind, StorageErrorKind::Full, "{e}");
                assert!(
                    e.message.contains("max-memory"),
                    "the refusal names the setting: {e}"
                );
                return stored;
            }
        }
    }
    panic!("a budget of {BUDGET} bytes took {stored} items of 1,000 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_store_refuses_new_items_serves_the_rest_and_makes_room_as_items_go() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open_with(tmp.path(), Durability::None, Some(BUDGET)).expect("open");
    let p = store.open("q", 0).await.expect("partition");
    let stored = fill(p.as_ref(), "a").await;
    let (used, max) = store.memory().expect("a budget");
    assert_eq!(max, BUDGET);
    let per_item = 1000 + ITEM_COST;
    assert!(
        used <= BUDGET && used + 100 * per_item > BUDGET,
        "stopped at the budget: {used} of {BUDGET} bytes held, {stored} items"
    );
    assert_eq!(used, stored as u64 * per_item, "the estimate follows the items");

    // Full: leases and completes go on, and what they take makes room.
    let got = p
        .lease(300, T0.add(SEC * 60))
        .await
        .expect("a lease on a full store");
    assert_eq!(got.len(), 300);
    let done = p
        .complete(vec![got.iter().map(|it| it.id).collect()])
        .await
        .expect("complete on a full store");
    assert!(done.iter().all(Result::is_ok));
    assert_eq!(store.memory().expect("budget").0, used - 300 * per_item);
    p.produce(batch(200, "b")).await.expect("room again");

    // A second partition shares the budget.
    let q = store.open("q", 1).await.expect("partition 1");
    let e = q.produce(batch(200, "c")).await.expect_err("the store is full");
    assert_eq!(e.kind, StorageErrorKind::Full);
    q.produce(batch(50, "c")).await.expect("what fits");

    // Replay counts what it rebuilds: the reopened store is as full as the one closed.
    let before = store.memory().expect("budget").0;
    drop((p, q));
    store.close().await;
    drop(store);
    let store = LogStore::open_with(tmp.path(), Durability::None, Some(BUDGET)).expect("reopen");
    assert_eq!(
        store.memory().expect("budget").0,
        before,
        "replay counts the items it rebuilt"
    );
    let p = store.open("q", 0).await.expect("partition");
    let e = p.produce(batch(100, "d")).await.expect_err("still full");
    assert_eq!(e.kind, StorageErrorKind::Full);

    // A destroyed partition gives its share back.
    let q_held = {
        let q = store.open("q", 1).await.expect("partition 1");
        q.stats(T0).await.expect("stats").counts.ready * per_item
    };
    store.destroy("q", 1).await.expect("destroy");
    // The last handle is dropped off the async workers; wait for it (briefly, in real time).
    for _ in 0..200 {
        if store.memory().expect("budget").0 == before - q_held {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(store.memory().expect("budget").0, before - q_held);
    store.close().await;
}

/// A store opened without a budget has none (the library default; the driver sets one, see the registry).
#[tokio::test]
async fn without_max_memory_nothing_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(tmp.path(), Durability::None).expect("open");
    assert_eq!(store.memory(), None);
    let p = store.open("q", 0).await.expect("partition");
    for round in 0..20 {
        p.produce(batch(100, &format!("r{round}")))
            .await
            .expect("no budget");
    }
    store.close().await;
}
