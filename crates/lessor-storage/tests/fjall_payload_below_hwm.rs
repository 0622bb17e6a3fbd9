//! A new item whose id is below the partition's hwm (ids come from per-priority blocks) keeps its large
//! payload on disk (it used to be written without its payload record, and came back empty after a restart).
#![cfg(feature = "fjall")]

use bytes::Bytes;
use lessor_core::storage::PartitionStore;
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::fjall::{Durability, FjallStore};

fn item(prio: u8, payload: Bytes) -> NewItem {
    NewItem {
        expire_deadline: Ts(1_900_000_000_000_000),
        created_at: Ts(1_800_000_000_000_000),
        payload,
        priority: prio,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_large_payload_of_a_lower_priority_block_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let big = Bytes::from(vec![b'x'; 2000]);
    {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        let p = store.open("q", 0).await.expect("partition");
        let a = p
            .produce(vec![item(1, Bytes::from_static(b"a"))])
            .await
            .expect("produce");
        let b = p
            .produce(vec![item(0, Bytes::from_static(b"b"))])
            .await
            .expect("produce");
        let c = p.produce(vec![item(1, big.clone())]).await.expect("produce");
        println!("ids: prio1 {:?}, prio0 {:?}, prio1 big {:?}", a, b, c);
        store.close().await;
    }
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("q", 0).await.expect("partition");
    let got = p.lease(10, Ts(1_800_000_100_000_000)).await.expect("lease");
    let sizes: Vec<(u8, usize)> = got.iter().map(|i| (i.priority, i.payload.len())).collect();
    println!("after restart: {sizes:?}");
    assert!(
        sizes.contains(&(1, 2000)),
        "the 2000-byte payload came back as {sizes:?}"
    );
}
