//! Second review of the log store (fuzzy checkpoints, destroy interleavings, open): each test states what an
//! acknowledged call promises across crashes, cancellations and restarts.
#![cfg(feature = "fjall")]

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use lessor_core::storage::{LifecyclePolicy, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::fjall::Durability;
use lessor_storage::log::{LogStore, LOG_DIR};

#[path = "support/log.rs"]
mod support;

use support::{copy_dir, item, open, poll_once, reopen, segment_files, store_with_held_partition, SEC, T0};

/// `destroy` parks the partition in `destroying` and takes it out only after its fsync wait. A caller that goes
/// away during that wait (a request cancelled: its future dropped) skips the removal: the destroyed partition,
/// items and all, stays in RAM for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_whose_caller_goes_away_does_not_keep_the_partition() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    for attempt in 0.. {
        let p = store.open("gone", attempt).await.expect("open");
        let batch: Vec<NewItem> = (0..100).map(|i| item(&format!("x-{i}"))).collect();
        p.produce(batch).await.expect("produce");
        drop(p);
        let mut d = Box::pin(store.destroy("gone", attempt));
        if !poll_once(d.as_mut()) {
            // Waiting for its fsync: the caller goes away now.
            drop(d);
            break;
        }
        // The fsync covered the destruction before the first poll ended (a stalled test thread): done, nothing
        // to cancel; try another partition.
        assert!(
            attempt < 20,
            "20 destroys were durable before their first poll ended"
        );
    }
    let waited = std::time::Instant::now();
    while store.destroys_in_progress() > 0 && waited.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store.destroys_in_progress(),
        0,
        "a cancelled destroy left its partition in `destroying` (never freed)"
    );
    store.close().await;
}

/// A crash while a destroy waits to log the destruction, after `open` made a new partition of the name, leaves two
/// live pids of one name; replay serves the later one and forgets the earlier without logging its destruction.
/// Once the later one is destroyed (acknowledged), the next restart finds the earlier one again: the partition
/// comes back with the items of the incarnation whose destroy was under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_that_lost_to_a_later_pid_stays_gone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, old, release) = store_with_held_partition(dir.path()).await;
    let d = {
        let store = store.clone();
        tokio::spawn(async move { store.destroy("q", 0).await.expect("destroy") })
    };
    let waited = std::time::Instant::now();
    while store.destroys_in_progress() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the destroy never started"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let new = store.open("q", 0).await.expect("open the new partition");
    assert!(!Arc::ptr_eq(&new, &old));
    new.produce(vec![item("new")]).await.expect("produce");
    // A crash now: the old partition's destruction is not logged.
    let crashed = tempfile::tempdir().expect("temp dir");
    copy_dir(&dir.path().join(LOG_DIR), &crashed.path().join(LOG_DIR));
    drop(release);
    d.await.expect("destroy task");
    drop((new, old));
    store.close().await;

    let s = open(crashed.path());
    let p = s.open("q", 0).await.expect("open");
    assert_eq!(
        p.counts().await.expect("counts").ready,
        1,
        "the new partition won"
    );
    drop(p);
    // The queue is deleted: acknowledged.
    s.destroy("q", 0).await.expect("destroy");
    let s = reopen(s, crashed.path()).await;
    let p = s.open("q", 0).await.expect("open");
    let c = p.counts().await.expect("counts");
    assert_eq!(
        c.ready, 0,
        "a destroyed partition came back after a restart with {} items of an older incarnation",
        c.ready
    );
    drop(p);
    s.close().await;
}

/// Open replays the previous run's last segment and starts a new one, but never fsyncs the old one: after a
/// SIGKILL (records written, not fsynced) and a restart, the new run serves and builds on those records, and a
/// power loss then may cut the old segment, which is no longer the last: the store refuses to open (corruption
/// before the tail), acknowledged writes of the new run included. Modelled here: what no fsync covered loses its
/// last bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_after_a_restart_does_not_make_the_log_unreadable() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Run 1 (none: nothing fsynced before the crash, as with any record in flight at a SIGKILL in sync).
    let store = LogStore::open(dir.path(), Durability::None).expect("open");
    let p = store.open("pl", 0).await.expect("open");
    p.produce(vec![item("run-1")]).await.expect("produce");
    drop(p);
    let crashed = tempfile::tempdir().expect("temp dir");
    copy_dir(&dir.path().join(LOG_DIR), &crashed.path().join(LOG_DIR));
    store.close().await;
    drop(store);
    let run1 = segment_files(crashed.path());
    assert_eq!(run1.len(), 1, "{run1:?}");

    // Run 2, sync: acknowledges a produce after its fsync.
    let s = open(crashed.path());
    let synced_at_open = s.fsyncs() > 0;
    let p = s.open("pl", 0).await.expect("open");
    let ids = p.produce(vec![item("run-2")]).await.expect("produce");
    // The power loss: copy what is on disk now, minus what no fsync covered.
    let lost = tempfile::tempdir().expect("temp dir");
    copy_dir(&crashed.path().join(LOG_DIR), &lost.path().join(LOG_DIR));
    drop(p);
    s.close().await;
    drop(s);
    if !synced_at_open {
        let old = lost.path().join(LOG_DIR).join(run1[0].file_name().expect("name"));
        let len = fs::metadata(&old).expect("meta").len();
        fs::OpenOptions::new()
            .write(true)
            .open(&old)
            .expect("open")
            .set_len(len - 3)
            .expect("cut");
    }
    let s = LogStore::open(lost.path(), Durability::Sync)
        .expect("the log opens after a power loss (run 1's segment was never fsynced)");
    let p = s.open("pl", 0).await.expect("open");
    let live = p.list(None, 10, false).await.expect("list");
    assert!(
        ids.iter().all(|id| live.iter().any(|it| it.id == *id)),
        "run 2's acknowledged produce is lost"
    );
    drop(p);
    s.close().await;
}

/// A checkpoint renames (in RAM) a dedup group whose first records were dropped after the first one it still has,
/// and the group's later drop is logged under that new name. When that checkpoint never ends (a crash, or a
/// checkpoint that failed), replay has the group under its old name: the drop misses it and the dropped records
/// are back after a restart (what `dropped_dedup_records_stay_dropped_after_a_checkpoint` checks for a checkpoint
/// that ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_group_dropped_after_a_cut_checkpoint_stays_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("grp", 0).await.expect("open");
    let mut batch = vec![item("a"), item("b")];
    batch[0].dedup_id = "key-a".into();
    batch[0].dedup_until = T0.add(SEC * 10);
    batch[1].dedup_id = "key-b".into();
    batch[1].dedup_until = T0.add(SEC * 20);
    p.produce(batch).await.expect("produce");
    let policy = LifecyclePolicy::default();
    // key-a has ended; the group (named by key-a's record) keeps it until key-b ends too, and leaves whole (groups
    // used to lose their first records one by one, and a checkpoint renamed them after the first left).
    p.lifecycle(T0.add(SEC * 15), policy, 100)
        .await
        .expect("lifecycle");
    let all = Ts(i64::MIN);
    assert_eq!(p.dedup_records(all).await.expect("records").len(), 2);
    assert_eq!(
        p.dedup_records(T0.add(SEC * 15)).await.expect("records").len(),
        1,
        "key-a has ended"
    );
    // A checkpoint that does not end.
    store.checkpoint_cut_for_tests().expect("cut checkpoint");
    // key-b goes: the whole group is dropped, by the name the checkpoint gave it.
    p.lifecycle(T0.add(SEC * 25), policy, 100)
        .await
        .expect("lifecycle");
    assert!(p.dedup_records(all).await.expect("records").is_empty());
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("grp", 0).await.expect("open");
    let back: Vec<String> = p
        .dedup_records(all)
        .await
        .expect("records")
        .into_iter()
        .map(|r| r.dedup_id)
        .collect();
    assert!(back.is_empty(), "dropped dedup records resurrected: {back:?}");
    drop(p);
    store.close().await;
}

/// The premise of the fuzzy checkpoint, at the state: paging through a partition while it changes between pages
/// (produce at several priorities, scheduled items, leases, completes, retries into the schedule and the dead,
/// deletes, lifecycle passes), every id a page returns is above the pages before it, and every item no change
/// touched (no put, no delete in any change set) since the first page is returned, as it was.
#[test]
fn pages_taken_while_the_partition_changes_miss_no_untouched_item() {
    use std::collections::{BTreeMap, HashSet};

    use lessor_core::storage::{RetryAction, RetryOp};
    use lessor_core::types::ItemId;
    use lessor_storage::state::{Changes, PartitionState};

    const DLQ: LifecyclePolicy = LifecyclePolicy {
        max_attempts: 3,
        has_dead_queue: true,
        backoff: lessor_core::types::Backoff::OFF,
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n.max(1)
    };
    for round in 0..40 {
        let mut s = PartitionState::new(1000);
        let mut made = 0u64;
        let mut new_items = |rnd: &mut dyn FnMut(u64) -> u64, n: u64| -> Vec<NewItem> {
            (0..n)
                .map(|_| {
                    made += 1;
                    let mut it = item(&format!("i{made}"));
                    it.priority = rnd(4) as u8;
                    if rnd(6) == 0 {
                        it.enqueue_at = T0.add(SEC * (1 + rnd(100) as u32));
                    }
                    it
                })
                .collect()
        };
        let n = 1 + rnd(5000);
        s.produce(new_items(&mut rnd, n));
        let (l, _) = s.lease(rnd(n) as usize, T0.add(SEC * 50));
        let dead: Vec<RetryOp> = l
            .iter()
            .filter(|_| rnd(3) == 0)
            .map(|it| RetryOp {
                id: it.id,
                action: RetryAction::Dead,
            })
            .collect();
        s.retry(vec![dead], DLQ);
        let start: BTreeMap<u64, lessor_core::types::Item> =
            s.all_items().into_iter().map(|it| (it.id.0, it)).collect();
        let mut touched: HashSet<u64> = HashSet::new();
        let mut touch = |ch: &Changes| {
            touched.extend(ch.put.iter().map(|it| it.id.0));
            touched.extend(ch.del.iter().map(|id| id.0));
        };
        let limit = 1 + rnd(700) as usize;
        let mut after = None;
        let mut seen = Vec::new();
        loop {
            let (page, next) = s.items_page(after, limit);
            assert!(page.len() <= limit);
            for it in page {
                assert!(
                    seen.last().is_none_or(|&(id, _)| id < it.id.0),
                    "round {round}: id {} out of order",
                    it.id
                );
                seen.push((it.id.0, it));
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
            // Changes between pages.
            for _ in 0..rnd(4) {
                match rnd(7) {
                    0 => {
                        let k = 1 + rnd(300);
                        touch(&s.produce(new_items(&mut rnd, k)).1);
                    }
                    1 => touch(&s.lease(rnd(200) as usize, T0.add(SEC * 50)).1),
                    2 | 3 => {
                        let l: Vec<ItemId> = s
                            .all_items()
                            .into_iter()
                            .filter(|it| it.is_leased && rnd(2) == 0)
                            .map(|it| it.id)
                            .collect();
                        let ops: Vec<RetryOp> = l
                            .iter()
                            .map(|&id| RetryOp {
                                id,
                                action: match rnd(4) {
                                    0 => RetryAction::Dead,
                                    1 => RetryAction::Schedule(T0.add(SEC * 30)),
                                    _ => RetryAction::Requeue,
                                },
                            })
                            .collect();
                        if rnd(2) == 0 {
                            touch(&s.complete(vec![l]).1);
                        } else {
                            touch(&s.retry(vec![ops], DLQ).1);
                        }
                    }
                    4 => {
                        let ids: Vec<ItemId> = s
                            .all_items()
                            .into_iter()
                            .filter(|_| rnd(10) == 0)
                            .map(|it| it.id)
                            .collect();
                        touch(&s.delete(ids));
                    }
                    5 => touch(&s.lifecycle(T0.add(SEC * (rnd(120) as u32)), DLQ, 500).1),
                    _ => {}
                }
            }
        }
        let got: BTreeMap<u64, lessor_core::types::Item> = seen.into_iter().collect();
        for (id, it) in &start {
            if touched.contains(id) {
                continue;
            }
            assert_eq!(
                got.get(id),
                Some(it),
                "round {round} (page size {limit}): item {id}, untouched since the first page, not copied as it was"
            );
        }
    }
}

/// A first destroy of q/0 waits for the partition's lock to log the destruction; meanwhile q/0 is opened again (a
/// new pid) and destroyed again, and that second destroy is acknowledged. A crash then, before the first
/// destruction is logged: replay found the first pid live and the second destroyed (its name forgotten), and served
/// the first one's items again. The last pid of a name decides: it was destroyed, so the name is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destroy_of_a_recreated_partition_stays_destroyed_after_a_crash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, old, release) = store_with_held_partition(dir.path()).await;
    drop(old);
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.destroy("q", 0).await.expect("first destroy") })
    };
    let waited = std::time::Instant::now();
    while store.destroys_in_progress() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the first destroy never started"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let new = store.open("q", 0).await.expect("open again");
    new.produce(vec![item("new")]).await.expect("produce");
    drop(new);
    tokio::time::timeout(Duration::from_secs(5), store.destroy("q", 0))
        .await
        .expect("the second destroy answers")
        .expect("second destroy");
    // A crash right after the second destroy's answer.
    let crashed = tempfile::tempdir().expect("temp dir");
    copy_dir(&dir.path().join(LOG_DIR), &crashed.path().join(LOG_DIR));
    drop(release);
    first.await.expect("first destroy task");
    let s = open(crashed.path());
    let p = s.open("q", 0).await.expect("open");
    let c = p.counts().await.expect("counts");
    assert_eq!(
        c.ready, 0,
        "acknowledged destroy undone: {} items of the older incarnation are back",
        c.ready
    );
    drop(p);
    // The restart logged the first pid's destruction: it stays gone in the run after.
    let s = reopen(s, crashed.path()).await;
    let p = s.open("q", 0).await.expect("open");
    assert_eq!(p.counts().await.expect("counts").ready, 0);
    drop(p);
    s.close().await;
    store.close().await;
}

/// An fsync fails (here: an injected failure, held until the test lets it fail) while a checkpoint rotates the
/// segment. On Linux the rotation's own fsync of the same file then succeeds over the pages the failure dropped;
/// it raised `synced` over every record written, and a produce waiting in the fsync thread's next group, whose
/// record the failed fsync should have covered, was answered durable from `synced` before the poison was looked at.
/// fsyncs now run one at a time, none once the log is poisoned, and the poison is checked first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_write_is_answered_durable_after_a_failed_fsync() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(open(dir.path()));
    let p = store.open("f", 0).await.expect("open");
    let (entered, release) = store.fail_next_fsync_for_tests();
    let mut a = Box::pin(p.produce(vec![item("a")]));
    assert!(!poll_once(a.as_mut()), "a produce answered before its fsync");
    tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)))
        .await
        .expect("join")
        .expect("the fsync thread took the first produce");
    // Queued behind the failing fsync: its record is in the file that fsync should have made durable.
    let mut b = Box::pin(p.produce(vec![item("b")]));
    assert!(!poll_once(b.as_mut()), "a produce answered before its fsync");
    let segments = store.segments();
    let checkpoint = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.checkpoint_now())
    };
    // The rotation either runs now (as it did) or waits for the failing fsync.
    let waited = std::time::Instant::now();
    while store.segments() == segments && waited.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(release);
    let e = a.await.expect_err("the first produce's fsync failed");
    assert_eq!(e.kind, lessor_core::error::StorageErrorKind::Poisoned, "{e}");
    let b = b.await;
    assert!(
        b.is_err(),
        "a produce was answered durable after the fsync that should have covered it failed"
    );
    checkpoint
        .await
        .expect("join")
        .expect_err("the checkpoint cannot be made durable");
    drop(p);
    store.close().await;
}
