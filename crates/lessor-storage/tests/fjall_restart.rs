//! Restart, exclusive use and format checks of the fjall backend: what is on disk comes back whole, a torn journal
//! tail never stops start-up, and a directory that is in use or in an unknown format is refused clearly.
#![cfg(feature = "fjall")]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, QueuesStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, DedupRecord, Item, NewItem, PartitionInfo, QueueInfo};
use lessor_storage::fjall::{
    Durability, FjallQueues, FjallStore, PARTITIONS_DIR, PARTITIONS_FORMAT_VERSION, QUEUES_DIR,
};

const T0: Ts = Ts(1_800_000_000_000_000);
const SEC: Duration = Duration::from_secs(1);
const DLQ: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 2,
    has_dead_queue: true,
    backoff: lessor_core::types::Backoff::OFF,
};

fn item(payload: &str) -> NewItem {
    NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        reference: format!("ref-{payload}"),
        encoding: "text/plain".into(),
        kind: "test".into(),
        payload: Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

fn queue(name: &str) -> QueueInfo {
    QueueInfo {
        name: name.into(),
        namespace: "_system".into(),
        created_at: T0,
        updated_at: T0,
        dead_queue: format!("{name}-dlq"),
        lease_timeout: SEC * 60,
        expire_timeout: SEC * 3600,
        max_attempts: 2,
        requested_partitions: 1,
        partitions: vec![PartitionInfo {
            partition: 0,
            storage_name: "fjall-01".into(),
            read_only: false,
        }],
        ..Default::default()
    }
}

/// Everything a partition can tell about its items.
#[derive(Debug, PartialEq)]
struct Snapshot {
    live: Vec<Item>,
    scheduled: Vec<Item>,
    dead: Vec<Item>,
    next_deadline: Option<Ts>,
}

async fn snapshot(p: &dyn Partition) -> Snapshot {
    Snapshot {
        live: p.list(None, 1000, false).await.expect("list"),
        scheduled: p.list(None, 1000, true).await.expect("list scheduled"),
        dead: p.dead_items(1000).await.expect("dead items"),
        next_deadline: p.next_deadline().await.expect("deadline"),
    }
}

fn open_both(dir: &Path) -> (FjallStore, FjallQueues) {
    (
        FjallStore::open(dir, Durability::Sync).expect("open partition store"),
        FjallQueues::open(dir, Durability::Sync).expect("open queue store"),
    )
}

#[tokio::test]
async fn restart_keeps_queues_items_leases_schedules_and_dead_items() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, queues) = open_both(dir.path());
    queues.add(&queue("orders")).await.expect("add queue");
    let p = store.open("orders", 0).await.expect("open");
    let mut batch: Vec<NewItem> = (0..6).map(|i| item(&format!("p{i}"))).collect();
    batch[5].enqueue_at = T0.add(SEC * 30);
    let ids = p.produce(batch).await.expect("produce");
    // p0, p1 leased until T0+10s.
    let leased = p.lease(2, T0.add(SEC * 10)).await.expect("lease");
    assert_eq!(leased.len(), 2);
    // p2 given up on: dead, waiting for transfer to the dead-letter queue.
    let l = p.lease(1, T0.add(SEC * 10)).await.expect("lease");
    p.retry(
        vec![vec![RetryOp {
            id: l[0].id,
            action: RetryAction::Dead,
        }]],
        DLQ,
    )
    .await
    .expect("retry dead");
    // p3 retried into the schedule.
    let l = p.lease(1, T0.add(SEC * 10)).await.expect("lease");
    p.retry(
        vec![vec![RetryOp {
            id: l[0].id,
            action: RetryAction::Schedule(T0.add(SEC * 20)),
        }]],
        DLQ,
    )
    .await
    .expect("retry");
    // p4's lease expires: back in the queue with one attempt used.
    p.lease(1, T0.add(SEC)).await.expect("lease");
    let o = p.lifecycle(T0.add(SEC), DLQ, 10).await.expect("lifecycle");
    assert_eq!(o.lease_expired, 1);
    p.complete(vec![vec![leased[1].id]]).await.expect("complete");
    let before = snapshot(p.as_ref()).await;
    assert_eq!(before.dead.len(), 1);
    assert_eq!(before.scheduled.len(), 2);
    assert_eq!(before.live.len(), 2, "p0 leased, p4 ready again");
    assert_eq!(before.live[1].attempts, 1);
    let stats_before = p.stats(T0.add(SEC * 5)).await.expect("stats");
    p.close().await;
    drop(p);
    store.close().await;
    queues.close().await;
    drop((store, queues));

    let (store, queues) = open_both(dir.path());
    assert_eq!(queues.get("orders").await.expect("get"), Some(queue("orders")));
    let p = store.open("orders", 0).await.expect("reopen");
    let after = snapshot(p.as_ref()).await;
    assert_eq!(
        after, before,
        "items, leases with deadlines and attempts, schedule and dead items"
    );
    assert_eq!(p.stats(T0.add(SEC * 5)).await.expect("stats"), stats_before);
    // The lease survives with its deadline: it expires on time and the item returns with a new, larger id.
    let o = p.lifecycle(T0.add(SEC * 10), DLQ, 10).await.expect("lifecycle");
    assert_eq!(o.lease_expired, 1);
    // Scheduled items still fire on time.
    let o = p.lifecycle(T0.add(SEC * 30), DLQ, 10).await.expect("lifecycle");
    assert_eq!(o.enqueued, 2);
    let more = p.produce(vec![item("new")]).await.expect("produce");
    let highest = ids.iter().chain(before.live.iter().map(|i| &i.id)).max().copied();
    assert!(Some(more[0]) > highest, "ids keep growing across restarts");
    // The dead item is transferred once: removed, it stays removed.
    let dead = p.dead_items(10).await.expect("dead");
    p.remove_dead(dead.iter().map(|i| i.id).collect())
        .await
        .expect("remove dead");
    store.close().await;
    queues.close().await;
    drop((p, store, queues));
    let (store, _queues) = open_both(dir.path());
    let p = store.open("orders", 0).await.expect("reopen");
    assert!(p.dead_items(10).await.expect("dead").is_empty());
}

/// A produce call's dedup records are one group on disk: a group whose records have all ended is gone after a
/// restart, and a group with one live record left keeps it.
#[tokio::test]
async fn dedup_groups_leave_the_disk_once_every_record_has_ended() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, queues) = open_both(dir.path());
    queues.add(&queue("groups")).await.expect("add");
    let p = store.open("groups", 0).await.expect("open");
    let keyed = |key: &str, until: Ts| NewItem {
        dedup_id: key.into(),
        dedup_until: until,
        ..item(key)
    };
    let (early, late) = (T0.add(SEC * 5), T0.add(SEC * 50));
    p.produce(vec![
        keyed("g1-a", early),
        keyed("g1-b", early),
        keyed("g1-c", early),
    ])
    .await
    .expect("produce");
    let mixed = p
        .produce(vec![keyed("g2-a", early), keyed("g2-b", late)])
        .await
        .expect("produce");
    assert_eq!(p.dedup_records(T0).await.expect("records").len(), 5);
    // Every record of the first group and the first of the second end at `early`.
    p.lifecycle(early, LifecyclePolicy::default(), 100)
        .await
        .expect("lifecycle");
    p.close().await;
    drop(p);
    store.close().await;
    queues.close().await;
    drop((store, queues));

    let (store, _queues) = open_both(dir.path());
    let p = store.open("groups", 0).await.expect("reopen");
    let live = p.dedup_records(T0).await.expect("records");
    let mut keys: Vec<&str> = live.iter().map(|r| r.dedup_id.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        vec!["g2-a", "g2-b"],
        "the first group is gone from disk; the second is whole, one record still live"
    );
    // Read at `early`, only the record that still lives is listed, under its own item's id (the engine rebuilds
    // its queue-wide index from this after a restart).
    let live = p.dedup_records(early).await.expect("records");
    assert_eq!(
        live.iter()
            .map(|r| (r.dedup_id.as_str(), r.id, r.until))
            .collect::<Vec<_>>(),
        vec![("g2-b", mixed[1], late)]
    );
    p.lifecycle(late, LifecyclePolicy::default(), 100)
        .await
        .expect("lifecycle");
    assert!(
        p.dedup_records(T0).await.expect("records").is_empty(),
        "every record has ended and left"
    );
}

/// The issue-10 state survives a restart: item priorities (and the serving order they give), extended lease
/// deadlines, an item backed off into the schedule after a lease expiry, dedup records (also of consumed items;
/// pruned ones stay gone) and the queue settings.
#[tokio::test]
async fn restart_keeps_priorities_dedup_records_backoff_and_queue_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, queues) = open_both(dir.path());
    let mut q = queue("features");
    q.dedup_window = SEC * 120;
    q.retry_backoff = Backoff {
        base: SEC * 10,
        factor: 3.0,
        max: SEC * 600,
        jitter: 0.3,
    };
    q.paused = true;
    q.max_lease_timeout = SEC * 900;
    queues.add(&q).await.expect("add queue");
    let policy = LifecyclePolicy {
        max_attempts: 5,
        has_dead_queue: true,
        backoff: q.retry_backoff,
    };
    let p = store.open("features", 0).await.expect("open");
    let keyed = |payload: &str, key: &str, priority: u8, until: Ts| NewItem {
        priority,
        dedup_id: key.into(),
        dedup_until: until,
        ..item(payload)
    };
    // Records that end early, dropped by a lifecycle pass before the restart: they must stay gone.
    p.produce(vec![keyed("short", "short-key", 0, T0.add(SEC * 5))])
        .await
        .expect("produce");
    let until = T0.add(SEC * 120);
    let ids = p
        .produce(vec![
            keyed("a", "ka", 0, until),
            keyed("b", "kb", 3, until),
            keyed("c", "kc", 9, until),
            keyed("d", "kd", 3, until),
            keyed("e", "ke", 5, until),
        ])
        .await
        .expect("produce");
    // c (9) is consumed: its record must still refuse "kc" after the restart.
    let c = p.lease(1, T0.add(SEC * 10)).await.expect("lease").remove(0);
    assert_eq!(c.priority, 9);
    p.complete(vec![vec![c.id]]).await.expect("complete");
    // e (5) is leased and extended.
    let e = p.lease(1, T0.add(SEC * 10)).await.expect("lease").remove(0);
    assert_eq!(e.priority, 5);
    assert_eq!(
        p.extend(vec![(vec![e.id], T0.add(SEC * 300))])
            .await
            .expect("extend"),
        vec![Ok(())]
    );
    // b (3) is leased, its lease expires under the backoff policy: scheduled, same id.
    let b = p.lease(1, T0.add(SEC * 10)).await.expect("lease").remove(0);
    assert_eq!(b.id, ids[1]);
    let now = T0.add(SEC * 10);
    let o = p.lifecycle(now, policy, 100).await.expect("lifecycle");
    assert_eq!(o.lease_expired, 1);
    let due = now.add(q.retry_backoff.delay(1, b.id));
    let before = snapshot(p.as_ref()).await;
    assert_eq!(before.scheduled.len(), 1);
    assert_eq!(
        (before.scheduled[0].id, before.scheduled[0].enqueue_at),
        (b.id, due)
    );
    let records_before = p.dedup_records(T0).await.expect("records");
    assert_eq!(
        records_before.len(),
        5,
        "the short record was dropped: {records_before:?}"
    );
    assert!(records_before.iter().all(|r| r.dedup_id != "short-key"));
    p.close().await;
    drop(p);
    store.close().await;
    queues.close().await;
    drop((store, queues));

    let (store, queues) = open_both(dir.path());
    assert_eq!(queues.get("features").await.expect("get"), Some(q));
    let p = store.open("features", 0).await.expect("reopen");
    assert_eq!(snapshot(p.as_ref()).await, before);
    let mut records_after = p.dedup_records(T0).await.expect("records");
    let mut expected = records_before.clone();
    records_after.sort_by(|x, y| x.dedup_id.cmp(&y.dedup_id));
    expected.sort_by(|x, y| x.dedup_id.cmp(&y.dedup_id));
    assert_eq!(records_after, expected);
    assert!(records_after.contains(&DedupRecord {
        dedup_id: "kc".into(),
        id: c.id,
        until,
    }));
    // The records are what the engine's queue-wide index is rebuilt from: the consumed item's key is among them
    // (checked above), so it is still refused within the window after the restart.
    // The backed-off item comes due on time, not before.
    let o = p.lifecycle(Ts(due.0 - 1), policy, 100).await.expect("lifecycle");
    assert_eq!(o.enqueued, 0);
    let o = p.lifecycle(due, policy, 100).await.expect("lifecycle");
    assert_eq!(o.enqueued, 1);
    // The extended lease holds until its new deadline.
    let o = p
        .lifecycle(T0.add(SEC * 299), policy, 100)
        .await
        .expect("lifecycle");
    assert_eq!(o.lease_expired, 0);
    assert_eq!(p.counts().await.expect("counts").leased, 1);
    assert_eq!(
        p.next_deadline().await.expect("deadline"),
        Some(T0.add(SEC * 300))
    );
    // Leases serve priorities in order.
    p.produce(vec![keyed("f", "kf", 3, until)])
        .await
        .expect("produce");
    let l = p.lease(10, due.add(SEC)).await.expect("lease");
    let order: Vec<(String, u8)> = l
        .iter()
        .map(|i| (String::from_utf8_lossy(&i.payload).into_owned(), i.priority))
        .collect();
    assert_eq!(
        order,
        vec![
            ("d".into(), 3),
            ("b".into(), 3),
            ("f".into(), 3),
            ("short".into(), 0),
            ("a".into(), 0)
        ]
    );
    assert_eq!(l[1].attempts, 2);
}

#[tokio::test]
async fn restart_keeps_acknowledged_writes_in_every_durability_mode() {
    for durability in [
        Durability::Sync,
        Durability::Interval(Duration::from_millis(5)),
        Durability::None,
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = FjallStore::open(dir.path(), durability).expect("open");
        let p = store.open("q", 1).await.expect("open");
        for i in 0..20 {
            p.produce(vec![item(&format!("p{i}"))]).await.expect("produce");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // No close: dropping is what a crashed process does to its handles (the OS keeps what was written).
        drop(p);
        drop(store);
        let store = reopen_when_unlocked(dir.path(), durability).await;
        let p = store.open("q", 1).await.expect("open");
        assert_eq!(p.counts().await.expect("counts").ready, 20, "{durability}");
    }
}

/// Many partitions writing at once on the multi-threaded runtime without fsyncs: some writes are made by the calling
/// worker (the writer thread idle), the others queue for the writer; every acknowledged one is there after a
/// crash-like drop and a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_by_callers_and_by_the_writer_all_survive_a_restart() {
    for durability in [Durability::None, Durability::Interval(Duration::from_millis(5))] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = std::sync::Arc::new(FjallStore::open(dir.path(), durability).expect("open"));
        let parts = open_parts(&store, "mixed", 16).await;
        let rounds = 25;
        let tasks: Vec<_> = parts
            .iter()
            .cloned()
            .map(|p| {
                tokio::spawn(async move {
                    for r in 0..rounds {
                        p.produce(vec![item(&format!("r{r}"))]).await.expect("produce");
                        if r % 5 == 4 {
                            let l = p.lease(2, T0.add(SEC * 600)).await.expect("lease");
                            let ids = l.iter().map(|it| it.id).collect();
                            assert!(p
                                .complete(vec![ids])
                                .await
                                .expect("complete")
                                .iter()
                                .all(Result::is_ok));
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        assert!(
            store.caller_writes() > 0,
            "{durability}: no write was made by its caller"
        );
        drop(parts);
        drop(store);
        let store = reopen_when_unlocked(dir.path(), durability).await;
        for i in 0..16 {
            let p = store.open("mixed", i).await.expect("open");
            let c = p.counts().await.expect("counts");
            assert_eq!(
                (c.ready, c.leased),
                (rounds - 10, 0),
                "{durability}, partition {i}"
            );
        }
    }
}

/// Opens the store once the previous instance's threads have let go of the lock.
async fn reopen_when_unlocked(dir: &Path, durability: Durability) -> FjallStore {
    for _ in 0..50 {
        match FjallStore::open(dir, durability) {
            Ok(s) => return s,
            Err(e) if e.kind == StorageErrorKind::Locked => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
    panic!("the store stayed locked after its handles were dropped");
}

/// The newest journal file of the partition store in `dir`.
fn newest_journal(dir: &Path) -> PathBuf {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let mut stack = vec![dir.join(PARTITIONS_DIR)];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read dir") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(n) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".jnl"))
                .and_then(|n| n.parse().ok())
            {
                found.push((n, path));
            }
        }
    }
    found.into_iter().max().expect("a journal file").1
}

/// Length of a journal without its zero-filled preallocated tail.
fn written_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

async fn produce_and_close(dir: &Path, n: usize) {
    let store = FjallStore::open(dir, Durability::Sync).expect("open");
    let p = store.open("torn", 0).await.expect("open");
    for i in 0..n {
        p.produce(vec![item(&format!("p{i}"))]).await.expect("produce");
    }
    p.close().await;
    store.close().await;
}

#[tokio::test]
async fn garbage_after_the_journal_tail_never_prevents_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    produce_and_close(dir.path(), 10).await;
    let jnl = newest_journal(dir.path());
    let mut bytes = fs::read(&jnl).expect("read journal");
    let end = written_len(&bytes);
    assert!(end > 0, "the journal holds the batches");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    bytes.truncate(end);
    bytes.extend_from_slice(&garbage);
    fs::write(&jnl, &bytes).expect("write journal");

    let store = FjallStore::open(dir.path(), Durability::Sync).expect("start-up despite garbage");
    let p = store.open("torn", 0).await.expect("open");
    assert_eq!(
        p.counts().await.expect("counts").ready,
        10,
        "every acknowledged item is there"
    );
    p.produce(vec![item("after")])
        .await
        .expect("writes work after recovery");
    p.close().await;
    store.close().await;
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("torn", 0).await.expect("open");
    assert_eq!(p.counts().await.expect("counts").ready, 11);
}

#[tokio::test]
async fn a_torn_last_batch_never_prevents_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    produce_and_close(dir.path(), 10).await;
    let jnl = newest_journal(dir.path());
    let bytes = fs::read(&jnl).expect("read journal");
    let end = written_len(&bytes);
    // Cut the file inside its last batch, as a crash in the middle of an append leaves it.
    fs::write(&jnl, &bytes[..end - 7]).expect("truncate journal");

    let store = FjallStore::open(dir.path(), Durability::Sync).expect("start-up despite a torn tail");
    let p = store.open("torn", 0).await.expect("open");
    let n = p.counts().await.expect("counts").ready;
    assert_eq!(n, 9, "only the torn batch is missing");
    let listed = p.list(None, 100, false).await.expect("list");
    for (i, it) in listed.iter().enumerate() {
        assert_eq!(it.payload, Bytes::from(format!("p{i}")), "earlier batches intact");
    }
    p.produce(vec![item("after")])
        .await
        .expect("writes work after recovery");
}

#[tokio::test]
async fn a_second_open_of_the_same_storage_dir_fails_with_locked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, queues) = open_both(dir.path());
    let e = FjallStore::open(dir.path(), Durability::Sync).expect_err("partition store in use");
    assert_eq!(e.kind, StorageErrorKind::Locked);
    assert!(
        e.message.contains(&dir.path().display().to_string()),
        "names the dir: {}",
        e.message
    );
    let e = FjallQueues::open(dir.path(), Durability::Sync).expect_err("queue store in use");
    assert_eq!(e.kind, StorageErrorKind::Locked);
    assert!(e.message.contains("another process"), "{}", e.message);
    store.close().await;
    queues.close().await;
    // Closing releases the lock.
    let _again = open_both(dir.path());
}

#[tokio::test]
async fn unknown_format_versions_and_foreign_directories_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, queues) = open_both(dir.path());
    store.close().await;
    queues.close().await;
    drop((store, queues));
    let marker = dir.path().join(PARTITIONS_DIR).join("LESSOR-FORMAT");
    let text = fs::read_to_string(&marker).expect("marker");
    assert_eq!(
        text.trim(),
        format!("lessor-fjall partitions {PARTITIONS_FORMAT_VERSION}")
    );
    fs::write(&marker, "lessor-fjall partitions 99\n").expect("write marker");
    let e = FjallStore::open(dir.path(), Durability::Sync).expect_err("future version");
    assert_eq!(e.kind, StorageErrorKind::Corrupt);
    assert!(e.message.contains("version 99"), "{}", e.message);

    // The queue store's directory is not a partition store.
    let e = FjallStore::open(
        dir.path().join(QUEUES_DIR).parent().expect("parent"),
        Durability::Sync,
    );
    assert!(e.is_err());
    let q_marker = dir.path().join(QUEUES_DIR).join("LESSOR-FORMAT");
    fs::copy(&q_marker, &marker).expect("copy marker");
    let e = FjallStore::open(dir.path(), Durability::Sync).expect_err("wrong kind");
    assert_eq!(e.kind, StorageErrorKind::Corrupt);
    assert!(e.message.contains("queues store"), "{}", e.message);

    // Data without a marker is not ours.
    let foreign = tempfile::tempdir().expect("temp dir");
    fs::create_dir_all(foreign.path().join(PARTITIONS_DIR)).expect("mkdir");
    fs::write(foreign.path().join(PARTITIONS_DIR).join("000001.sst"), b"x").expect("write");
    let e = FjallStore::open(foreign.path(), Durability::Sync).expect_err("foreign");
    assert_eq!(e.kind, StorageErrorKind::Corrupt);
    assert!(e.message.contains("LESSOR-FORMAT"), "{}", e.message);
}

#[tokio::test]
async fn destroy_removes_the_data_for_good() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let p = store.open("gone", 2).await.expect("open");
    p.produce(vec![item("a"), item("b")]).await.expect("produce");
    let keep = store.open("kept", 2).await.expect("open");
    keep.produce(vec![item("c")]).await.expect("produce");
    store.destroy("gone", 2).await.expect("destroy");
    store.destroy("never-existed", 0).await.expect("destroy missing");
    assert!(
        p.counts().await.is_err(),
        "a destroyed partition's handle is closed"
    );
    store.close().await;
    drop((p, keep, store));
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("gone", 2).await.expect("open");
    assert_eq!(p.counts().await.expect("counts").ready, 0);
    let keep = store.open("kept", 2).await.expect("open");
    assert_eq!(keep.counts().await.expect("counts").ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_to_many_partitions_share_fsyncs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = std::sync::Arc::new(FjallStore::open(dir.path(), Durability::Sync).expect("open"));
    let parts = open_parts(&store, "group", 32).await;
    let before = store.fsyncs();
    let rounds = 20;
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
    // In `sync` every write goes through the writer thread, whose groups share an fsync.
    assert_eq!(store.caller_writes(), 0);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_of_one_partition_share_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let (a, b) = tokio::join!(store.open("shared", 0), store.open("shared", 0));
    let (a, b) = (a.expect("open"), b.expect("open"));
    a.produce(vec![item("x")]).await.expect("produce");
    assert_eq!(b.counts().await.expect("counts").ready, 1, "one state, not two");
}

#[tokio::test]
async fn leases_rewrite_item_metadata_not_payloads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let p = store.open("lean", 0).await.expect("open");
    // Incompressible payloads, so the journal's compression cannot hide a rewrite.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let batch = (0..50)
        .map(|_| {
            let payload: Vec<u8> = (0..16 * 1024)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            NewItem {
                payload: Bytes::from(payload),
                ..item("")
            }
        })
        .collect();
    p.produce(batch).await.expect("produce");
    let jnl = newest_journal(dir.path());
    let after_produce = written_len(&fs::read(&jnl).expect("journal"));
    assert!(after_produce > 50 * 16 * 1024, "payloads are in the journal");
    let leased = p.lease(50, T0.add(SEC)).await.expect("lease");
    assert_eq!(leased.len(), 50);
    let after_lease = written_len(&fs::read(&jnl).expect("journal"));
    assert!(
        after_lease - after_produce < 16 * 1024,
        "a lease of 50 items wrote {} bytes: payloads rewritten",
        after_lease - after_produce
    );
    p.close().await;
    store.close().await;
    drop((p, store));
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("lean", 0).await.expect("open");
    let back = p.list(None, 100, false).await.expect("list");
    assert_eq!(back, leased, "leased items come back whole, payloads included");
}

/// A small payload is inline in its item's record (one key per item), a larger one a record of its own; both come
/// back whole after a restart, and completing them leaves no key behind, before and after the restart (which
/// reads back which items have a payload record).
#[tokio::test]
async fn payloads_of_every_size_come_back_and_leave_no_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let p = store.open("sizes", 0).await.expect("open");
    let sizes = [0usize, 1, 100, 1024, 1025, 20_000];
    let batch = |round: u8| -> Vec<NewItem> {
        sizes
            .iter()
            .map(|&n| NewItem {
                payload: Bytes::from(vec![round; n]),
                ..item("")
            })
            .collect()
    };
    p.produce(batch(1)).await.expect("produce");
    p.produce(batch(2)).await.expect("produce");
    // Twelve items, four of them with a payload record; the high-water mark and the catalog entry.
    assert_eq!(store.stored_keys().expect("keys"), 12 + 4 + 2);
    let first = p.lease(6, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(first.iter().map(|i| i.payload.len()).collect::<Vec<_>>(), sizes);
    let ids: Vec<_> = first.iter().map(|i| i.id).collect();
    assert_eq!(p.complete(vec![ids]).await.expect("complete")[0], Ok(()));
    assert_eq!(store.stored_keys().expect("keys"), 6 + 2 + 2);
    p.close().await;
    store.close().await;
    drop((p, store));
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("sizes", 0).await.expect("open");
    let second = p.lease(6, T0.add(SEC * 60)).await.expect("lease");
    assert!(second.iter().zip(sizes).all(|(it, n)| it.payload == vec![2u8; n]));
    let ids: Vec<_> = second.iter().map(|i| i.id).collect();
    assert_eq!(p.complete(vec![ids]).await.expect("complete")[0], Ok(()));
    assert_eq!(
        store.stored_keys().expect("keys"),
        2,
        "only the high-water mark and the catalog entry"
    );
}

#[tokio::test]
async fn interval_mode_acknowledges_first_and_fsyncs_in_the_background() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Interval(Duration::from_millis(20))).expect("open");
    let p = store.open("interval", 0).await.expect("open");
    let before = store.fsyncs();
    for i in 0..10 {
        p.produce(vec![item(&format!("p{i}"))]).await.expect("produce");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.fsyncs() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the interval thread never fsynced"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        store.fsyncs() - before < 10,
        "writes did not wait for an fsync each"
    );
    // Nothing new written: the interval thread stays idle.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let idle = store.fsyncs();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.fsyncs(), idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_auth_records_and_generation() {
    use std::sync::{Arc, Mutex};

    use lessor_core::auth::{Auth, AuthMode, KeySpec, NamespaceSpec, Permission};
    use lessor_core::time::ManualClock;

    // `none` too: auth commits are fsynced whatever the queue store's durability mode.
    for durability in [Durability::Sync, Durability::None] {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::new(T0));
        let queues = FjallQueues::open(dir.path(), durability).expect("open");
        let auth = Auth::new(queues.auth(), clock.clone(), AuthMode::Internal);
        let admin_key = Arc::new(Mutex::new(String::new()));
        let w = admin_key.clone();
        let report = auth
            .bootstrap(false, None, move |k| {
                *w.lock().expect("lock") = k.to_string();
                Ok(())
            })
            .await
            .expect("bootstrap");
        assert!(report.created_admin);
        auth.namespace_create(NamespaceSpec {
            name: "tenant".into(),
            ..Default::default()
        })
        .await
        .expect("namespace");
        let uid = auth.user_create("alice", "", "").await.expect("user");
        auth.binding_create("_system", "PublicViewer", &uid)
            .await
            .expect("bind");
        let (_, secret) = auth
            .key_create(KeySpec {
                user_id: uid.clone(),
                ..Default::default()
            })
            .await
            .expect("key");
        let generation = queues.auth().generation().await.expect("generation");
        assert!(generation > 0);
        drop(auth);
        queues.close().await;
        drop(queues);

        let queues = FjallQueues::open(dir.path(), durability).expect("reopen");
        let store = queues.auth();
        assert_eq!(
            store.generation().await.expect("generation"),
            generation,
            "{durability}: the generation survives a restart"
        );
        let auth = Auth::new(store.clone(), clock, AuthMode::Internal);
        let again = auth.bootstrap(false, None, |_| Ok(())).await.expect("bootstrap");
        assert!(
            !again.created_admin,
            "the bootstrap runs once per store, not per start"
        );
        assert!(
            store.generation().await.expect("generation") >= generation,
            "never backwards"
        );
        let admin_key = admin_key.lock().expect("lock").clone();
        let admin = auth
            .authenticate(Some(&admin_key))
            .await
            .expect("the bootstrap key still works");
        assert_eq!(admin.username, "admin");
        let alice = auth
            .authenticate(Some(&secret))
            .await
            .expect("alice's key still works");
        assert_eq!(alice.user_id, uid);
        auth.authorize(&alice, "tenant", Permission::SystemHealth)
            .await
            .expect("her binding survived");
        assert!(auth.namespace_exists("tenant").await.expect("exists"));
        queues.close().await;
    }
}

/// A store of format 4 (a schedule resident whole, no paged scheduled records) opens in this build: it is marked 5,
/// its scheduled items load as they were (beyond the new bound: nothing is rewritten), new ones past the bound are
/// paged, and every one comes due once, in due order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_4_store_with_a_schedule_opens_and_pages_what_comes_next() {
    let dir = tempfile::tempdir().expect("temp dir");
    let at = |i: usize| Ts(T0.0 + 100 + (i % 5) as i64);
    let sched = |i: usize| NewItem {
        enqueue_at: at(i),
        ..item(&format!("s{i:03}"))
    };
    {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        let p = store.open("old", 0).await.expect("partition");
        p.produce((0..40).map(sched).collect()).await.expect("produce");
        assert_eq!(store.paged_keys("old", 0).await.expect("scan"), Some(0));
        store.close().await;
    }
    let marker = dir.path().join(PARTITIONS_DIR).join("LESSOR-FORMAT");
    fs::write(&marker, "lessor-fjall partitions 4\n").expect("write marker");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("a format-4 store opens");
    assert_eq!(
        fs::read_to_string(&marker).expect("marker").trim(),
        format!("lessor-fjall partitions {PARTITIONS_FORMAT_VERSION}")
    );
    store.set_memory_window(8);
    let p = store.open("old", 0).await.expect("partition");
    assert_eq!(store.resident_scheduled("old", 0).await, Some(40));
    p.produce((40..80).map(sched).collect()).await.expect("produce");
    let c = store.paging_counts("old", 0).await.expect("open");
    assert_eq!(
        (c.paged_scheduled, p.counts().await.expect("counts").scheduled),
        (40, 80)
    );
    let o = p.lifecycle(Ts(T0.0 + 200), DLQ, 1_000).await.expect("lifecycle");
    assert_eq!((o.enqueued, o.more), (80, false), "{o:?}");
    let got: Vec<Bytes> = p
        .lease(100, T0.add(SEC * 60))
        .await
        .expect("lease")
        .into_iter()
        .map(|it| it.payload)
        .collect();
    let mut want: Vec<(Ts, usize)> = (0..80).map(|i| (at(i), i)).collect();
    want.sort();
    let want: Vec<Bytes> = want
        .into_iter()
        .map(|(_, i)| Bytes::from(format!("s{i:03}")))
        .collect();
    assert_eq!(got, want);
    store.close().await;
}

/// Opens partitions 0 to `n - 1` of queue `name`.
async fn open_parts(store: &FjallStore, name: &str, n: u32) -> Vec<std::sync::Arc<dyn Partition>> {
    let mut parts = Vec::new();
    for i in 0..n {
        parts.push(store.open(name, i).await.expect("open"));
    }
    parts
}
