//! The log store: partitions held in RAM like the memory store's, made durable by an append-only log of their
//! change sets (driver `log`).
//!
//! # Why
//! A queue's items mostly live for seconds: produced, leased, completed. The fjall store writes each of those
//! changes into an LSM tree (journal, memtable, flushes and compactions of a backlog that is deleted soon after),
//! and on a 2-core machine that work, not the fsync, bounded its durable throughput (docs/benchmarks.md, "What
//! bounds the durable path"). Here a change set is appended to a log and fsynced in groups, and the partition's
//! state in RAM is the only index: the same bytes reach the disk before a write is acknowledged, with nothing
//! else to maintain.
//!
//! # How
//! - Every partition is a [`MemoryPartition`] whose [`PartitionState`] builds change sets; each mutation appends its
//!   change set as one record, under the partition's lock (so the log holds a partition's changes in the order
//!   they were made), and waits for durability as the mode says (`sync` through the queue task's pass, see
//!   [`lessor_core::durability`]). The records and the log are in `wal` (framing, group commit, replay).
//! - Records: a partition's creation (its queue, number and a store-wide pid), its destruction, a change set
//!   (items written whole, payload included; ids removed; dedup records added and dropped), a state change set
//!   (a lease's or an extension's: the items' metadata without their payloads, laid over their whole records at
//!   replay), and checkpoints.
//! - Start-up replays every segment into per-partition maps of item records, then decodes each partition's records
//!   in id order straight into its state ([`PartitionState::load_sorted`]), so replay holds little more than the
//!   partitions it rebuilds; ids continue above the high-water mark a checkpoint recorded and every id seen.
//! - **Checkpoints** keep the log bounded: once more than [`CHECKPOINT_MIN_BYTES`] (and twice the last checkpoint)
//!   were appended, a thread starts a new segment, then writes each partition's items after it: a begin record,
//!   a copy of the items taken page by page (the partition's lock is held for one page at a time, so serving goes
//!   on meanwhile), an end record; then it makes all that durable and deletes the older segments. Every change
//!   writes or removes one whole value by its key, so replay rebuilds the partition exactly by applying the changes
//!   logged since the begin record over the copy, whichever version of each item a page caught (a fuzzy
//!   checkpoint). Replay uses a checkpoint only once its end record is read: one cut by a crash is dropped at the
//!   next run's open record or the end of the log, and the older segments it would have replaced are still there.
//!
//! # Limits
//! Everything is in RAM, like the memory store: a backlog larger than memory does not fit (the fjall store pages
//! it to disk). Replay reads the whole log at start: start-up takes as long as reading up to about three times the
//! live items' bytes plus `checkpoint-bytes`. A failed write or fsync poisons the store until a restart, reads
//! included: the state in RAM may then hold a change the log does not.

mod wal;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::{DedupRecord, Item, ItemId};

use crate::fjall::codec::{
    decode_dedup, decode_meta, dedup_len, encode_dedup, encode_dedup_into, encode_meta_into,
    encode_whole_into, restate,
};
use crate::fjall::Durability;
use crate::memory::{MemoryBudget, MemoryPartition};
use crate::state::{Changes, PartitionState};

pub(crate) use wal::Wal;

/// The log's directory under the configured `storage-dir`.
pub const LOG_DIR: &str = "~log";
/// A checkpoint starts once this much was appended since the last one (and twice what that one wrote).
pub const CHECKPOINT_MIN_BYTES: u64 = 256 << 20;
/// Items per page of a checkpoint: the partition's lock is held while one page is copied and appended.
pub(crate) const CHECKPOINT_PAGE: usize = 4096;
/// A checkpoint makes its copy durable after each this many bytes (see `MemoryPartition::write_checkpoint`).
pub(crate) const CHECKPOINT_SYNC_BYTES: u64 = 8 << 20;
/// Payload bytes per record of a checkpoint or a large change set, about (far below the log's record limit).
const RECORD_BYTES: usize = 64 << 20;

const R_CREATE: u8 = 1;
const R_DESTROY: u8 = 2;
const R_CHANGES: u8 = 3;
const R_CHECKPOINT_BEGIN: u8 = 4;
const R_CHECKPOINT_ITEMS: u8 = 5;
const R_CHECKPOINT_END: u8 = 6;
const R_OPEN: u8 = 7;
const R_CHANGES_PART: u8 = 8;
/// The change set of a lease or an extension (`Changes::put_kept`): each item's metadata record alone, which
/// replay lays over the item's whole record. (A lease used to log every item whole again, payload included: half
/// the log's bytes for an item produced, leased and completed.)
const R_STATES: u8 = 9;

/// What a partition of the log store logs through.
pub(crate) struct PartLog {
    wal: Arc<Wal>,
    pid: u64,
    /// Set, under the partition's lock, when its destruction was logged: nothing more of it may be.
    destroyed: AtomicBool,
    /// Sequence of its last record (its creation's at first; 0 when that was before this run).
    last: AtomicU64,
}

impl PartLog {
    /// Appends `changes` of this partition; when there was nothing to log and the call `relies` on what a
    /// concurrent call logged (its answer may report that call's work as done), its last record if that is not
    /// durable yet. Called under the partition's lock. (Every call that logs nothing waiting for it would make a
    /// lifecycle pass that found nothing due wait for an fsync it does not need, outside a pass, on the queue task.)
    pub(crate) fn append(&self, changes: &Changes, relies: bool) -> Result<Option<u64>, StorageError> {
        self.check_write()?;
        if changes.put.is_empty()
            && changes.del.is_empty()
            && changes.dedup_put.is_empty()
            && changes.dedup_del.is_empty()
        {
            return Ok(relies
                .then(|| self.wal.unsynced_at(self.last.load(Ordering::Relaxed)))
                .flatten());
        }
        let mut seq = None;
        for mut body in encode_changes(self.pid, changes, RECORD_BYTES, wal::MAX_BODY) {
            // The change is in RAM already, and maybe some of its part records in the log (the next change set's
            // last record would take them as its own): any failure poisons, not only a failed write.
            seq = Some(self.wal.append(&mut body).map_err(|e| {
                self.wal
                    .poison(format!("a change set could not be logged: {}", e.message))
            })?);
        }
        if let Some(seq) = seq {
            self.last.store(seq, Ordering::Relaxed);
        }
        Ok(seq)
    }

    /// Makes everything appended so far durable (a checkpoint's copy, a little at a time). Blocking.
    pub(crate) fn sync(&self) -> Result<(), StorageError> {
        self.wal.sync_all()
    }

    /// Checks the store is usable (a poisoned store answers nothing, reads included).
    pub(crate) fn check(&self) -> Result<(), StorageError> {
        self.wal.check()
    }

    /// Checks a write may be made: the store is usable and the partition not destroyed.
    pub(crate) fn check_write(&self) -> Result<(), StorageError> {
        if self.destroyed.load(Ordering::Acquire) {
            return Err(StorageError::new(
                StorageErrorKind::Unavailable,
                "the partition was destroyed",
            ));
        }
        self.wal.check()
    }

    /// Waits for the durability of the append `seq`, deferring the wait to the queue task's pass when it runs in
    /// one.
    pub(crate) async fn settle(&self, seq: Option<u64>) -> Result<(), StorageError> {
        let Some(seq) = seq else { return Ok(()) };
        let Some(promise) = self.wal.promise(seq)? else {
            return Ok(());
        };
        match lessor_core::durability::defer(promise) {
            None => Ok(()),
            Some(rx) => rx
                .await
                .map_err(|_| StorageError::unavailable("the log store closed"))?,
        }
    }
}

/// Byte writer for records.
struct Rec(Vec<u8>);

impl Rec {
    fn new(kind: u8, pid: u64, capacity: usize) -> Rec {
        let mut v = Vec::with_capacity(wal::FRAME_HEADER + 9 + capacity);
        // Room for the frame's header, which `Wal::append` fills in.
        v.resize(wal::FRAME_HEADER, 0);
        v.push(kind);
        v.extend_from_slice(&pid.to_le_bytes());
        Rec(v)
    }
    fn u32(&mut self, n: u32) {
        self.0.extend_from_slice(&n.to_le_bytes());
    }
    fn u64(&mut self, n: u64) {
        self.0.extend_from_slice(&n.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn items<'a>(&mut self, items: impl ExactSizeIterator<Item = &'a Item>) {
        self.records(items, encode_whole_into);
    }
    /// Items' metadata records, without their payloads (see [`R_STATES`]).
    fn states<'a>(&mut self, items: impl ExactSizeIterator<Item = &'a Item>) {
        self.records(items, encode_meta_into);
    }
    fn records<'a>(
        &mut self,
        items: impl ExactSizeIterator<Item = &'a Item>,
        encode: fn(&Item, &mut Vec<u8>),
    ) {
        self.u32(items.len() as u32);
        for it in items {
            self.u64(it.id.0);
            // The item's record is written in place after a length filled in once it is known.
            let at = self.0.len();
            self.u32(0);
            encode(it, &mut self.0);
            let n = (self.0.len() - at - 4) as u32;
            self.0[at..at + 4].copy_from_slice(&n.to_le_bytes());
        }
    }
}

/// The records of one change set: usually one. A change set larger than about `limit` bytes ([`RECORD_BYTES`]
/// outside tests; `max_body`, the log's record limit, is [`wal::MAX_BODY`]) goes out as part records, then a last record with the rest (replay applies the parts only with
/// that last record, so a crash between them loses the whole unacknowledged change set, never half of it). Each
/// record carries the next stretch of the set's operations in the order replay applies them: items, removed ids,
/// the dedup group, removed groups. Every list is split, not only the items: a clear of a large partition removes
/// more ids than one record may hold (8 bytes each, over the log's record limit beyond 134 million), and a record
/// refused for its size came after the change was made in RAM.
fn encode_changes(pid: u64, ch: &Changes, limit: usize, max_body: usize) -> Vec<Vec<u8>> {
    if ch.put_kept
        && !ch.put.is_empty()
        && ch.del.is_empty()
        && ch.dedup_put.is_empty()
        && ch.dedup_del.is_empty()
    {
        // A lease or an extension: the items' payloads are in the log already (see `R_STATES`).
        let size = ch
            .put
            .iter()
            .map(|it| 48 + it.reference.len() + it.kind.len() + it.encoding.len() + it.source_id.len())
            .sum();
        let mut r = Rec::new(R_STATES, pid, size);
        r.states(ch.put.iter());
        // A state record cannot be split (replay applies each at once): one over the log's limit (a lease of
        // millions of items) logs the items whole, in parts, as before state records, one change set all the same.
        if r.0.len() - wal::FRAME_HEADER <= max_body {
            return vec![r.0];
        }
    }
    let mut out = Vec::new();
    let (mut items, mut del, mut dedup_del) = (&ch.put[..], &ch.del[..], &ch.dedup_del[..]);
    // One dedup group at most per change set (a produce call's), named by its first record, and kept whole (a
    // record holds one group at most): in a record of its own when it does not fit beside the rest.
    let mut group = (!ch.dedup_put.is_empty()).then(|| (&ch.dedup_put[..], dedup_len(&ch.dedup_put) + 20));
    loop {
        let (n, mut size) = fill(items, limit);
        let (chunk, rest) = items.split_at(n);
        items = rest;
        // What follows the items goes in once no item is left for a later record, so the order holds.
        let (mut dels, mut grouped, mut dedup_dels) = (&[][..], None, &[][..]);
        if items.is_empty() {
            (dels, del) = del.split_at(del.len().min(room(limit, size, 8)));
            size += dels.len() * 8;
            if del.is_empty() {
                if let Some((g, len)) = group {
                    if size == 0 || size + len <= limit {
                        grouped = Some(g);
                        group = None;
                        size += len;
                    }
                }
                if group.is_none() {
                    (dedup_dels, dedup_del) = dedup_del.split_at(dedup_del.len().min(room(limit, size, 16)));
                    size += dedup_dels.len() * 16;
                }
            }
        }
        let last = items.is_empty() && del.is_empty() && group.is_none() && dedup_del.is_empty();
        let kind = if last { R_CHANGES } else { R_CHANGES_PART };
        let mut r = Rec::new(kind, pid, size + 32);
        r.items(chunk.iter());
        r.u32(dels.len() as u32);
        for id in dels {
            r.u64(id.0);
        }
        match grouped.and_then(|g| Some((g, g.first()?))) {
            Some((g, first)) => {
                r.0.push(1);
                r.u64(first.until.0 as u64);
                r.u64(first.id.0);
                // The group is encoded in place after room for its length.
                let at = r.0.len();
                r.u32(0);
                encode_dedup_into(g, &mut r.0);
                let len = (r.0.len() - at - 4) as u32;
                r.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }
            None => r.0.push(0),
        }
        r.u32(dedup_dels.len() as u32);
        for (until, id) in dedup_dels {
            r.u64(until.0 as u64);
            r.u64(id.0);
        }
        out.push(r.0);
        if last {
            return out;
        }
    }
}

/// How many entries of `each` bytes fit in a record of about `limit` bytes that holds `size` already: one at least
/// in an empty record, so every record makes progress.
fn room(limit: usize, size: usize, each: usize) -> usize {
    if size == 0 {
        (limit / each).max(1)
    } else {
        limit.saturating_sub(size) / each
    }
}

/// How many of `items` (one at least, when there is one) fit in about `limit` bytes, and their size.
fn fill(items: &[Item], limit: usize) -> (usize, usize) {
    let (mut n, mut size) = (0, 0);
    while n < items.len() && (n == 0 || size + items[n].payload.len() + 64 <= limit) {
        size += items[n].payload.len() + 64;
        n += 1;
    }
    (n, size)
}

/// Reader over a record body.
struct Cursor<'a> {
    buf: &'a [u8],
}

fn corrupt(what: &str) -> StorageError {
    StorageError::new(
        StorageErrorKind::Corrupt,
        format!("a log record is damaged: {what}"),
    )
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if self.buf.len() < n {
            return Err(corrupt("it ends early"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn byte(&mut self) -> Result<u8, StorageError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StorageError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, StorageError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StorageError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Reads the body of an [`R_STATES`] record as operations.
    fn states(&mut self) -> Result<Vec<Op>, StorageError> {
        let n = self.u32()?;
        let mut ops = Vec::with_capacity((n as usize).min(self.buf.len() / 12));
        for _ in 0..n {
            let id = self.u64()?;
            ops.push(Op::State(id, self.bytes()?.into()));
        }
        if !self.buf.is_empty() {
            return Err(corrupt("a state record has trailing bytes"));
        }
        Ok(ops)
    }
    /// Reads a change-set body (items, removed ids, a dedup group, removed groups) as operations.
    fn ops(&mut self) -> Result<Vec<Op>, StorageError> {
        let mut ops = Vec::new();
        for _ in 0..self.u32()? {
            let id = self.u64()?;
            // Kept encoded until the partition is built (see `Replayed::items`).
            ops.push(Op::Put(id, self.bytes()?.into()));
        }
        for _ in 0..self.u32()? {
            ops.push(Op::Del(self.u64()?));
        }
        if self.byte()? == 1 {
            let until = self.u64()? as i64;
            let id = self.u64()?;
            let group = decode_dedup(Ts(until), ItemId(id), self.bytes()?, "log record")?;
            ops.push(Op::DedupPut((until, id), group));
        }
        for _ in 0..self.u32()? {
            let until = self.u64()? as i64;
            ops.push(Op::DedupDel((until, self.u64()?)));
        }
        Ok(ops)
    }
}

/// One change of a partition, as replay reads it. Each writes or removes one whole value by its key, so applying
/// a partition's changes in order over a copy of its items taken at any moment since those changes began gives
/// its state after them (what makes a checkpoint copied page by page, while changes go on, exact). A state
/// change rewrites an item's metadata and keeps its payload: applied to an item the copy holds, it gives the same
/// as the whole record would have; an item the copy does not hold is one a later change in the same sequence
/// deletes (its page was copied after it was gone), so the change is dropped.
#[derive(Clone)]
enum Op {
    /// An item's id and its record (the fjall codec's item encoding).
    Put(u64, Box<[u8]>),
    /// An item's id and its metadata record (no payload): see [`R_STATES`].
    State(u64, Box<[u8]>),
    Del(u64),
    DedupPut((i64, u64), Vec<DedupRecord>),
    DedupDel((i64, u64)),
}

/// A partition as replay rebuilds it.
#[derive(Default)]
struct Replayed {
    name: Option<(String, u32)>,
    /// Each item's record, decoded only once the log is read, in id order, straight into the partition
    /// (`LogStore::open`). Decoded items in this map, then sorted in a copy of them, made replay's peak twice
    /// what the partition keeps (`tests/log_replay_memory.rs`: 2.14 times, now 1.13), and a restart of a million
    /// items of 100 B left the server at 789 MB resident where it had served them in 201 MB (now 259 MB).
    items: HashMap<u64, Box<[u8]>>,
    dedup: BTreeMap<(i64, u64), Vec<DedupRecord>>,
    /// Above every id it handed out, as far as the log shows (ids of items written, and the high-water mark a
    /// checkpoint recorded).
    next_id: u64,
    destroyed: bool,
    /// A checkpoint being read (see [`Pending`]).
    pending: Option<Box<Pending>>,
    /// Part records of a change set whose last record is not read yet (see `encode_changes`).
    parts: Vec<Op>,
}

/// A checkpoint of a partition being read: the copy of its items and dedup records (taken page by page after
/// the begin record), and every change of the partition logged since the begin record, which replace the
/// partition's state at the end record.
struct Pending {
    copy: Replayed,
    since: Vec<Op>,
}

impl Replayed {
    fn apply(&mut self, op: Op) -> Result<(), StorageError> {
        match op {
            Op::Put(id, record) => {
                self.next_id = self.next_id.max(id.saturating_add(1));
                self.items.insert(id, record);
            }
            Op::State(id, meta) => {
                if let Some(whole) = self.items.get_mut(&id) {
                    *whole = restate(ItemId(id), whole, &meta, "log record")?.into_boxed_slice();
                }
            }
            Op::Del(id) => {
                self.items.remove(&id);
            }
            Op::DedupPut(name, group) => {
                // An import's group has a fresh id of its own, above every item id then: ids go on above it.
                for r in &group {
                    self.next_id = self.next_id.max(r.id.0.saturating_add(1));
                }
                self.dedup.insert(name, group);
            }
            Op::DedupDel(name) => {
                self.dedup.remove(&name);
            }
        }
        Ok(())
    }
}

/// Everything replay found, by pid.
#[derive(Default)]
struct Replay {
    parts: HashMap<u64, Replayed>,
    max_pid: u64,
}

impl Replay {
    fn record(&mut self, body: &[u8]) -> Result<(), StorageError> {
        let mut c = Cursor { buf: body };
        let kind = c.byte()?;
        let pid = c.u64()?;
        if kind == R_OPEN {
            // A new run of the store: a checkpoint the last run left without its end, or a change set without its
            // last record, was cut by a crash.
            for p in self.parts.values_mut() {
                p.pending = None;
                p.parts.clear();
            }
            return Ok(());
        }
        self.max_pid = self.max_pid.max(pid);
        let p = self.parts.entry(pid).or_default();
        match kind {
            R_CREATE => {
                let name = String::from_utf8(c.bytes()?.to_vec())
                    .map_err(|_| corrupt("a queue name is not UTF-8"))?;
                let partition = c.u32()?;
                *p = Replayed {
                    name: Some((name, partition)),
                    ..Replayed::default()
                };
            }
            R_DESTROY => {
                // The name stays: a destroyed pid makes every earlier pid of its name a loser at open (see
                // `LogStore::open_with`), including one whose own destruction was never logged.
                let name = p
                    .name
                    .take()
                    .or_else(|| p.pending.take().and_then(|cp| cp.copy.name));
                *p = Replayed {
                    name,
                    destroyed: true,
                    ..Replayed::default()
                }
            }
            R_CHANGES_PART => p.parts.extend(c.ops()?),
            R_STATES => {
                let ops = c.states()?;
                if let Some(cp) = p.pending.as_mut() {
                    cp.since.extend(ops.iter().cloned());
                }
                for op in ops {
                    p.apply(op)?;
                }
            }
            R_CHANGES => {
                let mut ops = std::mem::take(&mut p.parts);
                ops.extend(c.ops()?);
                if let Some(cp) = p.pending.as_mut() {
                    cp.since.extend(ops.iter().cloned());
                }
                for op in ops {
                    p.apply(op)?;
                }
            }
            R_CHECKPOINT_BEGIN => {
                let name = String::from_utf8(c.bytes()?.to_vec())
                    .map_err(|_| corrupt("a queue name is not UTF-8"))?;
                let partition = c.u32()?;
                let next_id = c.u64()?;
                p.pending = Some(Box::new(Pending {
                    copy: Replayed {
                        name: Some((name, partition)),
                        next_id,
                        ..Replayed::default()
                    },
                    since: Vec::new(),
                }));
            }
            // Without a begin record: the rest of an older checkpoint whose begin was in a segment a later
            // checkpoint deleted (a crash can stop that deletion half way, oldest segments first). The later
            // checkpoint, further on, replaces whatever this one held.
            R_CHECKPOINT_ITEMS => {
                let Some(cp) = p.pending.as_mut() else {
                    return Ok(());
                };
                for op in c.ops()? {
                    cp.copy.apply(op)?;
                }
            }
            R_CHECKPOINT_END => {
                let Some(cp) = p.pending.take() else {
                    return Ok(());
                };
                let Pending { mut copy, since } = *cp;
                for op in since {
                    copy.apply(op)?;
                }
                copy.next_id = copy.next_id.max(p.next_id);
                *p = copy;
            }
            // A kind this build does not know is most likely a later build's (the log is then not damaged: see
            // "Going back to an earlier build" in docs/operations.md).
            k => {
                return Err(corrupt(&format!(
                    "unknown record kind {k} (a log written by a later build?)"
                )))
            }
        }
        Ok(())
    }
}

struct Inner {
    wal: Arc<Wal>,
    dir: PathBuf,
    parts: Mutex<HashMap<(String, u32), Arc<MemoryPartition>>>,
    /// Partitions taken out of `parts` by a destroy that has not made their destruction durable yet: a concurrent
    /// destroy of the name waits for the same record. Locked after `parts`.
    destroying: Mutex<HashMap<(String, u32), Arc<MemoryPartition>>>,
    next_pid: AtomicU64,
    /// Dropped to stop the checkpoint thread.
    kick: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    checkpoint_min: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// `max-memory`, when set.
    budget: Option<Arc<MemoryBudget>>,
}

/// The log store (see the module doc).
pub struct LogStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogStore {
    /// Opens (creating) the log store under `storage_dir`, replaying its log. Fails with `Locked` when another
    /// process uses the directory and `Corrupt` when the log is damaged before its tail. Blocking.
    pub fn open(storage_dir: impl AsRef<Path>, durability: Durability) -> Result<Self, StorageError> {
        Self::open_with(storage_dir, durability, None)
    }

    /// [`LogStore::open`] with a memory budget of `max_memory` bytes (`max-memory`, see [`MemoryBudget`]): what
    /// replay rebuilds counts in it (a store opened above it serves, and refuses new items until consumers make
    /// room).
    pub fn open_with(
        storage_dir: impl AsRef<Path>,
        durability: Durability,
        max_memory: Option<u64>,
    ) -> Result<Self, StorageError> {
        let budget = max_memory.map(|m| Arc::new(MemoryBudget::new(m)));
        let dir = storage_dir.as_ref().join(LOG_DIR);
        let mut replay = Replay::default();
        let started = std::time::Instant::now();
        let wal = Wal::open(&dir, durability, |body| replay.record(body))?;
        let mut parts = HashMap::new();
        let mut items = 0usize;
        // A name is given a new pid only once its partition left the map (a destroy under way), so the last pid of
        // a name decides what the name is: that partition when it is live, none when it was destroyed. Every
        // earlier pid of the name was being destroyed, logged or not: when a crash came before that was logged, it
        // must not be the partition, neither beside a live later pid nor once that one is destroyed (a destroy
        // acknowledged for the later pid would be undone by the earlier one coming back).
        let mut last: HashMap<(String, u32), u64> = HashMap::new();
        for (&pid, p) in &replay.parts {
            if let Some(name) = &p.name {
                let at = last.entry(name.clone()).or_insert(pid);
                *at = (*at).max(pid);
            }
        }
        let mut replayed: Vec<(u64, Replayed)> = replay.parts.into_iter().collect();
        replayed.sort_unstable_by_key(|(pid, _)| *pid);
        // Earlier live pids of a name: their destruction is logged below, or they would be the partition again in a
        // run whose log no longer holds the later pid's records.
        let mut losers = Vec::new();
        for (pid, p) in replayed {
            let Some((queue, partition)) = p.name else {
                continue;
            };
            if last.get(&(queue.clone(), partition)) != Some(&pid) {
                if !p.destroyed {
                    losers.push(pid);
                }
                continue;
            }
            if p.destroyed {
                continue;
            }
            items += p.items.len();
            let floor = ItemId::floor_for(partition).0.max(p.next_id);
            let mut records = p.items;
            let mut ids: Vec<u64> = records.keys().copied().collect();
            ids.sort_unstable();
            // Each record is decoded and freed in turn: the map's table and the state are all that is held.
            let decoded = ids.into_iter().map(|id| {
                let record = records.remove(&id).unwrap_or_default();
                decode_meta(ItemId(id), &record, "log record")
            });
            let state = PartitionState::load_sorted(decoded, HashMap::new(), floor)
                .map_err(|e| {
                    StorageError::new(
                        e.kind,
                        format!("{} (partition {partition} of queue '{queue}')", e.message),
                    )
                })?
                .with_dedup(p.dedup.into_values());
            drop(records);
            let log = PartLog {
                wal: wal.clone(),
                pid,
                destroyed: AtomicBool::new(false),
                last: AtomicU64::new(0),
            };
            parts.insert(
                (queue, partition),
                Arc::new(MemoryPartition::logged(state, log, budget.clone())),
            );
        }
        tracing::info!(
            dir = %dir.display(),
            %durability,
            partitions = parts.len(),
            items,
            took_ms = started.elapsed().as_millis() as u64,
            "log store open"
        );
        // Marks a new run: a checkpoint the last run left without its end was cut by a crash (see `Replay`).
        wal.append(&mut Rec::new(R_OPEN, 0, 0).0)?;
        // Durable with the next fsync, before anything logged after it.
        for pid in losers {
            wal.append(&mut Rec::new(R_DESTROY, pid, 0).0)?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = Arc::new(Inner {
            wal,
            dir,
            parts: Mutex::new(parts),
            destroying: Mutex::default(),
            next_pid: AtomicU64::new(replay.max_pid + 1),
            kick: Mutex::new(Some(tx)),
            checkpoint_min: AtomicU64::new(CHECKPOINT_MIN_BYTES),
            checkpoints: AtomicU64::new(0),
            checkpoint_thread: Mutex::new(None),
            budget,
        });
        let weak = Arc::downgrade(&inner);
        let t = std::thread::Builder::new()
            .name("lessor-log-ckpt".into())
            .spawn(move || checkpoint_loop(weak, rx))
            .map_err(|e| StorageError::other(format!("cannot start the log's checkpoint thread: {e}")))?;
        *lock(&inner.checkpoint_thread) = Some(t);
        Ok(LogStore { inner })
    }

    /// Sets the log bytes appended after which a checkpoint starts (`checkpoint-bytes`; the default is
    /// [`CHECKPOINT_MIN_BYTES`]); a checkpoint also waits until twice what the last one wrote was appended.
    pub fn set_checkpoint_min(&self, bytes: u64) {
        self.inner.checkpoint_min.store(bytes, Ordering::Relaxed);
    }

    /// The memory budget's estimate of what the partitions hold and its most (`max-memory`), when it has one.
    pub fn memory(&self) -> Option<(u64, u64)> {
        self.inner.budget.as_ref().map(|b| (b.used(), b.max()))
    }

    /// Checkpoints finished since open (tests).
    #[doc(hidden)]
    pub fn checkpoints(&self) -> u64 {
        self.inner.checkpoints.load(Ordering::Relaxed)
    }

    /// Log segments on disk (tests).
    #[doc(hidden)]
    pub fn segments(&self) -> usize {
        self.inner.wal.segment_count()
    }

    /// fsyncs made since open (tests: group commit shares them).
    #[doc(hidden)]
    pub fn fsyncs(&self) -> u64 {
        self.inner.wal.fsyncs()
    }

    /// Makes the next fsync of the log fail as a write-back error would (tests): the returned receiver hears when it
    /// starts, and it fails once the returned sender is sent to or dropped (until then it holds off every other
    /// fsync of the log, and a rotation with the appends behind it).
    #[doc(hidden)]
    pub fn fail_next_fsync_for_tests(&self) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        self.inner.wal.fail_next_fsync()
    }

    /// Runs a checkpoint now, whatever was appended (tests). Blocking.
    #[doc(hidden)]
    pub fn checkpoint_now(&self) -> Result<(), StorageError> {
        self.inner.checkpoint()
    }

    /// Writes a checkpoint as a crash would leave it: a new segment, every partition's begin and item records, no
    /// end record, no segment deleted (tests). Blocking.
    #[doc(hidden)]
    pub fn checkpoint_cut_for_tests(&self) -> Result<(), StorageError> {
        self.inner.wal.rotate()?;
        let parts: Vec<((String, u32), Arc<MemoryPartition>)> = lock(&self.inner.parts)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for ((queue, partition), p) in parts {
            p.write_checkpoint(&queue, partition, false)?;
        }
        self.inner.wal.sync_all()
    }

    /// Holds partition `partition` of `queue`'s lock on a thread of its own until the returned sender is dropped
    /// or sent to (tests of what waits behind a partition's lock); `None` when it is not open.
    #[doc(hidden)]
    pub fn hold_partition_for_tests(
        &self,
        queue: &str,
        partition: u32,
    ) -> Option<std::sync::mpsc::Sender<()>> {
        let p = lock(&self.inner.parts)
            .get(&(queue.to_string(), partition))?
            .clone();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (held, ready) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            p.hold(|| {
                let _ = held.send(());
                let _ = wait.recv();
            })
        });
        ready.recv().ok()?;
        Some(release)
    }

    /// Destroys that took their partition out and have not made its destruction durable yet (tests).
    #[doc(hidden)]
    pub fn destroys_in_progress(&self) -> usize {
        lock(&self.inner.destroying).len()
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
}

impl Inner {
    /// Writes every partition's state after a new segment, makes it durable and deletes the older segments.
    fn checkpoint(&self) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        self.wal.checkpoint_started();
        let boundary = self.wal.rotate()?;
        let parts: Vec<((String, u32), Arc<MemoryPartition>)> = lock(&self.parts)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut bytes = 0u64;
        for ((queue, partition), p) in parts {
            bytes += p.write_checkpoint(&queue, partition, true)?;
        }
        self.wal.sync_all()?;
        let removed = self.wal.remove_before(boundary)?;
        self.wal.checkpoint_ended(bytes);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            dir = %self.dir.display(),
            bytes,
            segments_removed = removed,
            took_ms = started.elapsed().as_millis() as u64,
            "log checkpoint written"
        );
        Ok(())
    }
}

fn checkpoint_loop(inner: Weak<Inner>, rx: std::sync::mpsc::Receiver<()>) {
    loop {
        // Polled: whether one is due is two atomic loads.
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.wal.check().is_err() {
            return;
        }
        if inner
            .wal
            .wants_checkpoint(inner.checkpoint_min.load(Ordering::Relaxed))
        {
            if let Err(e) = inner.checkpoint() {
                tracing::error!(error = %e, "log checkpoint failed");
            }
        }
    }
}

impl PartLog {
    /// Starts this partition's checkpoint: its begin record (the point in the log after which its changes are
    /// replayed over the copy), under the partition's lock. `Ok(None)` when the partition was destroyed.
    pub(crate) fn checkpoint_begin(
        &self,
        state: &PartitionState,
        queue: &str,
        partition: u32,
    ) -> Result<Option<u64>, StorageError> {
        if self.destroyed.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut begin = Rec::new(R_CHECKPOINT_BEGIN, self.pid, queue.len() + 16);
        begin.bytes(queue.as_bytes());
        begin.u32(partition);
        begin.u64(state.id_high_water());
        self.wal.append(&mut begin.0)?;
        Ok(Some(begin.0.len() as u64))
    }

    /// Writes one page of the checkpoint's copy: items (in records of at most [`RECORD_BYTES`] of
    /// payloads, about, one item at least, far below the log's record limit), and groups of dedup records (each
    /// named by its first record, as replay keys them), under the partition's lock. `Ok(None)` when the partition
    /// was destroyed meanwhile (the checkpoint stops there).
    pub(crate) fn checkpoint_page(
        &self,
        items: &[Item],
        dedup: Vec<Vec<DedupRecord>>,
    ) -> Result<Option<u64>, StorageError> {
        if self.destroyed.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut bytes = 0;
        let mut rest = items;
        while !rest.is_empty() {
            let (n, size) = fill(rest, RECORD_BYTES);
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let mut r = Rec::new(R_CHECKPOINT_ITEMS, self.pid, size);
            r.items(chunk.iter());
            r.u32(0);
            r.0.push(0);
            r.u32(0);
            self.wal.append(&mut r.0)?;
            bytes += r.0.len() as u64;
        }
        for group in dedup {
            let Some(first) = group.first() else { continue };
            let len: usize = group.iter().map(|r| r.dedup_id.len() + 24).sum();
            let mut r = Rec::new(R_CHECKPOINT_ITEMS, self.pid, len + 48);
            r.u32(0);
            r.u32(0);
            r.0.push(1);
            r.u64(first.until.0 as u64);
            r.u64(first.id.0);
            r.bytes(&encode_dedup(&group));
            r.u32(0);
            self.wal.append(&mut r.0)?;
            bytes += r.0.len() as u64;
        }
        Ok(Some(bytes))
    }

    /// Ends this partition's checkpoint, under its lock. `Ok(None)` when the partition was destroyed meanwhile.
    pub(crate) fn checkpoint_end(&self) -> Result<Option<u64>, StorageError> {
        if self.destroyed.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut end = Rec::new(R_CHECKPOINT_END, self.pid, 0);
        self.wal.append(&mut end.0)?;
        Ok(Some(end.0.len() as u64))
    }
}

#[async_trait]
impl PartitionStore for LogStore {
    fn driver(&self) -> &'static str {
        "log"
    }

    fn memory(&self) -> Option<(u64, u64)> {
        LogStore::memory(self)
    }

    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        self.inner.wal.check()?;
        let seq = {
            let mut parts = lock(&self.inner.parts);
            if let Some(p) = parts.get(&(queue.to_string(), partition)) {
                return Ok(p.clone());
            }
            let pid = self.inner.next_pid.fetch_add(1, Ordering::Relaxed);
            let mut r = Rec::new(R_CREATE, pid, queue.len() + 8);
            r.bytes(queue.as_bytes());
            r.u32(partition);
            let seq = self.inner.wal.append(&mut r.0)?;
            let log = PartLog {
                wal: self.inner.wal.clone(),
                pid,
                destroyed: AtomicBool::new(false),
                last: AtomicU64::new(seq),
            };
            let floor = ItemId::floor_for(partition).0;
            parts.insert(
                (queue.to_string(), partition),
                Arc::new(MemoryPartition::logged(
                    PartitionState::new(floor),
                    log,
                    self.inner.budget.clone(),
                )),
            );
            seq
        };
        self.inner.wal.durable(seq).await?;
        let p = lock(&self.inner.parts)
            .get(&(queue.to_string(), partition))
            .cloned();
        match p {
            Some(p) => Ok(p),
            None => Err(StorageError::new(
                StorageErrorKind::Unavailable,
                format!("partition {partition} of queue '{queue}' was destroyed while it was created"),
            )),
        }
    }

    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        self.inner.wal.check()?;
        let key = (queue.to_string(), partition);
        let p = {
            let mut parts = lock(&self.inner.parts);
            match parts.remove(&key) {
                Some(p) => {
                    lock(&self.inner.destroying).insert(key.clone(), p.clone());
                    p
                }
                // A concurrent destroy may not have logged it yet, or not made that durable: wait for the same.
                None => match lock(&self.inner.destroying).get(&key) {
                    Some(p) => p.clone(),
                    None => return Ok(()),
                },
            }
        };
        // In a task of its own: a caller that goes away (its future dropped) during the fsync wait must not leave
        // the partition in `destroying` for good.
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let res = match p.log_destroy() {
                Ok(seq) => inner.wal.durable(seq).await,
                Err(e) => Err(e),
            };
            {
                let mut destroying = lock(&inner.destroying);
                if destroying.get(&key).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                    destroying.remove(&key);
                }
            }
            res?;
            // Freeing millions of items takes a while: do it off the async workers.
            let _ = tokio::task::spawn_blocking(move || drop(p)).await;
            Ok(())
        })
        .await
        .map_err(|e| StorageError::other(format!("a destroy of the log store failed: {e}")))?
    }

    async fn close(&self) {
        drop(lock(&self.inner.kick).take());
        let t = lock(&self.inner.checkpoint_thread).take();
        if let Some(t) = t {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let wal = self.inner.wal.clone();
        let _ = tokio::task::spawn_blocking(move || wal.close()).await;
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        drop(lock(&self.inner.kick).take());
    }
}

impl PartLog {
    /// Logs the partition's destruction (the caller holds its lock), once: a second call gets the first one's
    /// sequence. Later appends fail.
    pub(crate) fn destroy(&self) -> Result<u64, StorageError> {
        if self.destroyed.load(Ordering::Acquire) {
            return Ok(self.last.load(Ordering::Relaxed));
        }
        self.destroyed.store(true, Ordering::Release);
        let mut r = Rec::new(R_DESTROY, self.pid, 0);
        let seq = self.wal.append(&mut r.0)?;
        self.last.store(seq, Ordering::Relaxed);
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64) -> Item {
        Item {
            id: ItemId(id),
            reference: format!("ref-{id}"),
            payload: bytes::Bytes::from(vec![b'x'; 100]),
            ..Item::default()
        }
    }

    fn dedup(key: &str, id: u64) -> DedupRecord {
        DedupRecord {
            dedup_id: key.to_string(),
            id: ItemId(id),
            until: Ts(5),
        }
    }

    /// Each record's kind, and the operations of all of them in order: `p`ut, `s`tate, `d`el, dedup `g`roup,
    /// dedup drop (`x`), by id.
    fn read(records: &[Vec<u8>]) -> (Vec<u8>, Vec<(char, u64)>) {
        let (mut kinds, mut ops) = (Vec::new(), Vec::new());
        for r in records {
            let mut c = Cursor {
                buf: &r[wal::FRAME_HEADER..],
            };
            let kind = c.byte().expect("kind");
            c.u64().expect("pid");
            kinds.push(kind);
            let read = if kind == R_STATES { c.states() } else { c.ops() };
            ops.extend(read.expect("ops").into_iter().map(|op| match op {
                Op::Put(id, _) => ('p', id),
                Op::State(id, _) => ('s', id),
                Op::Del(id) => ('d', id),
                Op::DedupPut((_, id), _) => ('g', id),
                Op::DedupDel((_, id)) => ('x', id),
            }));
        }
        (kinds, ops)
    }

    /// A change set whose removed ids alone are over the record size (a clear of a large partition: 8 bytes an id,
    /// over the log's limit beyond 134 million) is split into parts like one of large items, each record about
    /// the size, the operations in their order; replay applies them all with the last record. (The removed ids
    /// went in one record, which the log refused for its size after the change was made in RAM.)
    #[test]
    fn a_change_set_of_many_removed_ids_is_logged_in_parts() {
        let ch = Changes {
            put: (3001..3004).map(item).collect(),
            del: (1..=1990).map(ItemId).collect(),
            dedup_put: vec![dedup("a", 3001), dedup("b", 3002)],
            dedup_del: (0..200).map(|n| (Ts(1), ItemId(n))).collect(),
            ..Changes::default()
        };
        let want: Vec<(char, u64)> = (3001..3004)
            .map(|id| ('p', id))
            .chain((1..=1990).map(|id| ('d', id)))
            .chain([('g', 3001)])
            .chain((0..200).map(|id| ('x', id)))
            .collect();
        for limit in [1, 64, 1024, 4096] {
            let records = encode_changes(7, &ch, limit, 1 << 30);
            let (kinds, ops) = read(&records);
            assert!(records.len() > 1, "limit {limit}: one record");
            for r in &records {
                // At most one item over the size, or the group (kept whole), or a little framing.
                let len = r.len() - wal::FRAME_HEADER;
                assert!(
                    len <= limit.max(200) + 40,
                    "limit {limit}: a record of {len} bytes"
                );
            }
            assert_eq!(kinds.last(), Some(&R_CHANGES), "limit {limit}");
            assert!(
                kinds[..kinds.len() - 1].iter().all(|&k| k == R_CHANGES_PART),
                "limit {limit}: {kinds:?}"
            );
            assert_eq!(ops, want, "limit {limit}: the operations in their order");
        }

        // Replayed: a partition of 2000 items, then the change set.
        let mut replay = Replay::default();
        let mut create = Rec::new(R_CREATE, 7, 8);
        create.bytes(b"q");
        create.u32(0);
        let before = Changes {
            put: (1..=2000).map(item).collect(),
            ..Changes::default()
        };
        let records = [
            vec![create.0],
            encode_changes(7, &before, 1024, 1 << 30),
            encode_changes(7, &ch, 1024, 1 << 30),
        ];
        for r in records.iter().flatten() {
            replay.record(&r[wal::FRAME_HEADER..]).expect("replay");
        }
        let p = &replay.parts[&7];
        let mut ids: Vec<u64> = p.items.keys().copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, (1991..=2000).chain(3001..3004).collect::<Vec<_>>());
        assert_eq!(p.dedup.keys().map(|k| k.1).collect::<Vec<_>>(), vec![3001]);
        assert!(p.parts.is_empty());
    }

    /// A lease's state record cannot be split: one over the log's limit logs the items whole, in parts (it was
    /// refused for its size after the lease was made in RAM).
    #[test]
    fn a_state_record_over_the_limit_logs_the_items_whole() {
        let ch = Changes {
            put: (1..=500).map(item).collect(),
            put_kept: true,
            ..Changes::default()
        };
        let (kinds, ops) = read(&encode_changes(7, &ch, 1 << 20, 1 << 30));
        assert_eq!(kinds, vec![R_STATES]);
        assert_eq!(ops, (1..=500).map(|id| ('s', id)).collect::<Vec<_>>());
        let (kinds, ops) = read(&encode_changes(7, &ch, 4096, 8192));
        assert!(kinds.len() > 1 && kinds.last() == Some(&R_CHANGES), "{kinds:?}");
        assert_eq!(ops, (1..=500).map(|id| ('p', id)).collect::<Vec<_>>());
    }
}
