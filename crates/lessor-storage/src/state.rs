//! The item state machine of one partition over compact in-memory indexes.
//!
//! [`PartitionState`] implements every rule of the [`lessor_core::storage::Partition`] contract synchronously and
//! can report each change as a [`Changes`] set (items written, ids removed). The memory backend is this state behind
//! a mutex (with change tracking off); the fjall backend keeps the same state as its index and writes each change set
//! to disk, so the rules live in one place.
//!
//! # Why it looks like this
//! A queue holds millions of small items, so the per-item cost matters more than anything else here:
//! - Ready and leased items live in [`Slot`]s, 64 bytes each, in chunks of 1,024 addressed by id. Each priority
//!   takes its ids from blocks of its own, one chunk each (`PartitionState::alloc`), and ids grow by one per
//!   allocation within a block, so a chunk is dense while its items are in the queue and is freed once all of them
//!   are gone. A chunk with few live items left (an item leased for long while the rest flow on) keeps only those
//!   (the `chunk` submodule), so a waiting item never holds memory for the 1,024 slots of its chunk.
//!   Strings and the payload share one byte buffer, written into a per-priority arena when small
//!   (`PartitionState::arenas`); absent strings cost nothing.
//! - The ready queue of priority 0 (the default) needs no index of its own: an item becomes ready only under a
//!   fresh id at the tail, and leases take from the head, so every ready priority-0 id lies at or after a cursor
//!   that only moves forward. Each higher priority has a FIFO of ids (8 bytes per ready item), pushed in id order
//!   for the same reason; ids that stopped being ready (deleted, expired) are skipped when they reach the front,
//!   and a FIFO holding more than twice its ready count is compacted, so stale ids cost O(1) each, amortized.
//!   A lease serves the FIFOs from the highest priority down, then the cursor: no cost grows with depth.
//! - Deadline indexes (lease expiry, item expiry) map a deadline to the ids sharing it. A batch shares one deadline,
//!   so an entry costs one id. Entries of items that left (or whose lease was extended: the new deadline gets an
//!   entry of its own) are dropped lazily, but the first deadline of each index keeps a current id last in its list
//!   after every operation, so the next deadline is always exact.
//! - Scheduled and dead items are rarer and keep whole [`Item`]s in ordered maps (their payloads on disk only with
//!   a persistent backend: see "Payloads on disk").
//! - Dedup records (the `dedup` submodule) live beside the items and outlive them on purpose: a consumed item's key must still
//!   be refused within the window.
//!
//! Every operation costs O(log n) per item touched; none scans the partition.
//!
//! # Paging (persistent backends)
//! A backend that writes every change set may give the state a *window* ([`PartitionState::with_window`]): once that
//! many ready items are resident, each new ready item is written to disk only (the change set lists it in
//! [`Changes::spilled`]) and counted in [`Paged`] (the `paging` submodule), and so is every later one of its priority, so that per priority the resident ready ids lie
//! below the paged ones and FIFO order is id order across the boundary. The backend asks
//! [`PartitionState::page_plan`] which ids to read back (ahead of need when a priority's resident head falls under a
//! quarter of the window, at once when a lease needs more than is resident) and hands them to
//! [`PartitionState::page_in`], whose moves (and the counters) the backend writes with the next change set
//! ([`PartitionState::take_paging`]). A partition that never fills its window makes no paging writes at all. A
//! lease never serves a lower priority while a higher one still has paged items but
//! nothing resident. Counts, payload bytes, ages and the next deadline include the paged items through the counters,
//! so a paged item costs no memory at all unless it carries a source id (whose index entry stays resident).
//! Leased and dead items always stay resident, but without their large payloads ("Payloads on disk"); scheduled
//! items are paged too (next section). The memory backend sets no window.
//!
//! # Paging the schedule (persistent backends)
//! A backend that pages may also bound the resident schedule ([`PartitionState::with_sched_window`]; fjall: a
//! quarter of the item window, as a resident scheduled item is a whole [`Item`] in two ordered maps, several times a
//! ready slot). A scheduled item whose payload is in memory (a new one, or a retried one with a small payload) is
//! written to disk only ([`SchedMove::Spill`], counted in [`PagedSched`]) when the resident schedule is full, or when
//! it is due no earlier than the paged ones; the resident schedule is thus mostly the part due first. Every paged
//! item's (due time, id) is at or after [`PagedSched::from`], and nothing else holds:
//! - A lifecycle pass requeues resident items only while they lie before `from` (a paged item may be due before
//!   any later one). The backend asks [`PartitionState::sched_plan`] before the pass and hands what it read to
//!   [`PartitionState::page_in_sched`]: the paged items already due (in due order, up to what the pass's limit
//!   leaves past the resident items due before them, so that passes whose limit goes elsewhere add nothing, and a
//!   byte bound), which the same pass requeues, or, when none is due and the resident schedule fell under a quarter
//!   of its bound, the next ones, up to half of it, read ahead. `from` then rises past what was read, and the pass
//!   reports `more` when it stopped at a paged item, so due order and FIFO among equal times hold across the
//!   boundary.
//! - Counts, payload bytes and the next deadline include the paged items through the counters; scheduled items
//!   never expire while scheduled (the expiry index holds ready and leased items), so a paged one needs no expiry
//!   bound: it expires once requeued, as a resident one does.
//! - Delete by id, list, clear and snapshots reach the paged items by id (the backend keeps the records in due order,
//!   which a page-in reads as one range, and an index by id to the due time); dedup needs nothing (records are per produce call), and the
//!   source-id index keeps the ids of paged items that carry one (their count is [`PagedSched::with_source`]).
//! - An item whose payload is on disk only ("Payloads on disk": a large item retried with a later time) stays
//!   resident, without its payload: paging it would read the payload back.
//!
//! A partition whose schedule stays within its bound makes no paging writes for it; the memory backend sets none.
//!
//! # Payloads on disk (persistent backends)
//! Nothing bounds the number of leased items (a consumer may lease the whole backlog, one bounded answer after the
//! other) nor the schedule (a large delayed backlog), so their payloads must not live in memory: a backend that
//! writes every change set and keeps each payload above some size in a record of its own (fjall: above the
//! codec's inline limit of 1 KiB) says so with [`PartitionState::with_payloads_on_disk`]. A leased, scheduled or
//! dead item whose payload is above that size then keeps only its metadata and strings, and the payload's length
//! (`on_disk`, 16 bytes and a map entry per item); payloads of at most that size stay, as they ride in the item's
//! own record, which every metadata change rewrites anyway. Memory per such item is thus bounded by its metadata
//! plus 1 KiB, not by its payload.
//! - A lease serves the payload from memory as before (the change set carries it, so the record is written if it
//!   was not yet), and only then drops it from the slot: the hot path gains one length check per item, and a
//!   large item one small copy of its strings.
//! - Paths that keep the id (extend, a retry or an expiry that schedules or kills, delete, complete) need no
//!   payload: the payload record stays, and only the metadata is rewritten.
//! - Paths that give the item a new id need its payload to write the new records: a requeue after an expired lease
//!   or a retry, and a scheduled item coming due. The backend reads them back before the call
//!   ([`PartitionState::lifecycle_reads`], [`PartitionState::retry_reads`], handed over with
//!   [`PartitionState::set_fetched`]), while the old records are still there (the batch deleting them is the one
//!   writing the new ones). A lifecycle pass reads at most a byte bound's worth and stops at the first item it
//!   would need beyond it (the rest keep their order and come next pass, `more`), so a schedule coming due all at
//!   once is requeued a bounded batch at a time. A retry reads a byte bound's worth too and schedules the other
//!   requeues as due at once (they keep their ids and records, so the retry is whole and acknowledged); the
//!   backend then requeues those in bounded parts, in the retry's order ([`PartitionState::deferred_reads`],
//!   [`PartitionState::requeue_deferred`]), and a lifecycle pass requeues whatever it did not get to (a crash, a
//!   failed write). Unbounded, a retry of 1,000 leased items of 1 MB read a gigabyte back at once.
//! - Reads that return items (lists, dead items for transfer) get the payloads from the backend, which reads them
//!   for the items the call chose; the byte bounds count such items at their payload's length.
//! - Payload bytes in the stats include these (`on_disk` sums them); the byte window counts only what is resident.
//!
//! An object reference (the offload wrapper's) always stays: it is small and the tier counters read it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use lessor_core::error::ItemError;
use lessor_core::storage::{
    item_bytes, LifecycleOutcome, LifecyclePolicy, RetryAction, RetryOp, RetryOutcome,
};
use lessor_core::time::Ts;
use lessor_core::types::{
    ClearRequest, DedupRecord, Item, ItemId, NewItem, PartitionCounts, PartitionStats, TierStats,
    MAX_PRIORITY,
};

use crate::tiers::{offloaded_len, TierCounters};

mod chunk;
mod dedup;
pub mod paging;

use chunk::{Chunk, CHUNK};
use dedup::DedupSet;
use paging::NONE;
pub use paging::{PageRead, Paged, PagedSched, PagingCounts, SchedKey, SchedMove, SchedRead};

/// What an operation changed, for a persistent backend to write in one atomic batch.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Items written (inserted or replaced), keyed by their id.
    pub put: Vec<Item>,
    /// Ids removed.
    pub del: Vec<ItemId>,
    /// Dedup records written: one group (a produce call's), stored together and named by the first record's
    /// `(until, id)`.
    pub dedup_put: Vec<DedupRecord>,
    /// Dedup groups removed (every record of the group has ended), by name.
    pub dedup_del: Vec<(Ts, ItemId)>,
    /// Paging (see the `paging` module), only with a window. New ready items written as paged records instead of
    /// items: they are in `put` too, and a backend writes them once, as paged records.
    pub spilled: Vec<Item>,
    /// Paged records removed, by priority and id: paged back in, deleted, expired or cleared.
    pub unpaged: Vec<(u8, ItemId)>,
    /// Items that left the paged records for the items (paged in, or dead and kept for transfer): they are in
    /// `put` and are written whole, payload included, although their ids are not new.
    pub paged_in: Vec<ItemId>,
    /// The paging counters, when they changed; empty counters (nothing paged any more) are deleted, not stored.
    pub counters: Option<Paged>,
    /// Changes of the paged schedule, in order (see "Paging the schedule" in the module docs).
    pub sched_moves: Vec<SchedMove>,
    /// The paged schedule's counters, when they changed; empty ones are deleted, not stored.
    pub sched_counters: Option<PagedSched>,
    /// Every item of `put` is one the store holds whole already, with this payload: only its other fields changed
    /// (a lease, an extension). A store that logs each change (the log store) may write their metadata alone;
    /// one that keeps a record per item writes them whole as ever.
    pub put_kept: bool,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty()
            && self.del.is_empty()
            && self.dedup_put.is_empty()
            && self.dedup_del.is_empty()
            && self.spilled.is_empty()
            && self.unpaged.is_empty()
            && self.counters.is_none()
            && self.sched_moves.is_empty()
            && self.sched_counters.is_none()
    }

    /// Appends the changes of `later`, made after these (a later version of an item wins).
    pub fn append(&mut self, later: Changes) {
        if self.is_empty() && self.paged_in.is_empty() {
            // The usual case (nothing paged): no copy.
            *self = later;
            return;
        }
        self.put_kept = match (self.put.is_empty(), later.put.is_empty()) {
            (true, _) => later.put_kept,
            (false, true) => self.put_kept,
            (false, false) => self.put_kept && later.put_kept,
        };
        self.put.extend(later.put);
        self.del.extend(later.del);
        self.dedup_put.extend(later.dedup_put);
        self.dedup_del.extend(later.dedup_del);
        self.spilled.extend(later.spilled);
        self.unpaged.extend(later.unpaged);
        self.paged_in.extend(later.paged_in);
        if later.counters.is_some() {
            self.counters = later.counters;
        }
        self.sched_moves.extend(later.sched_moves);
        if later.sched_counters.is_some() {
            self.sched_counters = later.sched_counters;
        }
    }
}

use paging::PRIORITIES;

/// What an item costs in memory beyond its payload, in [`PartitionState::footprint`]: its fields and index entries
/// with the allocator's rounding, and room for short metadata strings. Measured: 77 bytes for an item of 100 B with
/// no metadata (the log store's server, mimalloc), 207 with 118 bytes of reference, encoding and kind
/// (`tests/log_replay_memory.rs`, the system allocator). Items with long metadata take more than the estimate.
pub const ITEM_COST: u64 = 128;

/// What a dedup record costs in memory, in [`PartitionState::footprint`] (its key, its group and index entries).
pub const DEDUP_COST: u64 = 96;

/// A priority FIFO is compacted once it holds more than twice its ready items plus this many ids.
const COMPACT_SLACK: usize = 64;
/// Most items one page-in reads: bounds the work of one read, so reads ahead stay short and frequent.
pub const PAGE_MAX: usize = 8192;
/// The schedule keeps at most the window divided by this resident (see "Paging the schedule" in the module docs).
pub const SCHED_SHARE: usize = 4;
/// Expired dedup records a produce call drops beyond as many as it adds, so a backlog drains too.
const PRUNE_EXTRA: usize = 16;

/// Bytes of a busy priority's arena buffers (see [`PartitionState::arenas`]).
const ARENA_BYTES: usize = 64 * 1024;
/// Bytes of a priority's first arena buffer; each next one is twice as large, up to [`ARENA_BYTES`]. A queue of
/// 65,535 partitions with an item or two in each must not hold 64 KiB per partition and priority.
const ARENA_MIN_BYTES: usize = 256;
/// Items whose strings and payload take more than this get a buffer of their own instead.
const ARENA_ITEM_MAX: usize = 4 * 1024;

const LIVE: u8 = 1;
const LEASED: u8 = 2;

// Bits of the first byte of a slot's data buffer: which optional fields follow, each as u32 length + bytes
// (max_attempts as a u32), in this order; the payload is the rest.
const HAS_SOURCE: u8 = 1;
const HAS_REFERENCE: u8 = 2;
const HAS_ENCODING: u8 = 4;
const HAS_KIND: u8 = 8;
const HAS_MAX_ATTEMPTS: u8 = 16;

/// One ready or leased item, or a tombstone (`flags == 0`).
#[derive(Debug, Default)]
struct Slot {
    created_at: i64,
    expire_deadline: i64,
    lease_deadline: i64,
    attempts: u32,
    flags: u8,
    /// Fits in the padding after `flags`.
    priority: u8,
    /// Strings and payload (see `HAS_SOURCE` and the rest), a slice of its priority's arena when small.
    data: Option<Bytes>,
}

impl Slot {
    fn live(&self) -> bool {
        self.flags & LIVE != 0
    }

    fn leased(&self) -> bool {
        self.flags & LEASED != 0
    }

    /// The slot of `it`, its strings and payload written into `arena` (its priority's) when they are small, so
    /// that a priority's items lie together in memory and a produce costs no allocation per item; a large one gets
    /// a buffer of its own. See [`PartitionState::arenas`].
    fn from_item(it: &Item, arena: &mut BytesMut, next_size: &mut usize) -> Slot {
        let mut header = 0u8;
        let mut len = 1 + it.payload.len();
        for (bit, s) in [
            (HAS_SOURCE, &it.source_id),
            (HAS_REFERENCE, &it.reference),
            (HAS_ENCODING, &it.encoding),
            (HAS_KIND, &it.kind),
        ] {
            if !s.is_empty() {
                header |= bit;
                len += 4 + s.len();
            }
        }
        if it.max_attempts != 0 {
            header |= HAS_MAX_ATTEMPTS;
            len += 4;
        }
        fn write(it: &Item, header: u8, buf: &mut impl BufMut) {
            buf.put_u8(header);
            for s in [&it.source_id, &it.reference, &it.encoding, &it.kind] {
                if !s.is_empty() {
                    buf.put_slice(&(s.len() as u32).to_le_bytes());
                    buf.put_slice(s.as_bytes());
                }
            }
            if it.max_attempts != 0 {
                buf.put_slice(&it.max_attempts.to_le_bytes());
            }
            buf.put_slice(&it.payload);
        }
        let data = if len > ARENA_ITEM_MAX {
            let mut buf = Vec::with_capacity(len);
            write(it, header, &mut buf);
            Bytes::from(buf)
        } else {
            if arena.capacity() - arena.len() < len {
                // The full arena's buffer is freed once the last item written into it has left.
                *arena = BytesMut::with_capacity((*next_size).max(len));
                *next_size = (*next_size * 2).min(ARENA_BYTES);
            }
            write(it, header, arena);
            arena.split().freeze()
        };
        Slot {
            created_at: it.created_at.0,
            expire_deadline: it.expire_deadline.0,
            lease_deadline: if it.is_leased { it.lease_deadline.0 } else { 0 },
            attempts: it.attempts,
            flags: LIVE | if it.is_leased { LEASED } else { 0 },
            priority: it.priority.min(MAX_PRIORITY),
            data: Some(data),
        }
    }

    /// Gives the slot a buffer of its own, so that it no longer keeps its arena's buffer alive (a chunk gone sparse:
    /// its few remaining items must not hold the memory of the many that left).
    fn own_data(&mut self) {
        if let Some(d) = &mut self.data {
            *d = Bytes::copy_from_slice(d);
        }
    }

    fn to_item(&self, id: u64) -> Item {
        let mut it = Item {
            id: ItemId(id),
            is_leased: self.leased(),
            lease_deadline: Ts(self.lease_deadline),
            expire_deadline: Ts(self.expire_deadline),
            created_at: Ts(self.created_at),
            attempts: self.attempts,
            priority: self.priority,
            ..Default::default()
        };
        let Some(data) = &self.data else { return it };
        let header = data.first().copied().unwrap_or(0);
        let mut pos = 1usize;
        let mut take = |data: &[u8]| -> String {
            let n = data
                .get(pos..pos + 4)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            let s = data
                .get(pos + 4..pos + 4 + n)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            pos += 4 + n;
            s
        };
        if header & HAS_SOURCE != 0 {
            it.source_id = take(data);
        }
        if header & HAS_REFERENCE != 0 {
            it.reference = take(data);
        }
        if header & HAS_ENCODING != 0 {
            it.encoding = take(data);
        }
        if header & HAS_KIND != 0 {
            it.kind = take(data);
        }
        if header & HAS_MAX_ATTEMPTS != 0 {
            if let Some(b) = data.get(pos..pos + 4) {
                it.max_attempts = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            pos += 4;
        }
        // A slice of the slot's buffer, not a copy: a lease hands payloads out without copying them.
        it.payload = data.slice(pos.min(data.len())..);
        it
    }

    /// The item's source id bytes (empty when it has none) and where its payload starts in the buffer, read
    /// without copying anything out.
    fn layout(&self) -> (&[u8], usize) {
        let Some(data) = &self.data else {
            return (&[], 0);
        };
        let header = data.first().copied().unwrap_or(0);
        let mut pos = 1usize;
        let mut source: &[u8] = &[];
        for bit in [HAS_SOURCE, HAS_REFERENCE, HAS_ENCODING, HAS_KIND] {
            if header & bit != 0 {
                let n = data
                    .get(pos..pos + 4)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
                if bit == HAS_SOURCE {
                    source = data.get(pos + 4..pos + 4 + n).unwrap_or_default();
                }
                pos += 4 + n;
            }
        }
        if header & HAS_MAX_ATTEMPTS != 0 {
            pos += 4;
        }
        (source, pos.min(data.len()))
    }

    /// Drops the payload and keeps the strings, in a buffer of their own (the payload is on disk: see "Payloads
    /// on disk" in the module docs). Returns the payload's length.
    fn drop_payload(&mut self) -> u64 {
        let (_, at) = self.layout();
        let Some(d) = &mut self.data else { return 0 };
        let len = (d.len() - at) as u64;
        *d = Bytes::copy_from_slice(&d[..at]);
        len
    }

    fn payload_len(&self) -> u64 {
        // The whole buffer counts: strings are user bytes too.
        self.data.as_ref().map_or(0, |d| d.len().saturating_sub(1) as u64)
    }
}

/// What a partition keeps per priority for its ready and leased items, allocated when the priority gets its first
/// item (see [`PartitionState::prios`]).
#[derive(Debug)]
struct Prio {
    /// The next id of the priority's open block of ids and the block's end (equal: no block open). See
    /// [`PartitionState::alloc`].
    block: (u64, u64),
    /// Whether it has used up a whole block (a busy priority gets its next chunk at full size at once).
    filled: bool,
    /// The buffer small items' strings and payloads are written into, one after the other (see
    /// [`Slot::from_item`]). Items of one priority leave in about the order they came, so a buffer is freed soon
    /// after its last item left; a chunk that goes sparse gives its few remaining items buffers of their own, so
    /// that straggling items do not keep the buffers of those that left alive (the same bound as for slots). A
    /// partition that empties lets go of its arenas (see [`PartitionState::clean_fronts`]).
    arena: BytesMut,
    /// The size of its next arena buffer (from [`ARENA_MIN_BYTES`], doubling up to [`ARENA_BYTES`]).
    arena_next: usize,
    /// Above priority 0: its ready ids in id order, plus stale ids of items that left (skipped lazily).
    fifo: VecDeque<u64>,
}

impl Default for Prio {
    fn default() -> Self {
        Prio {
            block: (0, 0),
            filled: false,
            arena: BytesMut::new(),
            arena_next: ARENA_MIN_BYTES,
            fifo: VecDeque::new(),
        }
    }
}

/// One partition's items and indexes.
#[derive(Debug)]
pub struct PartitionState {
    /// Above every id handed out or reserved by a block.
    next_id: u64,
    /// Per priority: its id block, arena and FIFO, from its first item on. Boxed, and only for the priorities a
    /// partition used: inline for all ten they took about 900 bytes in every partition, and a queue may have
    /// 65,536 partitions, most of them empty or holding one priority (`loaded_memory.rs`).
    prios: [Option<Box<Prio>>; PRIORITIES],
    track: bool,
    /// Ready and leased items, by id / CHUNK.
    chunks: BTreeMap<u64, Chunk>,
    /// Every ready priority-0 id is at or after this one.
    cursor: u64,
    ready: u64,
    /// Ready items per priority (they sum to `ready`).
    ready_by_prio: [u64; PRIORITIES],
    leased: u64,
    /// Lease deadline -> ids leased with it (lazily pruned).
    leases: DeadlineIndex,
    /// Expire deadline -> ids of live items with it (lazily pruned).
    expire: DeadlineIndex,
    /// The passes that drop stale entries from `leases` and `expire` (see [`Sweep`]).
    lease_sweep: Sweep,
    expire_sweep: Sweep,
    /// Scheduled items by id.
    sched: BTreeMap<u64, Item>,
    /// (enqueue_at, id) of scheduled items: FIFO among equal times.
    sched_idx: BTreeSet<(Ts, u64)>,
    /// Dead items waiting for transfer.
    dead: BTreeMap<u64, Item>,
    /// source_id -> id of every item that carries one.
    by_source: HashMap<String, u64>,
    /// Sum of created_at over live items (for the average age without a scan).
    sum_created: i128,
    /// Sum of lease deadlines over leased items.
    sum_lease: i128,
    payload_bytes: u64,
    /// Items and bytes by tier (inline or offloaded payload), over ready, leased and scheduled items.
    tiers: TierCounters,
    /// Dedup records.
    dedup: DedupSet,
    /// Most resident ready items before new ones are paged (`usize::MAX`: never; see the `paging` module).
    window: usize,
    /// Payload bytes of resident items (`payload_bytes`) above which new ready items are paged too, and page-ins
    /// stop (`u64::MAX`: never). Large items would otherwise fill the memory long before the item window.
    window_bytes: u64,
    /// Ready items on disk only.
    ///
    /// Boxed, from the first item paged on (see [`PartitionState::paged_mut`]): its per-priority counters take 368
    /// bytes, and most partitions of a queue of thousands never page.
    paged: Option<Box<Paged>>,
    /// Whether `paged` changed since the backend last took it.
    paged_dirty: bool,
    /// Most scheduled items resident before new ones are paged (`usize::MAX`: never; see "Paging the schedule").
    sched_window: usize,
    /// Scheduled items on disk only.
    psched: PagedSched,
    /// Whether `psched` changed since the backend last took it.
    psched_dirty: bool,
    /// Paging writes made outside an operation's own change set (spills, page-ins), for the next write to carry.
    /// Boxed, and only from a partition's first paging write on (see [`PartitionState::carry`]): a `Changes` takes
    /// about 600 bytes, and most partitions of a queue of thousands never page.
    carry: Option<Box<Changes>>,
    /// Changes whenever the set of paged items changes other than by new items at the tail (a page-in, a paged
    /// item removed): a read of paged items started before is out of date.
    paged_epoch: u64,
    /// Ids of paged items the backend found on disk for the next call (see [`PartitionState::set_probe`]).
    probe: HashSet<u64>,
    /// Spilled items are handed to the backend ([`PartitionState::take_spilled`]) even without change tracking.
    hand_off: bool,
    /// Leased, scheduled and dead items whose payload is longer than this keep it on disk only (`usize::MAX`:
    /// none; see "Payloads on disk" in the module docs).
    disk_min: usize,
    /// Items whose payload is on disk only, by id: the payload's length.
    on_disk: HashMap<u64, u64>,
    /// Sum of `on_disk`.
    disk_bytes: u64,
    /// Items and payload bytes of `on_disk` that the tier counters count (not dead ones).
    disk_tier: (u64, u64),
    /// Payloads of `on_disk` items the backend read back for the next call (see [`PartitionState::set_fetched`]).
    fetched: HashMap<u64, Bytes>,
    /// Items a retry requeues beyond its read bound, in request order: scheduled as due at once, keeping their ids
    /// and payload records, until [`PartitionState::requeue_deferred`] requeues them (see "Payloads on disk").
    deferred: VecDeque<u64>,
}

impl Default for PartitionState {
    fn default() -> Self {
        PartitionState::new(1)
    }
}

impl PartitionState {
    /// An empty partition whose ids start above `floor` (use the current time in microseconds, so ids stay unique
    /// across a delete and re-create). Changes are tracked.
    pub fn new(floor: u64) -> Self {
        PartitionState {
            next_id: floor.max(1),
            prios: Default::default(),
            track: true,
            chunks: BTreeMap::new(),
            cursor: 0,
            ready: 0,
            ready_by_prio: [0; PRIORITIES],
            leased: 0,
            leases: BTreeMap::new(),
            expire: BTreeMap::new(),
            lease_sweep: Sweep::default(),
            expire_sweep: Sweep::default(),
            sched: BTreeMap::new(),
            sched_idx: BTreeSet::new(),
            dead: BTreeMap::new(),
            by_source: HashMap::new(),
            sum_created: 0,
            sum_lease: 0,
            payload_bytes: 0,
            tiers: TierCounters::default(),
            dedup: DedupSet::default(),
            window: usize::MAX,
            window_bytes: u64::MAX,
            paged: None,
            // A partition that never spills never writes paging counters.
            paged_dirty: false,
            sched_window: usize::MAX,
            psched: PagedSched::default(),
            psched_dirty: false,
            carry: None,
            paged_epoch: 0,
            probe: HashSet::new(),
            hand_off: false,
            disk_min: usize::MAX,
            on_disk: HashMap::new(),
            disk_bytes: 0,
            disk_tier: (0, 0),
            fetched: HashMap::new(),
            deferred: VecDeque::new(),
        }
    }

    /// Pages ready items beyond `window` resident ones out (see the `paging` module). Only a backend that writes
    /// every change set and answers [`PartitionState::page_plan`] may set a window.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// Pages scheduled items beyond `window` resident ones out (see "Paging the schedule" in the module docs). Only
    /// a backend that writes every change set, stores [`Changes::sched_moves`] and answers
    /// [`PartitionState::sched_plan`] may.
    pub fn with_sched_window(mut self, window: usize) -> Self {
        self.sched_window = window.max(1);
        self
    }

    /// The scheduled items paged before the last restart (the counters the backend stored) and the source ids of
    /// those that carry one (their index stays resident).
    pub fn with_paged_sched(mut self, psched: PagedSched, sources: Vec<(String, u64)>) -> Self {
        self.psched = psched;
        self.by_source.extend(sources);
        self.psched_dirty = false;
        self
    }

    /// Pages new ready items also once the resident items' payloads reach `bytes` (with [`with_window`]'s
    /// conditions: only a backend that pages).
    ///
    /// [`with_window`]: PartitionState::with_window
    pub fn with_window_bytes(mut self, bytes: u64) -> Self {
        self.window_bytes = bytes.max(1);
        self
    }

    /// Keeps the payloads longer than `min` bytes of leased, scheduled and dead items on disk only (see "Payloads on
    /// disk" in the module docs). Only a backend that writes every change set, keeps each such payload in a record
    /// of its own and answers [`PartitionState::lifecycle_reads`] and [`PartitionState::retry_reads`] may.
    pub fn with_payloads_on_disk(mut self, min: usize) -> Self {
        self.disk_min = min;
        self
    }

    /// Whether an item that is not ready keeps `payload` on disk only. An object reference (the offload wrapper's)
    /// is small and stays whatever its length.
    fn keeps_on_disk(&self, payload: &[u8]) -> bool {
        payload.len() > self.disk_min && offloaded_len(payload).is_none()
    }

    /// Whether item `id`'s payload is on disk only: a read that returns the item reads its payload from there.
    pub fn is_on_disk(&self, id: u64) -> bool {
        !self.on_disk.is_empty() && self.on_disk.contains_key(&id)
    }

    /// Gives the next call the payloads of items on disk it needs (read by the backend, as
    /// [`PartitionState::lifecycle_reads`] or [`PartitionState::retry_reads`] said); the backend clears them
    /// afterwards with an empty map.
    ///
    /// Payloads given are added to those already there (a page-in of scheduled items hands over the payloads it
    /// read, see [`PartitionState::page_in_sched`]); an empty map clears them.
    pub fn set_fetched(&mut self, payloads: HashMap<u64, Bytes>) {
        if payloads.is_empty() {
            self.fetched = payloads;
        } else {
            self.fetched.extend(payloads);
        }
    }

    /// Whether the resident payloads fill the byte window: new ready items are paged and page-ins stop. A
    /// partition with no resident ready item is never full, so leases always find something to serve.
    fn bytes_full(&self) -> bool {
        self.ready > 0 && self.payload_bytes >= self.window_bytes
    }

    /// Keeps handing spilled items to the backend ([`PartitionState::take_spilled`]) after
    /// [`PartitionState::without_changes`]: the memory backend with cold segments keeps paged items itself, as
    /// compact records, and needs only them, not a copy of every change.
    pub fn handing_off_spills(mut self) -> Self {
        self.hand_off = true;
        self
    }

    /// The items spilled since the last call (see [`PartitionState::handing_off_spills`]), in id order.
    pub fn take_spilled(&mut self) -> Vec<Item> {
        self.carry
            .as_mut()
            .map(|c| std::mem::take(&mut c.spilled))
            .unwrap_or_default()
    }

    /// Above every id this partition handed out (a store that keeps no id high-water mark of its own records it).
    pub fn id_high_water(&self) -> u64 {
        self.next_id
    }

    /// Stops building change sets (a backend with nothing to persist saves the copies).
    pub fn without_changes(mut self) -> Self {
        self.track = false;
        self
    }

    /// Rebuilds the state from stored items (any order). Ids continue above the largest seen and `floor`. Nothing
    /// is paged out here, whatever the window: stored items stay where they are.
    pub fn load(items: impl IntoIterator<Item = Item>, floor: u64) -> Self {
        Self::load_with(items, HashMap::new(), floor)
    }

    /// [`PartitionState::load`] where the items named in `on_disk` (leased, scheduled or dead ones) come without
    /// their payload, which is on disk only, with its length (see "Payloads on disk" in the module docs).
    pub fn load_with(items: impl IntoIterator<Item = Item>, on_disk: HashMap<u64, u64>, floor: u64) -> Self {
        let mut items: Vec<Item> = items.into_iter().collect();
        items.sort_unstable_by_key(|it| it.id);
        match Self::load_sorted(
            items.into_iter().map(Ok::<_, std::convert::Infallible>),
            on_disk,
            floor,
        ) {
            Ok(s) => s,
            Err(never) => match never {},
        }
    }

    /// [`PartitionState::load_with`] from items that come in ascending id order, each as it is decoded: nothing
    /// holds them all at once but the state itself (the log store's replay keeps a million items as their
    /// records, and decodes each only here). The first error stops the load.
    pub fn load_sorted<E>(
        items: impl Iterator<Item = Result<Item, E>>,
        mut on_disk: HashMap<u64, u64>,
        floor: u64,
    ) -> Result<Self, E> {
        let mut s = PartitionState::new(floor);
        let mut min_ready = u64::MAX;
        let mut last = None;
        for it in items {
            let it = it?;
            debug_assert!(last < Some(it.id), "load_sorted: ids out of order");
            last = Some(it.id);
            s.next_id = s.next_id.max(it.id.0 + 1);
            if !it.dead && !it.is_scheduled() && !it.is_leased && it.priority == 0 {
                min_ready = min_ready.min(it.id.0);
            }
            let disk = on_disk.remove(&it.id.0);
            s.insert_as(it, disk);
        }
        s.cursor = if min_ready == u64::MAX {
            s.next_id
        } else {
            min_ready
        };
        s.clean_fronts();
        Ok(s)
    }

    /// Rebuilds a paging state from the resident items a backend read back and the paging counters it stored with
    /// its last write; `sources` are the source ids of paged items that carry one (their index stays resident), and
    /// `on_disk` as in [`PartitionState::load_with`].
    pub fn restore(
        resident: Vec<Item>,
        on_disk: HashMap<u64, u64>,
        paged: Paged,
        sources: Vec<(String, u64)>,
        floor: u64,
        window: usize,
    ) -> Self {
        let mut s = Self::load_with(resident, on_disk, floor).with_window(window);
        // Nothing paged needs no box (see `PartitionState::paged`).
        s.paged = (paged != Paged::EMPTY).then(|| Box::new(paged));
        s.by_source.extend(sources);
        s.paged_dirty = false;
        s
    }

    /// Adds stored dedup groups to a state built by [`PartitionState::load`] (expired ones too: later calls drop
    /// them, and their deletion reaches the disk). Of two records of one key, the later `until` holds the key.
    pub fn with_dedup(mut self, records: impl IntoIterator<Item = Vec<DedupRecord>>) -> Self {
        self.dedup.restore(records);
        self
    }

    /// A fresh id for an item of priority `p`, from that priority's own block of [`CHUNK`] ids (one chunk).
    ///
    /// Each priority fills chunks of its own, so a priority's items lie together in memory however producers mix
    /// priorities. With one global counter, items of ten priorities produced in turn shared every chunk, and a
    /// lease at depth took every tenth slot of chunks written long ago: a cache miss per item, which made lease +
    /// complete at 1M queued items 0.69-0.74 of the rate at 1,000 (docs/benchmarks.md). Ids still grow within a
    /// priority, which is all that FIFO order, the priority FIFOs and paging need; across priorities id order
    /// is no longer production order. A queue with one priority gets consecutive ids, as before.
    fn alloc(&mut self, p: u8) -> ItemId {
        let prio = self.prios[usize::from(p.min(MAX_PRIORITY))].get_or_insert_default();
        let (next, end) = &mut prio.block;
        if *next == *end {
            if *end != 0 {
                // Blocks are only closed once every id was handed out.
                prio.filled = true;
            }
            let start = self.next_id.div_ceil(CHUNK) * CHUNK;
            (*next, *end) = (start, start + CHUNK);
            self.next_id = start + CHUNK;
        }
        let id = *next;
        *next += 1;
        ItemId(id)
    }

    /// A fresh id that names no item (a dedup group's), outside every block.
    fn alloc_loose(&mut self) -> ItemId {
        let id = ItemId(self.next_id);
        self.next_id += 1;
        id
    }

    /// The cursor never moves past this id: priority 0's next id when it has a block open (its later items land
    /// there, and a later chunk of another priority must not carry the cursor beyond them), otherwise no bound
    /// (its next block starts above every id there is).
    fn cursor_limit(&self) -> u64 {
        let (next, end) = self.prios[0].as_ref().map_or((0, 0), |p| p.block);
        if next < end {
            next
        } else {
            u64::MAX
        }
    }

    /// Whether `id` is a resident ready or leased item.
    pub fn contains_live(&self, id: u64) -> bool {
        self.slot(id).is_some()
    }

    fn slot(&self, id: u64) -> Option<&Slot> {
        self.chunks
            .get(&(id / CHUNK))
            .and_then(|c| c.get((id % CHUNK) as usize))
            .filter(|s| s.live())
    }

    /// Puts an item in the indexes its fields call for.
    fn insert(&mut self, it: Item) {
        self.insert_as(it, None);
    }

    /// [`PartitionState::insert`] of an item whose payload is on disk only when `disk` gives its length (the item
    /// then comes without it); a leased, scheduled or dead item whose payload [`PartitionState::keeps_on_disk`]
    /// drops it here (the change set that wrote it, or wrote it before, has it).
    fn insert_as(&mut self, mut it: Item, disk: Option<u64>) {
        let id = it.id.0;
        if !it.source_id.is_empty() {
            self.by_source.insert(it.source_id.clone(), id);
        }
        let ready = !it.dead && !it.is_scheduled() && !it.is_leased;
        let disk =
            disk.or_else(|| (!ready && self.keeps_on_disk(&it.payload)).then_some(it.payload.len() as u64));
        match disk {
            Some(n) => {
                it.payload = Bytes::new();
                self.on_disk.insert(id, n);
                self.disk_bytes += n;
                if !it.dead {
                    self.tiers.add_plain(n);
                    self.disk_tier.0 += 1;
                    self.disk_tier.1 += n;
                }
            }
            None => {
                self.payload_bytes += it.payload.len() as u64;
                if !it.dead {
                    self.tiers.add(&it.payload);
                }
            }
        }
        if it.dead || it.is_scheduled() {
            // Kept as a whole item, possibly for long: its payload gets memory of its own rather than keep alive a
            // buffer it shares (an arena, or a request's whole body).
            if disk.is_none() {
                it.payload = Bytes::copy_from_slice(&it.payload);
            }
            if it.dead {
                self.dead.insert(id, it);
                return;
            }
            self.sched_idx.insert((it.enqueue_at, id));
            self.sched.insert(id, it);
            return;
        }
        let p = usize::from(it.priority.min(MAX_PRIORITY));
        let prio = self.prios[p].get_or_insert_default();
        let slot = Slot::from_item(&it, &mut prio.arena, &mut prio.arena_next);
        if slot.leased() {
            self.leased += 1;
            self.sum_lease += i128::from(slot.lease_deadline);
            self.leases.entry(Ts(slot.lease_deadline)).or_default().push(id);
            self.lease_sweep.pushes += 1;
        } else {
            self.ready += 1;
            // `slot.priority` is `p`.
            self.ready_by_prio[p] += 1;
            if p > 0 {
                // Ids reach a FIFO in increasing order: ready items always get the newest id (load sorts).
                prio.fifo.push_back(id);
            }
        }
        self.expire.entry(Ts(slot.expire_deadline)).or_default().push(id);
        self.expire_sweep.pushes += 1;
        self.sum_created += i128::from(slot.created_at);
        let off = (id % CHUNK) as usize;
        let full = prio.filled;
        self.chunks
            .entry(id / CHUNK)
            .or_insert_with(|| Chunk::starting_at(off, full))
            .put(off, slot);
    }

    /// Puts an item that just got the newest id into the state: a ready one is paged when the window is full or
    /// its priority already pages (so resident ids stay below paged ones). Returns whether it is resident.
    fn insert_new(&mut self, it: Item) -> bool {
        let ready = !it.dead && !it.is_scheduled() && !it.is_leased;
        let p = usize::from(it.priority.min(MAX_PRIORITY));
        if ready && (self.paged().from[p] != NONE || self.ready as usize >= self.window || self.bytes_full())
        {
            self.spill(it);
            return false;
        }
        if !it.dead && it.is_scheduled() && self.spills_sched(&it) {
            self.spill_sched(it);
            return false;
        }
        self.insert(it);
        true
    }

    /// Whether a scheduled item (its payload in memory) goes to disk only: the resident schedule is full, or the
    /// item is due no earlier than the paged ones (so that the resident schedule stays the part due first, and a
    /// read-ahead brings back what comes due next).
    fn spills_sched(&self, it: &Item) -> bool {
        self.sched_window != usize::MAX
            && (self.sched.len() >= self.sched_window
                || (self.psched.count > 0 && (it.enqueue_at.0, it.id.0) >= self.psched.from))
    }

    /// Counts a scheduled item as paged: the next write stores it as a paged scheduled record instead of an item.
    fn spill_sched(&mut self, it: Item) {
        let ps = &mut self.psched;
        ps.from = ps.from.min((it.enqueue_at.0, it.id.0));
        ps.count += 1;
        ps.bytes += it.payload.len() as u64;
        if !it.source_id.is_empty() {
            ps.with_source += 1;
            self.by_source.insert(it.source_id.clone(), it.id.0);
        }
        self.psched_dirty = true;
        if self.track {
            self.carry().sched_moves.push(SchedMove::Spill(it));
        }
    }

    /// Takes a paged scheduled item (read back from disk) out of the counters and records its records' removal;
    /// the caller puts it somewhere or drops it.
    fn unspill_sched(&mut self, it: &Item, ch: &mut Changes) {
        let ps = &mut self.psched;
        ps.count = ps.count.saturating_sub(1);
        ps.bytes = ps.bytes.saturating_sub(it.payload.len() as u64);
        if !it.source_id.is_empty() {
            ps.with_source = ps.with_source.saturating_sub(1);
        }
        ps.settle();
        self.psched_dirty = true;
        if self.track {
            ch.sched_moves.push(SchedMove::Unpage(it.enqueue_at.0, it.id.0));
        }
    }

    /// Whether `it` (read from disk) is one of the paged scheduled items.
    fn is_paged_sched(&self, it: &Item) -> bool {
        self.psched.count > 0
            && !it.dead
            && it.is_scheduled()
            && (it.enqueue_at.0, it.id.0) >= self.psched.from
            && !self.sched.contains_key(&it.id.0)
            && self.slot(it.id.0).is_none()
    }

    /// The paged schedule's counters.
    pub fn paged_sched(&self) -> &PagedSched {
        &self.psched
    }

    /// The read a lifecycle pass at `now` that handles up to `limit` items needs before it: the paged scheduled items
    /// already due (what `limit`, at most [`PAGE_MAX`], leaves past the resident items due before them), or, when
    /// none is due and the resident schedule fell below a quarter of its window, the next ones by due time, up to
    /// half the window (read ahead, so they are resident before they come due). `max_bytes` bounds the payloads
    /// read.
    pub fn sched_plan(&self, now: Ts, limit: usize, max_bytes: u64) -> Option<SchedRead> {
        if self.psched.count == 0 {
            return None;
        }
        let resident = self.sched.len();
        if self.psched.from.0 <= now.0 {
            // Resident items the pass can requeue before the paged boundary fill part of its limit, items paged in
            // by an earlier pass that did not get to them (its limit went to expired leases) included: reading the
            // limit again regardless would add a page to memory per such pass, until the whole due schedule was
            // resident. Counting stops at the limit, so this costs at most one page of the index.
            let n = limit.clamp(1, PAGE_MAX);
            let from = self.psched.from;
            let ahead = self
                .sched_idx
                .iter()
                .take_while(|&&(t, id)| t <= now && (t.0, id) < from)
                .take(n)
                .count();
            return (ahead < n).then_some(SchedRead {
                from,
                to: Some((now.0.saturating_add(1), 0)),
                n: n - ahead,
                max_bytes,
            });
        }
        let low = (self.sched_window / 4).max(1);
        let room = self.sched_window.saturating_sub(resident);
        (resident < low && room > 0).then(|| SchedRead {
            from: self.psched.from,
            to: None,
            n: room.min((self.sched_window / 2).max(1)).min(PAGE_MAX),
            max_bytes,
        })
    }

    /// Takes paged scheduled items read back from disk (in key order, from `read.from` on) into memory, their moves
    /// written with the next change set. `next`: the key of the first paged item the read left (past `read.to`, or
    /// past its bound), `None` when the disk holds none after what it read: the boundary becomes exact, so that the
    /// next deadline is the next paged item's due time, not a stale lower bound (a backend woken at such a bound
    /// would read nothing, over and over, until the item came due). A read planned before the paged schedule
    /// changed is ignored. The payloads that the items keep on disk once resident are handed to the next call as
    /// read back ([`PartitionState::set_fetched`]): a pass that requeues them needs them, and their payload records
    /// are only written by the write that carries this page-in.
    pub fn page_in_sched(&mut self, read: SchedRead, items: Vec<Item>, next: Option<SchedKey>) {
        if self.psched.from != read.from || self.psched.count == 0 {
            return;
        }
        let mut ch = self.take_carry();
        for it in items {
            if !self.is_paged_sched(&it) {
                continue;
            }
            let key = (it.enqueue_at.0, it.id.0);
            if read.to.is_some_and(|to| key >= to) || next.is_some_and(|n| key >= n) {
                continue;
            }
            self.unspill_sched(&it, &mut ch);
            if self.track {
                ch.paged_in.push(it.id);
                ch.put.push(it.clone());
            }
            let payload = it.payload.clone();
            let id = it.id.0;
            self.insert(it);
            if self.is_on_disk(id) {
                self.fetched.insert(id, payload);
            }
            if self.psched.count == 0 {
                break;
            }
        }
        *self.carry() = ch;
        if self.psched.count > 0 {
            match next {
                Some(n) if n > self.psched.from => {
                    self.psched.from = n;
                    self.psched_dirty = true;
                }
                Some(_) => {}
                None => {
                    tracing::warn!(
                        missing = self.psched.count,
                        "paged scheduled item count above what the disk holds; corrected"
                    );
                    self.psched = PagedSched::default();
                    self.psched_dirty = true;
                }
            }
        }
    }

    /// Removes paged scheduled items read back from disk (a delete by id, a clear), recording their removal.
    /// Items that are not paged (any more) are skipped. Returns how many went.
    pub fn drop_paged_sched(&mut self, items: Vec<Item>) -> (u64, Changes) {
        let mut ch = Changes::default();
        let mut n = 0;
        for it in items {
            if !self.is_paged_sched(&it) {
                continue;
            }
            self.unspill_sched(&it, &mut ch);
            if !it.source_id.is_empty() && self.by_source.get(&it.source_id) == Some(&it.id.0) {
                self.by_source.remove(&it.source_id);
            }
            n += 1;
        }
        (n, ch)
    }

    /// Forgets every paged scheduled item (a clear found fewer records than counted: trust the disk).
    pub fn forget_paged_sched(&mut self) {
        if self.psched.count > 0 {
            self.psched = PagedSched::default();
            self.psched_dirty = true;
        }
    }

    /// Counts a new ready item as paged: the next write stores it as a paged record instead of an item.
    fn spill(&mut self, it: Item) {
        let p = usize::from(it.priority.min(MAX_PRIORITY));
        let pg = self.paged_mut();
        pg.from[p] = pg.from[p].min(it.id.0);
        pg.count[p] += 1;
        let exp = it.expire_deadline.0;
        pg.min_expire[p] = pg.min_expire[p].min(exp);
        if exp < pg.max_expire[p] {
            pg.ordered[p] = false;
        }
        pg.max_expire[p] = pg.max_expire[p].max(exp);
        pg.bytes += it.payload.len() as u64;
        pg.sum_created += i128::from(it.created_at.0);
        if !it.source_id.is_empty() {
            pg.with_source += 1;
            self.by_source.insert(it.source_id.clone(), it.id.0);
        }
        self.paged_dirty = true;
        if self.track || self.hand_off {
            self.carry().spilled.push(it);
        }
    }

    /// Takes a paged item out of the counters (it was read back from disk); the caller puts it somewhere or
    /// records its removal.
    fn unspill(&mut self, it: &Item) {
        let p = usize::from(it.priority.min(MAX_PRIORITY));
        let pg = self.paged_mut();
        pg.count[p] = pg.count[p].saturating_sub(1);
        pg.bytes = pg.bytes.saturating_sub(it.payload.len() as u64);
        pg.sum_created -= i128::from(it.created_at.0);
        if !it.source_id.is_empty() {
            pg.with_source = pg.with_source.saturating_sub(1);
        }
        pg.settle(p);
        self.paged_dirty = true;
    }

    /// Whether `it` (read from disk) is one of the paged items.
    fn is_paged(&self, it: &Item) -> bool {
        let p = usize::from(it.priority.min(MAX_PRIORITY));
        !it.dead
            && !it.is_scheduled()
            && !it.is_leased
            && self.paged().count[p] > 0
            && it.id.0 >= self.paged().from[p]
            && self.slot(it.id.0).is_none()
    }

    /// Tells the next call which of the ids it names are paged items (found on disk by the backend), so that
    /// complete, extend and retry call them not leased rather than not found; the backend clears it afterwards.
    pub fn set_probe(&mut self, ids: HashSet<u64>) {
        self.probe = ids;
    }

    /// See the `paged_epoch` field: a backend applies a read of paged items only if this did not change since.
    pub fn paged_epoch(&self) -> u64 {
        self.paged_epoch
    }

    /// Ready items held in memory (the others are paged).
    pub fn resident_ready(&self) -> u64 {
        self.ready
    }

    /// Scheduled items held in memory (tests: the schedule's bound holds).
    pub fn resident_scheduled(&self) -> u64 {
        self.sched.len() as u64
    }

    /// The paging counters.
    pub fn paged(&self) -> &Paged {
        self.paged.as_deref().unwrap_or(&Paged::EMPTY)
    }

    /// The paging counters, to change them (boxed on first use).
    fn paged_mut(&mut self) -> &mut Paged {
        self.paged.get_or_insert_with(|| Box::new(Paged::EMPTY))
    }

    /// Resident and paged ready items, and the payload bytes of the paged ones; O(1).
    pub fn paging_counts(&self) -> PagingCounts {
        PagingCounts {
            resident_ready: self.ready,
            paged_ready: self.paged().total(),
            paged_bytes: self.paged().bytes,
            on_disk_bytes: self.disk_bytes,
            paged_scheduled: self.psched.count,
            paged_scheduled_bytes: self.psched.bytes,
        }
    }

    /// Raises priority `p`'s paged boundary to `id` once every paged item below it is known gone (a clear or a
    /// sweep removed them in id order), so later reads start past their deleted records.
    pub fn raise_paged_from(&mut self, p: u8, id: u64) {
        let p = usize::from(p.min(MAX_PRIORITY));
        if self.paged().count[p] > 0 && id > self.paged().from[p] {
            self.paged_mut().from[p] = id;
            self.paged_epoch += 1;
            self.paged_dirty = true;
        }
    }

    /// Forgets every paged item of priority `p` (the disk held fewer than counted: trust the disk).
    pub fn forget_paged(&mut self, p: u8) {
        let p = usize::from(p.min(MAX_PRIORITY));
        if self.paged().count[p] > 0 {
            self.trust_the_disk(p);
            self.paged_epoch += 1;
            self.paged_dirty = true;
        }
    }

    /// Forgets every paged item of priority `p` that the backend dropped without reading back (a clear that
    /// deleted cold segments whole).
    pub fn clear_paged(&mut self, p: u8) {
        let p = usize::from(p.min(MAX_PRIORITY));
        if self.paged().count[p] > 0 {
            let pg = self.paged_mut();
            pg.count[p] = 0;
            pg.settle(p);
            self.paged_epoch += 1;
            self.paged_dirty = true;
        }
    }

    /// Priority `p`'s paged count is above what its records on disk hold (it cannot be, short of a bug): says so
    /// and takes the disk's word, so that leases stop waiting for items that are not there.
    fn trust_the_disk(&mut self, p: usize) {
        tracing::warn!(
            priority = p,
            missing = self.paged().count[p],
            "paged item count above what the disk holds; corrected"
        );
        let pg = self.paged_mut();
        pg.count[p] = 0;
        pg.settle(p);
    }

    /// The reads a backend should do around an operation that leases `want` items. `urgent`: only what the lease
    /// cannot do without (priorities whose resident head is shorter than its share of the lease while they have
    /// paged items), to read before it, whatever the window. Otherwise: every priority whose resident head fell
    /// below its low-water mark, to read ahead in the background, within the room the window has left.
    ///
    /// The window is shared by the priorities that hold ready items: each gets an equal share, and the low-water
    /// mark (a quarter) and the refill (half, at most [`PAGE_MAX`]) are of that share. Marks of the whole window
    /// per priority made ten busy priorities each read ahead at once, past the window (RAM no longer bounded by
    /// it), and read back items as soon as they were paged, so each was written twice without need.
    pub fn page_plan(&self, want: usize, urgent: bool) -> Vec<PageRead> {
        let mut plan = Vec::new();
        if self.paged().is_empty() {
            return plan;
        }
        let active = (0..PRIORITIES)
            .filter(|&p| self.ready_by_prio[p] + self.paged().count[p] > 0)
            .count()
            .max(1);
        let share = (self.window / active).max(1);
        let low = (share / 4).max(1) as u64;
        let batch = (share / 2).clamp(1, PAGE_MAX) as u64;
        // The byte window's room, in items of the paged items' average size: page-ins read whole items, so a
        // page of large items must not bring back more than the window holds (a page of 8,192 items of 5 MB).
        let average = (self.paged().bytes / self.paged().total().max(1)).max(1);
        let byte_room = self.window_bytes.saturating_sub(self.payload_bytes) / average;
        let mut room = (self.window as u64).saturating_sub(self.ready).min(byte_room);
        let mut remaining = want as u64;
        for p in (0..PRIORITIES).rev() {
            let resident = self.ready_by_prio[p];
            let paged = self.paged().count[p];
            let n = if urgent {
                // What the lease needs is read whatever the window, but no more than the byte room (at least one
                // item): the lease itself is bounded in bytes, and the next one reads again.
                (resident < remaining).then(|| paged.min(batch + remaining).min(byte_room.max(1)))
            } else {
                (resident < low && room > 0).then(|| paged.min(batch + remaining).min(room))
            };
            if let Some(n) = n.filter(|&n| n > 0) {
                room = room.saturating_sub(n);
                plan.push(PageRead {
                    prio: p as u8,
                    from: self.paged().from[p],
                    n: n as usize,
                });
            }
            remaining = remaining.saturating_sub(resident + paged);
        }
        plan
    }

    /// Takes ready items of priority `read.prio` read back from disk (in id order, from `read.from` on) into memory.
    /// `exhausted`: the disk has no more of them. A read planned before the paged items changed (another read, a
    /// delete) is ignored: the plan is made again.
    pub fn page_in(&mut self, read: PageRead, items: Vec<Item>, exhausted: bool) {
        let p = usize::from(read.prio);
        if self.paged().from[p] != read.from || self.paged().count[p] == 0 {
            return;
        }
        self.paged_epoch += 1;
        let mut last = None;
        // Items past the byte window stay paged (the plan sized the read by the average; sizes vary).
        let mut stopped = false;
        for it in items {
            if !self.is_paged(&it) || usize::from(it.priority) != p {
                continue;
            }
            if last.is_some() && self.bytes_full() {
                stopped = true;
                break;
            }
            self.unspill(&it);
            last = Some(it.id.0);
            if p == 0 {
                // Every resident priority-0 id is below the paged ones, so the cursor may step back to them.
                self.cursor = self.cursor.min(it.id.0);
            }
            if self.track {
                // Moved from the paged records to the items, in the next write.
                let carry = self.carry();
                carry.unpaged.push((read.prio, it.id));
                carry.paged_in.push(it.id);
                carry.put.push(it.clone());
            }
            self.insert(it);
            if self.paged().count[p] == 0 {
                break;
            }
        }
        if self.paged().count[p] > 0 {
            if exhausted && !stopped {
                self.trust_the_disk(p);
            } else if let Some(last) = last {
                self.paged_mut().from[p] = last + 1;
            }
        }
        self.paged_dirty = true;
        self.clean_fronts();
    }

    /// Removes paged items read back from disk (a delete by id, an expiry, a clear), recording their removal; an
    /// expired one dies under `policy` when given. Items that are not paged (anymore) are skipped. Returns how
    /// many went.
    pub fn drop_paged(&mut self, items: Vec<Item>, expire: Option<LifecyclePolicy>) -> (u64, Changes) {
        let mut ch = Changes::default();
        let mut n = 0;
        for it in items {
            if !self.is_paged(&it) {
                continue;
            }
            self.unspill(&it);
            self.paged_epoch += 1;
            if !it.source_id.is_empty() && self.by_source.get(&it.source_id) == Some(&it.id.0) {
                self.by_source.remove(&it.source_id);
            }
            let (prio, id) = (it.priority, it.id);
            n += 1;
            match expire {
                Some(policy) => self.die(it, None, policy, &mut ch),
                None => self.record_del(&mut ch, id),
            }
            if self.track {
                ch.unpaged.push((prio, id));
                if self.dead.contains_key(&id.0) {
                    // Kept for transfer: it moves to the items, payload and all.
                    ch.paged_in.push(id);
                }
            }
        }
        (n, ch)
    }

    /// Sets the expiry bound of priority `p` to `min`, the earliest deadline a sweep found among all its paged items.
    pub fn set_paged_min_expire(&mut self, p: u8, min: i64) {
        let p = usize::from(p.min(MAX_PRIORITY));
        if self.paged().count[p] > 0 && self.paged().min_expire[p] != min {
            self.paged_mut().min_expire[p] = min;
            self.paged_dirty = true;
        }
    }

    /// Priorities whose paged items may have expired at `now`.
    pub fn paged_expiry_due(&self, now: Ts) -> Vec<u8> {
        (0..PRIORITIES)
            .filter(|&p| self.paged().count[p] > 0 && self.paged().min_expire[p] <= now.0)
            .map(|p| p as u8)
            .collect()
    }

    /// The paging writes waiting for the next write ([`PartitionState::carry`]), boxed on first use.
    fn carry(&mut self) -> &mut Changes {
        self.carry.get_or_insert_default()
    }

    /// What [`PartitionState::carry`] holds, leaving it empty; its box stays, for the partition's next paging write.
    fn take_carry(&mut self) -> Changes {
        self.carry.as_deref_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The paging writes made since the backend last asked (spills and page-ins, which happen outside the change
    /// set an operation returns), with the counters when they changed. A backend writes them in the same batch as
    /// the next change set, before it, so that every batch leaves records and counters in agreement.
    pub fn take_paging(&mut self) -> Changes {
        let mut ch = self.take_carry();
        if self.paged_dirty {
            self.paged_dirty = false;
            ch.counters = Some(self.paged().clone());
        }
        if self.psched_dirty {
            self.psched_dirty = false;
            ch.sched_counters = Some(self.psched.clone());
        }
        ch
    }

    /// Takes a live item out of the chunks (its deadline entries go stale and are pruned lazily).
    fn take_live(&mut self, id: u64) -> Option<Item> {
        self.take_live_slot(id).map(|s| s.to_item(id))
    }

    /// Removes an item from every index without building it (complete: nothing reads the item, so its payload is
    /// not copied out only to be dropped).
    fn discard(&mut self, id: u64) {
        let Some(slot) = self.take_live_slot(id) else {
            self.remove(id);
            return;
        };
        let (source, payload_at) = slot.layout();
        if !source.is_empty() {
            if let Ok(source) = std::str::from_utf8(source) {
                if self.by_source.get(source) == Some(&id) {
                    self.by_source.remove(source);
                }
            }
        }
        // Checked for emptiness first: most partitions hold no payload on disk, and complete is the hot path.
        if let Some(n) = self.take_disk(id) {
            self.forget_disk(n, true);
            return;
        }
        let total = slot.data.as_ref().map_or(0, |d| d.len());
        self.payload_bytes -= (total - payload_at) as u64;
        self.tiers.remove(
            slot.data
                .as_ref()
                .and_then(|d| d.get(payload_at..))
                .unwrap_or_default(),
        );
    }

    /// Takes item `id` out of `on_disk`, returning its payload's length if it was there.
    fn take_disk(&mut self, id: u64) -> Option<u64> {
        if self.on_disk.is_empty() {
            return None;
        }
        self.on_disk.remove(&id)
    }

    /// Takes a payload of `n` bytes on disk out of the counters (`counted`: of an item the tier counters count,
    /// not a dead one); the caller removed it from `on_disk`.
    fn forget_disk(&mut self, n: u64, counted: bool) {
        self.disk_bytes -= n;
        if counted {
            self.tiers.remove_plain(n);
            self.disk_tier.0 -= 1;
            self.disk_tier.1 -= n;
        }
    }

    /// [`PartitionState::take_live`] without building the item.
    fn take_live_slot(&mut self, id: u64) -> Option<Slot> {
        let key = id / CHUNK;
        let chunk = self.chunks.get_mut(&key)?;
        let slot = chunk.take((id % CHUNK) as usize)?;
        if chunk.live() == 0 {
            self.chunks.remove(&key);
        }
        if slot.leased() {
            self.leased -= 1;
            self.sum_lease -= i128::from(slot.lease_deadline);
        } else {
            self.ready -= 1;
            let p = usize::from(slot.priority);
            self.ready_by_prio[p] -= 1;
            // The id stays in its FIFO until it reaches the front; compact once stale ids are the majority, so
            // they never cost more than O(1) each.
            if let Some(prio) = self.prios[p].as_mut().filter(|_| p > 0) {
                if prio.fifo.len() > 2 * self.ready_by_prio[p] as usize + COMPACT_SLACK {
                    let chunks = &self.chunks;
                    prio.fifo.retain(|&id| ready_in(chunks, id));
                }
            }
        }
        self.sum_created -= i128::from(slot.created_at);
        Some(slot)
    }

    /// Takes an item out of every index. When its payload is on disk only, the item comes without it, and with its
    /// length, unless the backend read it back for this call ([`PartitionState::set_fetched`]): then it is whole.
    fn remove(&mut self, id: u64) -> Option<(Item, Option<u64>)> {
        let (mut it, counted) = if let Some(it) = self.take_live(id) {
            (it, true)
        } else if let Some(it) = self.sched.remove(&id) {
            self.sched_idx.remove(&(it.enqueue_at, id));
            (it, true)
        } else {
            (self.dead.remove(&id)?, false)
        };
        if !it.source_id.is_empty() && self.by_source.get(&it.source_id) == Some(&id) {
            self.by_source.remove(&it.source_id);
        }
        let Some(n) = self.take_disk(id) else {
            self.payload_bytes -= it.payload.len() as u64;
            if counted {
                self.tiers.remove(&it.payload);
            }
            return Some((it, None));
        };
        self.forget_disk(n, counted);
        match self.fetched.remove(&id) {
            Some(payload) => {
                it.payload = payload;
                Some((it, None))
            }
            None => Some((it, Some(n))),
        }
    }

    /// Drops stale entries at the front of both deadline indexes, so their first keys are real deadlines, and of
    /// the priority FIFOs, and moves the cursor onto the first ready priority-0 item: the head of every priority is
    /// then where [`PartitionState::stats`] looks, without a scan. Each stale id is dropped once and the cursor only
    /// moves forward over slots a lease would pass anyway, so this costs O(1) amortized per item.
    fn clean_fronts(&mut self) {
        if self.ready == 0 && self.leased == 0 {
            // Empty: the unused rest of each arena buffer goes back, and the next items start small again (an idle
            // partition holds no buffer; a busy one grows back to full-size buffers within a few). The rest of a
            // priority's state stays: its open block of ids is still its own.
            for prio in self.prios.iter_mut().flatten() {
                if prio.arena_next != ARENA_MIN_BYTES {
                    prio.arena = BytesMut::new();
                    prio.arena_next = ARENA_MIN_BYTES;
                }
            }
        }
        let chunks = &self.chunks;
        clean_front(&mut self.leases, |d, id| lease_valid(chunks, d, id));
        clean_front(&mut self.expire, |d, id| expire_valid(chunks, d, id));
        self.lease_sweep
            .step(&mut self.leases, |d, id| lease_valid(chunks, d, id));
        self.expire_sweep
            .step(&mut self.expire, |d, id| expire_valid(chunks, d, id));
        for fifo in self.prios.iter_mut().skip(1).flatten().map(|p| &mut p.fifo) {
            while let Some(&id) = fifo.front() {
                if ready_in(chunks, id) {
                    break;
                }
                fifo.pop_front();
            }
        }
        self.shrink_drained();
        self.settle_cursor();
    }

    /// Gives back the room of a drained burst in the maps and queues that grow with the items held: without it a
    /// partition kept, for as long as it lived, the room of its largest backlog (a flood of ten million dead letters,
    /// each with a source id, left about 550 MB of empty `by_source` table once drained). Each check is O(1); a
    /// shrink copies what is left, and comes again only once half of that has gone.
    fn shrink_drained(&mut self) {
        lessor_core::shrink::map(&mut self.by_source, SHRINK_MIN);
        lessor_core::shrink::map(&mut self.on_disk, SHRINK_MIN);
        for prio in self.prios.iter_mut().flatten() {
            shrink_deque(&mut prio.fifo);
        }
    }

    /// Moves the cursor forward onto the first ready priority-0 item (when there is one).
    fn settle_cursor(&mut self) {
        if self.ready_by_prio[0] == 0 {
            return;
        }
        loop {
            let Some((&key, chunk)) = self.chunks.range(self.cursor / CHUNK..).next() else {
                return;
            };
            let start = if key == self.cursor / CHUNK {
                (self.cursor % CHUNK) as usize
            } else {
                0
            };
            for (off, s) in chunk.iter_from(start) {
                if s.live() && !s.leased() && s.priority == 0 {
                    self.cursor = key * CHUNK + off as u64;
                    return;
                }
            }
            let end = key * CHUNK + chunk.end() as u64;
            if self.chunks.range((key + 1)..).next().is_some() {
                let next = ((key + 1) * CHUNK).min(self.cursor_limit());
                if next / CHUNK <= key {
                    return;
                }
                self.cursor = next;
            } else {
                // As in `lease`: later ids of the last chunk may still arrive.
                self.cursor = end.min(self.cursor_limit()).max(self.cursor);
                return;
            }
        }
    }

    /// `created_at` of the oldest item at the head of a priority (the items a lease takes next), if any is ready.
    fn oldest_head(&self) -> Option<i64> {
        let mut oldest: Option<i64> = None;
        let mut consider = |id: u64| {
            if let Some(s) = slot_in(&self.chunks, id).filter(|s| !s.leased()) {
                oldest = Some(oldest.map_or(s.created_at, |o| o.min(s.created_at)));
            }
        };
        if self.ready_by_prio[0] > 0 {
            consider(self.cursor);
        }
        for p in 1..PRIORITIES {
            if self.ready_by_prio[p] > 0 {
                if let Some(&id) = self.prios[p].as_ref().and_then(|p| p.fifo.front()) {
                    consider(id);
                }
            }
        }
        oldest
    }

    fn record_put(&self, ch: &mut Changes, id: u64) {
        if self.track {
            if let Some(s) = self.slot(id) {
                ch.put.push(s.to_item(id));
            } else if let Some(it) = self.sched.get(&id).or_else(|| self.dead.get(&id)) {
                ch.put.push(it.clone());
            }
        }
    }

    fn record_del(&self, ch: &mut Changes, id: ItemId) {
        if self.track {
            ch.del.push(id);
        }
    }

    /// Re-inserts `it` at the tail with a fresh id, recording the move. Its payload must be in memory (`disk` is
    /// `None`): the new id's records are written whole.
    fn requeue(&mut self, mut it: Item, disk: Option<u64>, ch: &mut Changes) {
        if disk.is_some() {
            // The backend did not read the payload back although `lifecycle_reads` or `retry_reads` named it (a
            // bug): the item keeps its id and its payload on disk, due at once, and the next lifecycle pass
            // requeues it with its payload read.
            tracing::error!(
                item = it.id.0,
                "payload on disk not read back for a requeue: scheduled instead"
            );
            self.schedule(it, Ts(1), disk, ch);
            return;
        }
        self.record_del(ch, it.id);
        it.id = self.alloc(it.priority);
        it.is_leased = false;
        it.lease_deadline = Ts::ZERO;
        it.enqueue_at = Ts::ZERO;
        if self.track {
            // Recorded from the item itself: a paged item has no slot to record from.
            ch.put.push(it.clone());
        }
        self.insert_new(it);
    }

    /// Puts `it` into the schedule until `at`, keeping its id, recording the change (`disk` as in
    /// [`PartitionState::insert_as`]).
    fn schedule(&mut self, mut it: Item, at: Ts, disk: Option<u64>, ch: &mut Changes) {
        it.is_leased = false;
        it.lease_deadline = Ts::ZERO;
        // A zero time would read as "not scheduled".
        it.enqueue_at = at.max(Ts(1));
        if self.track {
            // Recorded from the item itself, before its payload may go to disk only.
            ch.put.push(it.clone());
        }
        if disk.is_none() && self.spills_sched(&it) {
            // Its item records (it had this id before) make way for the paged record, in the same write. An item
            // whose payload is on disk only stays resident instead: paging it would read the payload back.
            self.record_del(ch, it.id);
            self.spill_sched(it);
            return;
        }
        self.insert_as(it, disk);
    }

    /// Kills an item: kept for transfer when a dead-letter queue exists, dropped otherwise.
    fn die(&mut self, mut it: Item, disk: Option<u64>, policy: LifecyclePolicy, ch: &mut Changes) {
        if policy.has_dead_queue {
            it.dead = true;
            it.is_leased = false;
            it.lease_deadline = Ts::ZERO;
            if self.track {
                // Recorded from the item itself: a paged item dying moves to the items whole, and its payload
                // may go to disk only here.
                ch.put.push(it.clone());
            }
            self.insert_as(it, disk);
        } else {
            self.record_del(ch, it.id);
        }
    }

    /// See [`lessor_core::storage::Partition::produce`].
    pub fn produce(&mut self, items: Vec<NewItem>) -> (Vec<ItemId>, Changes) {
        let mut ids = Vec::with_capacity(items.len());
        let mut ch = Changes::default();
        // Records that ended before the earliest item of the call are expired for every item of it.
        let earliest = items.iter().map(|n| n.created_at).min().unwrap_or(Ts::ZERO);
        let mut recorded = 0usize;
        for mut n in items {
            if !n.source_id.is_empty() {
                if let Some(&existing) = self.by_source.get(&n.source_id) {
                    ids.push(ItemId(existing));
                    continue;
                }
            }
            let id = self.alloc(n.priority);
            // Keys are recorded, not checked: the engine's queue-wide index is the check (see the `dedup` module).
            if !n.dedup_id.is_empty() && n.dedup_until > n.created_at {
                // The record copies the key's bytes; a persistent store's write takes the string itself.
                let key = std::mem::take(&mut n.dedup_id);
                self.dedup.insert(&key, id, n.dedup_until);
                if self.track {
                    ch.dedup_put.push(DedupRecord {
                        dedup_id: key,
                        id,
                        until: n.dedup_until,
                    });
                }
                recorded += 1;
            }
            let it = Item {
                id,
                source_id: n.source_id,
                expire_deadline: n.expire_deadline,
                enqueue_at: n.enqueue_at,
                created_at: n.created_at,
                reference: n.reference,
                encoding: n.encoding,
                kind: n.kind,
                payload: n.payload,
                priority: n.priority.min(MAX_PRIORITY),
                ..Default::default()
            };
            ids.push(id);
            if self.track {
                ch.put.push(it.clone());
            }
            self.insert_new(it);
        }
        // The call's records are one group on disk (see the `dedup` module); its name is its first record's.
        self.dedup.seal();
        self.prune_dedup(earliest, recorded + PRUNE_EXTRA, &mut ch);
        self.clean_fronts();
        (ids, ch)
    }

    /// Drops up to `limit` dedup records that ended at or before `now`.
    fn prune_dedup(&mut self, now: Ts, limit: usize, ch: &mut Changes) {
        let track = self.track;
        self.dedup.prune(now, limit, |until, id| {
            if track {
                ch.dedup_del.push((until, id));
            }
        });
    }

    /// See [`lessor_core::storage::Partition::import_dedup`]: the records join as one group, all under a fresh id
    /// (the group's name on disk must not meet one already there; the engine's index only reads key and `until`).
    pub fn import_dedup(&mut self, records: Vec<DedupRecord>) -> ((), Changes) {
        let mut ch = Changes::default();
        if records.is_empty() {
            return ((), ch);
        }
        let id = self.alloc_loose();
        for r in records {
            self.dedup.insert(&r.dedup_id, id, r.until);
            if self.track {
                ch.dedup_put.push(DedupRecord {
                    dedup_id: r.dedup_id,
                    id,
                    until: r.until,
                });
            }
        }
        self.dedup.seal();
        ((), ch)
    }

    /// See [`lessor_core::storage::Partition::dedup_records`].
    pub fn dedup_records(&self, now: Ts) -> Vec<DedupRecord> {
        self.dedup.live(now)
    }

    /// Every dedup record, ended ones not yet dropped included, in groups named by their first record (see
    /// `DedupSet::named_groups`): what the log store's checkpoint writes. Groups leave whole, never a record at a
    /// time, so a group keeps the name the log's earlier records know it by.
    pub fn dedup_groups(&self) -> Vec<Vec<DedupRecord>> {
        self.dedup.named_groups()
    }

    /// Number of dedup records held, expired ones not yet dropped included.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// See [`lessor_core::storage::Partition::lease`].
    pub fn lease(&mut self, n: usize, deadline: Ts) -> (Vec<Item>, Changes) {
        let (out, ch, _) = self.lease_within(n, deadline, u64::MAX);
        (out, ch)
    }

    /// See [`lessor_core::storage::Partition::lease_within`]: [`PartitionState::lease`] that stops before the
    /// item whose bytes would take the leased items' total over `max_bytes` (the first item is always taken). The
    /// flag tells whether it stopped short with ready items left (at the bound, or at paged items), having leased
    /// something.
    pub fn lease_within(&mut self, n: usize, deadline: Ts, max_bytes: u64) -> (Vec<Item>, Changes, bool) {
        let mut out = Vec::with_capacity(n.min(self.ready as usize));
        let mut taken = Vec::with_capacity(out.capacity());
        let mut bytes = 0u64;
        let mut capped = false;
        let disk_min = self.disk_min;
        // Leased ids whose payload goes to disk only once served (see "Payloads on disk"), with its length.
        let mut dropped: Vec<(u64, u64)> = Vec::new();
        // A priority whose resident head ran out while it still has paged items ends the lease: serving a lower
        // priority first would break the order (the backend pages in before a lease, so this is rare).
        let mut blocked = false;
        for p in (1..PRIORITIES).rev() {
            if blocked || capped {
                break;
            }
            // A priority that never had an item has no state, and no ready item (an empty FIFO allocates nothing).
            let mut never = VecDeque::new();
            let fifo = self.prios[p].as_mut().map_or(&mut never, |prio| &mut prio.fifo);
            while out.len() < n && self.ready_by_prio[p] > 0 {
                let Some(id) = fifo.pop_front() else {
                    break;
                };
                // Stale ids (items that left the ready queue since) are dropped here.
                let Some(s) = slot_mut(&mut self.chunks, id).filter(|s| !s.leased()) else {
                    continue;
                };
                let len = s.payload_len();
                if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
                    // Served first by the next lease.
                    fifo.push_front(id);
                    capped = true;
                    break;
                }
                bytes = bytes.saturating_add(len);
                s.flags |= LEASED;
                s.lease_deadline = deadline.0;
                s.attempts = s.attempts.saturating_add(1);
                let it = s.to_item(id);
                if it.payload.len() > disk_min && offloaded_len(&it.payload).is_none() {
                    dropped.push((id, s.drop_payload()));
                }
                out.push(it);
                taken.push(id);
                self.ready_by_prio[p] -= 1;
            }
            blocked = !capped && out.len() < n && self.paged().count[p] > 0;
        }
        while !blocked && !capped && out.len() < n && self.ready_by_prio[0] > 0 {
            let Some((&key, chunk)) = self.chunks.range_mut(self.cursor / CHUNK..).next() else {
                break;
            };
            let start = if key == self.cursor / CHUNK {
                (self.cursor % CHUNK) as usize
            } else {
                0
            };
            let end = chunk.end();
            let mut off = start;
            while out.len() < n {
                let Some((at, s)) = chunk.next_mut(off) else {
                    off = end;
                    break;
                };
                off = at + 1;
                // Higher priorities are served from their FIFOs; the cursor passes over them.
                if s.live() && !s.leased() && s.priority == 0 {
                    let len = s.payload_len();
                    if !out.is_empty() && bytes.saturating_add(len) > max_bytes {
                        // The cursor stays on it: the next lease starts there.
                        off = at;
                        capped = true;
                        break;
                    }
                    bytes = bytes.saturating_add(len);
                    s.flags |= LEASED;
                    s.lease_deadline = deadline.0;
                    s.attempts = s.attempts.saturating_add(1);
                    let id = key * CHUNK + at as u64;
                    let it = s.to_item(id);
                    if it.payload.len() > disk_min && offloaded_len(&it.payload).is_none() {
                        dropped.push((id, s.drop_payload()));
                    }
                    out.push(it);
                    taken.push(id);
                    self.ready_by_prio[0] -= 1;
                }
            }
            let exhausted = off >= end;
            self.cursor = key * CHUNK + off as u64;
            if exhausted && out.len() < n {
                // Later ids of this chunk may still arrive while it is the last chunk, or priority 0's open block,
                // so the cursor stays at its last slot; otherwise no id of this one will be handed out again.
                let next = ((key + 1) * CHUNK).min(self.cursor_limit());
                if next / CHUNK > key && self.chunks.range((key + 1)..).next().is_some() {
                    self.cursor = next;
                } else {
                    break;
                }
            }
        }
        let got = out.len() as u64;
        self.ready -= got;
        self.leased += got;
        self.sum_lease += i128::from(deadline.0) * i128::from(got);
        if !taken.is_empty() {
            self.lease_sweep.pushes += taken.len();
            self.leases.entry(deadline).or_default().extend(taken);
        }
        // The items served hold the payloads (slices of the old buffers) until the consumer has them; this write
        // stores them (or stored them before) in records of their own.
        for (id, n) in dropped {
            self.on_disk.insert(id, n);
            self.disk_bytes += n;
            self.disk_tier.0 += 1;
            self.disk_tier.1 += n;
            self.payload_bytes -= n;
        }
        self.clean_fronts();
        let ch = if self.track {
            Changes {
                put: out.clone(),
                // Leased where they were: their payloads are as written.
                put_kept: true,
                ..Default::default()
            }
        } else {
            Changes::default()
        };
        // A priority that ran out of resident items with paged ones left also stopped the lease short of what is
        // ready (the page-in before it is bounded by the byte window): the caller asks again.
        let short = blocked || (out.len() < n && self.paged().count[0] > 0);
        let stopped = (capped || short) && !out.is_empty();
        (out, ch, stopped)
    }

    fn check_leased(&self, ids: impl Iterator<Item = ItemId>) -> Result<(), ItemError> {
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(id) {
                return Err(ItemError::Duplicate(id.to_string()));
            }
            match self.slot(id.0) {
                // A paged item exists but is ready: the backend looked it up (see `set_probe`).
                None if self.probe.contains(&id.0) => return Err(ItemError::NotLeased(id.to_string())),
                None => return Err(ItemError::NotFound(id.to_string())),
                Some(s) if !s.leased() => return Err(ItemError::NotLeased(id.to_string())),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// See [`lessor_core::storage::Partition::complete`].
    pub fn complete(&mut self, requests: Vec<Vec<ItemId>>) -> (Vec<Result<(), ItemError>>, Changes) {
        let mut ch = Changes::default();
        let mut out = Vec::with_capacity(requests.len());
        for ids in requests {
            if let Err(e) = self.check_leased(ids.iter().copied()) {
                out.push(Err(e));
                continue;
            }
            for id in ids {
                self.discard(id.0);
                self.record_del(&mut ch, id);
            }
            out.push(Ok(()));
        }
        self.clean_fronts();
        (out, ch)
    }

    /// See [`lessor_core::storage::Partition::extend`].
    pub fn extend(&mut self, requests: Vec<(Vec<ItemId>, Ts)>) -> (Vec<Result<(), ItemError>>, Changes) {
        let mut ch = Changes::default();
        let mut out = Vec::with_capacity(requests.len());
        for (ids, deadline) in requests {
            if let Err(e) = self.check_leased(ids.iter().copied()) {
                out.push(Err(e));
                continue;
            }
            for &id in &ids {
                let Some(s) = slot_mut(&mut self.chunks, id.0) else {
                    continue;
                };
                self.sum_lease += i128::from(deadline.0) - i128::from(s.lease_deadline);
                s.lease_deadline = deadline.0;
                // The entry under the old deadline goes stale (it no longer matches the slot) and is dropped
                // lazily, like entries of items that left.
                self.record_put(&mut ch, id.0);
            }
            if !ids.is_empty() {
                self.lease_sweep.pushes += ids.len();
                self.leases
                    .entry(deadline)
                    .or_default()
                    .extend(ids.iter().map(|i| i.0));
            }
            out.push(Ok(()));
        }
        // Only deadlines changed.
        ch.put_kept = true;
        self.clean_fronts();
        (out, ch)
    }

    /// See [`lessor_core::storage::Partition::retry`].
    pub fn retry(
        &mut self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> (Vec<Result<RetryOutcome, ItemError>>, Changes) {
        let mut ch = Changes::default();
        let mut out = Vec::with_capacity(requests.len());
        for ops in requests {
            if let Err(e) = self.check_leased(ops.iter().map(|o| o.id)) {
                out.push(Err(e));
                continue;
            }
            let mut o = RetryOutcome::default();
            for op in ops {
                let Some((mut it, disk)) = self.remove(op.id.0) else {
                    continue;
                };
                let action = match op.action {
                    RetryAction::Dead => RetryAction::Dead,
                    RetryAction::Release => {
                        // The lease never reached anyone: it does not count.
                        it.attempts = it.attempts.saturating_sub(1);
                        RetryAction::Release
                    }
                    _ if policy.exhausted(it.attempts) => RetryAction::Dead,
                    a => a,
                };
                match action {
                    RetryAction::Dead => {
                        o.dead += 1;
                        self.die(it, disk, policy, &mut ch);
                    }
                    RetryAction::Backoff(now) if policy.backoff.is_on() => {
                        o.scheduled += 1;
                        let at = now.add(policy.backoff.delay(it.attempts, it.id));
                        self.schedule(it, at, disk, &mut ch);
                    }
                    RetryAction::Requeue | RetryAction::Backoff(_) | RetryAction::Release => {
                        o.requeued += 1;
                        if disk.is_some() {
                            // Beyond the bound of `retry_reads`: due at once, requeued by `requeue_deferred` (or
                            // by a lifecycle pass, should the backend not get there).
                            self.deferred.push_back(it.id.0);
                            self.schedule(it, Ts(1), disk, &mut ch);
                        } else {
                            self.requeue(it, None, &mut ch);
                        }
                    }
                    RetryAction::Schedule(at) => {
                        o.scheduled += 1;
                        self.schedule(it, at, disk, &mut ch);
                    }
                }
            }
            out.push(Ok(o));
        }
        self.clean_fronts();
        (out, ch)
    }

    /// Whether an item leaving its lease under `policy` after `attempts` attempts is requeued (gets a new id, so
    /// its payload is needed) rather than scheduled or killed (its id and records stay).
    fn requeues(policy: LifecyclePolicy, attempts: u32, action: RetryAction) -> bool {
        match action {
            RetryAction::Dead | RetryAction::Schedule(_) => false,
            RetryAction::Release => true,
            _ if policy.exhausted(attempts) => false,
            RetryAction::Backoff(_) => !policy.backoff.is_on(),
            RetryAction::Requeue => true,
        }
    }

    /// The items on disk (see "Payloads on disk") whose payloads [`PartitionState::retry`] with these requests
    /// needs: the leased ones it requeues, in request order, as long as their payloads add up to at most
    /// `max_bytes` (at least one). The retry schedules the others as due at once, keeping their ids, and
    /// [`PartitionState::requeue_deferred`] requeues them a bounded part at a time: a retry of a thousand leased
    /// items of 1 MB would otherwise read back a gigabyte at once (and copy it again into its write).
    pub fn retry_reads(
        &self,
        requests: &[Vec<RetryOp>],
        policy: LifecyclePolicy,
        max_bytes: u64,
    ) -> Vec<u64> {
        if self.on_disk.is_empty() {
            return Vec::new();
        }
        let mut seen = HashSet::new();
        let wanted = requests
            .iter()
            .flatten()
            .filter(|op| self.on_disk.contains_key(&op.id.0))
            .filter(|op| {
                self.slot(op.id.0)
                    .is_some_and(|s| s.leased() && Self::requeues(policy, s.attempts, op.action))
            })
            .map(|op| op.id.0)
            .filter(|&id| seen.insert(id));
        self.within_read_bound(wanted, max_bytes)
    }

    /// The prefix of `ids` (items on disk) whose payloads add up to at most `max_bytes`, at least one.
    fn within_read_bound(&self, ids: impl Iterator<Item = u64>, max_bytes: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for id in ids {
            bytes = bytes.saturating_add(self.on_disk.get(&id).copied().unwrap_or(0));
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(id);
        }
        out
    }

    /// The items a retry deferred (see [`PartitionState::retry_reads`]) whose payloads the next
    /// [`PartitionState::requeue_deferred`] needs, within `max_bytes` (at least one); empty once none is left.
    pub fn deferred_reads(&mut self, max_bytes: u64) -> Vec<u64> {
        // Those a lifecycle pass requeued (or a delete removed) meanwhile are no longer scheduled on disk.
        let (sched, on_disk) = (&self.sched, &self.on_disk);
        self.deferred
            .retain(|id| on_disk.contains_key(id) && sched.get(id).is_some_and(|it| it.enqueue_at == Ts(1)));
        let ids: Vec<u64> = self.deferred.iter().copied().collect();
        self.within_read_bound(ids.into_iter(), max_bytes)
    }

    /// Requeues the items a retry deferred whose payloads the backend read back ([`PartitionState::set_fetched`]),
    /// in the retry's order, stopping at the first one not read; returns whether some are left.
    pub fn requeue_deferred(&mut self) -> (bool, Changes) {
        let mut ch = Changes::default();
        while let Some(&id) = self.deferred.front() {
            if !self.fetched.contains_key(&id) {
                break;
            }
            self.deferred.pop_front();
            // Still the deferred item (`deferred_reads` checked under the same lock; this keeps it local).
            if self.sched.get(&id).is_none_or(|it| it.enqueue_at != Ts(1)) {
                continue;
            }
            if let Some((it, disk)) = self.remove(id) {
                self.requeue(it, disk, &mut ch);
            }
        }
        self.clean_fronts();
        (!self.deferred.is_empty(), ch)
    }

    /// Whether a retry deferred requeues (see [`PartitionState::retry_reads`]) not yet requeued.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Forgets what a retry deferred: the items stay scheduled as due at once, and the next lifecycle pass
    /// requeues them (a backend does so when a write of [`PartitionState::requeue_deferred`] failed).
    pub fn forget_deferred(&mut self) {
        self.deferred.clear();
    }

    /// Whether [`PartitionState::lifecycle`] under `policy` needs the payload of the expired lease `id`: it is on
    /// disk only and the item is requeued. An expiry acts as a retry without a time (`Backoff`): under a backoff
    /// policy it schedules the item, keeping its id and its payload record, so no payload is needed (asking for it
    /// would read back up to a pass's byte bound for nothing and stop the pass there).
    fn expiry_needs_payload(&self, id: u64, policy: LifecyclePolicy) -> bool {
        self.is_on_disk(id)
            && self
                .slot(id)
                .is_some_and(|s| Self::requeues(policy, s.attempts, RetryAction::Backoff(Ts::ZERO)))
    }

    /// The items on disk (see "Payloads on disk") whose payloads [`PartitionState::lifecycle`] with these arguments
    /// needs (expired leases it requeues, due scheduled items), in the order it takes them, as long as their
    /// payloads add up to at most `max_bytes` (at least one). The pass stops at the first one whose payload it was
    /// not given and leaves the rest to the next pass (`more`), so one pass reads a bounded amount from disk
    /// however much came due.
    pub fn lifecycle_reads(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
        max_bytes: u64,
    ) -> Vec<u64> {
        if self.on_disk.is_empty() {
            return Vec::new();
        }
        // The expired leases `due_lease` pops, in the same order, without popping them.
        let mut expired = Vec::new();
        'due: for (&d, ids) in self.leases.range(..=now) {
            for &id in ids.iter().rev() {
                if expired.len() >= limit {
                    break 'due;
                }
                if lease_valid(&self.chunks, d, id) {
                    expired.push(id);
                }
            }
        }
        expired.sort_unstable();
        expired.dedup();
        let rest = limit.saturating_sub(expired.len());
        let from = if self.psched.count > 0 {
            self.psched.from
        } else {
            (i64::MAX, u64::MAX)
        };
        let due = self
            .sched_idx
            .iter()
            .take_while(|(t, id)| *t <= now && (t.0, *id) < from)
            .filter(|(_, id)| !self.fetched.contains_key(id))
            .take(rest)
            .map(|&(_, id)| id)
            .filter(|id| self.on_disk.contains_key(id));
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for id in expired
            .into_iter()
            .filter(|&id| self.expiry_needs_payload(id, policy))
            .chain(due)
        {
            bytes = bytes.saturating_add(self.on_disk.get(&id).copied().unwrap_or(0));
            if !out.is_empty() && bytes > max_bytes {
                break;
            }
            out.push(id);
        }
        out
    }

    /// The next lease due to expire at `now`, taken out of the index.
    fn due_lease(&mut self, now: Ts) -> Option<u64> {
        let chunks = &self.chunks;
        pop_due(&mut self.leases, now, |d, id| lease_valid(chunks, d, id))
    }

    /// The next item due to expire at `now`, taken out of the index.
    fn due_expire(&mut self, now: Ts) -> Option<u64> {
        let chunks = &self.chunks;
        pop_due(&mut self.expire, now, |d, id| expire_valid(chunks, d, id))
    }

    /// See [`lessor_core::storage::Partition::lifecycle`].
    pub fn lifecycle(
        &mut self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> (LifecycleOutcome, Changes) {
        let mut ch = Changes::default();
        let mut o = LifecycleOutcome::default();
        // Items of one lease batch share a deadline; requeue them in id order so they keep their relative order.
        let mut expired: Vec<u64> = Vec::new();
        while expired.len() < limit {
            match self.due_lease(now) {
                Some(id) => expired.push(id),
                None => break,
            }
        }
        expired.sort_unstable();
        let mut done = expired.len();
        // Whether a payload on disk the pass needs was not read back (see `lifecycle_reads`): it stops there.
        let mut short = false;
        for (i, &id) in expired.iter().enumerate() {
            if self.expiry_needs_payload(id, policy) && !self.fetched.contains_key(&id) {
                // This one and the rest stay leased, back in the index, for the next pass.
                for &id in &expired[i..] {
                    if let Some(d) = self.slot(id).filter(|s| s.leased()).map(|s| s.lease_deadline) {
                        self.leases.entry(Ts(d)).or_default().push(id);
                        self.lease_sweep.pushes += 1;
                    }
                }
                short = true;
                break;
            }
            let Some((it, disk)) = self.remove(id) else {
                continue;
            };
            if policy.exhausted(it.attempts) {
                o.dead += 1;
                self.die(it, disk, policy, &mut ch);
            } else if policy.backoff.is_on() {
                o.lease_expired += 1;
                let at = now.add(policy.backoff.delay(it.attempts, it.id));
                self.schedule(it, at, disk, &mut ch);
            } else {
                o.lease_expired += 1;
                self.requeue(it, disk, &mut ch);
            }
        }
        while !short && done < limit {
            let Some(&(t, id)) = self.sched_idx.first().filter(|(t, _)| *t <= now) else {
                break;
            };
            if self.psched.count > 0 && (t.0, id) >= self.psched.from {
                // Paged items may come due before this one: the backend reads them first (`sched_plan`).
                short = true;
                break;
            }
            if self.is_on_disk(id) && !self.fetched.contains_key(&id) {
                short = true;
                break;
            }
            self.sched_idx.remove(&(t, id));
            if let Some((it, disk)) = self.remove(id) {
                o.enqueued += 1;
                self.requeue(it, disk, &mut ch);
            }
            done += 1;
        }
        while done < limit {
            let Some(id) = self.due_expire(now) else { break };
            if let Some((it, disk)) = self.remove(id) {
                o.dead += 1;
                self.die(it, disk, policy, &mut ch);
            }
            done += 1;
        }
        // Expired dedup records go too, within the same bound; they are no deadline of their own (produce drops
        // them as well), so they do not count towards `more`.
        self.prune_dedup(now, limit, &mut ch);
        self.clean_fronts();
        o.more = (short || done >= limit) && self.next_deadline().is_some_and(|d| d <= now);
        (o, ch)
    }

    /// See [`lessor_core::storage::Partition::dead_items`].
    pub fn dead_items(&self, limit: usize) -> Vec<Item> {
        self.dead.values().take(limit).cloned().collect()
    }

    /// See [`lessor_core::storage::Partition::dead_items_within`]: stops before the item that would take the
    /// batch over `max_bytes` (the first is always taken); tells whether it stopped there.
    pub fn dead_items_within(&self, limit: usize, max_bytes: u64) -> (Vec<Item>, bool) {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for it in self.dead.values().take(limit) {
            bytes = bytes.saturating_add(item_bytes(it) + self.disk_len(it.id.0));
            if !out.is_empty() && bytes > max_bytes {
                return (out, true);
            }
            out.push(it.clone());
        }
        (out, false)
    }

    /// The length of item `id`'s payload when it is on disk only, else 0 (its payload, if any, is in memory).
    pub fn disk_len(&self, id: u64) -> u64 {
        if self.on_disk.is_empty() {
            return 0;
        }
        self.on_disk.get(&id).copied().unwrap_or(0)
    }

    /// See [`lessor_core::storage::Partition::dead_count`].
    pub fn dead_count(&self) -> u64 {
        self.dead.len() as u64
    }

    /// See [`lessor_core::storage::Partition::remove_dead`].
    pub fn remove_dead(&mut self, ids: Vec<ItemId>) -> Changes {
        let mut ch = Changes::default();
        for id in ids {
            if self.dead.contains_key(&id.0) {
                self.remove(id.0);
                self.record_del(&mut ch, id);
            }
        }
        ch
    }

    /// See [`lessor_core::storage::Partition::next_deadline`].
    pub fn next_deadline(&self) -> Option<Ts> {
        if !self.dead.is_empty() {
            return Some(Ts::ZERO);
        }
        [
            self.leases.keys().next().copied(),
            self.sched_idx.first().map(|x| x.0),
            self.expire.keys().next().copied(),
            self.paged().next_deadline().map(Ts),
            (self.psched.count > 0).then_some(Ts(self.psched.from.0)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// See [`lessor_core::storage::Partition::counts`].
    pub fn counts(&self) -> PartitionCounts {
        PartitionCounts {
            ready: self.ready + self.paged().total(),
            leased: self.leased,
            scheduled: self.sched.len() as u64 + self.psched.count,
        }
    }

    /// See [`lessor_core::storage::Partition::stats`].
    pub fn stats(&self, now: Ts) -> PartitionStats {
        let live = i128::from(self.ready + self.leased + self.paged().total());
        let leased = i128::from(self.leased);
        let avg = |sum: i128, n: i128, later: bool| -> Duration {
            if n == 0 {
                return Duration::ZERO;
            }
            let mean = Ts((sum / n) as i64);
            if later {
                mean.since(now)
            } else {
                now.since(mean)
            }
        };
        PartitionStats {
            counts: self.counts(),
            average_age: avg(self.sum_created + self.paged().sum_created, live, false),
            average_leased_age: avg(self.sum_lease, leased, true),
            payload_bytes: self.payload_bytes + self.paged().bytes + self.psched.bytes + self.disk_bytes,
            oldest_ready_age: self.oldest_head().map_or(Duration::ZERO, |c| now.since(Ts(c))),
            // Everything this state holds is in memory; a backend that also keeps it on disk adds that tier.
            tiers: TierStats {
                memory: {
                    // Payloads on disk only are not held here: the backend counts them on disk.
                    let mut m = self.tiers.held();
                    m.items -= self.disk_tier.0;
                    m.bytes -= self.disk_tier.1;
                    m
                },
                object: self.tiers.object(),
                ..Default::default()
            },
        }
    }

    /// The running per-tier counters (see [`TierCounters`]).
    pub fn tier_counters(&self) -> TierCounters {
        self.tiers
    }

    /// See [`lessor_core::storage::Partition::list`].
    pub fn list(&self, pivot: Option<ItemId>, limit: usize, scheduled: bool) -> Vec<Item> {
        self.list_within(pivot, limit, scheduled, u64::MAX).0
    }

    /// See [`lessor_core::storage::Partition::list_within`]: [`PartitionState::list`] that stops before the item
    /// whose bytes would take the page over `max_bytes` (the first is always taken); tells whether it stopped
    /// there. Resident items are counted as a lease counts them (payload and strings).
    pub fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max_bytes: u64,
    ) -> (Vec<Item>, bool) {
        let from = pivot.map_or(0, |p| p.0);
        let mut out = Vec::new();
        let mut bytes = 0u64;
        if scheduled {
            for it in self.sched.range(from..).take(limit).map(|(_, it)| it) {
                bytes = bytes.saturating_add(item_bytes(it) + self.disk_len(it.id.0));
                if !out.is_empty() && bytes > max_bytes {
                    return (out, true);
                }
                out.push(it.clone());
            }
            return (out, false);
        }
        for (&key, chunk) in self.chunks.range(from / CHUNK..) {
            for (off, s) in chunk.iter() {
                let id = key * CHUNK + off as u64;
                if id < from || !s.live() {
                    continue;
                }
                if out.len() >= limit {
                    return (out, false);
                }
                bytes = bytes.saturating_add(s.payload_len() + self.disk_len(id));
                if !out.is_empty() && bytes > max_bytes {
                    return (out, true);
                }
                out.push(s.to_item(id));
            }
        }
        (out, false)
    }

    /// See [`lessor_core::storage::Partition::import`].
    pub fn import(&mut self, items: Vec<Item>) -> (Vec<Item>, Changes) {
        let mut ch = Changes::default();
        let mut out = Vec::with_capacity(items.len());
        for mut it in items {
            if !it.source_id.is_empty() && self.by_source.contains_key(&it.source_id) {
                continue;
            }
            it.priority = it.priority.min(MAX_PRIORITY);
            it.id = self.alloc(it.priority);
            // A dead item (from a backup) stays dead: the engine moves it to the dead-letter queue as it would
            // have on the backed-up server.
            if !it.is_leased {
                it.lease_deadline = Ts::ZERO;
            }
            if it.is_scheduled() {
                it.is_leased = false;
                it.lease_deadline = Ts::ZERO;
            }
            if self.track {
                ch.put.push(it.clone());
            }
            out.push(it.clone());
            self.insert_new(it);
        }
        self.clean_fronts();
        (out, ch)
    }

    /// Every item in every state (ready, leased, scheduled, dead), in id order: the copy a memory snapshot reads.
    pub fn all_items(&self) -> Vec<Item> {
        let mut out = Vec::with_capacity(self.len());
        for (&key, chunk) in &self.chunks {
            for (off, s) in chunk.iter() {
                if s.live() {
                    out.push(s.to_item(key * CHUNK + off as u64));
                }
            }
        }
        out.extend(self.sched.values().cloned());
        out.extend(self.dead.values().cloned());
        out.sort_unstable_by_key(|it| it.id);
        out
    }

    /// Up to `limit` items with ids above `after`, in every state (ready, leased, scheduled, dead), in id order,
    /// with the id to continue after (`None` once every item was returned). Costs the page, not the partition: a
    /// store that copies a large partition page by page holds its lock for one page at a time.
    pub fn items_page(&self, after: Option<u64>, limit: usize) -> (Vec<Item>, Option<u64>) {
        let limit = limit.max(1);
        let lo = match after {
            Some(a) if a == u64::MAX => return (Vec::new(), None),
            Some(a) => a + 1,
            None => 0,
        };
        let mut out = Vec::new();
        // Ids up to `bound` are all looked at by this page.
        let mut bound = u64::MAX;
        for (&key, chunk) in self.chunks.range(lo / CHUNK..) {
            if out.len() >= limit {
                bound = (key * CHUNK).saturating_sub(1);
                break;
            }
            for (off, s) in chunk.iter() {
                let id = key * CHUNK + off as u64;
                if id >= lo && s.live() {
                    out.push(s.to_item(id));
                }
            }
        }
        for m in [&self.sched, &self.dead] {
            out.extend(m.range(lo..=bound).take(limit).map(|(_, it)| it.clone()));
        }
        out.sort_unstable_by_key(|it| it.id);
        if out.len() > limit {
            out.truncate(limit);
        }
        if out.len() == limit {
            bound = out.last().map_or(bound, |it| it.id.0);
        }
        (out, (bound != u64::MAX).then_some(bound))
    }

    /// See [`lessor_core::storage::Partition::delete`].
    pub fn delete(&mut self, ids: Vec<ItemId>) -> Changes {
        let mut ch = Changes::default();
        for id in ids {
            if self.remove(id.0).is_some() {
                self.record_del(&mut ch, id);
            }
        }
        self.clean_fronts();
        ch
    }

    /// See [`lessor_core::storage::Partition::clear`].
    pub fn clear(&mut self, req: ClearRequest) -> Changes {
        let mut victims: Vec<u64> = Vec::new();
        if req.queue {
            for (&key, chunk) in &self.chunks {
                for (off, s) in chunk.iter() {
                    if s.live() && (req.destructive || !s.leased()) {
                        victims.push(key * CHUNK + off as u64);
                    }
                }
            }
        }
        if req.scheduled {
            victims.extend(self.sched.keys().copied());
        }
        let mut ch = Changes::default();
        for id in victims {
            if self.remove(id).is_some() {
                self.record_del(&mut ch, ItemId(id));
            }
        }
        self.clean_fronts();
        ch
    }

    /// Number of items of every kind.
    pub fn len(&self) -> usize {
        (self.ready + self.leased + self.paged().total() + self.psched.count) as usize
            + self.sched.len()
            + self.dead.len()
    }

    /// Whether the partition holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An estimate of the memory this state holds, for a store's memory budget (the log store's `max-memory`):
    /// the payload bytes it holds, [`ITEM_COST`] per item and [`DEDUP_COST`] per dedup record. Cheap (counters
    /// only), so every mutation can keep a budget up to date.
    pub fn footprint(&self) -> u64 {
        self.payload_bytes + self.len() as u64 * ITEM_COST + self.dedup.len() as u64 * DEDUP_COST
    }

    /// Payload bytes of live items (for memory accounting in tests and benchmarks).
    pub fn live_payload_bytes(&self) -> u64 {
        self.chunks
            .values()
            .flat_map(|c| c.iter())
            .map(|(_, s)| s.payload_len())
            .sum()
    }
}

/// A deadline index: deadline -> ids that had it when added. Entries of items that left or changed are dropped
/// lazily; `valid` tells a current entry from a stale one.
type DeadlineIndex = BTreeMap<Ts, Vec<u64>>;

fn slot_in(chunks: &BTreeMap<u64, Chunk>, id: u64) -> Option<&Slot> {
    chunks
        .get(&(id / CHUNK))
        .and_then(|c| c.get((id % CHUNK) as usize))
        .filter(|s| s.live())
}

fn slot_mut(chunks: &mut BTreeMap<u64, Chunk>, id: u64) -> Option<&mut Slot> {
    chunks
        .get_mut(&(id / CHUNK))
        .and_then(|c| c.get_mut((id % CHUNK) as usize))
        .filter(|s| s.live())
}

/// Whether `id` is a ready item.
fn ready_in(chunks: &BTreeMap<u64, Chunk>, id: u64) -> bool {
    slot_in(chunks, id).is_some_and(|s| !s.leased())
}

fn lease_valid(chunks: &BTreeMap<u64, Chunk>, d: Ts, id: u64) -> bool {
    slot_in(chunks, id).is_some_and(|s| s.leased() && s.lease_deadline == d.0)
}

fn expire_valid(chunks: &BTreeMap<u64, Chunk>, e: Ts, id: u64) -> bool {
    slot_in(chunks, id).is_some_and(|s| s.expire_deadline == e.0)
}

/// Removes stale entries from the front of `index` until its first deadline has a current entry. Within that
/// deadline only the stale ids at the end go (as `pop_due` takes them): checking the whole list on every call would
/// cost a batch's worth of lookups per call while a long-lived item (a low priority, a long lease) keeps an old
/// deadline first.
fn clean_front(index: &mut DeadlineIndex, valid: impl Fn(Ts, u64) -> bool) {
    while let Some(mut e) = index.first_entry() {
        let d = *e.key();
        let ids = e.get_mut();
        while let Some(&id) = ids.last() {
            if valid(d, id) {
                return;
            }
            ids.pop();
        }
        e.remove();
    }
}

/// Takes the next current entry due at `now` out of `index`.
fn pop_due(index: &mut DeadlineIndex, now: Ts, valid: impl Fn(Ts, u64) -> bool) -> Option<u64> {
    loop {
        let mut e = index.first_entry()?;
        let d = *e.key();
        if d > now {
            return None;
        }
        match e.get_mut().pop() {
            None => {
                e.remove();
            }
            Some(id) if valid(d, id) => return Some(id),
            Some(_) => {}
        }
    }
}

/// Ids a [`Sweep`] looks at per step: one step per mutation, so its pause stays short whatever the index's size.
const SWEEP_STEP: usize = 4096;
/// Pushes beyond twice what the last pass kept before the next pass starts.
const SWEEP_SLACK: usize = 8192;

/// Drops the stale entries of a deadline index that [`clean_front`] cannot reach.
///
/// `clean_front` only cleans the front: while the earliest deadline still has a current entry (a lease held
/// long, an item waiting at a low priority while higher ones flow), the entries of every item leased or produced
/// after it stay until that deadline passes, completed or not. In one partition with a single waiting item, that
/// kept an id (8 bytes, and a key per lease or produce call) for every item that flowed through, up to the
/// expiry timeout. A sweep walks the index a step at a time, keeping only current entries, once twice as many
/// ids were pushed since its last pass began as that pass kept (plus [`SWEEP_SLACK`]): the index then holds at
/// most about three times its current entries, and the work is a few checks per id pushed.
#[derive(Debug, Default)]
struct Sweep {
    /// Ids pushed since the last pass began.
    pushes: usize,
    /// Ids the last finished pass kept.
    kept_last: usize,
    /// The pass in progress: the deadline it resumes at, and the ids it kept so far.
    at: Option<Ts>,
    kept: usize,
}

impl Sweep {
    /// Runs one step of a pass over `index`, starting one if due.
    fn step(&mut self, index: &mut DeadlineIndex, valid: impl Fn(Ts, u64) -> bool) {
        let from = match self.at {
            Some(d) => d,
            None if self.pushes > 2 * self.kept_last + SWEEP_SLACK => {
                self.pushes = 0;
                self.kept = 0;
                Ts(i64::MIN)
            }
            None => return,
        };
        let mut budget = SWEEP_STEP;
        let mut emptied = Vec::new();
        let mut resume = None;
        for (&d, ids) in index.range_mut(from..) {
            if budget == 0 {
                resume = Some(d);
                break;
            }
            budget = budget.saturating_sub(ids.len());
            ids.retain(|&id| valid(d, id));
            if ids.is_empty() {
                emptied.push(d);
            } else {
                self.kept += ids.len();
                if ids.capacity() > 4 * ids.len() {
                    ids.shrink_to_fit();
                }
            }
        }
        for d in emptied {
            index.remove(&d);
        }
        self.at = resume;
        if resume.is_none() {
            self.kept_last = self.kept;
        }
    }
}

/// Below this many slots a collection keeps its room: shrinking small ones would only churn the allocator.
const SHRINK_MIN: usize = 1024;

/// See [`lessor_core::shrink::deque`]; for the `dedup` submodule.
pub(crate) fn shrink_deque<T>(d: &mut VecDeque<T>) {
    lessor_core::shrink::deque(d, SHRINK_MIN);
}

#[cfg(test)]
mod tests {
    /// The state of priority `p`, which must have had an item.
    fn prio(s: &PartitionState, p: usize) -> &Prio {
        s.prios[p].as_deref().expect("the priority had an item")
    }

    use super::*;

    /// Review: `put_kept` says every item of `put` is held whole already with its payload. A lease's and an
    /// extension's change sets say so; a produce's does not, and neither does a merge of a produce with a lease of
    /// the items it produced (`Changes::append`, used by the fjall store only, which ignores the flag), nor a
    /// failed extension's change set, which is empty.
    /// Review: a lease held long and an item waiting at a low priority keep the front of the lease and expiry
    /// indexes current, so `clean_front` alone kept an entry for every item that flowed past them (100,001 each
    /// here). The sweeps bound both, and the two items' own entries stay.
    #[test]
    fn deadline_indexes_stay_bounded_behind_a_long_lived_item() {
        let mut s = PartitionState::new(1).without_changes();
        let mut waiting = new_item("old", Ts::ZERO);
        waiting.expire_deadline = Ts(1_000_000_000);
        let (waiting, _) = s.produce(vec![waiting]);
        let mut held = new_item("held", Ts::ZERO);
        held.priority = 9;
        s.produce(vec![held]);
        let (held, _) = s.lease(1, Ts(5_000_000));
        let bound = SWEEP_SLACK + SWEEP_STEP + 200;
        for round in 0..1000i64 {
            let items = (0..100)
                .map(|i| {
                    let mut n = new_item(&format!("r{round}-{i}"), Ts::ZERO);
                    n.priority = 9;
                    n.created_at = Ts(10 + round);
                    n.expire_deadline = Ts(2_000_000_000 + round);
                    n
                })
                .collect();
            s.produce(items);
            let (leased, _) = s.lease(100, Ts(6_000_000 + round));
            assert_eq!(leased.len(), 100);
            if round % 2 == 0 {
                s.complete(vec![leased.iter().map(|it| it.id).collect()]);
            } else {
                // Extended first: the old entries go stale, the new ones too once completed.
                let ids: Vec<ItemId> = leased.iter().map(|it| it.id).collect();
                s.extend(vec![(ids.clone(), Ts(7_000_000 + round))]);
                s.complete(vec![ids]);
            }
            let lease_ids: usize = s.leases.values().map(Vec::len).sum();
            let expire_ids: usize = s.expire.values().map(Vec::len).sum();
            assert!(
                lease_ids <= bound && expire_ids <= bound,
                "round {round}: {lease_ids} / {expire_ids}"
            );
        }
        assert_eq!(s.leases.get(&Ts(5_000_000)), Some(&vec![held[0].id.0]));
        assert!(s
            .expire
            .get(&Ts(1_000_000_000))
            .is_some_and(|ids| ids.contains(&waiting[0].0)));
        assert_eq!(s.next_deadline(), Some(Ts(5_000_000)));
        // The held lease still falls due, and the waiting item is still served.
        assert_eq!(s.due_lease(Ts(4_999_999)), None);
        assert_eq!(s.due_lease(Ts(5_000_000)), Some(held[0].id.0));
        let (due, _) = s.lease(10, Ts(9_000_000));
        assert_eq!(due.iter().map(|it| it.id).collect::<Vec<_>>(), waiting);
    }

    /// A burst drained gives its room back: 100,000 items with source ids (a dead-letter flood) at priority 9, and
    /// 100,000 dedup keys, leave tables and queues sized for what is left, not for the burst.
    #[test]
    fn a_drained_burst_gives_its_room_back() {
        let mut s = PartitionState::new(1).without_changes();
        for round in 0..100 {
            let items = (0..1000)
                .map(|i| {
                    let mut n = keyed(&format!("k{round}-{i}"), 1, 1000);
                    n.source_id = format!("src-{round}-{i}");
                    n.priority = 9;
                    n
                })
                .collect();
            s.produce(items);
        }
        assert_eq!(s.by_source.len(), 100_000);
        assert!(s.by_source.capacity() >= 100_000);
        assert_eq!(s.dedup_len(), 100_000);
        loop {
            let (leased, _) = s.lease(1000, Ts(2000));
            if leased.is_empty() {
                break;
            }
            s.complete(vec![leased.iter().map(|it| it.id).collect()]);
        }
        // The keys' window has ended: the next calls drop their records, a bounded number each.
        while s.dedup_len() > 0 {
            s.produce(vec![keyed(&format!("late-{}", s.dedup_len()), 2000, 2000)]);
        }
        assert!(s.by_source.is_empty());
        let fifo = &s.prios[9].as_ref().expect("priority 9").fifo;
        assert!(
            s.by_source.capacity() <= 2 * SHRINK_MIN && fifo.capacity() <= 2 * SHRINK_MIN,
            "by_source {} / fifo {} slots kept",
            s.by_source.capacity(),
            fifo.capacity()
        );
        let (fifo, keys, groups) = s.dedup.capacities();
        assert!(
            fifo <= 2 * SHRINK_MIN && keys <= 2 * SHRINK_MIN && groups <= 2 * SHRINK_MIN,
            "dedup {fifo} / {keys} / {groups}"
        );
    }

    #[test]
    fn review_put_kept_marks_only_changes_whose_payloads_are_held() {
        let mut s = PartitionState::new(1);
        let (_, produced) = s.produce((0..3).map(|i| new_item(&format!("k-{i}"), Ts::ZERO)).collect());
        assert!(!produced.put_kept);
        let (leased, lease) = s.lease(3, Ts(10));
        assert_eq!(leased.len(), 3);
        assert!(lease.put_kept && lease.put.len() == 3);
        let mut merged = produced.clone();
        merged.append(lease.clone());
        assert!(
            !merged.put_kept,
            "a produce merged with a lease of its items writes them whole"
        );
        let mut merged = lease.clone();
        merged.append(produced.clone());
        assert!(!merged.put_kept, "a lease merged with a later produce too");
        let mut merged = lease.clone();
        merged.append(Changes {
            del: vec![leased[0].id],
            ..Default::default()
        });
        assert!(
            merged.put_kept && !merged.del.is_empty(),
            "kept, with a delete: logged whole by the log store"
        );
        let (r, ext) = s.extend(vec![(vec![leased[1].id], Ts(20))]);
        assert!(r[0].is_ok() && ext.put_kept && ext.put.len() == 1);
        assert_eq!(
            ext.put[0].payload, leased[1].payload,
            "the extension's item has its payload"
        );
        let (r, ext) = s.extend(vec![(vec![ItemId(u64::MAX - 1)], Ts(20))]);
        assert!(r[0].is_err() && ext.put.is_empty());
    }

    fn new_item(p: &str, enqueue_at: Ts) -> NewItem {
        NewItem {
            enqueue_at,
            expire_deadline: Ts(10_000_000),
            created_at: Ts(1),
            payload: Bytes::from(p.to_string()),
            ..Default::default()
        }
    }

    /// Payloads on disk: leased and scheduled items keep only their payloads' lengths; a lifecycle pass gets back
    /// what `lifecycle_reads` names within its byte bound and stops at the first item it needs whose payload it was
    /// not given, leaving the rest (in order) to the next pass; a retry gets what `retry_reads` names.
    #[test]
    fn lifecycle_passes_read_back_payloads_on_disk_within_their_bound() {
        // What a backend stored: the last payload written under each id.
        fn keep(disk: &mut HashMap<u64, Bytes>, ch: &Changes) {
            for it in ch.put.iter().filter(|it| !it.payload.is_empty()) {
                disk.insert(it.id.0, it.payload.clone());
            }
        }
        let mut disk = HashMap::new();
        let mut s = PartitionState::new(1).with_payloads_on_disk(4);
        let policy = LifecyclePolicy::default();
        let (_, ch) = s.produce(
            (0..3)
                .map(|i| new_item(&format!("payload-{i}"), Ts::ZERO))
                .collect(),
        );
        keep(&mut disk, &ch);
        let (leased, ch) = s.lease(3, Ts(10));
        keep(&mut disk, &ch);
        assert_eq!(payload_of(&leased[2]), "payload-2", "served from memory");
        let (_, ch) = s.produce((3..6).map(|i| new_item(&format!("payload-{i}"), Ts(5))).collect());
        keep(&mut disk, &ch);
        // A small payload stays.
        let (_, ch) = s.produce(vec![new_item("p", Ts(5))]);
        keep(&mut disk, &ch);
        assert_eq!(s.paging_counts().on_disk_bytes, 6 * 9);
        assert_eq!(s.payload_bytes, 1);
        assert_eq!(s.stats(Ts(1)).payload_bytes, 6 * 9 + 1);
        let mut passes = 0;
        loop {
            let reads = s.lifecycle_reads(Ts(20), policy, 100, 20);
            assert!(reads.len() <= 2, "{reads:?}");
            s.set_fetched(reads.iter().map(|id| (*id, disk[id].clone())).collect());
            let (o, ch) = s.lifecycle(Ts(20), policy, 100);
            s.set_fetched(HashMap::new());
            keep(&mut disk, &ch);
            passes += 1;
            if !o.more {
                break;
            }
        }
        assert_eq!(
            passes, 3,
            "two payloads of 9 bytes within 20 per pass, six payloads"
        );
        assert_eq!(s.paging_counts().on_disk_bytes, 0);
        let (again, _) = s.lease(10, Ts(30));
        let got: Vec<String> = again.iter().map(payload_of).collect();
        assert_eq!(
            got,
            [
                "payload-0",
                "payload-1",
                "payload-2",
                "payload-3",
                "payload-4",
                "payload-5",
                "p"
            ],
            "requeued in order, whole"
        );
        assert_eq!(s.paging_counts().on_disk_bytes, 6 * 9);
        let ops: Vec<RetryOp> = again
            .iter()
            .map(|it| RetryOp {
                id: it.id,
                action: RetryAction::Requeue,
            })
            .collect();
        let reads = s.retry_reads(std::slice::from_ref(&ops), policy, u64::MAX);
        assert_eq!(reads.len(), 6, "the small payload is in memory");
        s.set_fetched(reads.iter().map(|id| (*id, disk[id].clone())).collect());
        let (out, _) = s.retry(vec![ops], policy);
        s.set_fetched(HashMap::new());
        assert!(out[0].is_ok());
        let (third, _) = s.lease(10, Ts(40));
        assert_eq!(third.iter().map(payload_of).collect::<Vec<_>>(), got);
        let attempts: Vec<u32> = third.iter().map(|it| it.attempts).collect();
        assert_eq!(attempts, [3, 3, 3, 2, 2, 2, 2]);
    }

    /// The guard of `requeue` for a payload on disk that was not read back (no caller reaches it: lifecycle and
    /// retry check first): forced here, the item keeps its id and payload record, due at once, and the next
    /// lifecycle pass requeues it whole.
    #[test]
    fn a_requeue_missing_its_payload_schedules_the_item_instead_of_losing_it() {
        let mut s = PartitionState::new(1).with_payloads_on_disk(4);
        let (_, ch) = s.produce(vec![new_item("payload-0", Ts::ZERO)]);
        let stored = ch.put[0].payload.clone();
        let (leased, _) = s.lease(1, Ts(10));
        let id = leased[0].id;
        assert!(s.is_on_disk(id.0));
        let (it, disk) = s.remove(id.0).expect("leased");
        assert_eq!(disk, Some(9), "no payload read back");
        let mut ch = Changes::default();
        s.requeue(it, disk, &mut ch);
        assert_eq!(ch.del, [], "the old records stay");
        assert_eq!(ch.put.len(), 1);
        assert_eq!((ch.put[0].id, ch.put[0].enqueue_at), (id, Ts(1)));
        assert!(s.is_on_disk(id.0));
        assert_eq!(s.counts().scheduled, 1);
        let policy = LifecyclePolicy::default();
        let reads = s.lifecycle_reads(Ts(20), policy, 100, u64::MAX);
        assert_eq!(reads, [id.0]);
        s.set_fetched([(id.0, stored)].into());
        let (o, _) = s.lifecycle(Ts(20), policy, 100);
        s.set_fetched(HashMap::new());
        assert_eq!(o.enqueued, 1);
        let (again, _) = s.lease(1, Ts(30));
        assert_eq!(payload_of(&again[0]), "payload-0");
        assert_ne!(again[0].id, id);
    }

    /// A retry requeuing more payloads on disk than its read bound requeues those it was given and schedules the
    /// rest as due at once, keeping ids and payload records; `requeue_deferred` then requeues them a bounded part
    /// at a time in the retry's order, and should a backend give up on that, a lifecycle pass requeues them: every
    /// item comes back once, whole.
    #[test]
    fn a_retry_beyond_its_read_bound_requeues_the_rest_in_parts() {
        fn keep(disk: &mut HashMap<u64, Bytes>, ch: &Changes) {
            for it in ch.put.iter().filter(|it| !it.payload.is_empty()) {
                disk.insert(it.id.0, it.payload.clone());
            }
        }
        let policy = LifecyclePolicy::default();
        for give_up in [false, true] {
            let mut disk = HashMap::new();
            let mut s = PartitionState::new(1).with_payloads_on_disk(4);
            let (_, ch) = s.produce(
                (0..7)
                    .map(|i| new_item(&format!("payload-{i}"), Ts::ZERO))
                    .collect(),
            );
            keep(&mut disk, &ch);
            let (leased, ch) = s.lease(7, Ts(10));
            keep(&mut disk, &ch);
            // Requested in another order than the ids: the requeues keep the request's.
            let ops: Vec<RetryOp> = leased
                .iter()
                .rev()
                .map(|it| RetryOp {
                    id: it.id,
                    action: RetryAction::Requeue,
                })
                .collect();
            let reads = s.retry_reads(std::slice::from_ref(&ops), policy, 20);
            assert_eq!(reads.len(), 2, "two payloads of 9 bytes within 20");
            s.set_fetched(reads.iter().map(|id| (*id, disk[id].clone())).collect());
            let (out, ch) = s.retry(vec![ops], policy);
            s.set_fetched(HashMap::new());
            keep(&mut disk, &ch);
            assert_eq!(
                out[0],
                Ok(RetryOutcome {
                    requeued: 7,
                    ..Default::default()
                })
            );
            assert!(s.has_deferred());
            let c = s.counts();
            assert_eq!((c.ready, c.scheduled, c.leased), (2, 5, 0));
            assert_eq!(
                s.next_deadline(),
                Some(Ts(1)),
                "the deferred ones are due at once"
            );
            let mut parts = 0;
            if give_up {
                s.forget_deferred();
                loop {
                    let reads = s.lifecycle_reads(Ts(20), policy, 100, 20);
                    s.set_fetched(reads.iter().map(|id| (*id, disk[id].clone())).collect());
                    let (o, ch) = s.lifecycle(Ts(20), policy, 100);
                    s.set_fetched(HashMap::new());
                    keep(&mut disk, &ch);
                    if !o.more {
                        break;
                    }
                }
            } else {
                while s.has_deferred() {
                    let reads = s.deferred_reads(20);
                    assert!(reads.len() <= 2, "{reads:?}");
                    s.set_fetched(reads.iter().map(|id| (*id, disk[id].clone())).collect());
                    let (_, ch) = s.requeue_deferred();
                    s.set_fetched(HashMap::new());
                    keep(&mut disk, &ch);
                    parts += 1;
                }
                assert_eq!(parts, 3, "five deferred payloads of 9 bytes, two a part");
            }
            let c = s.counts();
            assert_eq!((c.ready, c.scheduled, c.leased), (7, 0, 0), "give up: {give_up}");
            let (again, _) = s.lease(10, Ts(30));
            let got: Vec<String> = again.iter().map(payload_of).collect();
            let mut want: Vec<String> = (0..7).rev().map(|i| format!("payload-{i}")).collect();
            if give_up {
                // The lifecycle requeues the deferred ones in their ids' order.
                want[2..].sort_unstable();
            }
            assert_eq!(got, want, "give up: {give_up}");
            assert!(again.iter().all(|it| it.attempts == 2));
        }
    }

    /// A xorshift generator from `seed`: `rnd(n)` is below `n`. Deterministic, so a failing run repeats.
    fn rng(mut x: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    /// The per-tier counters stay equal to a recount of the items held (ready, leased, scheduled; not dead) through
    /// a long random mix of every operation, payloads inline or object references, and a reload agrees.
    #[test]
    fn tier_counters_match_a_recount_through_every_operation() {
        use crate::tiers::{TierCounters, FRAME_MAGIC, KIND_OBJECT};
        let mut rnd = rng(0x2545_F491_4F6C_DD1Du64);
        let reference = |len: u64| {
            let mut b = FRAME_MAGIC.to_vec();
            b.extend_from_slice(&[KIND_OBJECT, 0]);
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&4u16.to_le_bytes());
            b.extend_from_slice(b"k123");
            Bytes::from(b)
        };
        let recount = |s: &PartitionState| {
            let mut c = TierCounters::default();
            for it in s.all_items().iter().filter(|it| !it.dead) {
                c.add(&it.payload);
            }
            c
        };
        let mut s = PartitionState::new(1).without_changes();
        let mut now = Ts(1);
        for step in 0..3000 {
            let policy = LifecyclePolicy {
                max_attempts: 3,
                has_dead_queue: rnd(2) == 0,
                ..Default::default()
            };
            match rnd(9) {
                0 | 1 => {
                    let items = (0..1 + rnd(4))
                        .map(|_| NewItem {
                            enqueue_at: if rnd(4) == 0 {
                                now.add(Duration::from_secs(rnd(20)))
                            } else {
                                Ts::ZERO
                            },
                            expire_deadline: now.add(Duration::from_secs(10 + rnd(100))),
                            created_at: now,
                            payload: if rnd(2) == 0 {
                                reference(100_000 + rnd(1 << 20))
                            } else {
                                Bytes::from(vec![b'p'; rnd(300) as usize])
                            },
                            ..Default::default()
                        })
                        .collect();
                    s.produce(items);
                }
                2 => {
                    s.lease(1 + rnd(3) as usize, now.add(Duration::from_secs(1 + rnd(10))));
                }
                3 | 4 => {
                    let leased: Vec<ItemId> = s
                        .list(None, 1000, false)
                        .iter()
                        .filter(|i| i.is_leased)
                        .map(|i| i.id)
                        .collect();
                    if let Some(&id) = leased.get(rnd(leased.len().max(1) as u64) as usize) {
                        if rnd(2) == 0 {
                            s.complete(vec![vec![id]]);
                        } else {
                            let action = match rnd(3) {
                                0 => RetryAction::Requeue,
                                1 => RetryAction::Schedule(now.add(Duration::from_secs(rnd(10)))),
                                _ => RetryAction::Dead,
                            };
                            s.retry(vec![vec![RetryOp { id, action }]], policy);
                        }
                    }
                }
                5 => {
                    now = now.add(Duration::from_secs(rnd(5)));
                    s.lifecycle(now, policy, 100);
                }
                6 => {
                    let all = s.all_items();
                    if let Some(it) = all.get(rnd(all.len().max(1) as u64) as usize) {
                        s.delete(vec![it.id]);
                    }
                }
                7 => {
                    let dead: Vec<ItemId> = s.dead_items(3).iter().map(|i| i.id).collect();
                    s.remove_dead(dead);
                }
                _ => {
                    if rnd(20) == 0 {
                        s.clear(ClearRequest {
                            queue: rnd(2) == 0,
                            scheduled: rnd(2) == 0,
                            destructive: rnd(2) == 0,
                        });
                    }
                }
            }
            assert_eq!(s.tier_counters(), recount(&s), "step {step}");
        }
        assert!(
            s.tier_counters().object_items > 0,
            "the mix kept some offloaded items"
        );
        let reloaded = PartitionState::load(s.all_items(), 1);
        assert_eq!(reloaded.tier_counters(), s.tier_counters());
    }

    /// The heads that `stats` reads are kept current by every operation: the cursor sits on the first ready
    /// priority-0 item even behind thousands of higher-priority ones, and a FIFO never starts with a stale id. So
    /// the oldest age is read from at most one slot per priority, never found by walking the partition.
    #[test]
    fn stats_reads_the_heads_kept_current() {
        let mut s = PartitionState::new(1).without_changes();
        let at = |p: &str, created: i64, priority: u8| NewItem {
            created_at: Ts(created),
            priority,
            ..new_item(p, Ts::ZERO)
        };
        let urgent: Vec<NewItem> = (0..3000).map(|i| at("u", 10 + i, 5)).collect();
        let (urgent_ids, _) = s.produce(urgent);
        let (plain, _) = s.produce(vec![at("p", 5, 0), at("q", 6, 0)]);
        assert_eq!(
            s.cursor, plain[0].0,
            "the cursor moved over the priority-5 items at once"
        );
        assert_eq!(s.stats(Ts(1_000_005)).oldest_ready_age, Duration::from_secs(1));
        // Deleting the head of priority 5 leaves its FIFO starting at a ready item.
        s.delete(vec![urgent_ids[0]]);
        assert_eq!(prio(&s, 5).fifo.front(), Some(&urgent_ids[1].0));
        // Leasing the priority-5 items and the first plain one moves the heads on.
        let (got, _) = s.lease(3000, Ts(50_000_000));
        assert_eq!(got.len(), 3000);
        assert_eq!(s.cursor, plain[1].0);
        assert_eq!(s.stats(Ts(1_000_006)).oldest_ready_age, Duration::from_secs(1));
        let (got, _) = s.lease(1, Ts(50_000_000));
        assert_eq!(got.len(), 1);
        assert_eq!(s.stats(Ts(1_000_006)).oldest_ready_age, Duration::ZERO);
    }

    /// Complete drops items without building them: the payload total and the source-id index stay exact (a
    /// completed dead-letter copy can be moved in again), whatever strings the item carries.
    #[test]
    fn complete_keeps_payload_bytes_and_source_ids_exact() {
        let mut s = PartitionState::new(1);
        let items: Vec<NewItem> = (0..4)
            .map(|i| NewItem {
                source_id: if i % 2 == 0 {
                    format!("src-{i}")
                } else {
                    String::new()
                },
                reference: if i == 1 { "ref".into() } else { String::new() },
                kind: if i == 2 { "kind".into() } else { String::new() },
                ..new_item(&"p".repeat(10 + i), Ts::ZERO)
            })
            .collect();
        let ids = s.produce(items.clone()).0;
        assert_eq!(s.stats(Ts(1)).payload_bytes, 10 + 11 + 12 + 13);
        let leased = s.lease(4, Ts(100)).0;
        assert_eq!(leased.len(), 4);
        let (res, ch) = s.complete(vec![ids[..2].to_vec()]);
        assert_eq!(res, vec![Ok(())]);
        assert_eq!(ch.del.len(), 2);
        assert_eq!(s.stats(Ts(1)).payload_bytes, 12 + 13);
        // The completed item's source id is free again; the live one's is still known.
        let again = s.produce(items).0;
        assert!(again[0] > ids[3], "stored anew");
        assert_eq!(again[2], ids[2], "still held by the live item");
    }

    /// A low priority starving behind busy traffic: 1 item in 64 waits at priority 0 while the rest flow through
    /// at priority 5. The waiting items keep memory for themselves only (sparse chunks), not for the 1,024 slots
    /// of every chunk they sit in, and still come out complete and in FIFO order.
    #[test]
    fn a_starving_priority_keeps_no_memory_for_the_items_that_left() {
        let mut s = PartitionState::new(1).without_changes();
        let mut waiting = Vec::new();
        for round in 0..64u32 {
            let batch: Vec<NewItem> = (0..1024u32)
                .map(|i| NewItem {
                    priority: if i % 64 == 0 { 0 } else { 5 },
                    ..new_item(&format!("{round}-{i}"), Ts::ZERO)
                })
                .collect();
            let ids = s.produce(batch).0;
            waiting.extend(ids.iter().step_by(64).copied());
            // Lease and complete what priority 5 has: the priority-0 items stay behind.
            let leased = s.lease(1024 - 16, Ts(100)).0;
            assert!(leased.len() == 1024 - 16 && leased.iter().all(|it| it.priority == 5));
            s.complete(vec![leased.iter().map(|it| it.id).collect()]);
        }
        assert_eq!(s.counts().ready, 64 * 16);
        let slots: usize = s.chunks.values().map(|c| c.capacity()).sum();
        // Dense, the 65 chunks would hold 66,560 slots (3 MiB) for 1,024 items. Sparse, each keeps at most 4 slots
        // per live item plus 8 (16 items: 72), and the tail chunk, still being filled, stays dense: under 6,000.
        assert!(
            slots <= 65 * 72 + 1024,
            "{slots} slots held for 1,024 waiting items"
        );
        let got = s.lease(5000, Ts(100)).0;
        assert_eq!(got.iter().map(|it| it.id).collect::<Vec<_>>(), waiting);
        // Payloads survive the move into the sparse form: item i of a round carries "{round}-{i}".
        for (k, it) in got.iter().enumerate() {
            assert_eq!(it.payload, format!("{}-{}", k / 16, (k % 16) * 64).as_bytes());
        }
    }

    /// Items that stay while those around them leave (leased for long) get buffers of their own once their chunk
    /// goes sparse: they do not keep alive the arena buffers the others were written into. Scheduled and dead items
    /// never share one.
    #[test]
    fn stragglers_do_not_keep_arena_buffers_alive() {
        let mut s = PartitionState::new(1).without_changes();
        s.produce(
            (0..2048u32)
                .map(|i| new_item(&format!("item-{i}"), Ts::ZERO))
                .collect(),
        );
        let leased = s.lease(2048, Ts(100)).0;
        assert_eq!(leased.len(), 2048);
        // Every 64th stays leased (16 per chunk, under the sparse threshold); the rest complete.
        let (kept, done): (Vec<Item>, Vec<Item>) =
            leased
                .into_iter()
                .enumerate()
                .fold((Vec::new(), Vec::new()), |(mut k, mut d), (i, it)| {
                    if i % 64 == 0 {
                        k.push(it)
                    } else {
                        d.push(it)
                    }
                    (k, d)
                });
        s.complete(vec![done.iter().map(|it| it.id).collect()]);
        drop(done);
        let want: Vec<(ItemId, Bytes)> = kept
            .iter()
            .map(|it| (it.id, Bytes::copy_from_slice(&it.payload)))
            .collect();
        drop(kept);
        let mut held = 0;
        for chunk in s.chunks.values() {
            for (_, slot) in chunk.iter().filter(|(_, s)| s.live()) {
                assert!(
                    slot.data.as_ref().is_some_and(|d| d.is_unique()),
                    "a straggler shares a buffer"
                );
                held += 1;
            }
        }
        assert_eq!(held, want.len());
        let got: Vec<(ItemId, Bytes)> = s.all_items().into_iter().map(|it| (it.id, it.payload)).collect();
        assert_eq!(got, want, "payloads survive the move to buffers of their own");
        // A retry into the schedule keeps a copy of its own too.
        let ids: Vec<ItemId> = want.iter().map(|w| w.0).collect();
        let ops = vec![RetryOp {
            id: ids[0],
            action: RetryAction::Schedule(Ts(1_000)),
        }];
        assert!(s.retry(vec![ops], LifecyclePolicy::default()).0[0].is_ok());
        assert!(s.sched.values().all(|it| it.payload.is_unique()));
    }

    /// A priority's arena buffers start small and double while it keeps filling them; a partition that empties
    /// lets go of them, so many partitions with an item or two (or none) hold little.
    #[test]
    fn arenas_start_small_and_go_when_the_partition_empties() {
        let mut s = PartitionState::new(1).without_changes();
        s.produce(vec![new_item("one", Ts::ZERO)]);
        // The buffer of a small item is the smallest there is: what is left of it is all the arena holds.
        assert!(prio(&s, 0).arena.capacity() < ARENA_MIN_BYTES);
        assert!(
            s.prios[1..].iter().all(Option::is_none),
            "priorities without items hold no state"
        );
        s.produce(
            (0..5_000u32)
                .map(|i| new_item(&format!("item-{i:06}"), Ts::ZERO))
                .collect(),
        );
        assert_eq!(
            prio(&s, 0).arena_next,
            ARENA_BYTES,
            "a busy priority reaches full-size buffers"
        );
        let leased = s.lease(10_000, Ts(100)).0;
        assert_eq!(leased.len(), 5_001);
        s.complete(vec![leased.iter().map(|it| it.id).collect()]);
        assert_eq!(
            prio(&s, 0).arena.capacity(),
            0,
            "an empty partition holds no arena"
        );
        assert_eq!(prio(&s, 0).arena_next, ARENA_MIN_BYTES);
    }

    /// Ready items spread over chunks with gaps (ids taken by scheduled items) are all found, in order.
    #[test]
    fn lease_crosses_chunks_and_gaps() {
        let mut s = PartitionState::new(1);
        let mut batch = Vec::new();
        for i in 0..3000u32 {
            // Every id between 500 and 2500 goes to the schedule, so chunks have holes and one chunk has none.
            let at = if (500..2500).contains(&i) {
                Ts(5_000_000)
            } else {
                Ts::ZERO
            };
            batch.push(new_item(&i.to_string(), at));
        }
        s.produce(batch);
        let got = s.lease(5000, Ts(100)).0;
        assert_eq!(got.len(), 1000);
        assert!(got.windows(2).all(|w| w[0].id < w[1].id));
        // Newly ready items after the cursor passed are found too.
        s.produce(vec![new_item("late", Ts::ZERO)]);
        assert_eq!(s.lease(10, Ts(100)).0.len(), 1);
        assert_eq!(s.counts().ready, 0);
    }

    /// Fields survive the compact encoding.
    #[test]
    fn slot_round_trip() {
        let it = Item {
            id: ItemId(7),
            source_id: "s".into(),
            is_leased: true,
            lease_deadline: Ts(5),
            expire_deadline: Ts(9),
            created_at: Ts(3),
            attempts: 2,
            max_attempts: 4,
            reference: "r".into(),
            encoding: "e".into(),
            kind: "k".into(),
            payload: Bytes::from_static(b"pay"),
            priority: 9,
            ..Default::default()
        };
        let (mut arena, mut next) = (BytesMut::new(), ARENA_MIN_BYTES);
        assert_eq!(Slot::from_item(&it, &mut arena, &mut next).to_item(7), it);
        assert_eq!(std::mem::size_of::<Slot>(), 64);
    }

    fn keyed(key: &str, created_at: i64, until: i64) -> NewItem {
        NewItem {
            dedup_id: key.into(),
            dedup_until: Ts(until),
            created_at: Ts(created_at),
            ..new_item(key, Ts::ZERO)
        }
    }

    /// Ids of high-priority items that leave without a lease (deleted here) do not pile up in their FIFO.
    #[test]
    fn priority_fifo_drops_stale_ids() {
        let mut s = PartitionState::new(1);
        let batch = (0..10_000)
            .map(|i| NewItem {
                priority: 5,
                ..new_item(&i.to_string(), Ts::ZERO)
            })
            .collect();
        let ids = s.produce(batch).0;
        s.delete(ids[..9_990].to_vec());
        assert_eq!(s.ready_by_prio[5], 10);
        let fifo = &prio(&s, 5).fifo;
        assert!(fifo.len() <= 2 * 10 + COMPACT_SLACK, "{}", fifo.len());
        let got = s.lease(100, Ts(100)).0;
        assert_eq!(
            got.iter().map(|i| i.id).collect::<Vec<_>>(),
            ids[9_990..].to_vec()
        );
        assert!(prio(&s, 5).fifo.is_empty());
        assert_eq!(s.counts().ready, 0);
    }

    /// Priority-0 items behind many higher-priority ones are found by the cursor, which passes the others once.
    #[test]
    fn cursor_skips_higher_priorities() {
        let mut s = PartitionState::new(1);
        let batch = (0..3000u32)
            .map(|i| NewItem {
                priority: if i % 3 == 0 { 0 } else { 2 },
                ..new_item(&i.to_string(), Ts::ZERO)
            })
            .collect();
        s.produce(batch);
        let first = s.lease(2000, Ts(100)).0;
        assert!(first.iter().all(|i| i.priority == 2));
        let rest = s.lease(5000, Ts(100)).0;
        assert_eq!(rest.len(), 1000);
        assert!(rest.windows(2).all(|w| w[0].id < w[1].id && w[0].priority == 0));
        assert_eq!(s.counts().ready, 0);
    }

    /// Leases follow a model queue (highest priority first, FIFO within one) through a random mix of produce,
    /// lease, complete and retry with priorities mixed in every batch, however the per-priority blocks of
    /// ids interleave, and every item produced is leased in the end.
    #[test]
    fn per_priority_blocks_keep_priority_and_fifo_order() {
        use std::collections::VecDeque;
        let mut rnd = rng(0x9E37_79B9_7F4A_7C15u64);
        let mut s = PartitionState::new(1).without_changes();
        // Per priority, the payloads of ready items in the order they must be leased.
        let mut model: Vec<VecDeque<String>> = vec![VecDeque::new(); PRIORITIES];
        let mut held: Vec<(ItemId, u8, String)> = Vec::new();
        let mut next = 0u64;
        for _ in 0..3_000 {
            match rnd(10) {
                0..=3 => {
                    // A few priorities, or all ten, in one batch; sometimes one priority only.
                    let spread = [1, 2, 10][rnd(3) as usize];
                    let base = rnd(10);
                    let batch: Vec<NewItem> = (0..1 + rnd(300))
                        .map(|_| {
                            let p = ((base + rnd(spread)) % 10) as u8;
                            next += 1;
                            model[usize::from(p)].push_back(format!("{p}-{next}"));
                            NewItem {
                                priority: p,
                                ..new_item(&format!("{p}-{next}"), Ts::ZERO)
                            }
                        })
                        .collect();
                    s.produce(batch);
                }
                4..=6 => {
                    let n = 1 + rnd(250) as usize;
                    let (got, _) = s.lease(n, Ts(1_000));
                    let mut want = Vec::new();
                    for p in (0..PRIORITIES).rev() {
                        while want.len() < n {
                            match model[p].pop_front() {
                                Some(v) => want.push(v),
                                None => break,
                            }
                        }
                    }
                    let payloads: Vec<String> = got.iter().map(payload_of).collect();
                    assert_eq!(payloads, want);
                    held.extend(got.iter().map(|i| (i.id, i.priority, payload_of(i))));
                }
                7 | 8 if !held.is_empty() => {
                    let n = 1 + rnd(held.len() as u64) as usize;
                    let done: Vec<ItemId> = held.drain(..n).map(|h| h.0).collect();
                    let (res, _) = s.complete(vec![done]);
                    assert!(res.iter().all(|r| r.is_ok()));
                }
                _ if !held.is_empty() => {
                    // Retry now: back at the tail of its priority under a fresh id.
                    let (id, p, v) = held.remove(rnd(held.len() as u64) as usize);
                    let op = RetryOp {
                        id,
                        action: RetryAction::Requeue,
                    };
                    let (res, _) = s.retry(vec![vec![op]], LifecyclePolicy::default());
                    assert!(res[0].is_ok());
                    model[usize::from(p)].push_back(v);
                }
                _ => {}
            }
            assert_eq!(
                s.counts().ready,
                model.iter().map(|m| m.len() as u64).sum::<u64>()
            );
        }
        let (rest, _) = s.lease(usize::MAX >> 1, Ts(1_000));
        let want: usize = model.iter().map(|m| m.len()).sum();
        let mut byp = [0usize; PRIORITIES];
        for i in &rest {
            byp[usize::from(i.priority)] += 1;
        }
        assert_eq!(rest.len(), want, "every ready item is found by a lease");
    }

    /// Priority 0's open block sits in a chunk before another priority's: a lease that empties it must not carry
    /// the cursor into the later chunk, past the ids priority 0 hands out next.
    #[test]
    fn the_cursor_waits_at_priority_0s_open_block() {
        let mut s = PartitionState::new(1).without_changes();
        let p = |prio: u8, name: &str| NewItem {
            priority: prio,
            ..new_item(name, Ts::ZERO)
        };
        s.produce((0..10).map(|i| p(0, &format!("a{i}"))).collect());
        s.produce(vec![p(9, "high")]);
        let (first, _) = s.lease(100, Ts(1_000));
        assert_eq!(first.len(), 11);
        assert_eq!(first[0].priority, 9);
        // The priority-9 item stays leased, so its chunk (after priority 0's) stays too.
        s.produce((0..5).map(|i| p(0, &format!("b{i}"))).collect());
        let (next, _) = s.lease(100, Ts(1_000));
        let got: Vec<String> = next.iter().map(payload_of).collect();
        assert_eq!(got, ["b0", "b1", "b2", "b3", "b4"]);
    }

    fn payload_of(i: &Item) -> String {
        String::from_utf8_lossy(&i.payload).into_owned()
    }

    /// Produce drops at least as many expired records as it adds, lifecycle drops them too, and every drop is in
    /// the change set.
    #[test]
    fn expired_dedup_records_are_dropped() {
        let mut s = PartitionState::new(1);
        for i in 0..100 {
            s.produce(vec![keyed(&format!("old{i}"), 1, 10)]);
        }
        assert_eq!(s.dedup_len(), 100);
        let (_, ch) = s.produce(vec![keyed("new0", 20, 500)]);
        assert_eq!(ch.dedup_put.len(), 1);
        assert_eq!(ch.dedup_del.len(), 1 + PRUNE_EXTRA);
        assert_eq!(s.dedup_len(), 100 - PRUNE_EXTRA);
        let (_, ch) = s.lifecycle(Ts(20), LifecyclePolicy::default(), 50);
        assert_eq!(ch.dedup_del.len(), 50);
        s.lifecycle(Ts(20), LifecyclePolicy::default(), 1000);
        assert_eq!(s.dedup_len(), 1);
        assert_eq!(s.dedup_records(Ts(0)).len(), 1);
    }

    /// Keys are recorded, not checked (the engine checks): a key recorded again after its record ended gets a
    /// record of its own, and the ended one is dropped, on disk too.
    #[test]
    fn a_key_recorded_again_gets_a_new_record() {
        let mut s = PartitionState::new(1);
        let a = s.produce(vec![keyed("k", 1, 10)]).0;
        let (b, ch) = s.produce(vec![keyed("k", 10, 20)]);
        assert_ne!(a, b, "the partition does not check keys");
        // The ended record is dropped by the same call (it ended before the call's items were produced).
        assert_eq!(ch.dedup_del, vec![(Ts(10), a[0])]);
        assert_eq!(ch.dedup_put.len(), 1);
        assert_eq!(s.dedup_len(), 1);
        assert_eq!(
            s.dedup_records(Ts(0)),
            vec![DedupRecord {
                dedup_id: "k".into(),
                id: b[0],
                until: Ts(20)
            }]
        );
        // A key without a window (until not after created_at) is not recorded.
        let (_, ch) = s.produce(vec![keyed("z", 15, 15)]);
        assert!(ch.dedup_put.is_empty());
        assert_eq!(s.dedup_len(), 1);
    }

    /// Records given back after a restart are listed while they live and dropped in time.
    #[test]
    fn with_dedup_restores_records() {
        let rec = |k: &str, id: u64, until: i64| DedupRecord {
            dedup_id: k.into(),
            id: ItemId(id),
            until: Ts(until),
        };
        let mut s = PartitionState::load(Vec::new(), 100).with_dedup(vec![
            vec![rec("a", 5, 50)],
            vec![rec("b", 6, 30)],
            vec![rec("b", 7, 40)],
        ]);
        assert_eq!(
            s.dedup_records(Ts(20)),
            vec![rec("b", 6, 30), rec("b", 7, 40), rec("a", 5, 50)]
        );
        let (_, ch) = s.lifecycle(Ts(35), LifecyclePolicy::default(), 100);
        assert_eq!(ch.dedup_del, vec![(Ts(30), ItemId(6))]);
        assert_eq!(s.dedup_records(Ts(45)), vec![rec("a", 5, 50)]);
        assert!(
            s.produce(vec![keyed("c", 45, 90)]).0[0] >= ItemId(100),
            "ids start at the floor"
        );
    }

    /// The records of one produce call are one group: written together, and deleted (by the first record's name)
    /// only when the last of them has ended; restored groups behave the same.
    #[test]
    fn a_calls_records_are_one_group() {
        let mut s = PartitionState::new(1);
        let (ids, ch) = s.produce(vec![keyed("a", 1, 10), keyed("b", 1, 10), keyed("c", 1, 10)]);
        assert_eq!(ch.dedup_put.len(), 3);
        assert_eq!((ch.dedup_put[0].until, ch.dedup_put[0].id), (Ts(10), ids[0]));
        let (_, ch) = s.lifecycle(Ts(9), LifecyclePolicy::default(), 2);
        assert!(ch.dedup_del.is_empty(), "nothing has ended");
        // A group leaves whole, past the call's bound of 2 if it must.
        let (_, ch) = s.lifecycle(Ts(10), LifecyclePolicy::default(), 2);
        assert_eq!(ch.dedup_del, vec![(Ts(10), ids[0])]);
        assert_eq!(s.dedup_len(), 0);
        let rec = |k: &str, id: u64, until: i64| DedupRecord {
            dedup_id: k.into(),
            id: ItemId(id),
            until: Ts(until),
        };
        let mut s = PartitionState::load(Vec::new(), 100).with_dedup(vec![
            vec![rec("x", 8, 20), rec("y", 9, 20)],
            vec![rec("z", 3, 15)],
        ]);
        let (_, ch) = s.lifecycle(Ts(20), LifecyclePolicy::default(), 100);
        assert_eq!(ch.dedup_del, vec![(Ts(15), ItemId(3)), (Ts(20), ItemId(8))]);
    }

    /// With a window, ready items beyond it are counted, not kept; a lease stops at the paged boundary rather than
    /// serve a lower priority, the plan asks for the right ids, and paged-in items lease in FIFO order.
    #[test]
    fn window_pages_out_and_in_in_order() {
        let mut s = PartitionState::new(1).with_window(4);
        let (ids, ch) = s.produce((0..10).map(|i| new_item(&i.to_string(), Ts::ZERO)).collect());
        let written = ch.put;
        assert_eq!((s.ready, s.paged().count[0], s.counts().ready), (4, 6, 10));
        assert_eq!(s.paged().from[0], ids[4].0);
        let high = s
            .produce(vec![NewItem {
                priority: 3,
                ..new_item("hi", Ts::ZERO)
            }])
            .0;
        assert_eq!(
            s.paged().count[3],
            1,
            "the window is full: even a higher priority is paged"
        );
        let got = s.lease(10, Ts(100)).0;
        assert!(got.is_empty(), "priority 3 has paged items and none resident");
        let plan = s.page_plan(10, true);
        assert_eq!(
            plan,
            vec![
                PageRead {
                    prio: 3,
                    from: high[0].0,
                    n: 1
                },
                PageRead {
                    prio: 0,
                    from: ids[4].0,
                    n: 6
                }
            ]
        );
        // Page priority 3 in (as a backend would from disk), then part of priority 0.
        let hi_item = Item {
            id: high[0],
            priority: 3,
            expire_deadline: Ts(10_000_000),
            created_at: Ts(1),
            payload: Bytes::from_static(b"hi"),
            ..Default::default()
        };
        s.page_in(plan[0], vec![hi_item], true);
        let epoch = s.paged_epoch();
        s.page_in(plan[1], written[4..7].to_vec(), false);
        assert!(s.paged_epoch() > epoch);
        assert_eq!((s.ready, s.paged().count[0], s.paged().from[0]), (8, 3, ids[7].0));
        let got = s.lease(10, Ts(100)).0;
        let mut want = vec![high[0]];
        want.extend_from_slice(&ids[..7]);
        assert_eq!(got.iter().map(|i| i.id).collect::<Vec<_>>(), want);
        let pw = s.take_paging();
        // Spilled: "4".."9" and "hi"; moved back: "hi", "4".."6".
        assert_eq!(pw.spilled.len(), 7);
        assert_eq!(pw.paged_in.len(), 4);
        assert_eq!(pw.unpaged.len(), 4);
        assert_eq!(pw.counters.as_ref().map(|p| p.count[0]), Some(3));
        assert!(
            s.take_paging().is_empty(),
            "taken once: nothing left for the next write"
        );
        // A stale read (planned before the boundary moved) is ignored.
        s.page_in(plan[1], written[4..7].to_vec(), false);
        assert_eq!(s.paged().count[0], 3);
        // Stats include what is paged: "7".."9" on disk, "hi" and "0".."6" leased.
        assert_eq!(s.stats(Ts(1)).payload_bytes, 3 + 2 + 7);
    }

    /// Read-ahead shares the window among the priorities that hold ready items and never plans past it: with ten
    /// priorities each holding a tenth of the window, none is short (a quarter of a tenth is the mark), and once
    /// they are, the reads together fit in the room left. An urgent read still gets what a lease needs.
    #[test]
    fn read_ahead_shares_the_window_among_priorities() {
        let items = |n: usize, prio: fn(usize) -> u8| -> Vec<NewItem> {
            (0..n)
                .map(|i| NewItem {
                    priority: prio(i),
                    ..new_item(&i.to_string(), Ts::ZERO)
                })
                .collect()
        };
        let mut s = PartitionState::new(1).with_window(1000);
        s.produce(items(3000, |i| (i % 10) as u8));
        assert_eq!((s.ready, s.paged().total()), (1000, 2000));
        assert!(
            s.page_plan(0, false).is_empty(),
            "100 resident per priority: above a quarter of each one's share (25)"
        );
        // Priority 9 (served first) down to 10 resident: it alone is short, and refills by half its share.
        assert_eq!(s.lease(90, Ts(100)).0.len(), 90);
        let plan = s.page_plan(0, false);
        assert_eq!(plan.len(), 1);
        assert_eq!((plan[0].prio, plan[0].n), (9, 50));

        // Two priorities; the window full of priority 0: priority 9 is short, but there is no room.
        let mut s = PartitionState::new(1).with_window(1000);
        s.produce(items(50, |_| 9));
        s.produce(items(950, |_| 0));
        s.produce(items(100, |_| 9));
        assert_eq!((s.ready, s.paged().count[9]), (1000, 100));
        assert!(s.page_plan(0, false).is_empty(), "no room in the window");
        // Ten leased: ten of room, and the read-ahead fits in it.
        assert_eq!(s.lease(10, Ts(100)).0.len(), 10);
        let plan = s.page_plan(0, false);
        assert_eq!(plan.len(), 1);
        assert_eq!((plan[0].prio, plan[0].n), (9, 10));
        // A lease of 100 needs priority 9's paged items now, room or not.
        let plan = s.page_plan(100, true);
        assert_eq!((plan[0].prio, plan[0].n), (9, 100));
    }

    /// Under its window a partition makes no paging writes at all (no records, no counters), so its writes are
    /// what they were before paging; the first spill brings the counters, and the last page-in clears them.
    #[test]
    fn no_paging_writes_under_the_window() {
        let mut s = PartitionState::new(1).with_window(100);
        for round in 0..20 {
            let (ids, ch) = s.produce((0..50).map(|i| new_item(&i.to_string(), Ts::ZERO)).collect());
            assert!(ch.spilled.is_empty() && ch.counters.is_none());
            let (got, _) = s.lease(50, Ts(100 + round));
            assert_eq!(got.len(), 50);
            let (r, _) = s.complete(vec![ids]);
            assert!(r[0].is_ok());
            assert!(s.take_paging().is_empty(), "round {round}");
        }
        s.produce((0..101).map(|i| new_item(&i.to_string(), Ts::ZERO)).collect());
        let pw = s.take_paging();
        assert_eq!(pw.spilled.len(), 1);
        assert_eq!(pw.counters.as_ref().map(Paged::total), Some(1));
        let plan = s.page_plan(101, true);
        s.page_in(plan[0], pw.spilled, true);
        let pw = s.take_paging();
        assert_eq!((pw.paged_in.len(), pw.unpaged.len()), (1, 1));
        assert!(
            pw.counters.as_ref().is_some_and(Paged::is_empty),
            "empty counters: the backend deletes them"
        );
    }

    /// A bounded schedule: within the bound nothing pages (no moves, no counters); past it new items are paged,
    /// a pass requeues resident ones only up to the paged boundary and reports `more`, and the items the backend
    /// reads back come due in due order, FIFO among equal times, and leave nothing paged.
    #[test]
    fn the_schedule_pages_past_its_bound_and_comes_due_in_order() {
        let mut s = PartitionState::new(1).with_window(100).with_sched_window(3);
        let (ids, ch) = s.produce(vec![
            new_item("a", Ts(10)),
            new_item("b", Ts(20)),
            new_item("c", Ts(20)),
        ]);
        assert!(ch.sched_moves.is_empty() && s.take_paging().is_empty());
        // Past the bound: paged, even when due earlier than resident ones.
        let (later, _) = s.produce(vec![new_item("d", Ts(5)), new_item("e", Ts(20))]);
        let pw = s.take_paging();
        assert_eq!(pw.sched_moves.len(), 2);
        assert_eq!(
            pw.sched_counters.as_ref().map(|c| (c.count, c.from)),
            Some((2, (5, later[0].0)))
        );
        assert_eq!((s.resident_scheduled(), s.counts().scheduled), (3, 5));
        assert_eq!(s.next_deadline(), Some(Ts(5)));
        // A pass without the paged items requeues nothing past the boundary ("d" is due first).
        let (o, _) = s.lifecycle(Ts(30), LifecyclePolicy::default(), 100);
        assert_eq!((o.enqueued, o.more), (0, true));
        let read = s.sched_plan(Ts(30), 100, u64::MAX).expect("a read of due items");
        assert_eq!((read.from, read.to), ((5, later[0].0), Some((31, 0))));
        let paged: Vec<Item> = pw
            .sched_moves
            .iter()
            .filter_map(|m| match m {
                SchedMove::Spill(it) => Some(it.clone()),
                SchedMove::Unpage(..) => None,
            })
            .collect();
        let mut sorted = paged.clone();
        sorted.sort_by_key(|it| (it.enqueue_at, it.id));
        s.page_in_sched(read, sorted, None);
        assert!(s.paged_sched().is_empty());
        let (o, _) = s.lifecycle(Ts(30), LifecyclePolicy::default(), 100);
        assert_eq!((o.enqueued, o.more), (5, false));
        let got: Vec<String> = s.lease(10, Ts(100)).0.iter().map(payload_of).collect();
        assert_eq!(got, ["d", "a", "b", "c", "e"]);
        let pw = s.take_paging();
        assert!(
            pw.sched_counters.is_some_and(|c| c.is_empty()),
            "empty counters: deleted"
        );
        assert_eq!(ids.len(), 3);
    }

    /// Extension moves the slot's deadline, the lease sums and the expiry index together.
    #[test]
    fn extend_keeps_lease_sums() {
        let mut s = PartitionState::new(1);
        s.produce(vec![new_item("a", Ts::ZERO), new_item("b", Ts::ZERO)]);
        let l = s.lease(2, Ts(100)).0;
        let (r, ch) = s.extend(vec![(vec![l[0].id], Ts(300))]);
        assert_eq!(r, vec![Ok(())]);
        assert_eq!(ch.put.len(), 1);
        assert_eq!(ch.put[0].lease_deadline, Ts(300));
        assert_eq!(s.sum_lease, 400);
        assert_eq!(s.next_deadline(), Some(Ts(100)));
        s.lifecycle(Ts(100), LifecyclePolicy::default(), 10);
        assert_eq!(s.next_deadline(), Some(Ts(300)));
        assert_eq!(s.sum_lease, 300);
    }
}
