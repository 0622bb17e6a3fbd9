//! Failure rules of the fjall backend: a full disk fails the write with `NoSpace`, keeps every acknowledged item
//! readable and lets writes resume once space is back; a failed fsync poisons the store for good.
//!
//! The disk-full case runs twice: with an injected fault (always), and on a real, size-limited tmpfs (when the
//! test may mount one, as root on Linux; otherwise it says so and passes).
#![cfg(feature = "fjall")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::{ItemId, NewItem};
use lessor_storage::fjall::{Durability, Fault, FjallStore};

const T0: Ts = Ts(1_800_000_000_000_000);

fn item(payload: Bytes) -> NewItem {
    NewItem {
        expire_deadline: T0.add(Duration::from_secs(3600)),
        created_at: T0,
        payload,
        ..Default::default()
    }
}

fn text(s: &str) -> NewItem {
    item(Bytes::from(s.to_string()))
}

/// Incompressible bytes, so the journal's compression cannot hide how much is written.
fn noise(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Retries `produce` until it succeeds (writes resume after the reopen back-off), failing after `limit`.
async fn produce_until_ok(p: &dyn Partition, items: Vec<NewItem>, limit: Duration) -> Vec<ItemId> {
    let start = Instant::now();
    loop {
        match p.produce(items.clone()).await {
            Ok(ids) => return ids,
            Err(e) if start.elapsed() < limit => {
                assert!(
                    e.is_transient(),
                    "only transient errors while space comes back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("writes did not resume: {e}"),
        }
    }
}

fn payloads(items: &[lessor_core::types::Item]) -> Vec<Bytes> {
    items.iter().map(|i| i.payload.clone()).collect()
}

#[tokio::test]
async fn injected_disk_full_fails_the_write_keeps_reads_and_resumes() {
    disk_full_round(Durability::Sync).await;
}

/// The same on the multi-threaded runtime in the modes whose writes wait for no fsync, where a partition's write
/// finding the writer thread idle is written by the calling worker (`block_in_place`): the failure rules are the
/// same on that path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_disk_full_on_writes_made_by_the_caller() {
    disk_full_round(Durability::None).await;
    disk_full_round(Durability::Interval(Duration::from_millis(5))).await;
}

async fn disk_full_round(durability: Durability) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), durability).expect("open");
    let p = store.open("full", 0).await.expect("open");
    p.produce(vec![text("a"), text("b")]).await.expect("produce");
    let leased = p.lease(1, T0.add(Duration::from_secs(60))).await.expect("lease");

    store.inject_fault(Some(Fault::NoSpace));
    let e = p.produce(vec![text("lost")]).await.expect_err("disk full");
    assert_eq!(e.kind, StorageErrorKind::NoSpace, "{e}");
    assert!(e.is_transient());
    assert!(e.message.contains("disk full"), "{}", e.message);
    let e = p
        .complete(vec![vec![leased[0].id]])
        .await
        .expect_err("still full");
    assert_eq!(e.kind, StorageErrorKind::NoSpace);
    // Reads keep working and show only what was acknowledged.
    let c = p.counts().await.expect("counts while full");
    assert_eq!((c.ready, c.leased), (1, 1));
    let live = p.list(None, 10, false).await.expect("list while full");
    assert_eq!(payloads(&live), vec![Bytes::from("a"), Bytes::from("b")]);
    // Another partition of the same store is refused too, without losing its items.
    let other = store.open("full", 1).await.expect("open another partition");
    assert_eq!(
        other.produce(vec![text("x")]).await.expect_err("full").kind,
        StorageErrorKind::NoSpace
    );

    store.inject_fault(None);
    produce_until_ok(p.as_ref(), vec![text("c")], Duration::from_secs(10)).await;
    assert_eq!(
        p.complete(vec![vec![leased[0].id]]).await.expect("complete")[0],
        Ok(())
    );
    other.produce(vec![text("y")]).await.expect("produce");
    p.close().await;
    other.close().await;
    store.close().await;
    drop((p, other, store));

    let store = FjallStore::open(dir.path(), durability).expect("reopen");
    let p = store.open("full", 0).await.expect("open");
    let live = p.list(None, 10, false).await.expect("list");
    assert_eq!(
        payloads(&live),
        vec![Bytes::from("b"), Bytes::from("c")],
        "nothing lost, nothing invented"
    );
    let other = store.open("full", 1).await.expect("open");
    assert_eq!(
        payloads(&other.list(None, 10, false).await.expect("list")),
        vec![Bytes::from("y")]
    );
}

#[tokio::test]
async fn a_failed_fsync_poisons_the_store_for_good() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let p = store.open("poison", 0).await.expect("open");
    p.produce(vec![text("kept")]).await.expect("produce");
    store.inject_fault(Some(Fault::SyncFails));
    let e = p.produce(vec![text("unknown")]).await.expect_err("fsync fails");
    assert_eq!(e.kind, StorageErrorKind::Poisoned);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        let e: StorageError = p.produce(vec![text("refused")]).await.expect_err("poisoned");
        assert_eq!(e.kind, StorageErrorKind::Poisoned);
        assert!(
            e.message
                .contains("store refuses writes after a failed fsync; restart the server"),
            "{}",
            e.message
        );
    }
    let q = store.open("poison", 1).await.expect("open another partition");
    assert_eq!(
        q.produce(vec![text("x")]).await.expect_err("poisoned").kind,
        StorageErrorKind::Poisoned
    );
    // Reads still answer.
    assert!(p.counts().await.expect("counts").ready >= 1);
    store.close().await;
    drop((p, q, store));
    // A restart clears the poison; acknowledged data is there.
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("poison", 0).await.expect("open");
    let live = p.list(None, 10, false).await.expect("list");
    assert_eq!(live[0].payload, Bytes::from("kept"));
    p.produce(vec![text("after restart")])
        .await
        .expect("writes again");
}

/// Inside a queue task's deferred scope (see `lessor_core::durability`) a write returns once written and hands its
/// fsync to the pass: the pass's replies learn that it is durable, or that the fsync failed, and a write outside a
/// scope still waits for its own fsync.
#[tokio::test]
async fn a_deferred_write_reports_its_fsync_to_the_pass() {
    use lessor_core::durability::{self, Pass};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    let p = store.open("deferred", 0).await.expect("open");
    let pass = Pass::new();
    let gate = pass
        .scope(async {
            p.produce(vec![text("durable")]).await.expect("written");
            durability::gate().expect("in a scope")
        })
        .await;
    pass.finish();
    gate.wait().await.expect("durable");

    store.inject_fault(Some(Fault::SyncFails));
    let pass = Pass::new();
    let gate = pass
        .scope(async {
            p.produce(vec![text("unknown")])
                .await
                .expect("written: its fsync is the pass's to wait for");
            durability::gate().expect("in a scope")
        })
        .await;
    pass.finish();
    let e = gate.wait().await.expect_err("the fsync failed");
    assert_eq!(e.kind, StorageErrorKind::Poisoned, "{e}");
    // Poisoned: refused up front, in a scope or not.
    let pass = Pass::new();
    let e = pass
        .scope(p.produce(vec![text("refused")]))
        .await
        .expect_err("poisoned");
    assert_eq!(e.kind, StorageErrorKind::Poisoned);
    pass.finish();
    store.close().await;
    drop((p, store));
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("deferred", 0).await.expect("open");
    let live = p.list(None, 10, false).await.expect("list");
    assert_eq!(
        live[0].payload,
        Bytes::from("durable"),
        "the acknowledged write is there"
    );
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().to_path_buf();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .ok()?;
        status.success().then_some(Tmpfs { path, _dir: dir })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test]
async fn real_disk_full_on_a_small_tmpfs_fails_writes_keeps_data_and_resumes() {
    let Some(fs) = Tmpfs::mount("8m") else {
        lessor_testkit::skip_or_fail(
            "cannot mount a tmpfs here (needs root); the injected-fault test covers the rules",
        );
        return;
    };
    let storage = fs.path().join("data");
    let store = FjallStore::open(&storage, Durability::Sync).expect("open");
    let p = store.open("full", 0).await.expect("open");
    // Space to give back later.
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![1u8; 2 * 1024 * 1024]).expect("filler");

    let mut acked = Vec::new();
    let mut failure = None;
    for i in 0..2000u64 {
        let payload = noise(i, 32 * 1024);
        match p.produce(vec![item(payload.clone())]).await {
            Ok(_) => acked.push(payload),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let e = failure.expect("the disk fills up");
    assert_eq!(e.kind, StorageErrorKind::NoSpace, "{e}");
    assert!(!acked.is_empty());
    // Reads keep working, with every acknowledged item.
    let live = p.list(None, 10_000, false).await.expect("list on a full disk");
    assert_eq!(payloads(&live), acked);
    // The failed item is not there, and a write as large still finds no room.
    let e = p
        .produce(vec![item(noise(7, 256 * 1024))])
        .await
        .expect_err("still full");
    assert_eq!(e.kind, StorageErrorKind::NoSpace, "{e}");

    std::fs::remove_file(&filler).expect("free space");
    let resumed = noise(99_999, 1024);
    produce_until_ok(p.as_ref(), vec![item(resumed.clone())], Duration::from_secs(15)).await;
    acked.push(resumed);
    assert_eq!(payloads(&p.list(None, 10_000, false).await.expect("list")), acked);

    p.close().await;
    store.close().await;
    drop((p, store));
    let store = FjallStore::open(&storage, Durability::Sync).expect("reopen");
    let p = store.open("full", 0).await.expect("open");
    assert_eq!(
        payloads(&p.list(None, 10_000, false).await.expect("list")),
        acked,
        "every acknowledged item survives, none of the failed ones appear"
    );
    store.close().await;
}
