//! The dedup records of one partition: which key was stored under which item until when.
//!
//! # Why it looks like this
//! The partition records keys but does not check them: the queue task's index (one per queue, in the engine) is the
//! only check for stores owned by one process, and it is rebuilt from these records when a queue opens (see
//! [`lessor_core::storage::Partition::produce`]). A second lookup table here cost as much again as the engine's
//! index for nothing (each key hashed twice, two tables growing and missing the cache), so records are only a FIFO:
//! - Records live in the order they were added, each with its key in one boxed string (moved in, not copied). Their
//!   `until` is `created_at + window`, so the FIFO is in expiry order and expired records are dropped from its
//!   front, O(1) each, no hashing. When the order is broken (the window was shortened, the clock stepped back), an
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
    key: Box<str>,
}

/// A partition's dedup records.
#[derive(Debug, Default)]
pub(crate) struct DedupSet {
    /// Records in the order they were added.
    fifo: VecDeque<Record>,
    /// The groups of the FIFO's records, in the same order: (records still in the FIFO, the group's name).
    groups: VecDeque<(u32, Ts, ItemId)>,
    /// Records added since the last [`DedupSet::seal`], not yet in a group.
    open: u32,
}

impl DedupSet {
    /// Records `key` for item `id` until `until`.
    pub(crate) fn insert(&mut self, key: String, id: ItemId, until: Ts) {
        self.fifo.push_back(Record {
            until,
            id: id.0,
            key: key.into_boxed_str(),
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

    /// Drops up to `limit` records from the front that ended at or before `now`, calling `dropped(until, id)` with
    /// a group's name when its last record goes. Records not sealed into a group yet are never dropped.
    pub(crate) fn prune(&mut self, now: Ts, limit: usize, mut dropped: impl FnMut(Ts, ItemId)) {
        let sealed = self.fifo.len() - self.open as usize;
        for _ in 0..limit.min(sealed) {
            if self.fifo.front().is_none_or(|r| r.until > now) {
                return;
            }
            self.fifo.pop_front();
            if let Some(g) = self.groups.front_mut() {
                g.0 -= 1;
                if g.0 == 0 {
                    let (_, until, id) = *g;
                    self.groups.pop_front();
                    dropped(until, id);
                }
            }
        }
    }

    /// The records that live at `now` (`until > now`), in the order they were added. A key recorded twice while
    /// both records live (only when the caller broke the contract, or the clock stepped back) is listed twice; the
    /// engine keeps the later `until`.
    pub(crate) fn live(&self, now: Ts) -> Vec<DedupRecord> {
        self.fifo
            .iter()
            .filter(|r| r.until > now)
            .map(|r| DedupRecord {
                dedup_id: r.key.to_string(),
                id: ItemId(r.id),
                until: r.until,
            })
            .collect()
    }

    /// Adds stored groups of records (any order, expired ones included: they are dropped in turn, and reported so);
    /// a group is named by its first record.
    pub(crate) fn restore(&mut self, groups: impl IntoIterator<Item = Vec<DedupRecord>>) {
        let mut groups: Vec<Vec<DedupRecord>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        groups.sort_by_key(|g| (g[0].until, g[0].id));
        for g in groups {
            self.groups.push_back((g.len() as u32, g[0].until, g[0].id));
            for r in g {
                self.fifo.push_back(Record {
                    until: r.until,
                    id: r.id.0,
                    key: r.dedup_id.into_boxed_str(),
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
        s.insert(key.to_string(), ItemId(id), Ts(until));
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

    /// Records not sealed into a group are never pruned, even when ended.
    #[test]
    fn open_records_wait_for_their_seal() {
        let mut s = DedupSet::default();
        s.insert("a".into(), ItemId(1), Ts(5));
        let mut dropped = Vec::new();
        s.prune(Ts(10), 10, |t, id| dropped.push((t, id)));
        assert_eq!((s.len(), dropped.len()), (1, 0));
        assert_eq!(s.seal(), Some((Ts(5), ItemId(1))));
        assert_eq!(s.seal(), None, "nothing added since");
        s.prune(Ts(10), 10, |t, id| dropped.push((t, id)));
        assert_eq!(dropped, vec![(Ts(5), ItemId(1))]);
    }
}
