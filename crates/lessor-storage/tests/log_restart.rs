//! Restart, checkpoint and damage tests of the log store: what was acknowledged comes back whole after a restart,
//! through checkpoints and checkpoints cut short; a torn tail is cut off, damage before it refused; a directory in
//! use is refused; concurrent writes share fsyncs.
#![cfg(feature = "fjall")]

use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{DedupRecord, Item, ItemId, NewItem};
use lessor_storage::fjall::Durability;
use lessor_storage::log::LogStore;

#[path = "support/log.rs"]
mod support;

use support::{item, open, reopen, segment_files, SEC, T0};
const DLQ: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 2,
    has_dead_queue: true,
    backoff: lessor_core::types::Backoff::OFF,
};

/// Everything a partition can tell about its items.
#[derive(Debug, PartialEq)]
struct Snapshot {
    live: Vec<Item>,
    scheduled: Vec<Item>,
    dead: Vec<Item>,
    dedup: Vec<DedupRecord>,
    next_deadline: Option<Ts>,
}

async fn snapshot(p: &dyn Partition) -> Snapshot {
    let mut dedup = p.dedup_records(T0).await.expect("dedup records");
    dedup.sort_by(|a, b| a.dedup_id.cmp(&b.dedup_id));
    Snapshot {
        live: p.list(None, 10_000, false).await.expect("list"),
        scheduled: p.list(None, 10_000, true).await.expect("list scheduled"),
        dead: p.dead_items(10_000).await.expect("dead items"),
        dedup,
        next_deadline: p.next_deadline().await.expect("deadline"),
    }
}

/// Leaves partition `p` with ready, leased, scheduled, dead, expired-lease, completed, deleted, keyed and
/// prioritised items; `tag` makes its payloads its own.
async fn workload(p: &dyn Partition, tag: &str) -> Vec<ItemId> {
    let mut batch: Vec<NewItem> = (0..12).map(|i| item(&format!("{tag}-{i}"))).collect();
    batch[5].enqueue_at = T0.add(SEC * 30);
    batch[6].priority = 7;
    for (i, it) in batch.iter_mut().enumerate().skip(8) {
        it.dedup_id = format!("{tag}-key-{i}");
        it.dedup_until = T0.add(SEC * 300);
    }
    // A payload larger than fjall's inline limit: the log keeps every payload in its record.
    batch[9].payload = Bytes::from(vec![b'x'; 5000]);
    let ids = p.produce(batch).await.expect("produce");
    let leased = p.lease(3, T0.add(SEC * 10)).await.expect("lease");
    assert_eq!(leased.len(), 3);
    p.complete(vec![vec![leased[0].id]]).await.expect("complete");
    p.extend(vec![(vec![leased[1].id], T0.add(SEC * 50))])
        .await
        .expect("extend");
    let l = p.lease(2, T0.add(SEC * 10)).await.expect("lease");
    p.retry(
        vec![vec![
            RetryOp {
                id: l[0].id,
                action: RetryAction::Dead,
            },
            RetryOp {
                id: l[1].id,
                action: RetryAction::Schedule(T0.add(SEC * 20)),
            },
        ]],
        DLQ,
    )
    .await
    .expect("retry");
    p.lease(1, T0.add(SEC)).await.expect("lease");
    p.lifecycle(T0.add(SEC * 2), DLQ, 10).await.expect("lifecycle");
    p.delete(vec![ids[11]]).await.expect("delete");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_brings_every_partition_back_as_it_was() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let a = store.open("orders", 0).await.expect("open");
    let b = store.open("orders", 1).await.expect("open");
    let gone = store.open("gone", 0).await.expect("open");
    workload(a.as_ref(), "a").await;
    let ids_b = workload(b.as_ref(), "b").await;
    workload(gone.as_ref(), "g").await;
    store.destroy("gone", 0).await.expect("destroy");
    let (sa, sb) = (snapshot(a.as_ref()).await, snapshot(b.as_ref()).await);
    assert!(!sa.live.is_empty() && !sa.scheduled.is_empty() && !sa.dead.is_empty());
    assert_eq!(sa.dedup.len(), 4, "{:?}", sa.dedup);
    let counts = a.counts().await.expect("counts");
    drop((a, b, gone));

    let store = reopen(store, dir.path()).await;
    let a = store.open("orders", 0).await.expect("open");
    let b = store.open("orders", 1).await.expect("open");
    assert_eq!(snapshot(a.as_ref()).await, sa, "partition 0 whole");
    assert_eq!(snapshot(b.as_ref()).await, sb, "partition 1 whole");
    assert_eq!(a.counts().await.expect("counts"), counts);
    let gone = store.open("gone", 0).await.expect("open");
    assert_eq!(
        gone.counts().await.expect("counts").ready,
        0,
        "a destroyed partition stays destroyed; its name opens a new, empty one"
    );
    // Ids continue above every id handed out before.
    let new = b.produce(vec![item("after")]).await.expect("produce");
    assert!(
        new[0] > *ids_b.iter().max().expect("ids"),
        "{new:?} after {ids_b:?}"
    );

    // And the changes made after a restart survive the next one.
    let sb = snapshot(b.as_ref()).await;
    drop((a, b, gone));
    let store = reopen(store, dir.path()).await;
    let b = store.open("orders", 1).await.expect("open");
    assert_eq!(snapshot(b.as_ref()).await, sb);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_bound_the_log_and_keep_every_item() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("cp", 0).await.expect("open");
    workload(p.as_ref(), "w").await;
    // Churn: items produced and completed, which a checkpoint leaves behind.
    for r in 0..50 {
        let batch: Vec<NewItem> = (0..20).map(|i| item(&format!("churn-{r}-{i}"))).collect();
        p.produce(batch).await.expect("produce");
        let l = p.lease(20, T0.add(SEC * 60)).await.expect("lease");
        p.complete(vec![l.iter().map(|i| i.id).collect()])
            .await
            .expect("complete");
    }
    let before = snapshot(p.as_ref()).await;
    store.checkpoint_now().expect("checkpoint");
    assert_eq!(store.segments(), 1, "the segments before the checkpoint are gone");
    assert_eq!(snapshot(p.as_ref()).await, before, "a checkpoint changes nothing");
    // Changes after the checkpoint land after it.
    p.produce(vec![item("after-checkpoint")]).await.expect("produce");
    let before = snapshot(p.as_ref()).await;
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("cp", 0).await.expect("open");
    assert_eq!(
        snapshot(p.as_ref()).await,
        before,
        "checkpoint and later changes replayed"
    );

    // The checkpoint thread starts one by itself once enough was appended.
    store.set_checkpoint_min(64 << 10);
    let before_count = store.checkpoints();
    for r in 0..200 {
        let batch: Vec<NewItem> = (0..10)
            .map(|i| item(&format!("auto-{r}-{i}-{}", "y".repeat(100))))
            .collect();
        p.produce(batch).await.expect("produce");
        let l = p.lease(10, T0.add(SEC * 60)).await.expect("lease");
        p.complete(vec![l.iter().map(|i| i.id).collect()])
            .await
            .expect("complete");
    }
    let waited = std::time::Instant::now();
    while store.checkpoints() == before_count {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no checkpoint started by itself"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = snapshot(p.as_ref()).await;
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("cp", 0).await.expect("open");
    assert_eq!(snapshot(p.as_ref()).await, before);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_cut_by_a_crash_is_ignored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("cut", 0).await.expect("open");
    let q = store.open("cut", 1).await.expect("open");
    workload(p.as_ref(), "p").await;
    workload(q.as_ref(), "q").await;
    // A checkpoint written up to its end records, as a crash would leave it; then p changes, q does not.
    store.checkpoint_cut_for_tests().expect("cut checkpoint");
    p.produce(vec![item("after-cut")]).await.expect("produce");
    let (sp, sq) = (snapshot(p.as_ref()).await, snapshot(q.as_ref()).await);
    assert!(store.segments() >= 2, "the older segments are kept");
    drop((p, q));
    let store = reopen(store, dir.path()).await;
    let p = store.open("cut", 0).await.expect("open");
    let q = store.open("cut", 1).await.expect("open");
    assert_eq!(snapshot(p.as_ref()).await, sp);
    assert_eq!(snapshot(q.as_ref()).await, sq);
    // A later, whole checkpoint replaces everything.
    store.checkpoint_now().expect("checkpoint");
    drop((p, q));
    let store = reopen(store, dir.path()).await;
    let p = store.open("cut", 0).await.expect("open");
    assert_eq!(snapshot(p.as_ref()).await, sp);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_off_and_damage_before_it_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("torn", 0).await.expect("open");
    workload(p.as_ref(), "t").await;
    let before = snapshot(p.as_ref()).await;
    drop(p);
    store.close().await;
    drop(store);
    // A frame header promising more than is there, then a frame whose checksum fails: an append cut by a crash.
    let last = segment_files(dir.path()).pop().expect("a segment");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .expect("open segment");
    f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 9, 9]).expect("write");
    drop(f);
    let store = open(dir.path());
    let p = store.open("torn", 0).await.expect("open");
    assert_eq!(
        snapshot(p.as_ref()).await,
        before,
        "the torn tail is cut off, nothing else lost"
    );
    p.produce(vec![item("after")]).await.expect("writes again");
    drop(p);
    store.close().await;
    drop(store);

    // The same damage in a segment that is not the last is corruption: records after it would be lost.
    let files = segment_files(dir.path());
    assert!(files.len() >= 2, "{files:?}");
    let first = &files[0];
    let mut bytes = fs::read(first).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(first, bytes).expect("write");
    let e = LogStore::open(dir.path(), Durability::Sync).expect_err("damaged log");
    assert_eq!(e.kind, StorageErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("not the last one"), "{}", e.message);
}

#[tokio::test]
async fn a_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let e = LogStore::open(dir.path(), Durability::Sync).expect_err("in use");
    assert_eq!(e.kind, StorageErrorKind::Locked, "{e}");
    store.close().await;
    drop(store);
    open(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_to_many_partitions_share_fsyncs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(open(dir.path()));
    let mut parts = Vec::new();
    for i in 0..32 {
        parts.push(store.open("group", i).await.expect("open"));
    }
    let before = store.fsyncs();
    let rounds = 20u64;
    let tasks: Vec<_> = parts
        .iter()
        .cloned()
        .map(|p| {
            tokio::spawn(async move {
                for r in 0..rounds {
                    p.produce(vec![item(&format!("r{r}"))]).await.expect("produce");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let writes = parts.len() as u64 * rounds;
    let fsyncs = store.fsyncs() - before;
    assert!(
        fsyncs < writes,
        "{writes} writes took {fsyncs} fsyncs: no group commit"
    );
    eprintln!("{writes} acknowledged writes from 32 partitions shared {fsyncs} fsyncs");
    for p in &parts {
        assert_eq!(p.counts().await.expect("counts").ready, rounds);
    }
}

/// A checkpoint copies a partition page by page while it keeps changing (produce, lease, complete, retry into the
/// schedule, dead items): replaying the changes logged since its begin record over that copy gives the state
/// exactly, through a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_taken_while_the_partition_changes_is_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(open(dir.path()));
    let p = store.open("busy", 0).await.expect("open");
    // Several pages of items.
    for r in 0..5 {
        let batch: Vec<NewItem> = (0..4000).map(|i| item(&format!("fill-{r}-{i}"))).collect();
        p.produce(batch).await.expect("produce");
    }
    let writer = {
        let p = p.clone();
        tokio::spawn(async move {
            for r in 0..300u64 {
                let mut batch: Vec<NewItem> = (0..20).map(|i| item(&format!("live-{r}-{i}"))).collect();
                batch[0].dedup_id = format!("key-{r}");
                batch[0].dedup_until = T0.add(SEC * 600);
                p.produce(batch).await.expect("produce");
                let l = p.lease(30, T0.add(SEC * 60)).await.expect("lease");
                let (done, rest) = l.split_at(l.len() / 2);
                p.complete(vec![done.iter().map(|i| i.id).collect()])
                    .await
                    .expect("complete");
                let ops = rest
                    .iter()
                    .enumerate()
                    .map(|(n, it)| RetryOp {
                        id: it.id,
                        action: if n % 3 == 0 {
                            RetryAction::Dead
                        } else {
                            RetryAction::Schedule(T0.add(SEC * (r as u32 + 5)))
                        },
                    })
                    .collect();
                p.retry(vec![ops], DLQ).await.expect("retry");
            }
        })
    };
    let mut checkpoints = 0;
    while !writer.is_finished() {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.checkpoint_now())
            .await
            .expect("task")
            .expect("checkpoint");
        checkpoints += 1;
    }
    writer.await.expect("writer");
    assert!(
        checkpoints >= 2,
        "only {checkpoints} checkpoints overlapped the writes"
    );
    let before = snapshot(p.as_ref()).await;
    assert!(!before.scheduled.is_empty() && !before.dead.is_empty() && before.dedup.len() == 300);
    drop(p);
    let store = Arc::into_inner(store).expect("one handle");
    let store = reopen(store, dir.path()).await;
    let p = store.open("busy", 0).await.expect("open");
    assert_eq!(snapshot(p.as_ref()).await, before);
    eprintln!("{checkpoints} checkpoints overlapped the writes");
    store.close().await;
}

/// The pages a checkpoint copies cover every item once, in id order, whatever the page size.
#[test]
fn pages_of_a_partition_cover_every_item_once() {
    use lessor_storage::state::PartitionState;
    let mut s = PartitionState::new(1000);
    let mut batch: Vec<NewItem> = (0..3000).map(|i| item(&format!("i{i}"))).collect();
    for (n, it) in batch.iter_mut().enumerate() {
        if n % 7 == 0 {
            it.enqueue_at = T0.add(SEC * 30);
        }
        it.priority = (n % 3) as u8;
    }
    s.produce(batch);
    let (leased, _) = s.lease(500, T0.add(SEC * 10));
    let dead: Vec<RetryOp> = leased
        .iter()
        .step_by(5)
        .map(|it| RetryOp {
            id: it.id,
            action: RetryAction::Dead,
        })
        .collect();
    s.retry(vec![dead], DLQ);
    let all = s.all_items();
    for limit in [1, 7, 100, 1000, 5000] {
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = s.items_page(after, limit);
            assert!(page.len() <= limit);
            paged.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(paged, all, "page size {limit}");
    }
}

/// Closing a store with `durability: interval` returns at once whatever its `sync-interval`: the interval thread
/// slept the whole interval before it could see the close, and close joins it, so a server configured with
/// `sync-interval: 1h` stayed in "shutting down" for up to an hour after SIGTERM (found by review). The close runs on
/// a thread of its own so that a close that hangs fails the test instead of hanging it.
#[test]
fn close_does_not_wait_for_the_sync_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), Durability::Interval(Duration::from_secs(3600))).expect("open");
    let (done, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(store.close());
        let _ = done.send(());
    });
    closed
        .recv_timeout(Duration::from_secs(10))
        .expect("close returns well before the 1h sync interval ends");
}
