//! Review of the log store's state records (R_STATES: a lease or an extension logs metadata only, laid over the
//! item's whole record at replay): restarts, checkpoints (whole, cut, and fuzzy ones taken while leases and
//! extensions go on) and crash images must bring back every item with its payload and its last state.
#![cfg(feature = "fjall")]

use std::sync::Arc;

use bytes::Bytes;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use lessor_core::types::{Item, ItemId, NewItem};
use lessor_storage::log::LogStore;
use lessor_testkit::rng::Rng;

#[path = "support/log.rs"]
mod support;

use support::{copy_dir, item, open, reopen, SEC, T0};

/// Everything the partition holds: ready and leased, scheduled, dead.
async fn everything(p: &dyn Partition) -> (Vec<Item>, Vec<Item>, Vec<Item>) {
    (
        p.list(None, 1_000_000, false).await.expect("list"),
        p.list(None, 1_000_000, true).await.expect("list scheduled"),
        p.dead_items(1_000_000).await.expect("dead"),
    )
}

/// [`everything`] of partition 0 of queue `q` in the log store under `dir` (a crash image), which is closed after.
async fn everything_in(dir: &std::path::Path, q: &str) -> (Vec<Item>, Vec<Item>, Vec<Item>) {
    let store = open(dir);
    let p = store.open(q, 0).await.expect("open image");
    let all = everything(&*p).await;
    drop(p);
    store.close().await;
    all
}

/// Restarts `store` cleanly and checks that partition 0 of `q` comes back holding what `p` held; returns the
/// store and the partition again.
async fn restarted_unchanged(
    store: LogStore,
    p: Arc<dyn Partition>,
    dir: &std::path::Path,
    q: &str,
) -> (LogStore, Arc<dyn Partition>) {
    let before = everything(&*p).await;
    drop(p);
    let store = reopen(store, dir).await;
    let p = store.open(q, 0).await.expect("open");
    assert_eq!(everything(&*p).await, before, "queue {q} after a restart");
    (store, p)
}

/// A number below `n` (0 when `n` is 0).
fn below(r: &mut Rng, n: u64) -> u64 {
    r.next_u64() % n.max(1)
}

fn payload(r: &mut Rng, i: u64) -> Bytes {
    match below(r, 4) {
        0 => Bytes::new(),
        1 => Bytes::from(format!("p{i}")),
        2 => Bytes::from(vec![(i % 251) as u8; 1500 + below(r, 600) as usize]),
        _ => Bytes::from(vec![b'x'; below(r, 200) as usize]),
    }
}

fn new_items(r: &mut Rng, n: usize, base: u64) -> Vec<NewItem> {
    (0..n as u64)
        .map(|i| NewItem {
            payload: payload(r, base + i),
            ..item(&format!("n{}", base + i))
        })
        .collect()
}

/// Random produces, leases, extensions, completes, retries, lifecycle passes and deletes, with restarts,
/// checkpoints and checkpoints cut by a crash in between: after every restart the partition holds exactly what it
/// held before, payloads and lease states included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_survive_restarts_and_checkpoints() {
    for seed in 1..=6u64 {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open(dir.path());
        let mut p = store.open("q", 0).await.expect("open");
        let mut r = Rng::new(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x1234_5678_9abc));
        let mut now = T0;
        let policy = LifecyclePolicy {
            max_attempts: 3,
            has_dead_queue: true,
            ..Default::default()
        };
        let mut base = 0;
        for step in 0..120 {
            let leased: Vec<ItemId> = p
                .list(None, 1_000_000, false)
                .await
                .expect("list")
                .into_iter()
                .filter(|it| it.is_leased)
                .map(|it| it.id)
                .collect();
            match below(&mut r, 10) {
                0 | 1 => {
                    let n = 1 + below(&mut r, 20) as usize;
                    p.produce(new_items(&mut r, n, base)).await.expect("produce");
                    base += n as u64;
                }
                2 | 3 => {
                    p.lease(
                        1 + below(&mut r, 10) as usize,
                        now.add(SEC * (5 + below(&mut r, 30) as u32)),
                    )
                    .await
                    .expect("lease");
                }
                4 => {
                    if !leased.is_empty() {
                        let k = 1 + below(&mut r, leased.len() as u64) as usize;
                        let ids: Vec<ItemId> = leased.iter().take(k).copied().collect();
                        let d = now.add(SEC * (10 + below(&mut r, 60) as u32));
                        p.extend(vec![(ids.clone(), d), (ids, d.add(SEC))])
                            .await
                            .expect("extend");
                    }
                }
                5 => {
                    if let Some(&id) = leased.get(below(&mut r, leased.len().max(1) as u64) as usize) {
                        p.complete(vec![vec![id]]).await.expect("complete");
                    }
                }
                6 => {
                    if let Some(&id) = leased.get(below(&mut r, leased.len().max(1) as u64) as usize) {
                        let action = match below(&mut r, 3) {
                            0 => RetryAction::Requeue,
                            1 => RetryAction::Schedule(now.add(SEC * 3)),
                            _ => RetryAction::Dead,
                        };
                        p.retry(vec![vec![RetryOp { id, action }]], policy)
                            .await
                            .expect("retry");
                    }
                }
                7 => {
                    now = now.add(SEC * (1 + below(&mut r, 20) as u32));
                    p.lifecycle(now, policy, 1000).await.expect("lifecycle");
                }
                8 => {
                    let all = p.list(None, 1_000_000, false).await.expect("list");
                    if let Some(it) = all.get(below(&mut r, all.len().max(1) as u64) as usize) {
                        p.delete(vec![it.id]).await.expect("delete");
                    }
                }
                _ => match below(&mut r, 3) {
                    0 => store.checkpoint_now().expect("checkpoint"),
                    1 => store.checkpoint_cut_for_tests().expect("cut checkpoint"),
                    _ => {}
                },
            }
            if step % 15 == 14 {
                let before = everything(&*p).await;
                // A crash image as well as a clean restart.
                let image = tempfile::tempdir().expect("temp dir");
                copy_dir(
                    &dir.path().join(lessor_storage::log::LOG_DIR),
                    &image.path().join(lessor_storage::log::LOG_DIR),
                );
                assert_eq!(
                    everything_in(image.path(), "q").await,
                    before,
                    "seed {seed} step {step}: crash image"
                );
                drop(p);
                store = reopen(store, dir.path()).await;
                p = store.open("q", 0).await.expect("open");
                assert_eq!(everything(&*p).await, before, "seed {seed} step {step}: restart");
            }
        }
        drop(p);
        store.close().await;
    }
}

/// Checkpoints taken page by page while leases and extensions of the items being copied go on (more items than a
/// page, so leases land between pages, before and after each item's own page): a restart brings back every item
/// with its payload and its last lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzy_checkpoints_under_leases_and_extensions_keep_payloads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(open(dir.path()));
    let p = store.open("fz", 0).await.expect("open");
    let n = 12_000u64;
    let batch: Vec<NewItem> = (0..n)
        .map(|i| NewItem {
            payload: if i % 5 == 0 {
                Bytes::new()
            } else {
                Bytes::from(format!("payload-{i}-{}", "y".repeat((i % 40) as usize)))
            },
            ..item(&format!("f{i}"))
        })
        .collect();
    for chunk in batch.chunks(3000) {
        p.produce(chunk.to_vec()).await.expect("produce");
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ck = {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || k < 2 {
                store.checkpoint_now().expect("checkpoint");
                k += 1;
            }
            k
        })
    };
    let mut round = 0u32;
    let mut leased_all = Vec::new();
    while leased_all.len() < n as usize {
        let got = p.lease(700, T0.add(SEC * (100 + round))).await.expect("lease");
        if got.is_empty() {
            break;
        }
        let ids: Vec<ItemId> = got.iter().map(|it| it.id).collect();
        p.extend(vec![(ids.clone(), T0.add(SEC * (1000 + round)))])
            .await
            .expect("extend");
        leased_all.extend(ids);
        round += 1;
        tokio::task::yield_now().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let checkpoints = tokio::task::spawn_blocking(move || ck.join().expect("checkpoint thread"))
        .await
        .expect("join");
    assert!(checkpoints >= 2);
    let before = everything(&*p).await;
    assert_eq!(before.0.len(), n as usize);
    drop(p);
    let store = Arc::into_inner(store).expect("one owner");
    let store = reopen(store, dir.path()).await;
    let p = store.open("fz", 0).await.expect("open");
    let after = everything(&*p).await;
    assert_eq!(after.0.len(), before.0.len(), "no item lost or brought back");
    for (a, b) in after.0.iter().zip(&before.0) {
        assert_eq!(a, b, "item {} after the restart", b.id);
    }
    drop(p);
    store.close().await;
}

/// A lease of an item whose payload is empty, then a restart and a checkpoint: the item keeps its empty payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_payloads_survive_state_records() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("e", 0).await.expect("open");
    p.produce(vec![
        NewItem {
            payload: Bytes::new(),
            ..item("a")
        },
        NewItem {
            payload: Bytes::new(),
            reference: String::new(),
            kind: String::new(),
            encoding: String::new(),
            ..item("b")
        },
    ])
    .await
    .expect("produce");
    let got = p.lease(2, T0.add(SEC * 10)).await.expect("lease");
    assert_eq!(got.len(), 2);
    p.extend(vec![(vec![got[1].id], T0.add(SEC * 20))])
        .await
        .expect("extend");
    let (store, p) = restarted_unchanged(store, p, dir.path(), "e").await;
    store.checkpoint_now().expect("checkpoint");
    p.extend(vec![(vec![got[0].id], T0.add(SEC * 30))])
        .await
        .expect("extend");
    let (store, p) = restarted_unchanged(store, p, dir.path(), "e").await;
    drop(p);
    store.close().await;
}

/// A crash that stopped a checkpoint's deletion of the older segments half way (oldest first): the segments left
/// hold state records of items whose whole records were in the deleted ones, and a checkpoint cut by the test
/// before them. Replay brings back exactly what the store held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_stopped_half_way_leaves_state_records_without_their_items() {
    use lessor_storage::log::LOG_DIR;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("hw", 0).await.expect("open");
    let mut r = Rng::new(77);
    p.produce(new_items(&mut r, 40, 0)).await.expect("produce");
    let a = p.lease(10, T0.add(SEC * 10)).await.expect("lease");
    store.checkpoint_now().expect("checkpoint 1");
    let ids: Vec<ItemId> = a.iter().map(|it| it.id).collect();
    p.extend(vec![(ids.clone(), T0.add(SEC * 20))])
        .await
        .expect("extend");
    p.produce(new_items(&mut r, 10, 100)).await.expect("produce");
    store.checkpoint_cut_for_tests().expect("cut");
    let b = p.lease(15, T0.add(SEC * 30)).await.expect("lease");
    p.extend(vec![(b.iter().map(|it| it.id).collect(), T0.add(SEC * 40))])
        .await
        .expect("extend");
    p.complete(vec![vec![ids[0]]]).await.expect("complete");
    // The segments as they are just before the next checkpoint.
    let pre = tempfile::tempdir().expect("temp dir");
    copy_dir(&dir.path().join(LOG_DIR), pre.path());
    let old = support::segment_files(dir.path());
    assert!(old.len() >= 2, "segments: {old:?}");
    store.checkpoint_now().expect("checkpoint 2");
    let c = p.lease(5, T0.add(SEC * 50)).await.expect("lease");
    p.extend(vec![(c.iter().map(|it| it.id).collect(), T0.add(SEC * 60))])
        .await
        .expect("extend");
    let expected = everything(&*p).await;
    // For each point where the deletion may have stopped: the older segments from there on, then the rest.
    for keep in 1..old.len() {
        let image = tempfile::tempdir().expect("temp dir");
        copy_dir(&dir.path().join(LOG_DIR), &image.path().join(LOG_DIR));
        for f in &old[keep..] {
            let name = f.file_name().expect("name");
            std::fs::copy(pre.path().join(name), image.path().join(LOG_DIR).join(name)).expect("copy");
        }
        assert_eq!(
            everything_in(image.path(), "hw").await,
            expected,
            "deletion stopped before segment {keep}"
        );
    }
    drop(p);
    store.close().await;
}

/// Review of `import_moved` on a store with a memory budget: a move is taken while the store is not over its
/// budget (even one that takes it past), refused as `Full` once it is over, and a plain import is refused as
/// before; moved items are logged whole (a restart brings them back with their payloads and states).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_pass_a_full_budget_once_and_are_logged_whole() {
    use lessor_core::error::StorageErrorKind;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = LogStore::open_with(dir.path(), lessor_storage::fjall::Durability::Sync, Some(2 << 20))
        .expect("open");
    let p = store.open("mv", 0).await.expect("open");
    let big = |tag: &str| NewItem {
        payload: Bytes::from(vec![b'b'; 100_000]),
        ..item(tag)
    };
    let mut i = 0;
    loop {
        match p.produce(vec![big(&format!("b{i}"))]).await {
            Ok(_) => i += 1,
            Err(e) => {
                assert_eq!(e.kind, StorageErrorKind::Full, "{e}");
                break;
            }
        }
    }
    let (used, max) = store.memory().expect("a budget");
    assert!(used <= max, "{used} of {max}");
    let moved: Vec<Item> = (0..5)
        .map(|k| Item {
            payload: Bytes::from(vec![b'm'; 100_000 + k]),
            source_id: format!("moved-{k}"),
            attempts: 2,
            priority: 3,
            ..Default::default()
        })
        .collect();
    let stored = p
        .import_moved(moved.clone())
        .await
        .expect("a move passes a full budget");
    assert_eq!(stored.len(), 5);
    let (used, max) = store.memory().expect("a budget");
    assert!(used > max, "over its budget now: {used} of {max}");
    let e = p
        .import_moved(vec![Item {
            payload: Bytes::from_static(b"x"),
            source_id: "moved-late".into(),
            ..Default::default()
        }])
        .await
        .expect_err("over its budget");
    assert_eq!(e.kind, StorageErrorKind::Full, "{e}");
    let e = p.import(vec![Item::default()]).await.expect_err("a plain import");
    assert_eq!(e.kind, StorageErrorKind::Full, "{e}");
    // A lease of the moved items (state records over their imported whole records), then a restart.
    p.lease(1000, T0.add(SEC * 60)).await.expect("lease");
    let (store, p) = restarted_unchanged(store, p, dir.path(), "mv").await;
    let after = everything(&*p).await;
    for m in &moved {
        let back = after
            .0
            .iter()
            .find(|it| it.source_id == m.source_id)
            .expect("moved item");
        assert_eq!(back.payload, m.payload);
        assert!(back.is_leased);
    }
    drop(p);
    store.close().await;
}
