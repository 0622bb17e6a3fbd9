//! [`FjallStore`] and its partitions: items in memory, every change set written to one fjall keyspace per partition.
//!
//! A partition applies each call to its [`PartitionState`] and sends the resulting change set to the store's writer
//! thread, which collects whatever batches arrived meanwhile, from any partition, and writes them as one atomic
//! fjall batch followed by one fsync (group commit). The async runtime never waits on disk: it awaits a reply.
//!
//! When a write fails the partition's memory is already ahead of the disk, so the partition marks itself stale and
//! re-reads its items on its next call: memory never claims what the disk does not hold.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;

use async_trait::async_trait;
use bytes::Bytes;
use fjall::KeyspaceCreateOptions;
use lessor_core::error::{ItemError, StorageError};
use lessor_core::storage::{
    LifecycleOutcome, LifecyclePolicy, Partition, PartitionStore, RetryOp, RetryOutcome,
};
use lessor_core::time::{Clock, SystemClock, Ts};
use lessor_core::types::{ClearRequest, Item, ItemId, NewItem, PartitionCounts, PartitionStats};
use tokio::sync::oneshot;

use super::codec::{decode_meta, encode_meta, meta_key, parse_key, payload_key, Key};
use super::engine::{Engine, Fault, Unit};
use super::{keyspace_name, Durability, PARTITIONS_DIR};
use crate::state::{Changes, PartitionState};

/// Bookkeeping key of a partition keyspace: the highest id ever written, so ids keep growing across restarts even
/// when the items that carried the highest ids are gone. Item keys are 8 bytes; this one is not.
const HWM_KEY: &[u8] = b"hwm";
/// Most batches one group commit takes.
const MAX_GROUP: usize = 1024;

fn keyspace_options() -> KeyspaceCreateOptions {
    // Queue items are mostly deleted soon after they are written: a roomy memtable lets many of them die before
    // they are flushed, which cut flush and compaction work enough to raise the drain rate from 99k to 126k items/s.
    // Memory stays bounded by the journal limit (see `Engine::open_db`: reaching it makes fjall flush the memtables
    // that pin the oldest journal), not by this size times the partition count.
    KeyspaceCreateOptions::default().max_memtable_size(64 * 1024 * 1024)
}

/// A job for the writer thread.
struct Job {
    unit: Unit,
    reply: oneshot::Sender<Result<(), StorageError>>,
}

/// What the store and its partitions share.
struct Shared {
    engine: Arc<Engine>,
    storage_dir: PathBuf,
    /// The writer thread's inbox; `None` once the store is closed.
    tx: RwLock<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Open partitions by keyspace name, so a second open of a live partition shares its state.
    open: Mutex<HashMap<String, Weak<FjallPartition>>>,
    /// Opens in progress by keyspace name, so two concurrent opens of one partition load it once.
    opening: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Shared {
    /// Sends one change set to the writer thread and waits for it to be written.
    async fn submit(&self, unit: Unit) -> Result<(), StorageError> {
        let (reply, rx) = oneshot::channel();
        {
            let tx = self.tx.read().unwrap_or_else(|e| e.into_inner());
            let Some(tx) = tx.as_ref() else {
                return Err(self.closed());
            };
            tx.send(Job { unit, reply }).map_err(|_| self.closed())?;
        }
        rx.await.map_err(|_| self.closed())?
    }

    fn closed(&self) -> StorageError {
        StorageError::unavailable(format!(
            "the fjall partition store at '{}' is closed",
            self.engine.dir().display()
        ))
    }

    /// Refuses a write up front when the engine is poisoned or cannot be reopened yet, so memory stays untouched.
    async fn check_writable(&self) -> Result<(), StorageError> {
        if !self.engine.needs_check() {
            return Ok(());
        }
        let engine = self.engine.clone();
        blocking(move || engine.check_writable()).await
    }

    /// Reads a partition's items from disk into a new state; also returns the stored id high-water mark.
    async fn load(&self, name: Arc<str>, create: bool) -> Result<(PartitionState, u64), StorageError> {
        let engine = self.engine.clone();
        blocking(move || {
            let floor = u64::try_from(SystemClock.now().0).unwrap_or(1);
            let Some(ks) = engine.keyspace(&name, create)? else {
                return Ok((PartitionState::new(floor), 0));
            };
            let what = format!("partition '{name}' in '{}'", engine.dir().display());
            let mut items = Vec::new();
            let mut hwm = 0u64;
            for kv in ks.iter() {
                let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
                match parse_key(&k) {
                    Key::Meta(id) => items.push(decode_meta(id, &v, &what)?),
                    // A payload sorts right after its item's metadata.
                    Key::Payload(id) => match items.last_mut() {
                        Some(it) if it.id == id => it.payload = Bytes::copy_from_slice(&v),
                        _ => {
                            tracing::warn!(partition = %name, item = %id, "payload without an item: ignored")
                        }
                    },
                    Key::Other if &*k == HWM_KEY => {
                        hwm = <[u8; 8]>::try_from(&*v).map(u64::from_be_bytes).unwrap_or(0);
                    }
                    // No other key is written; one that is there anyway carries nothing this build needs.
                    Key::Other => {}
                }
            }
            let state = PartitionState::load(items, floor.max(hwm.saturating_add(1)));
            Ok((state, hwm))
        })
        .await
    }
}

/// Runs blocking work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::other(format!("storage task failed: {e}")))?
}

/// The writer thread: takes every job waiting, writes them as one group, answers each.
fn writer_loop(engine: Arc<Engine>, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (units, replies): (Vec<Unit>, Vec<_>) = jobs.into_iter().map(|j| (j.unit, j.reply)).unzip();
        for (res, reply) in engine.commit_group(units).into_iter().zip(replies) {
            // The caller may have given up waiting; the write stands either way.
            let _ = reply.send(res);
        }
    }
}

/// Partitions in fjall: one database under `<storage-dir>/~partitions/`, one keyspace per partition.
pub struct FjallStore {
    shared: Arc<Shared>,
}

impl fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallStore")
            .field("storage_dir", &self.shared.storage_dir)
            .field("engine", &self.shared.engine)
            .finish()
    }
}

impl FjallStore {
    /// Opens (creating on first use) the partition store under `storage_dir`. Fails with `Locked` when another
    /// process uses the directory and with `Corrupt` when it holds an unknown format. Blocking: run it at start-up
    /// or in `spawn_blocking`.
    pub fn open(storage_dir: impl Into<PathBuf>, durability: Durability) -> Result<Self, StorageError> {
        let storage_dir = storage_dir.into();
        let engine = Engine::open(
            &storage_dir,
            PARTITIONS_DIR,
            "partitions",
            "partition store",
            durability,
            keyspace_options,
        )?;
        let (tx, rx) = mpsc::channel();
        let writer = {
            let engine = engine.clone();
            std::thread::Builder::new()
                .name("lessor-fjall-writer".into())
                .spawn(move || writer_loop(engine, rx))
                .map_err(|e| StorageError::other(format!("cannot start the fjall writer thread: {e}")))?
        };
        tracing::info!(
            storage_dir = %storage_dir.display(),
            engine = "fjall",
            %durability,
            "partition storage open"
        );
        Ok(FjallStore {
            shared: Arc::new(Shared {
                engine,
                storage_dir,
                tx: RwLock::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                open: Mutex::new(HashMap::new()),
                opening: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The configured storage-dir.
    pub fn storage_dir(&self) -> &Path {
        &self.shared.storage_dir
    }

    /// Injects (or with `None` clears) a failure, for tests of the failure rules.
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Option<Fault>) {
        self.shared.engine.inject(fault);
    }

    /// Journal fsyncs done since the store opened (group commit makes this far smaller than the writes).
    #[doc(hidden)]
    pub fn fsyncs(&self) -> u64 {
        self.shared.engine.fsyncs()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<FjallPartition>>> {
        self.shared.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gates(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.shared.opening.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns the live partition `name` or loads it; the caller holds the partition's open gate.
    async fn open_gated(
        &self,
        queue: &str,
        partition: u32,
        name: String,
    ) -> Result<Arc<dyn Partition>, StorageError> {
        let live = self.registry().get(&name).and_then(Weak::upgrade);
        if let Some(p) = live.filter(|p| !p.closed.load(Ordering::Acquire)) {
            return Ok(p);
        }
        let name: Arc<str> = name.into();
        let started = std::time::Instant::now();
        let (state, hwm) = self.shared.load(name.clone(), true).await?;
        tracing::debug!(
            queue,
            partition,
            items = state.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partition loaded"
        );
        let p = Arc::new(FjallPartition {
            name: name.clone(),
            shared: self.shared.clone(),
            inner: tokio::sync::Mutex::new(Inner {
                state,
                hwm,
                stale: false,
            }),
            closed: AtomicBool::new(false),
        });
        self.registry().insert(name.to_string(), Arc::downgrade(&p));
        Ok(p)
    }
}

#[async_trait]
impl PartitionStore for FjallStore {
    fn driver(&self) -> &'static str {
        "fjall"
    }

    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        let name = keyspace_name(queue, partition);
        let gate = self.gates().entry(name.clone()).or_default().clone();
        let loaded = {
            let _g = gate.lock().await;
            self.open_gated(queue, partition, name.clone()).await
        };
        let mut gates = self.gates();
        // Forget the gate unless another open is waiting on it (the map and this call hold the only references).
        if Arc::strong_count(&gate) == 2 {
            gates.remove(&name);
        }
        loaded
    }

    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        let name = keyspace_name(queue, partition);
        if let Some(p) = self.registry().remove(&name).and_then(|w| w.upgrade()) {
            p.closed.store(true, Ordering::Release);
        }
        let engine = self.shared.engine.clone();
        blocking(move || engine.drop_keyspace(&name)).await
    }

    async fn close(&self) {
        // Dropping the sender ends the writer thread once it has answered every job already sent.
        self.shared.tx.write().unwrap_or_else(|e| e.into_inner()).take();
        let writer = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let engine = self.shared.engine.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(w) = writer {
                let _ = w.join();
            }
            engine.close();
        })
        .await;
    }
}

/// A partition's state behind its lock.
struct Inner {
    state: PartitionState,
    /// Highest id written to disk (see [`HWM_KEY`]).
    hwm: u64,
    /// Memory may be ahead of the disk after a failed write: re-read before the next call.
    stale: bool,
}

/// One partition of a [`FjallStore`].
pub struct FjallPartition {
    name: Arc<str>,
    shared: Arc<Shared>,
    /// Only the owning queue task calls, one call at a time; an async lock because a write holds it while it waits
    /// for the disk.
    inner: tokio::sync::Mutex<Inner>,
    closed: AtomicBool,
}

impl fmt::Debug for FjallPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallPartition")
            .field("keyspace", &self.name)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl FjallPartition {
    /// Locks the state, re-reading it from disk first when a failed write left it stale.
    async fn lock(&self) -> Result<tokio::sync::MutexGuard<'_, Inner>, StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::unavailable(format!(
                "partition '{}' is closed",
                self.name
            )));
        }
        let mut g = self.inner.lock().await;
        if g.stale {
            let (state, hwm) = self.shared.load(self.name.clone(), false).await?;
            tracing::info!(partition = %self.name, items = state.len(), "partition re-read from disk after a failed write");
            g.state = state;
            g.hwm = hwm;
            g.stale = false;
        }
        Ok(g)
    }

    async fn read<T>(&self, op: impl FnOnce(&PartitionState) -> T) -> Result<T, StorageError> {
        let g = self.lock().await?;
        Ok(op(&g.state))
    }

    /// Applies `op` to the state and writes what it changed; on a failed write the state goes stale.
    async fn write<T>(
        &self,
        op: impl FnOnce(&mut PartitionState) -> (T, Changes),
    ) -> Result<T, StorageError> {
        let mut g = self.lock().await?;
        self.shared.check_writable().await?;
        let (out, ch) = op(&mut g.state);
        if ch.is_empty() {
            return Ok(out);
        }
        let (unit, top) = self.unit(&ch, g.hwm);
        match self.shared.submit(unit).await {
            Ok(()) => {
                g.hwm = top;
                Ok(out)
            }
            Err(e) => {
                g.stale = true;
                Err(e)
            }
        }
    }

    /// Encodes a change set with one operation per key, the final one: an id put and then removed within one call
    /// is removed, an id put twice keeps its last version, so a batch never holds two versions of a key. Ids above
    /// `hwm` are new and get their payload written; older ids only change their metadata (a payload never changes).
    fn unit(&self, ch: &Changes, hwm: u64) -> (Unit, u64) {
        let gone: HashSet<ItemId> = ch.del.iter().copied().collect();
        let mut seen = HashSet::with_capacity(ch.put.len());
        let mut puts = Vec::with_capacity(ch.put.len() + 1);
        let mut top = hwm;
        for it in ch.put.iter().rev() {
            top = top.max(it.id.0);
            if gone.contains(&it.id) || !seen.insert(it.id) {
                continue;
            }
            puts.push((meta_key(it.id), encode_meta(it)));
            if it.id.0 > hwm && !it.payload.is_empty() {
                puts.push((payload_key(it.id), it.payload.to_vec()));
            }
        }
        if top > hwm {
            puts.push((HWM_KEY.to_vec(), top.to_be_bytes().to_vec()));
        }
        let mut dels = Vec::with_capacity(gone.len() * 2);
        for id in gone {
            dels.push(meta_key(id));
            dels.push(payload_key(id));
        }
        (
            Unit {
                keyspace: self.name.clone(),
                puts,
                dels,
            },
            top,
        )
    }
}

#[async_trait]
impl Partition for FjallPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        self.write(|s| s.produce(items)).await
    }

    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        self.write(|s| s.lease(n, lease_deadline)).await
    }

    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        self.write(|s| s.complete(requests)).await
    }

    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        self.write(|s| s.retry(requests, policy)).await
    }

    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        self.write(|s| s.lifecycle(now, policy, limit)).await
    }

    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError> {
        self.read(|s| s.dead_items(limit)).await
    }

    async fn remove_dead(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        self.write(|s| ((), s.remove_dead(ids))).await
    }

    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        self.read(|s| s.next_deadline()).await
    }

    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        self.read(|s| s.counts()).await
    }

    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError> {
        self.read(|s| s.stats(now)).await
    }

    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        self.read(|s| s.list(pivot, limit, scheduled)).await
    }

    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.write(|s| s.import(items)).await
    }

    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        self.write(|s| ((), s.delete(ids))).await
    }

    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError> {
        self.write(|s| ((), s.clear(request))).await
    }

    async fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let mut reg = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
            // Only forget the entry if it is still this partition (a destroy and re-open may have replaced it).
            if reg
                .get(&*self.name)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), self))
            {
                reg.remove(&*self.name);
            }
        }
    }
}
