//! What the log store's test files share (`log_restart.rs`, `log_review.rs`, `log_review2.rs`): a plain item, opening and reopening
//! a store, and the log's segment files.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::fjall::Durability;
use lessor_storage::log::{LogStore, LOG_DIR};

pub const T0: Ts = Ts(1_800_000_000_000_000);
pub const SEC: Duration = Duration::from_secs(1);

/// A ready item expiring in an hour, its payload and reference made of `payload`.
pub fn item(payload: &str) -> NewItem {
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

/// The log store under `dir`, durability `sync`.
pub fn open(dir: &Path) -> LogStore {
    LogStore::open(dir, Durability::Sync).expect("open log store")
}

/// Closes `store` and opens the directory again (a clean restart).
pub async fn reopen(store: LogStore, dir: &Path) -> LogStore {
    store.close().await;
    drop(store);
    open(dir)
}

/// The log's segment files under the storage-dir `dir`, oldest first.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join(LOG_DIR))
        .expect("log dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Copies the files of `from` into `to` (a crash's image of a log directory).
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// Polls `f` once (it runs up to its first wait); whether it finished.
pub fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx).is_ready()
}

/// A log store under `dir` whose partition `q`/0 holds 50 items, and that partition's lock held on a thread of its
/// own until the returned sender is dropped (tests of what waits behind it: destroys, opens).
pub async fn store_with_held_partition(
    dir: &Path,
) -> (Arc<LogStore>, Arc<dyn Partition>, std::sync::mpsc::Sender<()>) {
    let store = Arc::new(open(dir));
    let old = store.open("q", 0).await.expect("open");
    let batch: Vec<NewItem> = (0..50).map(|i| item(&format!("old-{i}"))).collect();
    old.produce(batch).await.expect("produce");
    let release = store.hold_partition_for_tests("q", 0).expect("held");
    (store, old, release)
}
