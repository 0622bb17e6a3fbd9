//! The fjall partition store under many partitions and under churn: creating thousands of partitions is one write,
//! destroyed partitions give their keys back in the background (and after a restart when interrupted), and a queue
//! re-created under the same name starts empty.
#![cfg(feature = "fjall")]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::fjall::{Durability, Fault, FjallStore};
use lessor_testkit::eventually;

fn item(i: usize) -> NewItem {
    NewItem {
        expire_deadline: Ts(4_000_000_000_000_000),
        payload: Bytes::from(format!("item-{i}")),
        ..Default::default()
    }
}

/// Waits until the store's background deletions are done, failing with what is left after `within`.
async fn reclaimed(store: &FjallStore, within: Duration) {
    eventually("background deletions done", within, || async {
        match store.pending_deletions() {
            0 => Ok(()),
            n => Err(format!("{n} deletions pending")),
        }
    })
    .await;
}

fn keys(store: &FjallStore) -> usize {
    store.stored_keys().expect("count keys")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_partitions_are_a_few_catalog_writes_and_open_concurrently() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(FjallStore::open(dir.path(), Durability::Sync).expect("open"));
    let parts: Vec<u32> = (0..10_000).collect();
    let fsyncs = store.fsyncs();
    store.create("wide", &parts).await.expect("create");
    // Written in bounded chunks of 256 entries (so other queues' writes are never held up for long), not one
    // write or fsync per partition.
    let writes = store.fsyncs() - fsyncs;
    assert!(
        (1..=40).contains(&writes),
        "{writes} fsyncs for 10,000 catalog entries"
    );
    assert_eq!(store.partition_count().await, 10_000);
    // Idempotent.
    store.create("wide", &parts).await.expect("create again");
    assert_eq!(store.fsyncs() - fsyncs, writes, "nothing new to write");

    let opened: Vec<Arc<dyn Partition>> = join_all(parts.iter().map(|&p| {
        let store = store.clone();
        async move { store.open("wide", p).await.expect("open") }
    }))
    .await;
    for (i, p) in opened.iter().enumerate().step_by(997) {
        p.produce(vec![item(i)]).await.expect("produce");
    }
    for p in &opened {
        p.close().await;
    }
    drop(opened);
    store.close().await;
    drop(store);

    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    assert_eq!(store.partition_count().await, 10_000);
    for i in (0..10_000).step_by(997) {
        let p = store.open("wide", i).await.expect("open");
        let items = p.list(None, 10, false).await.expect("list");
        assert_eq!(items.len(), 1, "partition {i}");
        assert_eq!(items[0].payload, Bytes::from(format!("item-{i}")));
    }
    let empty = store.open("wide", 1).await.expect("open");
    assert!(empty.list(None, 10, false).await.expect("list").is_empty());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_partitions_give_back_every_key_and_a_new_queue_starts_empty() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    let baseline = keys(&store);
    // One large partition (many reclaim chunks, whole tables dropped) and many small ones.
    let big = store.open("churn", 0).await.expect("open");
    for chunk in 0..20 {
        big.produce((0..1_000).map(|i| item(chunk * 1_000 + i)).collect())
            .await
            .expect("produce");
    }
    for p in 1..64 {
        store
            .open("churn", p)
            .await
            .expect("open")
            .produce(vec![item(p as usize)])
            .await
            .expect("produce");
    }
    // One key per item: small payloads are inline in the item's record.
    assert!(keys(&store) > 20_000, "{} keys", keys(&store));
    let parts: Vec<u32> = (0..64).collect();
    store.destroy_many("churn", &parts).await.expect("destroy");
    // The live handle is fenced at once.
    assert!(
        big.produce(vec![item(0)]).await.is_err(),
        "a destroyed partition refuses writes"
    );
    // A queue re-created under the same name sees nothing of the old one, even while deletion runs.
    let again = store.open("churn", 0).await.expect("reopen partition");
    assert!(again.list(None, 10, false).await.expect("list").is_empty());
    reclaimed(&store, Duration::from_secs(60)).await;
    again.close().await;
    store.destroy("churn", 0).await.expect("destroy the new one");
    reclaimed(&store, Duration::from_secs(10)).await;
    assert_eq!(
        keys(&store),
        baseline,
        "every key of the destroyed partitions is gone"
    );
    assert_eq!(store.partition_count().await, 0);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_deletion_finishes_after_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let baseline = keys(&store);
    let p = store.open("gone", 0).await.expect("open");
    for chunk in 0..10 {
        p.produce((0..1_000).map(|i| item(chunk * 1_000 + i)).collect())
            .await
            .expect("produce");
    }
    p.close().await;
    drop(p);
    // Every write fails from now on: the destroy itself is refused and changes nothing...
    store.inject_fault(Some(Fault::NoSpace));
    store.destroy("gone", 0).await.expect_err("disk full");
    assert_eq!(store.partition_count().await, 1);
    store.inject_fault(None);
    // ...then it is accepted once the store has reopened (after its reopen back-off), and the reclaimer's own
    // writes fail, leaving the deletion record behind.
    eventually(
        "the destroy is accepted once the disk is back",
        Duration::from_secs(10),
        || async { store.destroy("gone", 0).await.map_err(|e| e.to_string()) },
    )
    .await;
    store.inject_fault(Some(Fault::NoSpace));
    store.close().await;
    drop(store);

    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    assert_eq!(store.partition_count().await, 0, "the destroy stands");
    reclaimed(&store, Duration::from_secs(30)).await;
    assert_eq!(keys(&store), baseline, "the restart finished the deletion");
    let p = store.open("gone", 0).await.expect("open");
    assert!(p.list(None, 10, false).await.expect("list").is_empty());
    store.close().await;
}
