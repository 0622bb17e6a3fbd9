//! Paging: the part of a partition's ready backlog that is on disk only.
//!
//! A persistent backend bounds the memory of a partition by its *window*: once that many ready items are resident,
//! a new ready item of priority `p` is written to disk only and counted here ("spilled"), and so is every later one
//! of `p`, so that for each priority the resident ready items are exactly those below [`Paged::from`] and the
//! paged ones those at or above it (ids are FIFO order within a priority, and an item that becomes ready always
//! gets a new id). The backend reads the next ones back ("page-in") when the resident head of a priority runs low,
//! ahead of the lease that needs them.
//!
//! [`Paged`] holds everything the state must know about the paged items without reading them: counts, byte and
//! age sums for the stats, and bounds of their expiry deadlines so the next deadline stays honest and an expiry
//! sweep knows where to stop. It is small and fixed in size; a backend stores it in the same atomic write as every
//! change of the paged items and reads it back at open instead of counting. A partition that never spilled has
//! none and writes none.

use lessor_core::types::{Item, MAX_PRIORITY};

/// Number of priorities (0..=MAX_PRIORITY).
pub const PRIORITIES: usize = MAX_PRIORITY as usize + 1;

/// [`Paged::from`] of a priority with nothing paged.
pub const NONE: u64 = u64::MAX;

/// The ready items of a partition that live on disk only (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paged {
    /// Per priority: every paged item has an id at or above this one, every resident ready one below ([`NONE`]
    /// when the priority has nothing paged).
    pub from: [u64; PRIORITIES],
    /// Paged items per priority.
    pub count: [u64; PRIORITIES],
    /// Per priority: no paged item expires before this (a lower bound: it only rises after a sweep).
    pub min_expire: [i64; PRIORITIES],
    /// Per priority: the latest expiry deadline spilled so far.
    pub max_expire: [i64; PRIORITIES],
    /// Per priority: whether the paged items' expiry deadlines never decrease with their ids (the usual case: one
    /// expiry timeout per queue), so a sweep may stop at the first item that is not due.
    pub ordered: [bool; PRIORITIES],
    /// Payload bytes of the paged items.
    pub bytes: u64,
    /// Sum of `created_at` over the paged items.
    pub sum_created: i128,
    /// Paged items that carry a source id. Their ids stay in the resident source-id index, which a restart can
    /// only rebuild by reading every item: while this is not zero, a restart reads the whole partition.
    pub with_source: u64,
}

impl Default for Paged {
    fn default() -> Self {
        Paged::EMPTY
    }
}

impl Paged {
    /// Nothing paged. A constant, so that a partition that never paged lends it out instead of holding one.
    pub const EMPTY: Paged = Paged {
        from: [NONE; PRIORITIES],
        count: [0; PRIORITIES],
        min_expire: [i64::MAX; PRIORITIES],
        max_expire: [i64::MIN; PRIORITIES],
        ordered: [true; PRIORITIES],
        bytes: 0,
        sum_created: 0,
        with_source: 0,
    };

    /// Paged items of every priority.
    pub fn total(&self) -> u64 {
        self.count.iter().sum()
    }

    /// Whether nothing is paged.
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }

    /// Whether `id` may be a paged item (of some priority).
    pub fn may_hold(&self, id: u64) -> bool {
        (0..PRIORITIES).any(|p| self.count[p] > 0 && id >= self.from[p])
    }

    /// The earliest deadline a paged item may have, if any is paged.
    pub fn next_deadline(&self) -> Option<i64> {
        (0..PRIORITIES)
            .filter(|&p| self.count[p] > 0)
            .map(|p| self.min_expire[p])
            .min()
    }

    /// Resets priority `p` once its last paged item is gone.
    pub(super) fn settle(&mut self, p: usize) {
        if self.count[p] == 0 {
            self.from[p] = NONE;
            self.min_expire[p] = i64::MAX;
            self.max_expire[p] = i64::MIN;
            self.ordered[p] = true;
        }
        if self.is_empty() {
            // Sums of nothing are zero; a drift (an item counted twice by a bug) must not outlive the backlog.
            self.bytes = 0;
            self.sum_created = 0;
            self.with_source = 0;
        }
    }
}

/// One read a backend does to page items in: up to `n` ready items of priority `prio` with ids at or above `from`,
/// in id order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRead {
    /// The priority.
    pub prio: u8,
    /// The first id that may be read ([`Paged::from`] of the priority when the plan was made).
    pub from: u64,
    /// Most items to read.
    pub n: usize,
}

/// How a partition's ready items divide between memory and paged records (see
/// [`super::PartitionState::paging_counts`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PagingCounts {
    /// Ready items held in memory.
    pub resident_ready: u64,
    /// Ready items on disk only.
    pub paged_ready: u64,
    /// Payload bytes of the paged items.
    pub paged_bytes: u64,
    /// Payload bytes of leased, scheduled and dead items held on disk only (see the state's module docs,
    /// "Payloads on disk").
    pub on_disk_bytes: u64,
    /// Scheduled items on disk only (see "Paging the schedule" in the state's module docs).
    pub paged_scheduled: u64,
    /// Payload bytes of the paged scheduled items.
    pub paged_scheduled_bytes: u64,
}

/// The key that orders the schedule: due time, then id (FIFO among equal times).
pub type SchedKey = (i64, u64);

/// The scheduled items of a partition that live on disk only (see "Paging the schedule" in the state's module
/// docs). Like [`Paged`], small and fixed in size, stored in the same atomic write as every change of the paged
/// schedule and read back at open instead of counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedSched {
    /// Every paged scheduled item's (due time, id) is at or after this one (a lower bound: it rises as items are
    /// read back, and falls when an item due earlier is paged).
    pub from: SchedKey,
    /// Paged scheduled items.
    pub count: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Those that carry a source id (see [`Paged::with_source`]).
    pub with_source: u64,
}

impl Default for PagedSched {
    fn default() -> Self {
        PagedSched {
            from: (i64::MAX, u64::MAX),
            count: 0,
            bytes: 0,
            with_source: 0,
        }
    }
}

impl PagedSched {
    /// Whether nothing is paged.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Resets the counters once the last paged item is gone (sums of nothing are zero, whatever drifted).
    pub(super) fn settle(&mut self) {
        if self.count == 0 {
            *self = PagedSched::default();
        }
    }
}

/// One read a backend does to page scheduled items in: up to `n` paged scheduled items with keys at or above
/// `from` and below `to` (no bound: `None`), in key order, with at most `max_bytes` of payloads (at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedRead {
    /// The first key that may be read ([`PagedSched::from`] when the plan was made).
    pub from: SchedKey,
    /// The first key not to read.
    pub to: Option<SchedKey>,
    /// Most items to read.
    pub n: usize,
    /// Most payload bytes to read (the item that crosses it is the last).
    pub max_bytes: u64,
}

/// A change of the paged schedule, in the order the state made them (a backend keeps the last one per id).
#[derive(Debug, Clone)]
pub enum SchedMove {
    /// A scheduled item written to disk only (its item records, if it had any, are in the change set's `del`).
    Spill(Item),
    /// A paged scheduled item's records removed (paged in, deleted, cleared), by due time and id.
    Unpage(i64, u64),
}
