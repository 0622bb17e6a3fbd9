//! Review tests of the log store: what an acknowledged write promises across checkpoints, crashes and restarts.
#![cfg(feature = "fjall")]

use std::fs;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::storage::PartitionStore;
use lessor_core::time::Ts;
use lessor_core::types::{DedupRecord, ItemId, NewItem};
use lessor_storage::fjall::Durability;
use lessor_storage::log::{LogStore, LOG_DIR};

#[path = "support/log.rs"]
mod support;

use support::{copy_dir, item, open, poll_once, reopen, segment_files, store_with_held_partition, SEC, T0};

fn rec(key: &str, until: Ts) -> DedupRecord {
    DedupRecord {
        dedup_id: key.into(),
        id: ItemId(0),
        until,
    }
}

/// An import's dedup records are one group under one fresh id; a checkpoint writes each record as a group named
/// `(until, id)`, so records of the import that share `until` share the name, and replay keeps only the last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_dedup_records_survive_a_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("imp", 0).await.expect("open");
    let until = T0.add(SEC * 300);
    p.import_dedup(vec![rec("a", until), rec("b", until), rec("c", until)])
        .await
        .expect("import dedup");
    let keys = |recs: Vec<DedupRecord>| {
        let mut k: Vec<String> = recs.into_iter().map(|r| r.dedup_id).collect();
        k.sort();
        k
    };
    assert_eq!(keys(p.dedup_records(T0).await.expect("records")), ["a", "b", "c"]);
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("imp", 0).await.expect("open");
    assert_eq!(
        keys(p.dedup_records(T0).await.expect("records")),
        ["a", "b", "c"],
        "a restart without a checkpoint keeps the import"
    );
    store.checkpoint_now().expect("checkpoint");
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("imp", 0).await.expect("open");
    assert_eq!(
        keys(p.dedup_records(T0).await.expect("records")),
        ["a", "b", "c"],
        "an acknowledged import_dedup lost records through a checkpoint"
    );
    store.close().await;
}

/// A crash can leave a file longer than what reached it, the rest reading as zeros (the size was written, the
/// data blocks were not). A zero header is length 0 with CRC 0, which is the CRC of an empty body: the frame
/// "passes", and replaying an empty body fails, so the store refuses to open after an ordinary crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_filled_tail_is_cut_off() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("zero", 0).await.expect("open");
    let ids = p.produce(vec![item("kept")]).await.expect("produce");
    drop(p);
    store.close().await;
    drop(store);
    let last = segment_files(dir.path()).pop().expect("a segment");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .expect("open segment");
    f.write_all(&[0u8; 4096]).expect("write");
    drop(f);
    let store =
        LogStore::open(dir.path(), Durability::Sync).expect("a zero-filled tail is a torn tail, cut off");
    let p = store.open("zero", 0).await.expect("open");
    let live = p.list(None, 10, false).await.expect("list");
    assert_eq!(live.iter().map(|i| i.id).collect::<Vec<_>>(), ids);
    store.close().await;
}

/// `destroy` takes the partition out of the map and only then logs its destruction, under the partition's lock.
/// Meanwhile `open` of the same name creates a new partition (new pid) and acknowledges it and a produce to it. A
/// crash before the destruction is logged (the destroy was never acknowledged) leaves two live pids with one name;
/// the later one must be the partition. The window is held open by holding the old partition's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_created_while_its_old_self_is_destroyed_wins_after_a_crash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, old, release) = store_with_held_partition(dir.path()).await;
    let destroyed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = {
        let (store, destroyed) = (store.clone(), destroyed.clone());
        tokio::spawn(async move {
            store.destroy("q", 0).await.expect("destroy");
            destroyed.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    // The destroy takes the partition out of the map, then waits for its lock.
    let waited = std::time::Instant::now();
    loop {
        // (Not a read of it: the old partition's lock is held.)
        let new = store.open("q", 0).await.expect("open");
        if !Arc::ptr_eq(&new, &old) {
            drop(new);
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the destroy never took the partition out"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let new = store.open("q", 0).await.expect("open the new partition");
    let ids = new.produce(vec![item("new")]).await.expect("produce");
    // A crash now: the destroy is not acknowledged, the new partition and its item are.
    let crashed = tempfile::tempdir().expect("temp dir");
    copy_dir(&dir.path().join(LOG_DIR), &crashed.path().join("snap"));
    assert!(
        !destroyed.load(std::sync::atomic::Ordering::SeqCst),
        "the destroy waited for the lock"
    );
    drop(release);
    d.await.expect("destroy task");
    for attempt in 0..8 {
        let run = crashed.path().join(format!("run-{attempt}"));
        copy_dir(&crashed.path().join("snap"), &run.join(LOG_DIR));
        let s = open(&run);
        let p = s.open("q", 0).await.expect("open");
        let live = p.list(None, 100, false).await.expect("list");
        assert_eq!(
            live.iter().map(|i| i.id).collect::<Vec<_>>(),
            ids,
            "attempt {attempt}: after the crash (q, 0) is the old, destroyed partition, not the acknowledged new one"
        );
        drop(p);
        s.close().await;
    }
    drop((new, old));
    store.close().await;
}

/// A call that finds its work already done (logged by a concurrent caller, not yet fsynced) writes nothing and
/// answers at once, in `sync`, before the record it relies on is durable: a crash then undoes an acknowledged
/// destroy (`destroy` of a name no longer in the map returns `Ok` without waiting for the first caller's
/// `R_DESTROY`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_destroy_is_answered_only_once_the_destruction_is_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let mut early = Vec::new();
    let mut raced = 0;
    for round in 0..20 {
        let p = store.open("d", round).await.expect("open");
        p.produce(vec![item("x")]).await.expect("produce");
        drop(p);
        let before = store.fsyncs();
        let mut first = Box::pin(store.destroy("d", round));
        if poll_once(first.as_mut()) {
            // The fsync thread covered the record before the first poll ended (a busy machine can stall this
            // thread that long): durable already, so nothing can be acknowledged early in this round.
            continue;
        }
        raced += 1;
        store.destroy("d", round).await.expect("second destroy");
        if store.fsyncs() == before {
            early.push(round);
        }
        first.await.expect("first destroy");
    }
    assert!(
        raced >= 10,
        "only {raced} of 20 rounds had the first destroy still waiting"
    );
    assert!(
        early.is_empty(),
        "rounds {early:?}: the second destroy was acknowledged before any fsync covered the R_DESTROY"
    );
    store.close().await;
}

/// The same with a produce that a source id makes a repeat: it returns the first call's id, logs nothing and
/// answers before that call's record is durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_produce_is_answered_only_once_the_first_is_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("s", 0).await.expect("open");
    let mut early = Vec::new();
    let mut raced = 0;
    for round in 0..20 {
        let mut it = item("x");
        it.source_id = format!("src-{round}");
        let before = store.fsyncs();
        let mut first = Box::pin(p.produce(vec![it.clone()]));
        if poll_once(first.as_mut()) {
            // Durable before the first poll ended (see the test above): no early answer possible this round.
            continue;
        }
        raced += 1;
        let again = p.produce(vec![it]).await.expect("repeat");
        if store.fsyncs() == before {
            early.push(round);
        }
        assert_eq!(first.await.expect("first produce"), again);
    }
    assert!(
        raced >= 10,
        "only {raced} of 20 rounds had the first produce still waiting"
    );
    assert!(
        early.is_empty(),
        "rounds {early:?}: the repeat was acknowledged before any fsync covered the first produce's record"
    );
    store.close().await;
}

/// Items of 256 KiB, sharing one buffer in RAM.
fn big_items(n: usize, tag: &str) -> Vec<NewItem> {
    let payload = Bytes::from(vec![b'p'; 256 << 10]);
    (0..n)
        .map(|i| NewItem {
            payload: payload.clone(),
            ..item(&format!("{tag}-{i}"))
        })
        .collect()
}

/// A checkpoint writes a partition's items 4096 to a record, whatever their size: 4096 items of 256 KiB make a
/// record over the log's 1 GiB limit, so every checkpoint of such a partition fails (after writing its begin
/// record and whatever came before) and the log is never cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_large_items_succeeds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("big", 0).await.expect("open");
    for r in 0..66 {
        p.produce(big_items(64, &format!("r{r}"))).await.expect("produce");
    }
    assert_eq!(p.counts().await.expect("counts").ready, 66 * 64);
    let before = store.segments();
    store
        .checkpoint_now()
        .expect("a checkpoint of 4224 items of 256 KiB");
    // The checkpoint itself fills segments of 64 MiB; the produces' segments are gone.
    assert!(
        store.segments() < before,
        "{} segments, {before} before",
        store.segments()
    );
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("big", 0).await.expect("open");
    assert_eq!(p.counts().await.expect("counts").ready, 66 * 64);
    store.close().await;
}

/// A change set larger than one record may be (a lease of 4224 items of 256 KiB: over 1 GiB of whole items) is
/// logged as part records and a last one: the lease succeeds, and a restart finds every item leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_set_over_the_record_limit_is_logged_in_parts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("big", 0).await.expect("open");
    for r in 0..66 {
        p.produce(big_items(64, &format!("r{r}"))).await.expect("produce");
    }
    let leased = p.lease(66 * 64, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(leased.len(), 66 * 64);
    drop(leased);
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 66 * 64));
    drop(p);
    let store = reopen(store, dir.path()).await;
    let p = store.open("big", 0).await.expect("open");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 66 * 64), "every lease was logged");
    drop(p);
    store.close().await;
}

/// A read checks the poison before it takes the partition's lock: one that waits for the lock while a write fails
/// (here: the rotation after a 65 MiB produce cannot create the next segment, which is in the way) gets the lock
/// after the poison and serves the failed write's state from RAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_waiting_while_a_write_poisons_the_store_serves_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("poison", 0).await.expect("open");
    let last = segment_files(dir.path()).pop().expect("a segment");
    let id = u64::from_str_radix(last.file_stem().and_then(|s| s.to_str()).expect("name"), 16).expect("hex");
    fs::write(dir.path().join(LOG_DIR).join(format!("{:016x}.seg", id + 1)), b"")
        .expect("block the next segment");
    let writer = {
        let p = p.clone();
        tokio::spawn(async move { p.produce(big_items(260, "w")).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    let read = p.counts().await;
    let write = writer.await.expect("writer");
    let e = write.expect_err("the rotation fails");
    assert_eq!(e.kind, lessor_core::error::StorageErrorKind::Poisoned, "{e}");
    if let Ok(c) = read {
        assert_eq!(
            c.ready, 0,
            "a read answered after the store was poisoned, with the failed write's items"
        );
    }
    store.close().await;
}

/// A produce's dedup records are one group, dropped (by its first record's name) once all have ended. A checkpoint
/// writes every record as a group of its own; the group's later drop names only the first, so after a restart
/// the other records of the call, dropped before, are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_dedup_records_stay_dropped_after_a_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("grp", 0).await.expect("open");
    let mut batch = vec![item("a"), item("b"), item("c")];
    for (i, it) in batch.iter_mut().enumerate() {
        it.dedup_id = format!("key-{i}");
        it.dedup_until = T0.add(SEC * 10);
    }
    p.produce(batch).await.expect("produce");
    store.checkpoint_now().expect("checkpoint");
    let policy = lessor_core::storage::LifecyclePolicy::default();
    for _ in 0..3 {
        p.lifecycle(T0.add(SEC * 20), policy, 100)
            .await
            .expect("lifecycle");
    }
    let all = Ts(i64::MIN);
    assert!(
        p.dedup_records(all).await.expect("records").is_empty(),
        "the ended group was dropped"
    );
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
    store.close().await;
}

/// A checkpoint deletes the segments before it oldest first; a crash part way leaves the newer old segments, which
/// may start inside an older checkpoint (one that spanned a rotation) with its item or end records, whose begin
/// record was in a deleted segment. Replay calls that corruption and the store does not open again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_checkpoint_deletes_old_segments_leaves_a_log_that_opens() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    let p = store.open("del", 0).await.expect("open");
    for r in 0..5 {
        p.produce(big_items(60, &format!("r{r}"))).await.expect("produce");
    }
    // About 75 MiB: this checkpoint spans a rotation.
    store.checkpoint_now().expect("first checkpoint");
    let kept = segment_files(dir.path());
    assert!(kept.len() >= 2, "{kept:?}");
    let backup = tempfile::tempdir().expect("temp dir");
    for f in &kept {
        fs::copy(f, backup.path().join(f.file_name().expect("name"))).expect("backup");
    }
    store.checkpoint_now().expect("second checkpoint");
    let counts = p.counts().await.expect("counts");
    drop(p);
    store.close().await;
    drop(store);
    // The crash: the second checkpoint is durable and deleted only the oldest of the segments before it.
    for f in &kept[1..] {
        fs::copy(backup.path().join(f.file_name().expect("name")), f).expect("restore");
    }
    let store = LogStore::open(dir.path(), Durability::Sync).expect("the log opens after the crash");
    let p = store.open("del", 0).await.expect("open");
    assert_eq!(p.counts().await.expect("counts"), counts);
    store.close().await;
}

/// A first destroy has taken the partition out of the map and waits for its lock (held here) to log the
/// destruction; a second destroy of the name must not answer before that record is durable: it waits for the same
/// record, and once it has answered, a crash leaves the partition destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destroy_answered_while_another_waits_to_log_it_stays_destroyed_after_a_crash() {
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
    let second = {
        let store = store.clone();
        tokio::spawn(async move { store.destroy("q", 0).await.expect("second destroy") })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "the second destroy answered before the destruction was logged"
    );
    drop(release);
    second.await.expect("second destroy task");
    // A crash right after the second destroy's answer.
    let crashed = tempfile::tempdir().expect("temp dir");
    copy_dir(&dir.path().join(LOG_DIR), &crashed.path().join(LOG_DIR));
    first.await.expect("first destroy task");
    let s = open(crashed.path());
    let p = s.open("q", 0).await.expect("open");
    assert_eq!(
        p.counts().await.expect("counts").ready,
        0,
        "an acknowledged destroy undone by a crash: the partition is back"
    );
    drop(p);
    s.close().await;
    store.close().await;
}
