//! [`FjallStore`] and its partitions: the resident part of each partition in memory (the head of its ready queue,
//! leased, scheduled and dead items, counters; see the `paging` module for the rest), every change set written under
//! the partition's prefix in the store's one `items` keyspace.
//!
//! A partition applies each call to its [`PartitionState`] and sends the resulting change set to the store's writer
//! thread, which collects whatever batches arrived meanwhile, from any partition, and writes them as one atomic
//! fjall batch followed by one fsync (group commit). The async runtime never waits on disk: it awaits a reply.
//! In the modes whose writes wait for no fsync (`none`, `interval`), a partition's write that finds nothing queued
//! for the writer is written by the calling worker itself, inside `tokio::task::block_in_place` (which hands the
//! worker's other tasks to another thread): waking the writer for it cost a thread hand-off per write, and on a
//! small machine the woken writer could wait milliseconds behind another busy task (docs/benchmarks.md, "fjall: the
//! light-load latency tail"). The runtime itself is not blocked; the calling queue task waits for the write as it
//! waited for the writer's answer.
//! Inside a queue task's deferred scope (produce, complete, retry, extend, lease; see [`lessor_core::durability`])
//! a call returns once its change set is written, so readable by the partition's next calls, and the queue task's
//! pass, not the call, waits for the fsync. (Returning before the write itself was tried too, for 5-7 % more
//! throughput; a read of paged items could then miss a write still queued, and the crash tests lost items.)
//!
//! When a write fails the partition's memory is already ahead of the disk, so the partition marks itself stale and
//! re-reads its items on its next call: memory never claims what the disk does not hold.
//!
//! Partitions are numbered (their *pid*) by the catalog, kept under pid 0 of the same keyspace. Creating partitions
//! writes catalog entries, in a few bounded writes for a whole queue; destroying one replaces its entry by a
//! deletion record in one atomic write and hands the pid to the reclaimer thread, which drops the prefix's whole on-disk tables, deletes what is left in bounded
//! chunks through the writer (so serving traffic keeps its share), and finally removes the deletion record. A
//! restart resumes unfinished deletions from those records.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fjall::KeyspaceCreateOptions;
use lessor_core::error::{ItemError, StorageError, StorageErrorKind};
use lessor_core::storage::{
    item_bytes, keep_page, LifecycleOutcome, LifecyclePolicy, Partition, PartitionSnapshot, PartitionStore,
    RetryOp, RetryOutcome,
};
use lessor_core::time::Ts;
use lessor_core::types::{ClearRequest, DedupRecord, Item, ItemId, NewItem, PartitionCounts, PartitionStats};
use tokio::sync::oneshot;

use super::codec::{
    decode_dedup, decode_meta, dedup_key, encode_dedup, encode_item, inline_payload, parse_key, Key,
    INLINE_PAYLOAD_MAX, PAYLOAD_TAG,
};
use super::engine::{Engine, Fault, Formats, Unit};
use super::paging::{self as pg};
use super::{keyspace_name, upgrade, Durability, PARTITIONS_DIR, PARTITIONS_FORMAT_VERSION};
use crate::state::paging::PRIORITIES;
use crate::state::{
    Changes, PageRead, PagingCounts, PartitionState, SchedKey, SchedMove, SchedRead, SCHED_SHARE,
};
use crate::tiers::offloaded_len;

#[cfg(feature = "s3")]
mod cold;

/// Paged items a byte-bounded list reads from disk in its first step for a priority; later steps double up to
/// [`LIST_STEP_MAX`]. Small, so that a page of large items reads little past the bound.
const LIST_STEP: usize = 4;
/// The largest step of a byte-bounded list's disk reads.
const LIST_STEP_MAX: usize = 256;

/// Keyspace holding every partition's items, each under its pid, and the catalog under pid 0.
pub(crate) const ITEMS: &str = "items";
/// The pid of the catalog: partition names to pids, and destroyed pids until their items are gone. Keeping it in
/// the items keyspace lets a partition's first write carry its catalog entry in the same atomic batch.
const CATALOG_PID: u64 = 0;
/// Catalog key tag of a live partition: `'p' + name -> pid`.
const CAT_PARTITION: u8 = b'p';
/// Catalog key tag of a destroyed partition whose items are still being deleted: `'d' + pid -> name`.
const CAT_DELETING: u8 = b'd';
/// Bookkeeping key of a partition (after its pid): the highest id ever written, so ids keep growing across restarts
/// even when the items that carried the highest ids are gone. Item keys are 8 or 9 bytes; this one is not.
const HWM_KEY: &[u8] = b"hwm";
/// Default of `memory-window-items`: most ready items a partition keeps in memory before it pages the rest.
pub const DEFAULT_MEMORY_WINDOW: usize = crate::registry::DEFAULT_MEMORY_WINDOW;
/// Most payload bytes of leased and scheduled items one lifecycle call, or one write of a retry, reads back from
/// disk to requeue them (at least one item's; see "Payloads on disk" in the state's module docs): the rest waits
/// for the next call, or the retry's next write.
const LIFECYCLE_READ_BYTES: u64 = 16 << 20;
/// The resident schedule's bound for an item window of `window`: a resident scheduled item costs several times a
/// resident ready one (a whole item in two ordered maps, about 400 bytes, against a 64-byte slot), so a quarter of
/// the window keeps the schedule's memory near the ready window's (see "Paging the schedule" in the state's docs).
fn sched_window(window: usize) -> usize {
    (window / SCHED_SHARE).max(1)
}

/// Most items one expiry sweep of paged items reads back and expires per lifecycle call.
const SWEEP_LIMIT: usize = 4096;

/// Why one read of an expiry sweep of paged items ended.
#[derive(Clone, Copy)]
enum SweepStop {
    /// The records ran out, or (deadlines rising with ids) one is not due: nothing more is due.
    End,
    /// It holds [`DROP_READ_BYTES`] of payloads: the next read goes on after its last item.
    Bytes,
    /// The sweep took [`SWEEP_LIMIT`] items: more are due, for the next lifecycle call.
    Limit,
}
/// Most paged items one delete-by-id or clear reads back per disk read (a clear writes each such chunk on its own).
const DROP_BATCH: usize = 16 * 1024;
/// Most payload bytes one read of paged items (ready or scheduled) for a delete-by-id, a clear or the lookup of a
/// complete, extend or retry holds (at least one item's): they need only the items' metadata, but the records hold
/// the payloads, and 16,384 records of large items read at once took memory in proportion to the items removed.
const DROP_READ_BYTES: u64 = 16 << 20;
/// Most batches one group commit takes.
const MAX_GROUP: usize = 1024;
/// Most keys one reclaimer write deletes: small enough that serving writes queued behind it wait little.
const RECLAIM_CHUNK: usize = 1024;
/// Most partitions one catalog write of `create` or `destroy_many` names, for the same reason.
const CATALOG_CHUNK: usize = 256;
/// Partitions loaded from disk at once. A queue opening thousands of partitions must not fill the blocking pool
/// with scans that crowd out every other queue on a small machine.
const CONCURRENT_LOADS: usize = 2;
/// Pause of the reclaimer after a failed write before it tries again.
const RECLAIM_BACKOFF: Duration = Duration::from_secs(1);
/// Most partitions of one queue in one fjall store. Creating 10,000 costs one catalog write; the bound is what a
/// queue task does per pass over its partitions, measured in docs/benchmarks.md.
pub const MAX_PARTITIONS: u32 = 65_536;

pub(crate) fn keyspace_options() -> KeyspaceCreateOptions {
    // Queue items are mostly deleted soon after they are written: a roomy memtable lets many of them die before
    // they are flushed, which cut flush and compaction work enough to raise the drain rate from 99k to 126k items/s.
    // Memory stays bounded by the journal limit (see `Engine::open_db`: reaching it makes fjall flush the memtables
    // that pin the oldest journal).
    let mib = super::engine::tuning("LESSOR_FJALL_MEMTABLE_MIB").unwrap_or(64);
    KeyspaceCreateOptions::default().max_memtable_size(mib.clamp(1, 1024) * 1024 * 1024)
}

/// The key of `inner` (an item key or [`HWM_KEY`]) in partition `pid`.
pub(crate) fn item_key(pid: u64, inner: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + inner.len());
    k.extend_from_slice(&pid.to_be_bytes());
    k.extend_from_slice(inner);
    k
}

/// The key of the dedup record `(until, id)` in partition `pid`.
fn pid_dedup_key(pid: u64, until: Ts, id: ItemId) -> Vec<u8> {
    item_key(pid, &dedup_key(until, id))
}

/// The key of item `id`'s metadata (or with `payload`, its payload) in partition `pid`, built in one allocation:
/// the write path makes two of these per item.
fn pid_item_key(pid: u64, id: ItemId, payload: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.extend_from_slice(&pid.to_be_bytes());
    k.extend_from_slice(&id.0.to_be_bytes());
    if payload {
        k.push(PAYLOAD_TAG);
    }
    k
}

#[cfg(test)]
#[test]
fn pid_item_keys_are_the_pid_followed_by_the_item_keys() {
    use super::codec::{meta_key, payload_key};
    let id = ItemId(0x0102_0304_0506_0708);
    assert_eq!(pid_item_key(9, id, false), item_key(9, &meta_key(id)));
    assert_eq!(pid_item_key(9, id, true), item_key(9, &payload_key(id)));
}

/// The catalog key of partition `name`.
pub(crate) fn catalog_key(name: &str) -> Vec<u8> {
    let mut k = item_key(CATALOG_PID, &[CAT_PARTITION]);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The catalog key of the deletion record of `pid`.
fn deleting_key(pid: u64) -> Vec<u8> {
    item_key(CATALOG_PID, &[CAT_DELETING])
        .into_iter()
        .chain(pid.to_be_bytes())
        .collect()
}

/// A pid stored as a value.
fn decode_pid(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

/// A job for the writer thread.
struct Job {
    unit: Unit,
    /// Answered once an fsync covers the unit, or, for a deferred write, once the unit is written.
    reply: Reply,
    /// For a deferred write (see [`lessor_core::durability`]): answered once an fsync covers the unit.
    durable: Option<Reply>,
}

/// Partition names and their pids. An entry is on disk once `create` wrote it or the partition's first write
/// carried it; an entry only in memory names an empty partition, which a restart forgets harmlessly.
#[derive(Default)]
struct Catalog {
    /// Name -> (pid, whether the entry is known to be on disk).
    by_name: HashMap<Arc<str>, (u64, bool)>,
    /// Above every pid in use, in the catalog or under deletion. A pid is reused only after a restart and only
    /// once nothing of it is left.
    next_pid: u64,
    /// Pids this process handed out and nobody has opened yet: nothing can be stored under them, so opening one
    /// needs no disk read (a new 10,000-partition queue opens without 10,000 scans).
    fresh: HashSet<u64>,
}

/// What the store and its partitions share.
struct Shared {
    engine: Arc<Engine>,
    /// [`ITEMS`], allocated once: every write names it.
    items: Arc<str>,
    storage_dir: PathBuf,
    /// The writer thread's inbox; `None` once the store is closed.
    tx: RwLock<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The reclaimer thread's inbox of destroyed pids; `None` once the store is closed.
    reclaim_tx: Mutex<Option<mpsc::Sender<u64>>>,
    reclaimer: Mutex<Option<JoinHandle<()>>>,
    /// Destroyed partitions whose items are not all deleted yet.
    reclaiming: AtomicU64,
    /// The catalog. An async lock: `create` and `destroy` hold it while their write reaches the disk.
    catalog: tokio::sync::Mutex<Catalog>,
    /// Open partitions by name, so a second open of a live partition shares its state.
    open: Mutex<HashMap<String, Weak<FjallPartition>>>,
    /// Bounds concurrent partition loads (see [`CONCURRENT_LOADS`]).
    loads: tokio::sync::Semaphore,
    /// Opens and destroys in progress by name, so they never interleave for one partition.
    opening: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `memory-window-items`, read when a partition opens.
    window: AtomicUsize,
    /// `memory-window-bytes`, read when a partition opens.
    window_bytes: AtomicU64,
    /// Items read from disk by partition opens (tests: an open reads the window, not the backlog).
    items_loaded: AtomicU64,
    /// Items paged in from disk.
    items_paged_in: AtomicU64,
    /// Jobs sent to the writer thread and not written yet: a write that finds none may be written by its caller
    /// (see [`Shared::submit_deferrable`]).
    queued: Arc<AtomicUsize>,
    /// Whether such writes may be written by their caller (not in durability `sync`).
    inline_writes: bool,
    /// Writes made by their caller that way, for tests that must see the path taken.
    caller_writes: AtomicU64,
    /// Where cold segments go (`cold-segments`), once set.
    #[cfg(feature = "s3")]
    cold: RwLock<Option<Arc<cold::ColdCtx>>>,
    /// Cold segments written, loaded, and failed to load since the store opened.
    segments_written: AtomicU64,
    segments_loaded: AtomicU64,
    segment_failures: AtomicU64,
}

impl Shared {
    /// Sends one change set to the writer thread and waits for it to be written and durable.
    async fn submit(&self, unit: Unit) -> Result<(), StorageError> {
        let rx = self.send(unit, None)?;
        rx.await.map_err(|_| self.closed())?
    }

    /// [`Shared::submit`] for a partition's operation: inside a queue task's deferred scope it returns once the
    /// change set is written, and the pass waits for its fsync (see [`lessor_core::durability`]); the partition's
    /// next operation is written meanwhile, behind it in the journal.
    ///
    /// In `none` and `interval`, when nothing is queued for the writer, the caller writes the change set itself (see
    /// the module doc): written is then durable as far as these modes go, as the writer would have answered. Only on
    /// the multi-threaded runtime, where `block_in_place` moves the worker's other tasks to another thread; the
    /// write still waits for fjall's journal lock like any other (serialised by the engine's write lock).
    async fn submit_deferrable(&self, unit: Unit) -> Result<(), StorageError> {
        if self.inline_writes
            && self.queued.load(Ordering::Acquire) == 0
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            if self.tx.read().unwrap_or_else(|e| e.into_inner()).is_none() {
                return Err(self.closed());
            }
            let engine = &self.engine;
            let written = tokio::task::block_in_place(|| engine.write_group(vec![unit]));
            self.caller_writes.fetch_add(1, Ordering::Relaxed);
            return written.results.into_iter().next().unwrap_or(Ok(()));
        }
        if !lessor_core::durability::deferring() {
            return self.submit(unit).await;
        }
        let (durable, wait) = oneshot::channel();
        let rx = self.send(unit, Some(durable))?;
        rx.await.map_err(|_| self.closed())??;
        match lessor_core::durability::defer(wait) {
            None => Ok(()),
            Some(wait) => wait.await.map_err(|_| self.closed())?,
        }
    }

    /// Makes every change set written so far durable, in the modes that do not fsync each write: called before an
    /// object whose content the journal now holds (a loaded cold segment, a destroyed partition's segments) is
    /// deleted, so a power loss cannot take both the journal's copy and the object. Only cold segments need it.
    #[cfg(feature = "s3")]
    async fn make_durable(&self) -> Result<(), StorageError> {
        if self.engine.durability() == Durability::Sync {
            return Ok(());
        }
        let engine = self.engine.clone();
        blocking(move || engine.sync_journal()).await
    }

    /// [`Shared::submit`] for threads outside the async runtime.
    fn submit_blocking(&self, unit: Unit) -> Result<(), StorageError> {
        let rx = self.send(unit, None)?;
        rx.blocking_recv().map_err(|_| self.closed())?
    }

    fn send(
        &self,
        unit: Unit,
        durable: Option<Reply>,
    ) -> Result<oneshot::Receiver<Result<(), StorageError>>, StorageError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.read().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = tx.as_ref() else {
            return Err(self.closed());
        };
        self.queued.fetch_add(1, Ordering::AcqRel);
        if tx.send(Job { unit, reply, durable }).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(self.closed());
        }
        Ok(rx)
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

    /// The cold segment manifest of partition `pid` (one entry per segment; no segment body is read).
    #[cfg(feature = "s3")]
    async fn manifest(
        &self,
        pid: u64,
        name: &str,
    ) -> Result<std::collections::BTreeMap<(u8, u64), crate::offload::segment::ManifestEntry>, StorageError>
    {
        let engine = self.engine.clone();
        let what = format!("partition '{name}' in '{}'", engine.dir().display());
        blocking(move || cold::read_manifest(&engine, pid, &what)).await
    }

    /// Reads partition `pid` from disk into a new state; also returns the stored id high-water mark. Reads the
    /// partition's own prefix, which holds only its resident items, and its paging counters if it has paged items
    /// (see the `paging` module): what an open reads is bounded by the window and the items in flight, not by the
    /// depth of the queue.
    async fn load(&self, name: Arc<str>, pid: u64, part_no: u32) -> Result<Loaded, StorageError> {
        let _permit = self.loads.acquire().await.map_err(|_| self.closed())?;
        let engine = self.engine.clone();
        let window = self.window.load(Ordering::Relaxed);
        let window_bytes = self.window_bytes.load(Ordering::Relaxed);
        let (state, hwm, read, payload_keys) = blocking(move || {
            let floor = ItemId::floor_for(part_no).0;
            let Some(ks) = engine.keyspace(ITEMS, true)? else {
                return Ok((
                    PartitionState::new(floor)
                        .with_window(window)
                        .with_sched_window(sched_window(window))
                        .with_window_bytes(window_bytes)
                        .with_payloads_on_disk(INLINE_PAYLOAD_MAX),
                    0,
                    0,
                    HashSet::new(),
                ));
            };
            let what = format!("partition '{name}' in '{}'", engine.dir().display());
            let paged = pg::read_counters(&engine, &ks, pid, &what)?;
            let psched = pg::read_sched_counters(&engine, &ks, pid, &what)?;
            let mut items = Vec::new();
            let mut dedup = Vec::new();
            let mut hwm = 0u64;
            let mut payload_keys = HashSet::new();
            // Leased, scheduled and dead items whose payload stays on disk only (see "Payloads on disk" in the
            // state's module docs): read past, never kept, so an open holds no more of them than the lengths.
            let mut on_disk = HashMap::new();
            for kv in ks.prefix(pid.to_be_bytes()) {
                let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
                let inner = &k[8..];
                match parse_key(inner) {
                    Key::Meta(id) => items.push(decode_meta(id, &v, &what)?),
                    // A payload sorts right after its item's metadata.
                    Key::Payload(id) => match items.last_mut() {
                        Some(it) if it.id == id => {
                            payload_keys.insert(id.0);
                            let ready = !it.dead && !it.is_scheduled() && !it.is_leased;
                            if !ready && v.len() > INLINE_PAYLOAD_MAX && offloaded_len(&v).is_none() {
                                on_disk.insert(id.0, v.len() as u64);
                            } else {
                                it.payload = Bytes::copy_from_slice(&v);
                            }
                        }
                        _ => {
                            tracing::warn!(partition = %name, item = %id, "payload without an item: ignored")
                        }
                    },
                    Key::Dedup(until, id) => dedup.push(decode_dedup(until, id, &v, &what)?),
                    Key::Other if inner == HWM_KEY => {
                        hwm = decode_pid(&v).unwrap_or(0);
                    }
                    // No other key is written; one that is there anyway carries nothing this build needs.
                    Key::Other => {}
                }
            }
            let read = items.len() as u64;
            let floor = floor.max(hwm.saturating_add(1));
            let state = match paged {
                Some(paged) => {
                    let sources = if paged.with_source > 0 {
                        pg::source_ids(&engine, &ks, pid, &what)?
                    } else {
                        Vec::new()
                    };
                    PartitionState::restore(items, on_disk, paged, sources, floor, window)
                }
                None => PartitionState::load_with(items, on_disk, floor).with_window(window),
            };
            let state = match psched {
                Some(ps) => {
                    let sources = if ps.with_source > 0 {
                        pg::sched_source_ids(&engine, &ks, pid, &what)?
                    } else {
                        Vec::new()
                    };
                    state.with_paged_sched(ps, sources)
                }
                None => state,
            };
            Ok((
                state
                    .with_sched_window(sched_window(window))
                    .with_dedup(dedup)
                    .with_window_bytes(window_bytes)
                    .with_payloads_on_disk(INLINE_PAYLOAD_MAX),
                hwm,
                read,
                payload_keys,
            ))
        })
        .await?;
        self.items_loaded.fetch_add(read, Ordering::Relaxed);
        Ok(Loaded {
            state,
            hwm,
            payload_keys,
        })
    }

    /// The pid of partition `name`, whether its catalog entry is on disk, and whether the pid is fresh (handed out
    /// by this process and never opened: nothing is stored under it). Hands out a new pid (in memory only: the
    /// partition's first write stores it) when it has none. The pid is no longer fresh afterwards.
    async fn pid(&self, name: &Arc<str>) -> (u64, bool, bool) {
        let mut cat = self.catalog.lock().await;
        if let Some(&(pid, stored)) = cat.by_name.get(name) {
            let fresh = cat.fresh.remove(&pid);
            return (pid, stored, fresh);
        }
        let pid = cat.next_pid;
        cat.next_pid += 1;
        cat.by_name.insert(name.clone(), (pid, false));
        (pid, false, true)
    }

    /// Hands a destroyed pid to the reclaimer.
    fn reclaim(&self, pid: u64) {
        self.reclaiming.fetch_add(1, Ordering::AcqRel);
        let tx = self.reclaim_tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            // A closed reclaimer leaves the deletion record: the next start finishes the job.
            let _ = tx.send(pid);
        }
    }

    /// Up to `limit` keys of `items` in `[from, hi)`.
    fn keys_from(&self, from: &[u8], hi: &[u8], limit: usize) -> Result<Vec<Vec<u8>>, StorageError> {
        let Some(ks) = self.engine.keyspace(ITEMS, false)? else {
            return Ok(Vec::new());
        };
        let mut keys = Vec::new();
        for kv in ks.range(from..hi).take(limit) {
            let k = kv.key().map_err(|e| self.engine.read_error(e))?;
            keys.push(k.to_vec());
        }
        Ok(keys)
    }

    /// Builds the next reclaimer write from the front of `work`: tombstones for up to [`RECLAIM_CHUNK`] keys of
    /// destroyed pids, plus the deletion record of every pid that write empties. Returns the write, the new scan
    /// position of each pid it touched (applied once the write succeeds), and how many pids it finishes.
    fn next_reclaim(&self, work: &mut VecDeque<Reclaim>) -> Result<ReclaimStep, StorageError> {
        let mut dels = Vec::new();
        let mut positions = Vec::new();
        let mut finished = 0;
        let mut popped = 0;
        for r in work.iter_mut() {
            let room = RECLAIM_CHUNK - dels.len();
            if room == 0 {
                break;
            }
            let hi = r.hi.clone();
            let mut keys = self.keys_from(&r.from, &hi, room)?;
            if keys.len() == RECLAIM_CHUNK && !r.dropped {
                // A large partition: drop its whole on-disk tables at once instead of a tombstone per key, then
                // tombstone what is left (memtables, tables shared with a neighbour).
                r.dropped = true;
                if let Err(e) = self.engine.drop_range(ITEMS, &r.from, &hi) {
                    tracing::warn!(pid = r.pid, error = %e, "dropping a destroyed partition's tables failed");
                }
                keys = self.keys_from(&r.from, &hi, room)?;
            }
            let done = keys.len() < room;
            let next = match keys.last() {
                Some(k) => {
                    let mut n = k.clone();
                    n.push(0);
                    n
                }
                None => r.from.clone(),
            };
            dels.extend(keys);
            positions.push(next);
            if !done {
                break;
            }
            popped += 1;
            if !r.paged {
                // The partition's own prefix goes last (after its paged prefix): then its deletion record.
                dels.push(deleting_key(r.pid));
                finished += 1;
            }
        }
        Ok(ReclaimStep {
            dels,
            positions,
            popped,
            finished,
        })
    }
}

/// One reclaimer write and what it achieves once it succeeds.
struct ReclaimStep {
    /// Keys to delete.
    dels: Vec<Vec<u8>>,
    /// The next scan position of each pid at the front of the work queue that the write touches.
    positions: Vec<Vec<u8>>,
    /// How many entries at the front of the work queue the write empties.
    popped: usize,
    /// How many pids the write finishes (their deletion records included).
    finished: usize,
}

/// A prefix of a destroyed pid being deleted (its paged prefix, then its own), and where its next scan starts.
struct Reclaim {
    pid: u64,
    /// Whether this is the pid's paged prefix (see the `paging` module).
    paged: bool,
    from: Vec<u8>,
    /// The first key after the prefix.
    hi: Vec<u8>,
    dropped: bool,
}

/// Runs blocking work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::other(format!("storage task failed: {e}")))?
}

type Reply = oneshot::Sender<Result<(), StorageError>>;
/// A written group waiting for its fsync: its sequence, its results so far, and whom to answer.
type Pending = (u64, Vec<Result<(), StorageError>>, Vec<Reply>);

/// The writer thread: takes every job waiting, writes them as one group and hands the answers to the sync thread,
/// which sends them once an fsync covers the group. Meanwhile the writer writes the next group: the fsync of one
/// group overlaps the writing of the next (pipelined group commit, see the `engine` module doc).
fn writer_loop(engine: Arc<Engine>, rx: mpsc::Receiver<Job>, queued: &AtomicUsize) {
    std::thread::scope(|scope| {
        let (sync_tx, sync_rx) = mpsc::channel::<Pending>();
        let synced = std::thread::Builder::new()
            .name("lessor-fjall-fsync".into())
            .spawn_scoped(scope, || sync_loop(&engine, sync_rx));
        // Without the thread, the writer waits for each fsync itself (the results are the same, only slower).
        let sync_tx = synced.is_ok().then_some(sync_tx);
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let (units, replies): (Vec<Unit>, Vec<_>) =
                jobs.into_iter().map(|j| (j.unit, (j.reply, j.durable))).unzip();
            let n = units.len();
            let written = engine.write_group(units);
            queued.fetch_sub(n, Ordering::AcqRel);
            // A deferred write learns now that it is written (or failed); its durability is answered like any
            // other job's reply below.
            let replies: Vec<Reply> = replies
                .into_iter()
                .zip(&written.results)
                .map(|((reply, durable), res)| match durable {
                    Some(d) => {
                        let _ = reply.send(res.clone());
                        d
                    }
                    None => reply,
                })
                .collect();
            match (written.seq, &sync_tx) {
                (Some(seq), Some(tx)) => {
                    if let Err(mpsc::SendError((seq, results, replies))) =
                        tx.send((seq, written.results, replies))
                    {
                        answer(&engine, Some(seq), results, replies);
                    }
                }
                (seq, _) => answer(&engine, seq, written.results, replies),
            }
        }
        // Dropping the sender ends the sync thread once it has answered everything; the scope joins it.
        drop(sync_tx);
    });
}

/// The sync thread: waits until an fsync covers each written group, in order, and answers its callers. One fsync
/// usually covers every group waiting here.
fn sync_loop(engine: &Engine, rx: mpsc::Receiver<Pending>) {
    while let Ok((seq, results, replies)) = rx.recv() {
        answer(engine, Some(seq), results, replies);
    }
}

/// Answers the callers of one group, after waiting for the fsync that covers it when it has a sequence.
fn answer(
    engine: &Engine,
    seq: Option<u64>,
    mut results: Vec<Result<(), StorageError>>,
    replies: Vec<Reply>,
) {
    if let Some(seq) = seq {
        if let Err(e) = engine.wait_durable(seq) {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(e.clone());
            }
        }
    }
    for (res, reply) in results.into_iter().zip(replies) {
        // The caller may have given up waiting; the write stands either way.
        let _ = reply.send(res);
    }
}

/// The reclaimer thread: deletes destroyed partitions in writes of bounded size that go through the writer like any
/// other, so serving traffic keeps its share of the disk. Many small partitions share one write.
fn reclaimer_loop(shared: Weak<Shared>, rx: mpsc::Receiver<u64>) {
    let mut work: VecDeque<Reclaim> = VecDeque::new();
    let add = |work: &mut VecDeque<Reclaim>, pid: u64| {
        let paged = u64::from_be_bytes(pg::paged_prefix(pid));
        work.push_back(Reclaim {
            pid,
            paged: true,
            from: paged.to_be_bytes().to_vec(),
            hi: paged.saturating_add(1).to_be_bytes().to_vec(),
            dropped: false,
        });
        work.push_back(Reclaim {
            pid,
            paged: false,
            from: pid.to_be_bytes().to_vec(),
            hi: pid.saturating_add(1).to_be_bytes().to_vec(),
            dropped: false,
        });
    };
    loop {
        if work.is_empty() {
            match rx.recv() {
                Ok(pid) => add(&mut work, pid),
                Err(_) => return,
            }
        }
        while let Ok(pid) = rx.try_recv() {
            add(&mut work, pid);
        }
        let Some(shared) = shared.upgrade() else { return };
        if shared.tx.read().unwrap_or_else(|e| e.into_inner()).is_none() {
            return;
        }
        let step = shared.next_reclaim(&mut work).and_then(|step| {
            shared.submit_blocking(Unit {
                keyspace: shared.items.clone(),
                puts: Vec::new(),
                dels: step.dels,
                once_dels: Vec::new(),
            })?;
            Ok((step.positions, step.popped, step.finished))
        });
        match step {
            Ok((positions, popped, finished)) => {
                for (r, from) in work.iter_mut().zip(positions) {
                    r.from = from;
                }
                for _ in 0..popped {
                    work.pop_front();
                }
                shared.reclaiming.fetch_sub(finished as u64, Ordering::AcqRel);
            }
            Err(e) if e.kind == StorageErrorKind::Poisoned => return,
            Err(e) => {
                // The deletion records stay until their pid is empty: a later attempt (or restart) finishes.
                tracing::warn!(error = %e, "deleting destroyed partitions failed; retrying");
                drop(shared);
                std::thread::sleep(RECLAIM_BACKOFF);
            }
        }
    }
}

/// Partitions in fjall: one database under `<storage-dir>/~partitions/`, every partition a prefix of one keyspace.
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
    /// Opens (creating on first use) the partition store under `storage_dir`, upgrading a format-1 store. Fails
    /// with `Locked` when another process uses the directory and with `Corrupt` when it holds an unknown format.
    /// Blocking: run it at start-up or in `spawn_blocking`.
    pub fn open(storage_dir: impl Into<PathBuf>, durability: Durability) -> Result<Self, StorageError> {
        let storage_dir = storage_dir.into();
        let (engine, version) = Engine::open(
            &storage_dir,
            PARTITIONS_DIR,
            "partitions",
            "partition store",
            durability,
            keyspace_options,
            Formats {
                current: PARTITIONS_FORMAT_VERSION,
                upgradable: &[1, 2, 3, 4],
            },
        )?;
        if version == 1 {
            upgrade::from_v1(&engine)?;
        } else if version < PARTITIONS_FORMAT_VERSION {
            // Nothing to rewrite: format 3 only adds paged prefixes, which a partition gets when it first spills,
            // format 4 inline payloads, which items get when next written, and format 5 paged scheduled records,
            // which a partition gets when its schedule first spills. The marker changes first, so a
            // build that would not read them refuses the store.
            engine.set_format_version("partitions", PARTITIONS_FORMAT_VERSION)?;
        }
        upgrade::drop_leftovers(&engine)?;
        engine.keyspace(ITEMS, true)?;
        let (catalog, deleting) = read_catalog(&engine)?;
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        // In `sync` mode every write goes through the writer, which hands it to the fsync thread. The override is
        // for measurements (docs/benchmarks.md), not a supported setting.
        let inline_writes = engine.durability() != Durability::Sync
            && super::engine::tuning("LESSOR_FJALL_INLINE_WRITES") != Some(0);
        let writer = {
            let engine = engine.clone();
            let queued = queued.clone();
            std::thread::Builder::new()
                .name("lessor-fjall-writer".into())
                .spawn(move || writer_loop(engine, rx, &queued))
                .map_err(|e| StorageError::other(format!("cannot start the fjall writer thread: {e}")))?
        };
        let (reclaim_tx, reclaim_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            engine,
            items: ITEMS.into(),
            storage_dir: storage_dir.clone(),
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            reclaim_tx: Mutex::new(Some(reclaim_tx)),
            reclaimer: Mutex::new(None),
            reclaiming: AtomicU64::new(0),
            catalog: tokio::sync::Mutex::new(catalog),
            open: Mutex::new(HashMap::new()),
            loads: tokio::sync::Semaphore::new(CONCURRENT_LOADS),
            opening: Mutex::new(HashMap::new()),
            window: AtomicUsize::new(DEFAULT_MEMORY_WINDOW),
            window_bytes: AtomicU64::new(crate::registry::DEFAULT_MEMORY_WINDOW_BYTES),
            items_loaded: AtomicU64::new(0),
            items_paged_in: AtomicU64::new(0),
            queued,
            inline_writes,
            caller_writes: AtomicU64::new(0),
            #[cfg(feature = "s3")]
            cold: RwLock::new(None),
            segments_written: AtomicU64::new(0),
            segments_loaded: AtomicU64::new(0),
            segment_failures: AtomicU64::new(0),
        });
        let reclaimer = {
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("lessor-fjall-reclaim".into())
                .spawn(move || reclaimer_loop(weak, reclaim_rx))
                .map_err(|e| StorageError::other(format!("cannot start the fjall reclaimer thread: {e}")))?
        };
        *shared.reclaimer.lock().unwrap_or_else(|e| e.into_inner()) = Some(reclaimer);
        let unfinished = deleting.len();
        for pid in deleting {
            shared.reclaim(pid);
        }
        tracing::info!(
            storage_dir = %storage_dir.display(),
            engine = "fjall",
            %durability,
            unfinished_deletions = unfinished,
            "partition storage open"
        );
        Ok(FjallStore { shared })
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

    /// Partition writes made by the calling worker instead of the writer thread since the store opened (only in
    /// durability `none` and `interval`; see the module doc).
    #[doc(hidden)]
    pub fn caller_writes(&self) -> u64 {
        self.shared.caller_writes.load(Ordering::Relaxed)
    }

    /// Sets `memory-window-items` (at least 1) for partitions opened from now on.
    pub fn set_memory_window(&self, items: usize) {
        self.shared.window.store(items.max(1), Ordering::Relaxed);
    }

    /// Sets `memory-window-bytes` (at least 1) for partitions opened from now on: above that many payload bytes of
    /// resident items, new ready items are paged as beyond the item window.
    pub fn set_memory_window_bytes(&self, bytes: u64) {
        self.shared.window_bytes.store(bytes.max(1), Ordering::Relaxed);
    }

    /// Turns cold backlog segments on (`cold-segments`); `store_name` goes into every object key. Set before the
    /// first partition opens.
    ///
    /// # Errors
    /// The object store's client cannot be built from `settings`.
    #[cfg(feature = "s3")]
    pub fn set_cold(
        &self,
        settings: crate::registry::ColdSettings,
        store_name: &str,
    ) -> Result<(), StorageError> {
        self.set_cold_clock(settings, store_name, Arc::new(lessor_core::time::SystemClock))
    }

    /// [`FjallStore::set_cold`] whose retry pauses of segments that could not be fetched are timed by `clock`
    /// (tests: a manual clock passes a pause without waiting for it).
    ///
    /// # Errors
    /// The object store's client cannot be built from `settings`.
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub fn set_cold_clock(
        &self,
        settings: crate::registry::ColdSettings,
        store_name: &str,
        clock: lessor_core::time::SharedClock,
    ) -> Result<(), StorageError> {
        let ctx = cold::ColdCtx::new(settings, store_name, clock)?;
        *self.shared.cold.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(ctx));
        Ok(())
    }

    /// Tests: makes every lifecycle call wait for the cold spill or load it starts and commit it, so a suite that
    /// calls lifecycle now and then still moves its backlog through segments.
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub fn set_cold_eager(&self, eager: bool) {
        if let Some(c) = self
            .shared
            .cold
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.eager.store(eager, Ordering::Relaxed);
        }
    }

    /// Tests: while `hold`, every spill waits before it writes its object, as an upload to a slow object store
    /// would, until released.
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub fn hold_cold_spills(&self, hold: bool) {
        if let Some(c) = self
            .shared
            .cold
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.hold.send_replace(hold);
        }
    }

    /// Tests: waits until `n` spills in all have reached the wait of [`FjallStore::hold_cold_spills`].
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub async fn cold_spills_held(&self, n: u64) {
        let held = self
            .shared
            .cold
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.held.subscribe());
        if let Some(mut held) = held {
            let _ = held.wait_for(|&k| k >= n).await;
        }
    }

    /// Cold segments written, loaded back, and failed to load (missing, corrupt, object store down) since the
    /// store opened.
    pub fn segment_counters(&self) -> (u64, u64, u64) {
        (
            self.shared.segments_written.load(Ordering::Relaxed),
            self.shared.segments_loaded.load(Ordering::Relaxed),
            self.shared.segment_failures.load(Ordering::Relaxed),
        )
    }

    /// The open partition `partition` of `queue`, for operations beyond the `Partition` trait (tests, sweeps).
    #[doc(hidden)]
    pub fn live_partition(&self, queue: &str, partition: u32) -> Option<Arc<FjallPartition>> {
        self.registry()
            .get(&keyspace_name(queue, partition))
            .and_then(Weak::upgrade)
    }

    /// Items partition opens read from disk since the store opened.
    #[doc(hidden)]
    pub fn items_loaded(&self) -> u64 {
        self.shared.items_loaded.load(Ordering::Relaxed)
    }

    /// Items paged in from disk since the store opened.
    #[doc(hidden)]
    pub fn items_paged_in(&self) -> u64 {
        self.shared.items_paged_in.load(Ordering::Relaxed)
    }

    /// Ready items partition `partition` of `queue` holds in memory, if it is open (tests: the window holds).
    #[doc(hidden)]
    pub async fn resident_ready(&self, queue: &str, partition: u32) -> Option<u64> {
        let p = self.live_partition(queue, partition)?;
        let g = p.inner.lock().await;
        Some(g.state.resident_ready())
    }

    /// Scheduled items partition `partition` of `queue` holds in memory, if it is open (tests: the schedule's bound
    /// holds).
    #[doc(hidden)]
    pub async fn resident_scheduled(&self, queue: &str, partition: u32) -> Option<u64> {
        let p = self.live_partition(queue, partition)?;
        let g = p.inner.lock().await;
        Some(g.state.resident_scheduled())
    }

    /// Resident and paged ready items (and paged payload bytes) of partition `partition` of `queue`, if it is open:
    /// what a per-tier statistic needs, from counters, without a disk read.
    pub async fn paging_counts(&self, queue: &str, partition: u32) -> Option<PagingCounts> {
        let p = self.live_partition(queue, partition)?;
        Some(p.paging_counts().await)
    }

    /// Keys under the paged prefix of partition `partition` of `queue` (paged records and counters), `None` when it
    /// has no pid (tests: a partition that never spilled has none). Blocking; scans the prefix.
    #[doc(hidden)]
    pub async fn paged_keys(&self, queue: &str, partition: u32) -> Result<Option<usize>, StorageError> {
        let name: Arc<str> = keyspace_name(queue, partition).into();
        let Some(pid) = self.shared.catalog.lock().await.by_name.get(&name).map(|e| e.0) else {
            return Ok(None);
        };
        let engine = self.shared.engine.clone();
        blocking(move || {
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok(Some(0));
            };
            pg::count_keys(&engine, &ks, pid).map(Some)
        })
        .await
    }

    /// Destroyed partitions whose items are still being deleted in the background.
    pub fn pending_deletions(&self) -> u64 {
        self.shared.reclaiming.load(Ordering::Acquire)
    }

    /// Keys stored in the items keyspace, catalog included (tests of space reclamation). Blocking; scans.
    #[doc(hidden)]
    pub fn stored_keys(&self) -> Result<usize, StorageError> {
        let Some(ks) = self.shared.engine.keyspace(ITEMS, false)? else {
            return Ok(0);
        };
        let mut n = 0;
        for kv in ks.iter() {
            kv.key().map_err(|e| self.shared.engine.read_error(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Partitions with a catalog entry (created and not destroyed).
    pub async fn partition_count(&self) -> usize {
        self.shared.catalog.lock().await.by_name.len()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<FjallPartition>>> {
        self.shared.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gate(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.shared.opening.lock().unwrap_or_else(|e| e.into_inner());
        gates.entry(name.to_string()).or_default().clone()
    }

    fn forget_gate(&self, name: &str, gate: Arc<tokio::sync::Mutex<()>>) {
        let mut gates = self.shared.opening.lock().unwrap_or_else(|e| e.into_inner());
        // Forget the gate unless another call is waiting on it (the map and `gate` hold the only references).
        if Arc::strong_count(&gate) == 2 {
            gates.remove(name);
            shrink_sparse(&mut gates);
        }
    }

    /// Returns the live partition `name` or loads it; the caller holds the partition's gate.
    async fn open_gated(
        &self,
        queue: &str,
        partition: u32,
        name: String,
    ) -> Result<Arc<dyn Partition>, StorageError> {
        let live = self.registry().get(&name).and_then(Weak::upgrade);
        if let Some(p) = live {
            if !p.closed.load(Ordering::Acquire) {
                return Ok(p);
            }
            // Being closed: its last write may still be on its way to disk, and the state loaded below must hold it.
            drop(p.inner.lock().await);
        }
        let name: Arc<str> = name.into();
        let started = std::time::Instant::now();
        let (pid, stored, fresh) = self.shared.pid(&name).await;
        let Loaded {
            state,
            hwm,
            payload_keys,
        } = if fresh {
            let window = self.shared.window.load(Ordering::Relaxed);
            let window_bytes = self.shared.window_bytes.load(Ordering::Relaxed);
            Loaded {
                state: PartitionState::new(ItemId::floor_for(partition).0)
                    .with_window(window)
                    .with_sched_window(sched_window(window))
                    .with_window_bytes(window_bytes)
                    .with_payloads_on_disk(INLINE_PAYLOAD_MAX),
                hwm: 0,
                payload_keys: HashSet::new(),
            }
        } else {
            self.shared.load(name.clone(), pid, partition).await?
        };
        tracing::debug!(
            queue,
            partition,
            pid,
            items = state.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "partition loaded"
        );
        let p = Arc::new(FjallPartition {
            name: name.clone(),
            pid,
            registered: AtomicBool::new(stored),
            shared: self.shared.clone(),
            inner: tokio::sync::Mutex::new(Inner {
                state,
                prefetch: None,
                hwm,
                payload_keys,
                stale: false,
                #[cfg(feature = "s3")]
                cold: cold::ColdState::with_segs(self.shared.manifest(pid, &name).await?),
            }),
            #[cfg(feature = "s3")]
            queue: queue.into(),
            part_no: partition,
            closed: AtomicBool::new(false),
        });
        self.registry().insert(name.to_string(), Arc::downgrade(&p));
        #[cfg(feature = "s3")]
        if self
            .shared
            .cold
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            cold::start_ticker(&p, !fresh);
        }
        Ok(p)
    }

    /// Destroys partitions `names` in one write; the caller holds their gates.
    async fn destroy_gated(&self, names: &[String]) -> Result<(), StorageError> {
        for name in names {
            let live = self.registry().remove(name).and_then(|w| w.upgrade());
            if let Some(p) = live {
                p.closed.store(true, Ordering::Release);
                // A write in flight holds the lock until the disk has it: after this, nothing writes under the pid.
                #[allow(unused_mut)]
                let mut g = p.inner.lock().await;
                // A spill in flight is ended first: its object goes with the partition's other segments.
                #[cfg(feature = "s3")]
                let _ = g.cold.abandon_job().await;
                drop(g);
            }
        }
        let mut cat = self.shared.catalog.lock().await;
        let doomed: Vec<(&String, u64)> = names
            .iter()
            .filter_map(|n| cat.by_name.get(n.as_str()).map(|&(pid, _)| (n, pid)))
            .collect();
        // Bounded writes, as in `create`; each partition's entry and deletion record change in one of them.
        for chunk in doomed.chunks(CATALOG_CHUNK) {
            self.shared
                .submit(Unit {
                    keyspace: self.shared.items.clone(),
                    puts: chunk
                        .iter()
                        .map(|(name, pid)| (deleting_key(*pid), name.as_bytes().to_vec()))
                        .collect(),
                    dels: chunk.iter().map(|(name, _)| catalog_key(name)).collect(),
                    once_dels: Vec::new(),
                })
                .await?;
            for (name, pid) in chunk {
                cat.by_name.remove(name.as_str());
                cat.fresh.remove(pid);
                self.shared.reclaim(*pid);
            }
        }
        Ok(())
    }

    /// Deletes every cold segment object of `partitions` of `queue` (destroyed, their gates held), after making the
    /// destroy durable: a restart must not find manifest entries naming objects that are gone.
    #[cfg(feature = "s3")]
    async fn delete_destroyed_segments(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        let Some(ctx) = self.shared.cold.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        use futures::StreamExt;
        self.shared.make_durable().await?;
        // Owned values in the futures: borrowed ones make the destroy's future not `Send` for every lifetime.
        let results: Vec<Result<(), StorageError>> = futures::stream::iter(partitions.to_vec())
            .map(|p| {
                let (ctx, queue) = (ctx.clone(), queue.to_string());
                async move { ctx.delete_destroyed(&queue, p).await }
            })
            .buffer_unordered(crate::offload::FETCH_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
    }
}

/// Gives back the slots of a table of partitions that has emptied to a quarter of its capacity: a `HashMap` never
/// shrinks on its own, so the partitions open at a peak (queues loaded, then unloaded for being idle) kept their
/// slots for the life of the store. Shrinking to twice the entries left makes the next shrink wait until the table
/// has halved twice more, so the rehash costs O(1) per removal over time.
fn shrink_sparse<V>(map: &mut HashMap<String, V>) {
    lessor_core::shrink::map(map, 64);
}

/// Reads the catalog: live partitions, the next pid, and the pids whose deletion is unfinished.
fn read_catalog(engine: &Engine) -> Result<(Catalog, Vec<u64>), StorageError> {
    let mut cat = Catalog::default();
    let mut deleting = Vec::new();
    let corrupt = |what: &str| {
        StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "the catalog of the partition store at '{}' holds a bad {what} record",
                engine.dir().display()
            ),
        )
    };
    let Some(ks) = engine.keyspace(ITEMS, true)? else {
        return Ok((cat, deleting));
    };
    let mut max_pid = CATALOG_PID;
    for kv in ks.prefix(CATALOG_PID.to_be_bytes()) {
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        let rest = &k[8..];
        match rest.first() {
            Some(&CAT_PARTITION) => {
                let name = std::str::from_utf8(&rest[1..]).map_err(|_| corrupt("partition"))?;
                let pid = decode_pid(&v).ok_or_else(|| corrupt("partition"))?;
                max_pid = max_pid.max(pid);
                cat.by_name.insert(name.into(), (pid, true));
            }
            Some(&CAT_DELETING) => {
                let pid = decode_pid(&rest[1..]).ok_or_else(|| corrupt("deletion"))?;
                max_pid = max_pid.max(pid);
                deleting.push(pid);
            }
            _ => {}
        }
    }
    // Items under a pid above every catalog record (written with an entry a crash lost? never: the entry rides in
    // the same batch as the first items) would still keep their pid from being handed out again.
    // Paged prefixes (see the `paging` module) sort after every pid and are not pids.
    if let Some(kv) = ks.range(..pg::paged_prefix(0).to_vec()).next_back() {
        let k = kv.key().map_err(|e| engine.read_error(e))?;
        if let Some(pid) = k.get(..8).and_then(decode_pid) {
            max_pid = max_pid.max(pid);
        }
    }
    cat.next_pid = max_pid + 1;
    Ok((cat, deleting))
}

#[async_trait]
impl PartitionStore for FjallStore {
    fn driver(&self) -> &'static str {
        "fjall"
    }

    fn max_partitions(&self) -> u32 {
        MAX_PARTITIONS
    }

    async fn create(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        let mut cat = self.shared.catalog.lock().await;
        let mut next = cat.next_pid;
        let mut added: Vec<(Arc<str>, u64)> = Vec::new();
        let mut seen = HashSet::new();
        let mut puts = Vec::new();
        for &p in partitions {
            let name: Arc<str> = keyspace_name(queue, p).into();
            if !seen.insert(name.clone()) {
                continue;
            }
            let pid = match cat.by_name.get(&name) {
                Some(&(_, true)) => continue,
                Some(&(pid, false)) => pid,
                None => {
                    next += 1;
                    cat.fresh.insert(next - 1);
                    next - 1
                }
            };
            puts.push((catalog_key(&name), pid.to_be_bytes().to_vec()));
            added.push((name, pid));
        }
        if added.is_empty() {
            return Ok(());
        }
        // Pids handed out now are never handed out again, even if a write below fails (an unused pid costs nothing).
        cat.next_pid = next;
        // Bounded writes, one after another: the writer serves every queue, and a 10,000-entry batch would hold up
        // their writes for milliseconds. Each entry stands alone (the queue's definition is stored only after all of
        // them), so the chunks need not be one atomic write.
        let mut puts = puts.into_iter();
        for chunk in added.chunks(CATALOG_CHUNK) {
            self.shared
                .submit(Unit {
                    keyspace: self.shared.items.clone(),
                    puts: puts.by_ref().take(chunk.len()).collect(),
                    dels: Vec::new(),
                    once_dels: Vec::new(),
                })
                .await?;
            for (name, pid) in chunk {
                cat.by_name.insert(name.clone(), (*pid, true));
            }
        }
        Ok(())
    }

    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        let name = keyspace_name(queue, partition);
        let gate = self.gate(&name);
        let loaded = {
            let _g = gate.lock().await;
            self.open_gated(queue, partition, name.clone()).await
        };
        self.forget_gate(&name, gate);
        loaded
    }

    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        self.destroy_many(queue, &[partition]).await
    }

    async fn destroy_many(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        let mut partitions = partitions.to_vec();
        // Sorted and unique: gates are taken in one order (no deadlock with another destroy) and once each.
        partitions.sort_unstable();
        partitions.dedup();
        let names: Vec<String> = partitions.iter().map(|&p| keyspace_name(queue, p)).collect();
        let gates: Vec<_> = names.iter().map(|n| self.gate(n)).collect();
        let (done, _pids) = {
            let mut held = Vec::with_capacity(gates.len());
            for g in &gates {
                held.push(g.lock().await);
            }
            // The pids of the partitions (segment keys name them), read under the gates.
            let pids: Vec<(u32, u64)> = {
                let cat = self.shared.catalog.lock().await;
                partitions
                    .iter()
                    .zip(&names)
                    .filter_map(|(&p, n)| cat.by_name.get(n.as_str()).map(|&(pid, _)| (p, pid)))
                    .collect()
            };
            let done = self.destroy_gated(&names).await;
            // The segment objects go while the gates are held: no partition of these names exists then, nor can
            // one be opened, so everything under their segment directories is a destroyed partition's (also one
            // whose earlier destroy failed here, whose pid the catalog no longer knows). A failure fails the
            // destroy: nothing else lists a destroyed partition's segments, and destroying again finishes it.
            #[cfg(feature = "s3")]
            let done = match done {
                Ok(()) => self.delete_destroyed_segments(queue, &partitions).await,
                e => e,
            };
            (done, pids)
        };
        for (name, gate) in names.iter().zip(gates) {
            self.forget_gate(name, gate);
        }
        // Once more after the object-storage request timeout, in the background and best effort: a spill task of
        // a partition dropped earlier may still be writing an object. Only those the destroyed pids wrote: by
        // then a queue created again under the name may have segments of its own there.
        #[cfg(feature = "s3")]
        if done.is_ok() && !_pids.is_empty() {
            if let Some(ctx) = self.shared.cold.read().unwrap_or_else(|e| e.into_inner()).clone() {
                let queue = queue.to_string();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(40)).await;
                    for &(p, pid) in &_pids {
                        ctx.delete_partition(&queue, p, pid).await;
                    }
                });
            }
        }
        done
    }

    async fn close(&self) {
        // The reclaimer first: it writes through the writer. Unfinished deletions resume at the next open.
        self.shared
            .reclaim_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let reclaimer = self
            .shared
            .reclaimer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
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
            if let Some(r) = reclaimer {
                let _ = r.join();
            }
            if let Some(w) = writer {
                let _ = w.join();
            }
            engine.close();
        })
        .await;
    }
}

/// A point-in-time read of one partition: a database snapshot read one page per call, in id order, merging the
/// partition's own prefix with its paged records (see the `paging` module), one key range per priority, and the
/// paged schedule's records (in id order too).
struct FjallSnapshot {
    engine: Arc<Engine>,
    name: Arc<str>,
    snap: fjall::Snapshot,
    /// `None` when the store never wrote an item: the snapshot is empty.
    ks: Option<fjall::Keyspace>,
    pid: u64,
    /// Per source (the partition's prefix, then each priority's paged records, then the paged schedule's): the next
    /// key to read (inclusive),
    /// `None` once the source is read out.
    next: Vec<Option<Vec<u8>>>,
}

impl fmt::Debug for FjallSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallSnapshot").field("name", &self.name).finish()
    }
}

impl FjallSnapshot {
    /// The first key after source `i`.
    fn end(&self, i: usize) -> Vec<u8> {
        if i == 0 {
            (self.pid + 1).to_be_bytes().to_vec()
        } else if i > PRIORITIES {
            pg::sched_record_key(self.pid, u64::MAX)
        } else {
            pg::record_key(self.pid, (i - 1) as u8, u64::MAX)
        }
    }

    /// The key source `i` would hold item `id` under.
    fn key_of(&self, i: usize, id: u64) -> Vec<u8> {
        if i == 0 {
            pid_item_key(self.pid, ItemId(id), false)
        } else if i > PRIORITIES {
            pg::sched_record_key(self.pid, id)
        } else {
            pg::record_key(self.pid, (i - 1) as u8, id)
        }
    }

    /// Items of source `i` from its next key on, in id order, up to the first of: the end of the source, an id at or
    /// after `ceiling` (the page cannot take it), `limit` items, or the item after the one that took their bytes
    /// over `max_bytes` (so at most one item past the bound is read). Says where it stopped.
    fn read_source(
        &self,
        ks: &fjall::Keyspace,
        i: usize,
        limit: usize,
        max_bytes: u64,
        ceiling: Option<u64>,
    ) -> Result<(Vec<Item>, SourceEnd), StorageError> {
        use fjall::Readable;
        let Some(from) = &self.next[i] else {
            return Ok((Vec::new(), SourceEnd::Exhausted));
        };
        let what = format!("partition '{}' in '{}'", self.name, self.engine.dir().display());
        let end = self.end(i);
        let mut items: Vec<Item> = Vec::new();
        // Bytes of the items before the last one: the last one's payload may still follow (a record of its own).
        let mut total = 0u64;
        let mut stop = |items: &[Item], id: u64| -> Option<SourceEnd> {
            if ceiling.is_some_and(|c| id >= c) {
                return Some(SourceEnd::Ceiling);
            }
            if let Some(last) = items.last() {
                total = total.saturating_add(item_bytes(last));
            }
            (items.len() >= limit || total > max_bytes).then_some(SourceEnd::Cut(id))
        };
        for kv in self.snap.range(ks, from.as_slice()..end.as_slice()) {
            let (k, v) = kv.into_inner().map_err(|e| self.engine.read_error(e))?;
            if i > PRIORITIES {
                // The paged schedule's id index: the record is under the due time it names.
                let Some(id) = pg::record_id(&k) else { continue };
                if let Some(end) = stop(&items, id) {
                    return Ok((items, end));
                }
                let due = pg::decode_due(id, &v, &what)?;
                let r = self
                    .snap
                    .get(ks, pg::sched_due_key(self.pid, (due, id)))
                    .map_err(|e| self.engine.read_error(e))?
                    .ok_or_else(|| pg::sched_missing(id, &what))?;
                items.push(pg::decode_record(id, &r, &what)?);
                continue;
            }
            if i > 0 {
                let Some(id) = pg::record_id(&k) else { continue };
                if let Some(end) = stop(&items, id) {
                    return Ok((items, end));
                }
                items.push(pg::decode_record(id, &v, &what)?);
                continue;
            }
            match parse_key(&k[8..]) {
                Key::Meta(id) => {
                    if let Some(end) = stop(&items, id.0) {
                        return Ok((items, end));
                    }
                    items.push(decode_meta(id, &v, &what)?);
                }
                // A payload sorts right after its item's metadata.
                Key::Payload(id) => {
                    if let Some(it) = items.last_mut().filter(|it| it.id == id) {
                        it.payload = Bytes::copy_from_slice(&v);
                    }
                }
                Key::Dedup(..) | Key::Other => {}
            }
        }
        Ok((items, SourceEnd::Exhausted))
    }

    /// Reads the next items in id order, at most `limit` and within `max_bytes` (at least one): the sources are
    /// read one after the other, each up to the page's ceiling (the first id the page had to leave out), so that
    /// at most the bound plus one item is read per source; each source's next key is then the ceiling, or nothing
    /// once it was read out within the page.
    fn page(&mut self, limit: usize, max_bytes: u64) -> Result<Vec<Item>, StorageError> {
        let Some(ks) = self.ks.clone() else {
            return Ok(Vec::new());
        };
        let limit = limit.max(1);
        let mut out: Vec<Item> = Vec::new();
        let mut ceiling: Option<u64> = None;
        // Per source: whether it was read to its end, and the highest id read from it.
        let mut ends: Vec<(bool, Option<u64>)> = Vec::with_capacity(self.next.len());
        for i in 0..self.next.len() {
            let (items, end) = self.read_source(&ks, i, limit, max_bytes, ceiling)?;
            ends.push((end == SourceEnd::Exhausted, items.last().map(|it| it.id.0)));
            if let SourceEnd::Cut(id) = end {
                // The source holds more from `id` on, unread: the page cannot go past it.
                ceiling = Some(ceiling.map_or(id, |c| c.min(id)));
            }
            out.extend(items);
            keep_page(&mut out, limit, max_bytes, &mut ceiling);
        }
        for (i, (exhausted, last)) in ends.into_iter().enumerate() {
            if self.next[i].is_none() {
                continue;
            }
            self.next[i] = match ceiling {
                // Everything it held was read and is in the page.
                _ if exhausted && last.is_none_or(|l| ceiling.is_none_or(|c| l < c)) => None,
                Some(c) => Some(self.key_of(i, c)),
                // Unreachable: a source not read out set a ceiling.
                None => None,
            };
        }
        Ok(out)
    }
}

/// Where [`FjallSnapshot::read_source`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceEnd {
    /// At the end of the source.
    Exhausted,
    /// At an id at or after the page's ceiling.
    Ceiling,
    /// Before item `id`, for the limit or the byte bound: the source holds more from there on.
    Cut(u64),
}

#[async_trait]
impl PartitionSnapshot for FjallSnapshot {
    async fn next(&mut self, limit: usize) -> Result<Vec<Item>, StorageError> {
        self.next_within(limit, u64::MAX).await
    }

    async fn next_within(&mut self, limit: usize, max_bytes: u64) -> Result<Vec<Item>, StorageError> {
        if self.next.iter().all(Option::is_none) {
            return Ok(Vec::new());
        }
        // Reading pages from disk blocks: on the blocking pool, with the snapshot moved there and back.
        let mut me = FjallSnapshot {
            engine: self.engine.clone(),
            name: self.name.clone(),
            snap: self.snap.clone(),
            ks: self.ks.clone(),
            pid: self.pid,
            next: std::mem::take(&mut self.next),
        };
        let (items, next) = blocking(move || {
            let items = me.page(limit, max_bytes)?;
            Ok((items, me.next))
        })
        .await?;
        self.next = next;
        Ok(items)
    }
}

/// What a page read returns per planned read: the read, the items, whether the disk had no more.
type PageData = (PageRead, Vec<Item>, bool);

/// Reads the planned pages of partition `pid`. Blocking.
fn read_pages(
    engine: &Engine,
    pid: u64,
    what: &str,
    plan: Vec<PageRead>,
) -> Result<Vec<PageData>, StorageError> {
    let Some(ks) = engine.keyspace(ITEMS, false)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(plan.len());
    for r in plan {
        // The plan bounds a page-in (see `PartitionState::page_plan`).
        let items = pg::read_page(engine, &ks, pid, r, u64::MAX, what)?;
        let exhausted = items.len() < r.n;
        out.push((r, items, exhausted));
    }
    Ok(out)
}

/// A read-ahead of paged items in flight.
struct Prefetch {
    /// [`PartitionState::paged_epoch`] when it started.
    epoch: u64,
    task: tokio::task::JoinHandle<Result<Vec<PageData>, StorageError>>,
}

/// A partition's state behind its lock.
/// What opening a partition reads from disk.
struct Loaded {
    state: PartitionState,
    hwm: u64,
    payload_keys: HashSet<u64>,
}

struct Inner {
    state: PartitionState,
    /// A read-ahead of paged items, applied by a later call.
    prefetch: Option<Prefetch>,
    /// Highest id written to disk (see [`HWM_KEY`]).
    hwm: u64,
    /// Ids of the live items whose payload is a record of its own (larger than the codec's inline limit, or
    /// written by an earlier build): only their deletion deletes a payload key. Read at open, kept by every write.
    payload_keys: HashSet<u64>,
    /// Memory may be ahead of the disk after a failed write: re-read before the next call.
    stale: bool,
    /// Cold segments and the cold work in flight.
    #[cfg(feature = "s3")]
    cold: cold::ColdState,
}

/// One partition of a [`FjallStore`].
pub struct FjallPartition {
    name: Arc<str>,
    /// The prefix of this partition's keys in the `items` keyspace.
    pid: u64,
    /// Whether the catalog entry naming `pid` is on disk; until it is, every write carries it.
    registered: AtomicBool,
    shared: Arc<Shared>,
    /// Only the owning queue task calls, one call at a time; an async lock because a write holds it while it waits
    /// for the disk.
    inner: tokio::sync::Mutex<Inner>,
    closed: AtomicBool,
    /// The queue (object keys of cold segments name it).
    #[cfg(feature = "s3")]
    queue: Arc<str>,
    /// The partition number (where a fresh partition's ids start; object keys of cold segments name it too).
    part_no: u32,
}

impl fmt::Debug for FjallPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallPartition")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl FjallPartition {
    /// Locks the state, re-reading it from disk first when a failed write left it stale.
    async fn lock(&self) -> Result<tokio::sync::MutexGuard<'_, Inner>, StorageError> {
        let closed = || StorageError::unavailable(format!("partition '{}' is closed", self.name));
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let mut g = self.inner.lock().await;
        // Checked again under the lock: a destroy sets the flag and then waits for the lock, so no write under a
        // destroyed pid can start after the destroy has passed this point.
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        if g.stale {
            let Loaded {
                state,
                hwm,
                payload_keys,
            } = self
                .shared
                .load(self.name.clone(), self.pid, self.part_no)
                .await?;
            tracing::info!(partition = %self.name, items = state.len(), "partition re-read from disk after a failed write");
            g.state = state;
            g.hwm = hwm;
            g.payload_keys = payload_keys;
            g.stale = false;
            g.prefetch = None;
            #[cfg(feature = "s3")]
            {
                g.cold.segs = self.shared.manifest(self.pid, &self.name).await?;
                g.cold.gen += 1;
                // What the failed write did is unknown here: a spill in flight is abandoned.
                if let Some(removed) = g.cold.spill_removed() {
                    removed.all = true;
                }
            }
        }
        Ok(g)
    }

    async fn read<T>(&self, op: impl FnOnce(&PartitionState) -> T) -> Result<T, StorageError> {
        let g = self.lock().await?;
        Ok(op(&g.state))
    }

    /// Resident and paged ready items, and paged payload bytes (counters only: no disk read).
    pub async fn paging_counts(&self) -> PagingCounts {
        self.inner.lock().await.state.paging_counts()
    }

    /// Applies `op` to the state and writes what it changed; on a failed write the state goes stale.
    async fn write<T>(
        &self,
        op: impl FnOnce(&mut PartitionState) -> (T, Changes),
    ) -> Result<T, StorageError> {
        // Nothing is urgent for an operation that leases nothing: no segment can be left unloaded.
        self.write_paged(0, op, |_| true).await
    }

    /// [`FjallPartition::write`] for an operation that leases up to `want` items: the pages it needs (and any
    /// priority whose resident head ran low) are read in first. When a segment the lease needs cannot be loaded,
    /// the reads stop at its priority, the operation serves what comes before it, and `served` says whether that
    /// is something (it may also adjust the answer): if not, the call fails with the segment's error.
    async fn write_paged<T>(
        &self,
        want: usize,
        op: impl FnOnce(&mut PartitionState) -> (T, Changes),
        served: impl FnOnce(&mut T) -> bool,
    ) -> Result<T, StorageError> {
        let mut g = self.lock().await?;
        self.shared.check_writable().await?;
        let unloaded = self.page_in(&mut g, want).await?;
        let (mut out, ch) = op(&mut g.state);
        let Some(e) = unloaded else {
            return self.commit(g, out, ch).await;
        };
        // The page-ins done (higher priorities') and what the operation changed are written either way.
        let any = served(&mut out);
        self.commit_mut(&mut g, ch).await?;
        if any {
            Ok(out)
        } else {
            Err(e)
        }
    }

    /// [`FjallPartition::write`] for an operation on leased items named by `ids`: the ones that are paged items
    /// are looked up first, so the operation refuses them as not leased (not as missing).
    async fn write_probed<T>(
        &self,
        ids: Vec<ItemId>,
        op: impl FnOnce(&mut PartitionState) -> (T, Changes),
    ) -> Result<T, StorageError> {
        self.write_fetched(ids, |_| Vec::new(), op).await
    }

    /// [`FjallPartition::write_probed`] that first reads back the payloads on disk `reads` names (see "Payloads on
    /// disk" in the state's module docs) and gives them to the operation.
    async fn write_fetched<T>(
        &self,
        ids: Vec<ItemId>,
        reads: impl FnOnce(&mut PartitionState) -> Vec<u64>,
        op: impl FnOnce(&mut PartitionState) -> (T, Changes),
    ) -> Result<T, StorageError> {
        let mut g = self.lock().await?;
        self.shared.check_writable().await?;
        self.page_in(&mut g, 0).await?;
        let wanted = reads(&mut g.state);
        let fetched = !wanted.is_empty();
        if fetched {
            let payloads = self.read_payloads(wanted).await?;
            g.state.set_fetched(payloads);
        }
        let mut found = HashSet::new();
        if !g.state.paged().is_empty() {
            self.find_paged(&mut g, &ids, false, |_, items| {
                found.extend(items.iter().map(|it| it.id.0));
            })
            .await?;
        }
        let probed = !found.is_empty();
        if probed {
            g.state.set_probe(found);
        }
        let (out, ch) = op(&mut g.state);
        if probed {
            g.state.set_probe(HashSet::new());
        }
        if fetched {
            g.state.set_fetched(HashMap::new());
        }
        self.commit(g, out, ch).await
    }

    /// Writes a change set (after the paging writes the state holds), marking the state stale when it fails.
    async fn commit<T>(
        &self,
        mut g: tokio::sync::MutexGuard<'_, Inner>,
        out: T,
        ch: Changes,
    ) -> Result<T, StorageError> {
        self.commit_mut(&mut g, ch).await?;
        Ok(out)
    }

    /// [`FjallPartition::commit`] keeping the lock.
    async fn commit_mut(&self, g: &mut Inner, ch: Changes) -> Result<(), StorageError> {
        let mut all = g.state.take_paging();
        all.append(ch);
        if all.is_empty() {
            return Ok(());
        }
        let (unit, top) = self.unit(&all, g.hwm, &mut g.payload_keys);
        match self.shared.submit_deferrable(unit).await {
            Ok(()) => {
                g.hwm = top;
                self.registered.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                g.stale = true;
                Err(e)
            }
        }
    }

    /// Pages items in around an operation that leases up to `want` items (see [`PartitionState::page_plan`]): takes
    /// a finished read-ahead, reads what the lease cannot do without (waiting for a read-ahead in flight first), and
    /// starts the next read-ahead when a priority's resident head ran low. Disk reads run off the async runtime; a
    /// read-ahead runs while the partition serves. What comes in is moved from paged records to items by the
    /// operation's write.
    ///
    /// `Ok(Some(_))`: a cold segment the lease needs could not be loaded (see [`FjallPartition::cold_guard`]).
    /// The reads are planned highest priority first and stop at that priority, after reading its records on disk
    /// before the segment; its resident head then runs out while it still has paged items, which ends the state's
    /// lease there: what the lease serves is exactly what comes before the segment in serving order. Never with
    /// `want` 0 (nothing is urgent then).
    async fn page_in(&self, g: &mut Inner, want: usize) -> Result<Option<StorageError>, StorageError> {
        #[cfg(feature = "s3")]
        self.cold_poll(g).await?;
        if g.state.paged().is_empty() && g.prefetch.is_none() {
            return Ok(None);
        }
        if g.prefetch.as_ref().is_some_and(|f| f.task.is_finished()) {
            self.finish_prefetch(g).await?;
        }
        #[allow(unused_mut)]
        let mut unloaded: Option<StorageError> = None;
        // The priority whose segment could not be loaded just now: its read-ahead would only try it again.
        #[allow(unused_mut, unused_variables)]
        let mut failed: Option<u8> = None;
        if !g.state.page_plan(want, true).is_empty() {
            self.finish_prefetch(g).await?;
            #[allow(unused_mut)]
            let mut plan = g.state.page_plan(want, true);
            // Failing the whole lease instead took the partition out of service in the engine (produce and every
            // priority with it) for as long as a low priority's segment stayed unreadable.
            #[cfg(feature = "s3")]
            for i in 0..plan.len() {
                let r = plan[i];
                if let Some(u) = self.cold_guard(g, r.prio, r.from, r.n).await? {
                    plan[i].n = u.before;
                    plan.truncate(if u.before > 0 { i + 1 } else { i });
                    failed = Some(r.prio);
                    unloaded = Some(u.error);
                    break;
                }
            }
            if !plan.is_empty() {
                let epoch = g.state.paged_epoch();
                let reads = self.read_pages(plan).await?;
                self.apply_pages(g, epoch, reads);
            }
        }
        if g.prefetch.is_none() {
            #[allow(unused_mut)]
            let mut plan = g.state.page_plan(0, false);
            // A read-ahead that would pass a segment that cannot be loaded reads only the records before it (the
            // failure is logged and counted; the next lease that needs the segment tries again and gets the
            // error): failing instead failed every write of the partition, produce included, while the segment
            // stayed unreadable.
            #[cfg(feature = "s3")]
            {
                let mut ahead = Vec::with_capacity(plan.len());
                for mut r in plan {
                    if failed == Some(r.prio) {
                        continue;
                    }
                    if let Some(u) = self.cold_guard(g, r.prio, r.from, r.n).await? {
                        r.n = u.before;
                    }
                    if r.n > 0 {
                        ahead.push(r);
                    }
                }
                plan = ahead;
            }
            if !plan.is_empty() {
                let epoch = g.state.paged_epoch();
                let task = tokio::task::spawn_blocking({
                    let (engine, pid, what) = (self.shared.engine.clone(), self.pid, self.what());
                    move || read_pages(&engine, pid, &what, plan)
                });
                g.prefetch = Some(Prefetch { epoch, task });
            }
        }
        Ok(unloaded)
    }

    /// Waits for the read-ahead in flight, if any, and applies it unless the paged items changed since it started.
    async fn finish_prefetch(&self, g: &mut Inner) -> Result<(), StorageError> {
        let Some(f) = g.prefetch.take() else {
            return Ok(());
        };
        let reads = f
            .task
            .await
            .map_err(|e| StorageError::other(format!("storage task failed: {e}")))??;
        self.apply_pages(g, f.epoch, reads);
        Ok(())
    }

    /// Reads pages now (off the async runtime).
    async fn read_pages(&self, plan: Vec<PageRead>) -> Result<Vec<PageData>, StorageError> {
        let (engine, pid, what) = (self.shared.engine.clone(), self.pid, self.what());
        blocking(move || read_pages(&engine, pid, &what, plan)).await
    }

    /// Gives read pages to the state, unless the paged items changed since the read started (`epoch`).
    fn apply_pages(&self, g: &mut Inner, epoch: u64, reads: Vec<PageData>) {
        if g.state.paged_epoch() != epoch {
            return;
        }
        for (r, items, exhausted) in reads {
            self.shared
                .items_paged_in
                .fetch_add(items.len() as u64, Ordering::Relaxed);
            g.state.page_in(r, items, exhausted);
        }
    }

    /// Names the partition in error messages.
    fn what(&self) -> String {
        format!(
            "partition '{}' in '{}'",
            self.name,
            self.shared.engine.dir().display()
        )
    }

    /// Reads the paged items among the first ids of `ids` (point reads under each priority whose paged range may
    /// hold the id), skipping resident and missing ones, up to [`DROP_READ_BYTES`] of payloads (the item that
    /// crosses it is the last), and how many ids were looked up: the caller asks again for the rest (see
    /// `find_paged`).
    async fn read_paged(&self, g: &Inner, ids: &[ItemId]) -> Result<(Vec<Item>, usize), StorageError> {
        let paged = g.state.paged();
        // Each pair with the index in `ids` of its id, to say how many ids a read that stopped early looked up.
        let (at, wanted): (Vec<usize>, Vec<(u8, u64)>) = ids
            .iter()
            .map(|i| i.0)
            .enumerate()
            .filter(|&(_, id)| !g.state.contains_live(id))
            .flat_map(|(i, id)| {
                (0..PRIORITIES)
                    .filter(move |&p| paged.count[p] > 0 && id >= paged.from[p])
                    .map(move |p| (i, (p as u8, id)))
            })
            .unzip();
        if wanted.is_empty() {
            return Ok((Vec::new(), ids.len()));
        }
        let engine = self.shared.engine.clone();
        let (pid, what) = (self.pid, self.what());
        let n = wanted.len();
        let (items, used) = blocking(move || {
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok((Vec::new(), n));
            };
            pg::find(&engine, &ks, pid, &wanted, DROP_READ_BYTES, &what)
        })
        .await?;
        // A read that stopped early stopped at an item it found: an item has one priority, so the pairs of its id
        // under the other priorities left need no look-up.
        let ids_used = match used.checked_sub(1) {
            Some(last) if used < n => at[last] + 1,
            _ => ids.len(),
        };
        Ok((items, ids_used))
    }

    /// The payloads of items `ids`, kept on disk only (see "Payloads on disk" in the state's module docs), by id:
    /// each from its payload record, or its item record should the payload be inline there. One point read each.
    async fn read_payloads(&self, ids: Vec<u64>) -> Result<HashMap<u64, Bytes>, StorageError> {
        let engine = self.shared.engine.clone();
        let (pid, what) = (self.pid, self.what());
        blocking(move || {
            let mut out = HashMap::with_capacity(ids.len());
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok(out);
            };
            for id in ids {
                let payload = match ks
                    .get(pid_item_key(pid, ItemId(id), true))
                    .map_err(|e| engine.read_error(e))?
                {
                    Some(v) => Bytes::copy_from_slice(&v),
                    None => match ks
                        .get(pid_item_key(pid, ItemId(id), false))
                        .map_err(|e| engine.read_error(e))?
                    {
                        Some(v) => decode_meta(ItemId(id), &v, &what)?.payload,
                        None => {
                            return Err(StorageError::other(format!(
                                "{what}: item {id} whose payload is on disk has no record"
                            )))
                        }
                    },
                };
                out.insert(id, payload);
            }
            Ok(out)
        })
        .await
    }

    /// Fills in the payloads of `items` that are on disk only (a list, the dead items for transfer): bounded by
    /// the byte bound of the call that chose the items, which counted them.
    async fn fill_payloads(&self, g: &Inner, items: &mut [Item]) -> Result<(), StorageError> {
        let wanted: Vec<u64> = items
            .iter()
            .map(|it| it.id.0)
            .filter(|&id| g.state.is_on_disk(id))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut payloads = self.read_payloads(wanted).await?;
        for it in items {
            if let Some(p) = payloads.remove(&it.id.0) {
                it.payload = p;
            }
        }
        Ok(())
    }

    /// Looks up the paged ready items (`sched`: the paged scheduled items) among `ids`, in reads of at most
    /// [`DROP_BATCH`] ids and [`DROP_READ_BYTES`] of payloads, handing each read's items to `each` with the state
    /// before the next read.
    async fn find_paged(
        &self,
        g: &mut Inner,
        ids: &[ItemId],
        sched: bool,
        mut each: impl FnMut(&mut PartitionState, Vec<Item>),
    ) -> Result<(), StorageError> {
        let mut rest = ids;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(DROP_BATCH)];
            let (items, used) = if sched {
                self.find_sched(chunk).await?
            } else {
                self.read_paged(g, chunk).await?
            };
            // A read looks up at least one id (it stops only after an item it found): the clamp only ensures
            // progress.
            rest = &rest[used.clamp(1, rest.len())..];
            each(&mut g.state, items);
        }
        Ok(())
    }

    /// Up to `limit` paged items of priority `prio` with ids at or above `from`, in id order, with payloads up to
    /// `max_bytes` (the item that crosses it is the last).
    async fn read_ready(
        &self,
        prio: u8,
        from: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Item>, StorageError> {
        let engine = self.shared.engine.clone();
        let (pid, what) = (self.pid, self.what());
        let read = PageRead { prio, from, n: limit };
        blocking(move || {
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok(Vec::new());
            };
            pg::read_page(&engine, &ks, pid, read, max_bytes, &what)
        })
        .await
    }

    /// The paged scheduled items `read` names, and the key of the next one on disk (see `pg::read_sched`).
    async fn read_sched(&self, read: SchedRead) -> Result<(Vec<Item>, Option<SchedKey>), StorageError> {
        let engine = self.shared.engine.clone();
        let (pid, what) = (self.pid, self.what());
        blocking(move || {
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok((Vec::new(), None));
            };
            pg::read_sched(&engine, &ks, pid, read, &what)
        })
        .await
    }

    /// Up to `limit` paged scheduled items with ids at or above `from`, in id order, with payloads up to `max_bytes`
    /// (the item that crosses it is the last).
    async fn read_sched_by_id(
        &self,
        from: u64,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Item>, StorageError> {
        let engine = self.shared.engine.clone();
        let (pid, what) = (self.pid, self.what());
        blocking(move || {
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok(Vec::new());
            };
            pg::read_sched_by_id(&engine, &ks, pid, from, limit, max_bytes, &what)
        })
        .await
    }

    /// The paged scheduled items among the first ids of `ids` (one point read each), up to [`DROP_READ_BYTES`] of
    /// payloads, and how many ids were looked up (see `pg::find_sched`).
    async fn find_sched(&self, ids: &[ItemId]) -> Result<(Vec<Item>, usize), StorageError> {
        let ids: Vec<u64> = ids.iter().map(|i| i.0).collect();
        let engine = self.shared.engine.clone();
        let (pid, what) = (self.pid, self.what());
        blocking(move || {
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok((Vec::new(), ids.len()));
            };
            pg::find_sched(&engine, &ks, pid, &ids, DROP_READ_BYTES, &what)
        })
        .await
    }

    /// Expires paged items whose deadline passed: for each priority whose expiry bound is due, walks its paged
    /// records from the lowest id, expires up to [`SWEEP_LIMIT`] due ones and sets the bound to the earliest
    /// deadline left. When the priority's deadlines rise with its ids (one expiry timeout, the usual case) the walk
    /// stops at the first item not due; otherwise it reads every paged record of the priority. Returns how many
    /// died and whether more are due.
    async fn sweep_paged(
        &self,
        g: &mut Inner,
        now: Ts,
        policy: LifecyclePolicy,
        ch: &mut Changes,
    ) -> Result<(u64, bool), StorageError> {
        let mut dead = 0;
        let mut more = false;
        for p in g.state.paged_expiry_due(now) {
            // The first id of a due segment that could not be read, if any: it is logged and counted, its items
            // (and those of the due segments after it) stay in it, unswept, and the rest of the sweep and of the
            // lifecycle goes on. Failing the call instead stopped the whole lifecycle (expired leases held,
            // schedules not run) for as long as the segment stayed unreadable.
            #[cfg(feature = "s3")]
            let unread = {
                let unread = self.cold_guard_due(g, p, now).await?;
                g.cold.gen += 1;
                unread
            };
            #[cfg(not(feature = "s3"))]
            let unread: Option<u64> = None;
            let ordered = g.state.paged().ordered[usize::from(p)];
            let mut from = g.state.paged().from[usize::from(p)];
            let mut budget = SWEEP_LIMIT;
            let mut rest_min = i64::MAX;
            // Reads of at most DROP_READ_BYTES of due items' payloads, each dropped from the state before the next:
            // only their metadata is needed, and up to SWEEP_LIMIT items of large payloads held at once took
            // memory in proportion to the items expired (+556 MB for 600 items of 1 MiB).
            let complete = loop {
                let engine = self.shared.engine.clone();
                let (pid, what) = (self.pid, self.what());
                let (items, chunk_min, stop) = blocking(move || {
                    let Some(ks) = engine.keyspace(ITEMS, false)? else {
                        return Ok((Vec::new(), i64::MAX, SweepStop::End));
                    };
                    let mut due = Vec::new();
                    let (mut rest_min, mut bytes) = (i64::MAX, 0u64);
                    let mut stop = SweepStop::End;
                    pg::walk(&engine, &ks, pid, p, from, &what, |it| {
                        let exp = it.expire_deadline.0;
                        if exp > now.0 {
                            rest_min = rest_min.min(exp);
                            !ordered
                        } else if due.len() < budget {
                            bytes += it.payload.len() as u64;
                            due.push(it);
                            if bytes >= DROP_READ_BYTES {
                                stop = SweepStop::Bytes;
                                return false;
                            }
                            true
                        } else {
                            stop = SweepStop::Limit;
                            false
                        }
                    })?;
                    Ok((due, rest_min, stop))
                })
                .await?;
                rest_min = rest_min.min(chunk_min);
                budget -= items.len();
                let last = items.last().map(|it| it.id.0);
                let (n, c) = g.state.drop_paged(items, Some(policy));
                ch.append(c);
                dead += n;
                if ordered {
                    // Everything below the last one expired went with it: later reads start past their records.
                    // Not past a segment left unread, whose items are still there.
                    if let Some(last) = last {
                        g.state
                            .raise_paged_from(p, unread.map_or(last + 1, |f| f.min(last + 1)));
                    }
                }
                match (stop, last) {
                    // The records not read yet are the ones after the last item taken: the ones before it were
                    // either taken or counted in `rest_min`.
                    (SweepStop::Bytes, Some(last)) if budget > 0 => from = last + 1,
                    (SweepStop::End, _) => break true,
                    _ => break false,
                }
            };
            if complete {
                // Segments left hold items that are not due yet: their bound counts too. Due segments left unread
                // come due again after the backoff (their items expire that much late): a bound already passed
                // had the engine run the lifecycle again at once.
                #[cfg(feature = "s3")]
                let rest_min = {
                    let seg_min = g.cold.min_expire(p);
                    let seg_min = match unread {
                        Some(_) => seg_min.max(now.add(cold::FAILURE_BACKOFF).0),
                        None => seg_min,
                    };
                    rest_min.min(seg_min)
                };
                g.state.set_paged_min_expire(p, rest_min);
            } else {
                more = true;
            }
        }
        Ok((dead, more))
    }

    /// Encodes a change set with one operation per key, the final one: an id put and then removed within one call
    /// is removed, an id put twice keeps its last version, so a batch never holds two versions of a key. Ids above
    /// `hwm` are new and get their payload written; older ids only change their metadata (a payload never changes),
    /// except items paged back in, written whole. Spilled items are written as paged records only; a paged record
    /// removed without its item moving to the items was never an item, so it leaves no item keys to delete.
    fn unit(&self, ch: &Changes, hwm: u64, payload_keys: &mut HashSet<u64>) -> (Unit, u64) {
        let gone: HashSet<ItemId> = ch.del.iter().copied().collect();
        let spilled: HashSet<ItemId> = ch.spilled.iter().map(|it| it.id).collect();
        let paged_in: HashSet<ItemId> = ch.paged_in.iter().copied().collect();
        let unpaged: HashSet<ItemId> = ch.unpaged.iter().map(|x| x.1).collect();
        // The paged schedule's last move per id (see `SchedMove`): an item spilled is written as a paged record
        // only, not as an item.
        let mut sched: HashMap<u64, &SchedMove> = HashMap::with_capacity(ch.sched_moves.len());
        for mv in &ch.sched_moves {
            let id = match mv {
                SchedMove::Spill(it) => it.id.0,
                SchedMove::Unpage(_, id) => *id,
            };
            sched.insert(id, mv);
        }
        // Checked for emptiness first: most writes move nothing in the schedule, and this runs per item written.
        let sched_spilled =
            |id: ItemId| !sched.is_empty() && matches!(sched.get(&id.0), Some(SchedMove::Spill(_)));
        let mut seen = HashSet::with_capacity(ch.put.len());
        let mut puts = Vec::with_capacity(ch.put.len() + 1);
        let mut top = hwm;
        for it in ch.put.iter().rev() {
            top = top.max(it.id.0);
            if gone.contains(&it.id)
                || spilled.contains(&it.id)
                || sched_spilled(it.id)
                || !seen.insert(it.id)
            {
                continue;
            }
            // A small payload rides in the item's record (see the codec); a large one is written once, in a
            // record of its own, by the write that creates the id.
            puts.push((pid_item_key(self.pid, it.id, false), encode_item(it)));
            // Written once per id: when the id has no payload record yet (a new item, or one paged back in).
            // Not `id > hwm`: ids come from per-priority blocks, so a new item's id may lie below the hwm.
            if !it.payload.is_empty() && !inline_payload(it) && payload_keys.insert(it.id.0) {
                puts.push((pid_item_key(self.pid, it.id, true), it.payload.to_vec()));
            }
        }
        for it in &ch.spilled {
            top = top.max(it.id.0);
            if !gone.contains(&it.id) {
                puts.push((
                    pg::record_key(self.pid, it.priority, it.id.0),
                    pg::encode_record(it),
                ));
            }
        }
        let mut dels =
            Vec::with_capacity(gone.len() * 2 + ch.unpaged.len() + ch.dedup_del.len() + 2 * sched.len() + 2);
        match &ch.counters {
            Some(c) if c.is_empty() => dels.push(pg::counters_key(self.pid)),
            Some(c) => puts.push((pg::counters_key(self.pid), pg::encode_counters(c))),
            None => {}
        }
        for mv in sched.values() {
            match mv {
                SchedMove::Spill(it) => {
                    top = top.max(it.id.0);
                    puts.push((
                        pg::sched_due_key(self.pid, (it.enqueue_at.0, it.id.0)),
                        pg::encode_record(it),
                    ));
                    puts.push((
                        pg::sched_record_key(self.pid, it.id.0),
                        it.enqueue_at.0.to_be_bytes().to_vec(),
                    ));
                }
                SchedMove::Unpage(due, id) => {
                    dels.push(pg::sched_due_key(self.pid, (*due, *id)));
                    dels.push(pg::sched_record_key(self.pid, *id));
                }
            }
        }
        match &ch.sched_counters {
            Some(c) if c.is_empty() => dels.push(pg::sched_counters_key(self.pid)),
            Some(c) => puts.push((pg::sched_counters_key(self.pid), pg::encode_sched_counters(c))),
            None => {}
        }
        if top > hwm {
            puts.push((item_key(self.pid, HWM_KEY), top.to_be_bytes().to_vec()));
        }
        if !self.registered.load(Ordering::Acquire) {
            puts.push((catalog_key(&self.name), self.pid.to_be_bytes().to_vec()));
        }
        // A call's dedup records are one group, one entry in the same batch as their items. A group is never
        // written and removed by one call (a call only drops records that ended before its items were produced),
        // but keep one operation per key anyway, as for items.
        let dropped: HashSet<(Ts, ItemId)> = ch.dedup_del.iter().copied().collect();
        if let Some(first) = ch.dedup_put.first() {
            if !dropped.contains(&(first.until, first.id)) {
                puts.push((
                    pid_dedup_key(self.pid, first.until, first.id),
                    encode_dedup(&ch.dedup_put),
                ));
            }
        }
        // A payload key is written once, by the write that creates its id, or by the page-in of a paged item,
        // which had no item keys before (ids never repeat within a pid, a pid is reused only once nothing of it is
        // left, and only new items are paged), so its deletion can be a weak tombstone. Should a key ever be
        // written twice anyway, the worst a weak tombstone can do is bring back an old payload without its
        // metadata record, which `load` ignores: the metadata key keeps an ordinary tombstone.
        let mut once_dels = Vec::with_capacity(gone.len());
        for id in gone {
            if unpaged.contains(&id) && !paged_in.contains(&id) {
                continue;
            }
            // A paged scheduled item read back and requeued by the same write (a lifecycle pass): its item keys
            // were never written (the put above is skipped), so there is nothing to delete.
            if paged_in.contains(&id) && matches!(sched.get(&id.0), Some(SchedMove::Unpage(..))) {
                continue;
            }
            dels.push(pid_item_key(self.pid, id, false));
            // An item with its payload inline (or none) has no payload key: no tombstone for one. (A write that
            // fails re-reads the partition, this set included, from the disk.)
            if payload_keys.remove(&id.0) {
                once_dels.push(pid_item_key(self.pid, id, true));
            }
        }
        for &(prio, id) in &ch.unpaged {
            dels.push(pg::record_key(self.pid, prio, id.0));
        }
        for (until, id) in dropped {
            dels.push(pid_dedup_key(self.pid, until, id));
        }
        (
            Unit {
                keyspace: self.shared.items.clone(),
                puts,
                dels,
                once_dels,
            },
            top,
        )
    }
}

impl FjallPartition {
    /// A snapshot of the partition (see [`Partition::snapshot`]); with `whole`, every cold segment is loaded back
    /// first so that the snapshot also reads the items in segments.
    async fn take_snapshot(&self, whole: bool) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        // Holding the partition's lock means none of its writes is in flight: every write it acknowledged is in
        // the database, and the database snapshot taken now reads exactly that, from disk and memtables, without
        // copying anything and without holding the partition up while it is read.
        #[allow(unused_mut)]
        let mut g = self.lock().await?;
        // Segment items are read like the other paged items: every segment is loaded back first.
        #[cfg(feature = "s3")]
        if whole {
            self.cold_guard_all(&mut g).await?;
        }
        #[cfg(not(feature = "s3"))]
        let _ = whole;
        let _g = g;
        let engine = self.shared.engine.clone();
        let name = self.name.clone();
        let pid = self.pid;
        blocking(move || {
            let db = engine.database()?;
            let ks = engine.keyspace(ITEMS, false)?;
            let snap = db.snapshot();
            Ok(Box::new(FjallSnapshot {
                engine,
                name,
                snap,
                ks,
                pid,
                next: std::iter::once(pid.to_be_bytes().to_vec())
                    .chain((0..PRIORITIES as u8).map(|p| pg::record_key(pid, p, 0)))
                    .chain(std::iter::once(pg::sched_record_key(pid, 0)))
                    .map(Some)
                    .collect(),
            }) as Box<dyn PartitionSnapshot>)
        })
        .await
    }
}

#[async_trait]
impl Partition for FjallPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        self.write(|s| s.produce(items)).await
    }

    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        self.write_paged(n, |s| s.lease(n, lease_deadline), |out| !out.is_empty())
            .await
    }

    async fn lease_within(
        &self,
        n: usize,
        lease_deadline: Ts,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        self.write_paged(
            n,
            |s| {
                let (out, ch, capped) = s.lease_within(n, lease_deadline, max_bytes);
                ((out, capped), ch)
            },
            |(out, capped)| {
                // Nothing more can be served until the segment loads: not "ask again in this pass".
                *capped = false;
                !out.is_empty()
            },
        )
        .await
    }

    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        let ids = requests.iter().flatten().copied().collect();
        self.write_probed(ids, |s| s.complete(requests)).await
    }

    async fn extend(
        &self,
        requests: Vec<(Vec<ItemId>, Ts)>,
    ) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        let ids = requests.iter().flat_map(|r| r.0.iter()).copied().collect();
        self.write_probed(ids, |s| s.extend(requests)).await
    }

    async fn dedup_records(&self, now: Ts) -> Result<Vec<DedupRecord>, StorageError> {
        self.read(|s| s.dedup_records(now)).await
    }

    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        let ids = requests.iter().flatten().map(|o| o.id).collect();
        let plan = requests.clone();
        let (out, mut deferred) = self
            .write_fetched(
                ids,
                move |s| s.retry_reads(&plan, policy, LIFECYCLE_READ_BYTES),
                |s| {
                    let (out, ch) = s.retry(requests, policy);
                    ((out, s.has_deferred()), ch)
                },
            )
            .await?;
        // Requeues beyond the read bound were scheduled as due at once (acknowledged: they are on disk, and a
        // lifecycle pass would requeue them); requeue them now, one bounded write at a time, so that a retry of
        // many large items never holds more than the bound's worth of payloads.
        while deferred {
            let step = self
                .write_fetched(
                    Vec::new(),
                    |s| s.deferred_reads(LIFECYCLE_READ_BYTES),
                    |s| s.requeue_deferred(),
                )
                .await;
            match step {
                Ok(more) => deferred = more,
                Err(e) => {
                    // The retry itself is done and on disk: what is left is due at once, and the lifecycle
                    // requeues it (a failed write re-reads the partition, which forgets the list anyway).
                    tracing::warn!(partition = %self.name, error = %e, "requeue of retried items deferred to the lifecycle");
                    if let Ok(mut g) = self.lock().await {
                        g.state.forget_deferred();
                    }
                    deferred = false;
                }
            }
        }
        Ok(out)
    }

    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        let mut g = self.lock().await?;
        self.shared.check_writable().await?;
        #[cfg(feature = "s3")]
        self.cold_step(&mut g).await?;
        self.page_in(&mut g, 0).await?;
        // Paged scheduled items due now (the pass requeues them in due order with the resident ones), or the next
        // ones when the resident schedule ran low. Their moves ride in this pass's write; the payloads they keep on
        // disk once resident are handed over as read back, for the requeue.
        if let Some(read) = g.state.sched_plan(now, limit, LIFECYCLE_READ_BYTES) {
            let (items, next) = self.read_sched(read).await?;
            g.state.page_in_sched(read, items, next);
        }
        // Payloads on disk the pass requeues, read before anything else changes; the sweep below touches only paged
        // ready items, which are not among them. A failed read re-reads the partition (the page-in above is ahead
        // of the disk).
        let wanted = g.state.lifecycle_reads(now, policy, limit, LIFECYCLE_READ_BYTES);
        if !wanted.is_empty() {
            let payloads = match self.read_payloads(wanted).await {
                Ok(p) => p,
                Err(e) => {
                    g.stale = true;
                    return Err(e);
                }
            };
            g.state.set_fetched(payloads);
        }
        let mut ch = Changes::default();
        // The sweep changes the state priority by priority before it writes anything: failing halfway (a read,
        // the object store) leaves memory ahead of the disk, so the next call re-reads the partition (`stale`)
        // instead of committing counters that no longer match the records on disk.
        let (dead, more) = match self.sweep_paged(&mut g, now, policy, &mut ch).await {
            Ok(v) => v,
            Err(e) => {
                g.stale = true;
                return Err(e);
            }
        };
        let (mut o, c) = g.state.lifecycle(now, policy, limit);
        g.state.set_fetched(HashMap::new());
        ch.append(c);
        o.dead += dead;
        o.more |= more;
        if !o.more && !g.state.paged_expiry_due(now).is_empty() {
            // The pass requeued items (due schedules, expired leases) behind a full window as paged records, some
            // already past their expiry deadline: write them, then sweep them as the resident ones were, so that
            // none stays ready (and leasable) after it expired.
            self.commit_mut(&mut g, std::mem::take(&mut ch)).await?;
            let (dead, more) = match self.sweep_paged(&mut g, now, policy, &mut ch).await {
                Ok(v) => v,
                Err(e) => {
                    g.stale = true;
                    return Err(e);
                }
            };
            o.dead += dead;
            o.more |= more;
        }
        self.commit(g, o, ch).await
    }

    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError> {
        let g = self.lock().await?;
        let mut out = g.state.dead_items(limit);
        self.fill_payloads(&g, &mut out).await?;
        Ok(out)
    }

    async fn dead_items_within(
        &self,
        limit: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let g = self.lock().await?;
        let (mut out, capped) = g.state.dead_items_within(limit, max_bytes);
        self.fill_payloads(&g, &mut out).await?;
        Ok((out, capped))
    }

    async fn dead_count(&self) -> Result<u64, StorageError> {
        self.read(|s| s.dead_count()).await
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
        let g = self.lock().await?;
        #[cfg(feature = "s3")]
        let (cold_items, cold_bytes) = g.cold.totals();
        #[cfg(not(feature = "s3"))]
        let (cold_items, cold_bytes) = (0u64, 0u64);
        Ok({
            let s = &g.state;
            let mut st = s.stats(now);
            // The state's figures are the items held in memory (leased, scheduled, the ready ones within the
            // window); every item is on disk, the paged ones only there. A paged item whose payload is offloaded
            // counts on disk by its reference until it is paged in (paged items are counted, not read).
            let paged = s.paging_counts();
            let mut disk = s.tier_counters().held();
            // Items in cold segments are paged items whose records are in object storage.
            disk.items += paged.paged_ready.saturating_sub(cold_items) + paged.paged_scheduled;
            disk.bytes += paged.paged_bytes.saturating_sub(cold_bytes) + paged.paged_scheduled_bytes;
            st.tiers.disk = disk;
            st.tiers.object.items += cold_items;
            st.tiers.object.bytes += cold_bytes;
            st
        })
    }

    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        Ok(self.list_within(pivot, limit, scheduled, u64::MAX).await?.0)
    }

    /// Paged items are read from disk a few at a time, and a priority's reading stops at the page's ceiling (the
    /// first id the page had to leave out for its limit or its bound): at most the bound plus one step of items is
    /// read, instead of `limit` items of every paged priority. Resident items are slices of their buffers, not
    /// copies, so they are merged unbounded and cut with the rest.
    async fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let g = self.lock().await?;
        let paged = if scheduled {
            !g.state.paged_sched().is_empty()
        } else {
            !g.state.paged().is_empty()
        };
        if !paged {
            let (mut out, capped) = g.state.list_within(pivot, limit, scheduled, max_bytes);
            self.fill_payloads(&g, &mut out).await?;
            return Ok((out, capped));
        }
        // Paged items are on disk only: merge those at or after the pivot (of each paged priority, or the paged
        // schedule's) with the resident ones, in id order, keeping the page's prefix within `limit` and the bound.
        let from = pivot.map_or(0, |p| p.0);
        let mut out = g.state.list(pivot, limit, scheduled);
        let mut ceiling = None;
        // Items whose payload is on disk only count at its length (as `keep_page` would count them whole), and
        // only those kept are read back.
        let mut total = 0u64;
        let keep = out.iter().position(|it| {
            total = total.saturating_add(item_bytes(it) + g.state.disk_len(it.id.0));
            total > max_bytes
        });
        if let Some(i) = keep.map(|i| i.max(1)).filter(|&i| i < out.len()) {
            ceiling = Some(out[i].id.0);
            out.truncate(i);
        }
        self.fill_payloads(&g, &mut out).await?;
        lessor_core::storage::keep_page(&mut out, limit, max_bytes, &mut ceiling);
        // The sources to merge: each paged priority, or the paged schedule (`None`).
        let sources: Vec<Option<usize>> = if scheduled {
            vec![None]
        } else {
            (0..PRIORITIES)
                .filter(|&p| g.state.paged().count[p] > 0)
                .map(Some)
                .collect()
        };
        for src in sources {
            let mut start = match src {
                Some(p) => g.state.paged().from[p].max(from),
                None => from,
            };
            // Where the priority's items in cold segments begin to be merged (after its records on disk).
            #[cfg(feature = "s3")]
            let first = start;
            let mut step = LIST_STEP.min(limit.max(1));
            while ceiling.is_none_or(|c| start < c) {
                let got = match src {
                    // The steps and the page's ceiling bound what is read.
                    Some(p) => self.read_ready(p as u8, start, step, u64::MAX).await?,
                    None => self.read_sched_by_id(start, step, u64::MAX).await?,
                };
                let more = got.len() == step;
                if let Some(last) = got.last() {
                    start = last.id.0.saturating_add(1);
                }
                out.extend(got);
                lessor_core::storage::keep_page(&mut out, limit, max_bytes, &mut ceiling);
                if !more {
                    break;
                }
                step = (step * 2).min(limit.max(1)).min(LIST_STEP_MAX);
            }
            // Items in cold segments are listed too: the segments the page reaches are read, not loaded back. The
            // records read past a segment above are cut by the page's ceiling as its items come in.
            #[cfg(feature = "s3")]
            if let Some(p) = src {
                self.cold_list(&g, p as u8, first, limit, max_bytes, &mut out, &mut ceiling)
                    .await?;
            }
        }
        Ok((out, ceiling.is_some()))
    }

    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.write(|s| s.import(items)).await
    }

    async fn import_dedup(&self, records: Vec<lessor_core::types::DedupRecord>) -> Result<(), StorageError> {
        self.write(|s| s.import_dedup(records)).await
    }

    async fn delete(&self, mut ids: Vec<ItemId>) -> Result<(), StorageError> {
        // An id named twice is one item: a paged one read back twice would be counted out of its counters twice,
        // which would then fall below the records on disk (and the records left once they reach zero would never
        // be read again). The API passes the list as the caller gave it.
        ids.sort_unstable();
        ids.dedup();
        let mut g = self.lock().await?;
        self.shared.check_writable().await?;
        #[cfg(feature = "s3")]
        {
            let raw: Vec<u64> = ids.iter().map(|i| i.0).collect();
            self.cold_guard_ids(&mut g, &raw).await?;
            g.cold.gen += 1;
        }
        let mut ch = g.state.delete(ids.clone());
        // Only the items' metadata is needed, but their records hold the payloads: reads bounded in bytes, each
        // dropped from the state before the next, and one write of it all.
        let mut dropped = Ok(());
        if !g.state.paged().is_empty() {
            dropped = self
                .find_paged(&mut g, &ids, false, |s, items| {
                    ch.append(s.drop_paged(items, None).1)
                })
                .await;
        }
        if dropped.is_ok() && !g.state.paged_sched().is_empty() {
            dropped = self
                .find_paged(&mut g, &ids, true, |s, items| {
                    ch.append(s.drop_paged_sched(items).1)
                })
                .await;
        }
        if let Err(e) = dropped {
            // The state has changed already: a failed read re-reads the partition next time (see `lifecycle`).
            g.stale = true;
            return Err(e);
        }
        self.commit(g, (), ch).await
    }

    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        self.take_snapshot(true).await
    }

    async fn reference_snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        // A spill stops at the first record whose payload is an object reference (see `cold::is_object_ref`), so
        // no segment holds one: the payload sweeper reads what is on disk and leaves the segments cold.
        self.take_snapshot(false).await
    }

    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError> {
        let mut g = self.lock().await?;
        self.shared.check_writable().await?;
        let ch = g.state.clear(request);
        let sched = request.scheduled && !g.state.paged_sched().is_empty();
        if request.queue || sched {
            // The resident part and the paged records go in bounded writes, each leaving records and counters in
            // agreement (a crash in between leaves a partly cleared queue, as a clear racing a crash may).
            self.commit_mut(&mut g, ch).await?;
            if sched {
                let mut from = 0;
                while !g.state.paged_sched().is_empty() {
                    let items = self.read_sched_by_id(from, DROP_BATCH, DROP_READ_BYTES).await?;
                    let Some(last) = items.last().map(|it| it.id.0) else {
                        g.state.forget_paged_sched();
                        break;
                    };
                    from = last + 1;
                    let (_, c) = g.state.drop_paged_sched(items);
                    self.commit_mut(&mut g, c).await?;
                }
            }
            if !request.queue {
                return self.commit(g, (), Changes::default()).await;
            }
            #[cfg(feature = "s3")]
            self.cold_clear(&mut g).await?;
            for p in 0..PRIORITIES as u8 {
                while g.state.paged().count[usize::from(p)] > 0 {
                    let from = g.state.paged().from[usize::from(p)];
                    let items = self.read_ready(p, from, DROP_BATCH, DROP_READ_BYTES).await?;
                    let Some(last) = items.last().map(|it| it.id.0) else {
                        g.state.forget_paged(p);
                        break;
                    };
                    let (_, c) = g.state.drop_paged(items, None);
                    g.state.raise_paged_from(p, last + 1);
                    self.commit_mut(&mut g, c).await?;
                }
            }
            return self.commit(g, (), Changes::default()).await;
        }
        self.commit(g, (), ch).await
    }

    async fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // Returns once a write in flight is on disk and the cold job has ended (its result is never committed:
            // committing needs `lock`, which now fails). A re-open meanwhile finds this partition closed in the
            // registry and waits for its lock too (`open_gated`), so it cannot load a state that misses a write
            // this partition made. A spilled object nobody names is swept at that open.
            #[allow(unused_mut)]
            let mut g = self.inner.lock().await;
            #[cfg(feature = "s3")]
            let _ = g.cold.abandon_job().await;
            drop(g);
            let mut reg = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
            // Only forget the entry if it is still this partition (a destroy and re-open may have replaced it).
            if reg
                .get(&*self.name)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), self))
            {
                reg.remove(&*self.name);
                // Partitions close as their queues unload: the registry gives back the slots of those it held.
                shrink_sparse(&mut reg);
            }
        }
    }
}
