//! The dedup records of one partition: which key was stored under which item until when.
//!
//! # Why it looks like this
//! With a key on every item, this set is on the produce path of every item, so it must cost little time and memory
//! per record (measured with `examples/memory_overhead.rs`: about 100 to 135 resident bytes per record with 16- to
//! 36-byte keys, against about 200 for a map plus an ordered index of shared strings):
//! - Records live in a FIFO in the order they were added, each with its key in one boxed string. Their `until` is
//!   `created_at + window`, so the FIFO is in expiry order and expired records are dropped from its front, O(1)
//!   each. When the order is broken (the window was shortened, the clock stepped back), an expired record behind a
//!   live one waits for it; every lookup checks `until`, so it is only kept longer, never obeyed.
//! - The lookup table maps a keyed SipHash of the key (the standard, flood-resistant hash, computed once per key) to
//!   the record's position, so the table holds 16 bytes per record and never rehashes strings as it grows. The key
//!   string of the record is compared on every hit: two keys with one hash are never confused. In that case (odds
//!   about n²/2⁶⁵) the second key's item is stored without a record, i.e. it is not deduplicated, which loses
//!   nothing.
//! - A key recorded again once its record ended points the table at the new record; the old one stays in the FIFO
//!   until its turn, and is reported dropped then, so a persistent store deletes it from disk.
//! - Records are stored on disk in groups, one per produce call (one key-value entry for a whole batch instead of
//!   one per item: a third entry per item cost fjall more than the rest of the key's work together). A group is
//!   named by its first record's `(until, id)` and is reported dropped when its last record leaves the FIFO;
//!   records of a call are consecutive in the FIFO, so the groups leave in the order they came.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use lessor_core::time::Ts;
use lessor_core::types::{DedupRecord, ItemId};

/// A hasher for keys that already are hashes: it passes the `u64` through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed with it (see `write_u64`); this keeps the trait whole.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Debug)]
struct Record {
    until: Ts,
    id: u64,
    key: Box<str>,
}

/// A partition's dedup records.
#[derive(Debug, Default)]
pub(crate) struct DedupSet {
    hasher: RandomState,
    /// Hash of a key -> sequence number of the record holding the key.
    table: HashMap<u64, u64, BuildHasherDefault<PassThrough>>,
    /// Records in the order they were added; record `seq` is at `seq - first_seq`.
    fifo: VecDeque<Record>,
    first_seq: u64,
    /// The groups of the FIFO's records, in the same order: (records still in the FIFO, the group's name).
    groups: VecDeque<(u32, Ts, ItemId)>,
    /// Records added since the last [`DedupSet::seal`], not yet in a group.
    open: u32,
}

/// What [`DedupSet::find`] learnt about a key, for the [`DedupSet::insert`] that may follow.
pub(crate) struct Probe {
    hash: u64,
    /// The record holding the key's hash, if any: (sequence number, whether it holds this very key).
    held: Option<(u64, bool)>,
}

impl DedupSet {
    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn get(&self, seq: u64) -> Option<&Record> {
        self.fifo
            .get(usize::try_from(seq.checked_sub(self.first_seq)?).ok()?)
    }

    /// Looks `key` up: the id of its record when that record lives at `at` (`until > at`), and a probe for
    /// [`DedupSet::insert`].
    pub(crate) fn find(&self, key: &str, at: Ts) -> (Option<ItemId>, Probe) {
        let hash = self.hash(key);
        let Some(&seq) = self.table.get(&hash) else {
            return (None, Probe { hash, held: None });
        };
        // The table only names records in the FIFO (`prune` removes an entry with its record).
        let Some(r) = self.get(seq) else {
            return (None, Probe { hash, held: None });
        };
        let same = *r.key == *key;
        let live = same && r.until > at;
        (
            live.then_some(ItemId(r.id)),
            Probe {
                hash,
                held: Some((seq, same)),
            },
        )
    }

    /// Records `key` for item `id` until `until`, after a [`DedupSet::find`] that found no live record at `at`.
    /// Returns false (and records nothing) when another key with the same hash still holds a live record.
    pub(crate) fn insert(&mut self, probe: Probe, key: String, id: ItemId, until: Ts, at: Ts) -> bool {
        if let Some((seq, false)) = probe.held {
            if self.get(seq).is_some_and(|r| r.until > at) {
                return false;
            }
        }
        let seq = self.first_seq + self.fifo.len() as u64;
        self.fifo.push_back(Record {
            until,
            id: id.0,
            key: key.into_boxed_str(),
        });
        self.table.insert(probe.hash, seq);
        self.open += 1;
        true
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
            let Some(r) = self.fifo.pop_front() else { return };
            let seq = self.first_seq;
            self.first_seq += 1;
            let hash = self.hash(&r.key);
            // The key may be held by a later record by now: only this record's entry goes.
            if self.table.get(&hash) == Some(&seq) {
                self.table.remove(&hash);
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
    }

    /// The records holding their key that live at `now` (`until > now`), in the order they were added.
    pub(crate) fn live(&self, now: Ts) -> Vec<DedupRecord> {
        (self.first_seq..)
            .zip(&self.fifo)
            .filter(|(seq, r)| r.until > now && self.table.get(&self.hash(&r.key)) == Some(seq))
            .map(|(_, r)| DedupRecord {
                dedup_id: r.key.to_string(),
                id: ItemId(r.id),
                until: r.until,
            })
            .collect()
    }

    /// Adds stored groups of records (any order, expired ones included: they are dropped in turn, and reported so);
    /// a group is named by its first record. Of two records of one key, the later one in `(until, id)` order holds
    /// it.
    pub(crate) fn restore(&mut self, groups: impl IntoIterator<Item = Vec<DedupRecord>>) {
        let mut groups: Vec<Vec<DedupRecord>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        groups.sort_by_key(|g| (g[0].until, g[0].id));
        for g in groups {
            self.groups.push_back((g.len() as u32, g[0].until, g[0].id));
            self.restore_group(g);
        }
    }

    fn restore_group(&mut self, records: Vec<DedupRecord>) {
        for r in records {
            let hash = self.hash(&r.dedup_id);
            let seq = self.first_seq + self.fifo.len() as u64;
            self.fifo.push_back(Record {
                until: r.until,
                id: r.id.0,
                key: r.dedup_id.into_boxed_str(),
            });
            // Sorted by `until`: a later record of the same key replaces the earlier one in the table.
            self.table.insert(hash, seq);
        }
    }

    /// Records held, expired ones not yet dropped included.
    pub(crate) fn len(&self) -> usize {
        self.fifo.len()
    }

    /// Records the lookup table points at (one per key).
    #[cfg(test)]
    pub(crate) fn keys(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(s: &mut DedupSet, key: &str, id: u64, at: i64, until: i64) -> Option<ItemId> {
        let (found, probe) = s.find(key, Ts(at));
        if found.is_none() {
            assert!(s.insert(probe, key.to_string(), ItemId(id), Ts(until), Ts(at)));
            s.seal();
        }
        found
    }

    /// Two keys with one hash are told apart by their strings; the second is not recorded while the first lives.
    #[test]
    fn a_hash_collision_never_confuses_keys() {
        let mut s = DedupSet::default();
        add(&mut s, "a", 1, 0, 100);
        // Force a collision: point the hash of "b" at the record of "a".
        let hb = s.hash("b");
        s.table.insert(hb, 0);
        let (found, probe) = s.find("b", Ts(5));
        assert_eq!(found, None, "another key's record is not this key's");
        assert!(!s.insert(probe, "b".into(), ItemId(2), Ts(100), Ts(5)));
        assert_eq!(s.find("a", Ts(5)).0, Some(ItemId(1)));
        // Once the colliding record has ended, the slot is taken over.
        let (found, probe) = s.find("b", Ts(100));
        assert_eq!(found, None);
        assert!(s.insert(probe, "b".into(), ItemId(3), Ts(200), Ts(100)));
        assert_eq!(s.find("b", Ts(150)).0, Some(ItemId(3)));
    }

    /// An expired record stuck behind a live one (the window was shortened) is obeyed by no lookup, listed by no
    /// `live`, and dropped once the record in front of it goes.
    #[test]
    fn out_of_order_expiry_is_only_kept_longer() {
        let mut s = DedupSet::default();
        add(&mut s, "long", 1, 0, 1000);
        add(&mut s, "short", 2, 0, 10);
        assert_eq!(
            add(&mut s, "short", 3, 20, 30),
            None,
            "the ended record is not obeyed"
        );
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
        assert_eq!((s.len(), s.keys()), (0, 0));
    }
}
