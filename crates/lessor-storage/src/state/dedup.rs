//! The dedup records of one partition: which key was stored under which item until when.
//!
//! # Why it looks like this
//! The partition records keys but does not check them: the queue task's index (one per queue, in the engine) is the
//! only check for stores owned by one process, and it is rebuilt from these records when a queue opens (see
//! [`lessor_core::storage::Partition::produce`]). A second lookup table here cost as much again as the engine's
//! index for nothing (each key hashed twice, two tables growing and missing the cache), so records are only a FIFO:
//! - Records live in the order they were added; their keys are copied back to back into one ring of bytes in the
//!   same order, so a record costs its key's length and 24 bytes, with no allocation of its own: a boxed string
//!   per key cost an allocation, a free at the far end of the window (a cache miss on memory written long ago,
//!   on the queue's task) and the allocator's rounding. Their `until` is `created_at + window`, so the FIFO is in
//!   expiry order and expired records are dropped from its front, O(1) each, no hashing. When the order is broken (the window was shortened, the clock stepped back), an
//!   expired record behind a live one waits for it; [`DedupSet::live`] checks `until`, so it is only kept longer,
//!   never obeyed.
//! - A key recorded again (the engine found its record ended) leaves both records in the FIFO until their turn;
//!   readers keep the later `until` of a key.
//! - Records are stored on disk in groups, one per produce call (one key-value entry for a whole batch instead of
//!   one per item: a third entry per item cost fjall more than the rest of the key's work together). A group is
//!   named by its first record's `(until, id)` and is reported dropped when its last record leaves the FIFO;
//!   records of a call are consecutive in the FIFO, so the groups leave in the order they came.

use std::collections::VecDeque;

use lessor_core::time::Ts;
use lessor_core::types::{DedupRecord, ItemId};

#[derive(Debug)]
struct Record {
    until: Ts,
    id: u64,
    /// Length of its key in [`DedupSet::keys`].
    len: u32,
}

/// A partition's dedup records.
#[derive(Debug, Default)]
pub(crate) struct DedupSet {
    /// Records in the order they were added.
    fifo: VecDeque<Record>,
    /// The records' keys, back to back, in the same order.
    keys: VecDeque<u8>,
    /// The groups of the FIFO's records, in the same order: (records still in the FIFO, the group's name).
    groups: VecDeque<(u32, Ts, ItemId)>,
    /// Records added since the last [`DedupSet::seal`], not yet in a group.
    open: u32,
}

impl DedupSet {
    /// Records `key` for item `id` until `until`.
    pub(crate) fn insert(&mut self, key: &str, id: ItemId, until: Ts) {
        self.keys.extend(key.as_bytes());
        self.fifo.push_back(Record {
            until,
            id: id.0,
            len: key.len() as u32,
        });
        self.open += 1;
    }

    /// Closes the records added since the last call into one group, named by the first of them; returns that name,
    /// or `None` when nothing was added.
    pub(crate) fn seal(&mut self) -> Option<(Ts, ItemId)> {
        let n = std::mem::take(&mut self.open);
        let first = self.fifo.len().checked_sub(n as usize)?;
        let r = self.fifo.get(first).filter(|_| n > 0)?;
        let name = (r.until, ItemId(r.id));
        self.groups.push_back((n, name.0, name.1));
        Some(name)
    }

    /// The room of the record queue, the key ring and the group queue (tests).
    #[cfg(test)]
    pub(crate) fn capacities(&self) -> (usize, usize, usize) {
        (self.fifo.capacity(), self.keys.capacity(), self.groups.capacity())
    }

    /// Drops up to `limit` records from the front that ended at or before `now`, calling `dropped(until, id)` with
    /// a group's name when its last record goes. Records not sealed into a group yet are never dropped.
    pub(crate) fn prune(&mut self, now: Ts, limit: usize, mut dropped: impl FnMut(Ts, ItemId)) {
        let sealed = self.fifo.len() - self.open as usize;
        for _ in 0..limit.min(sealed) {
            if self.fifo.front().is_none_or(|r| r.until > now) {
                break;
            }
            if let Some(r) = self.fifo.pop_front() {
                self.keys.drain(..r.len as usize);
            }
            if let Some(g) = self.groups.front_mut() {
                g.0 -= 1;
                if g.0 == 0 {
                    let (_, until, id) = *g;
                    self.groups.pop_front();
                    dropped(until, id);
                }
            }
        }
        // A burst of keys leaves its room behind once its window ends (see `PartitionState::shrink_drained`).
        super::shrink_deque(&mut self.fifo);
        super::shrink_deque(&mut self.keys);
        super::shrink_deque(&mut self.groups);
    }

    /// The records that live at `now` (`until > now`), in the order they were added. A key recorded twice while
    /// both records live (only when the caller broke the contract, or the clock stepped back) is listed twice; the
    /// engine keeps the later `until`.
    pub(crate) fn live(&self, now: Ts) -> Vec<DedupRecord> {
        let mut out = Vec::new();
        let mut bytes = self.keys.iter();
        for r in &self.fifo {
            let key: Vec<u8> = bytes.by_ref().take(r.len as usize).copied().collect();
            if r.until > now {
                out.push(DedupRecord {
                    // Keys were strings when they came in; a lossy read can only matter if memory was corrupted.
                    dedup_id: String::from_utf8(key)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                    id: ItemId(r.id),
                    until: r.until,
                });
            }
        }
        out
    }

    /// Every record, ended ones not yet dropped included, in its group, each group named by its first record
    /// (a store that writes its groups whole, as the log store's checkpoints do). A group whose first records
    /// were dropped already is renamed after the first it still has, so that the name its drop will report is the
    /// one it was written under. Also the renamed groups: their index in the list and their name before.
    pub(crate) fn named_groups(&mut self) -> (Vec<Vec<DedupRecord>>, super::DedupRenames) {
        let mut out = Vec::with_capacity(self.groups.len() + 1);
        let mut bytes = self.keys.iter();
        let mut records = self.fifo.iter();
        let mut take = |n: u32| -> Vec<DedupRecord> {
            records
                .by_ref()
                .take(n as usize)
                .map(|r| {
                    let key: Vec<u8> = bytes.by_ref().take(r.len as usize).copied().collect();
                    DedupRecord {
                        dedup_id: String::from_utf8(key)
                            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                        id: ItemId(r.id),
                        until: r.until,
                    }
                })
                .collect()
        };
        let mut renamed = Vec::new();
        for g in self.groups.iter_mut() {
            let group = take(g.0);
            if let Some(first) = group.first() {
                if (g.1, g.2) != (first.until, first.id) {
                    renamed.push((out.len(), (g.1, g.2)));
                    (g.1, g.2) = (first.until, first.id);
                }
                out.push(group);
            }
        }
        // Records not sealed into a group yet (none between two calls of a partition).
        let open = take(self.open);
        if !open.is_empty() {
            out.push(open);
        }
        (out, renamed)
    }

    /// Adds stored groups of records (any order, expired ones included: they are dropped in turn, and reported so);
    /// a group is named by its first record.
    pub(crate) fn restore(&mut self, groups: impl IntoIterator<Item = Vec<DedupRecord>>) {
        let mut groups: Vec<Vec<DedupRecord>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        groups.sort_by_key(|g| (g[0].until, g[0].id));
        for g in groups {
            self.groups.push_back((g.len() as u32, g[0].until, g[0].id));
            for r in g {
                self.keys.extend(r.dedup_id.as_bytes());
                self.fifo.push_back(Record {
                    until: r.until,
                    id: r.id.0,
                    len: r.dedup_id.len() as u32,
                });
            }
        }
    }

    /// Records held, expired ones not yet dropped included.
    pub(crate) fn len(&self) -> usize {
        self.fifo.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(s: &mut DedupSet, key: &str, id: u64, until: i64) {
        s.insert(key, ItemId(id), Ts(until));
        s.seal();
    }

    /// An expired record stuck behind a live one (the window was shortened) is listed by no `live`, and dropped
    /// once the record in front of it goes.
    #[test]
    fn out_of_order_expiry_is_only_kept_longer() {
        let mut s = DedupSet::default();
        add(&mut s, "long", 1, 1000);
        add(&mut s, "short", 2, 10);
        add(&mut s, "short", 3, 30);
        assert_eq!(
            s.live(Ts(20)).iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ItemId(1), ItemId(3)]
        );
        let mut dropped = Vec::new();
        s.prune(Ts(40), 10, |t, id| dropped.push((t, id)));
        assert!(dropped.is_empty(), "the live front record holds the others back");
        s.prune(Ts(1000), 10, |t, id| dropped.push((t, id)));
        assert_eq!(
            dropped,
            vec![(Ts(1000), ItemId(1)), (Ts(10), ItemId(2)), (Ts(30), ItemId(3))]
        );
        assert_eq!(s.len(), 0);
    }

    /// Keys of different lengths come back whole and in order after the ones before them were pruned.
    #[test]
    fn keys_come_back_whole_after_a_prune() {
        let mut s = DedupSet::default();
        add(&mut s, "", 1, 10);
        add(&mut s, "ab", 2, 10);
        add(&mut s, "ünïcode-κey", 3, 20);
        add(&mut s, "x".repeat(128).as_str(), 4, 30);
        s.prune(Ts(10), 10, |_, _| {});
        let live = s.live(Ts(10));
        let keys: Vec<&str> = live.iter().map(|r| r.dedup_id.as_str()).collect();
        assert_eq!(keys, vec!["ünïcode-κey", "x".repeat(128).as_str()]);
        assert_eq!(
            s.keys.len(),
            "ünïcode-κey".len() + 128,
            "pruned keys' bytes are gone"
        );
    }

    /// Records not sealed into a group are never pruned, even when ended.
    #[test]
    fn open_records_wait_for_their_seal() {
        let mut s = DedupSet::default();
        s.insert("a", ItemId(1), Ts(5));
        let mut dropped = Vec::new();
        s.prune(Ts(10), 10, |t, id| dropped.push((t, id)));
        assert_eq!((s.len(), dropped.len()), (1, 0));
        assert_eq!(s.seal(), Some((Ts(5), ItemId(1))));
        assert_eq!(s.seal(), None, "nothing added since");
        s.prune(Ts(10), 10, |t, id| dropped.push((t, id)));
        assert_eq!(dropped, vec![(Ts(5), ItemId(1))]);
    }
}
