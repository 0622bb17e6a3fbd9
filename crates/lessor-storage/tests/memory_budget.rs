//! The memory driver's budget (`max-memory`), the same as the log store's (`log_memory_budget.rs`): calls that add
//! items are refused with `Full` once the partitions hold the budget (by estimate), everything else goes on, and
//! what consumers take or a destroy frees makes room again.

use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::memory::MemoryStore;
use lessor_storage::state::ITEM_COST;

const BUDGET: u64 = 1 << 20;
const T0: Ts = Ts(1_800_000_000_000_000);

fn batch(n: usize) -> Vec<NewItem> {
    (0..n)
        .map(|_| NewItem {
            expire_deadline: T0.add(std::time::Duration::from_secs(3600)),
            created_at: T0,
            payload: bytes::Bytes::from(vec![b'x'; 1000]),
            ..Default::default()
        })
        .collect()
}

async fn fill(p: &dyn Partition) -> usize {
    let mut stored = 0;
    loop {
        match p.produce(batch(100)).await {
            Ok(ids) => stored += ids.len(),
            Err(e) => {
                assert_eq!(e.kind, StorageErrorKind::Full, "{e}");
                assert!(e.message.contains("max-memory"), "{e}");
                return stored;
            }
        }
        assert!(stored < 100_000, "a budget of {BUDGET} bytes took {stored} items");
    }
}

#[tokio::test]
async fn a_full_memory_store_refuses_new_items_and_makes_room_as_items_go() {
    let store = MemoryStore::with_max_memory(BUDGET);
    let p = store.open("q", 0).await.expect("partition");
    let stored = fill(p.as_ref()).await;
    let per_item = 1000 + ITEM_COST;
    let (used, max) = store.memory().expect("a budget");
    assert_eq!((used, max), (stored as u64 * per_item, BUDGET));
    assert!(used + 100 * per_item > BUDGET, "stopped at the budget: {used}");

    let got = p
        .lease(250, T0.add(std::time::Duration::from_secs(60)))
        .await
        .expect("lease");
    let done = p
        .complete(vec![got.iter().map(|it| it.id).collect()])
        .await
        .expect("complete");
    assert!(done.iter().all(Result::is_ok));
    assert_eq!(store.memory().expect("budget").0, used - 250 * per_item);
    p.produce(batch(200)).await.expect("room again");

    drop(p);
    store.destroy("q", 0).await.expect("destroy");
    assert_eq!(
        store.memory().expect("budget").0,
        0,
        "a destroyed partition gives its share back"
    );
    let p = store.open("q", 0).await.expect("a new partition");
    p.produce(batch(500)).await.expect("room after the destroy");
}

#[tokio::test]
async fn a_memory_store_without_a_budget_refuses_nothing() {
    let store = MemoryStore::new();
    assert_eq!(store.memory(), None);
    let p = store.open("q", 0).await.expect("partition");
    for _ in 0..20 {
        p.produce(batch(100)).await.expect("no budget");
    }
}
