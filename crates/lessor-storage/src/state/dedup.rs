//! The dedup records of one partition: which key was stored under which item until when.
//!
//! # Why it looks like this
//! The partition records keys but does not check them: the queue task's index (one per queue, in the engine) is the
//! only check for stores owned by one process, and it is rebuilt from these records when a queue opens (see
//! [`lessor_core::storage::Partition::produce`]). A second lookup table here cost as much again as the engine's
//! index for nothing (each key hashed twice, two tables growing and missing the cache), so records are only a FIFO:
//! - Records are stored on disk in groups, one per produce call (one key-value entry for a whole batch instead of
//!   one per item: a third entry per item cost fjall more than the rest of the key's work together). A group is
//!   named by its first record's `(until, id)` and leaves whole, reported dropped, once the last `until` of its
//!   records has passed.
//! - Groups live in FIFO lanes, records in the order they were added within a lane; their keys are copied back to
//!   back into one ring of bytes per lane in the same order, so a record costs its key's length and 24 bytes, with
//!   no allocation of its own: a boxed string per key cost an allocation, a free at the far end of the window (a
//!   cache miss on memory written long ago, on the queue's task) and the allocator's rounding.
//! - A record's `until` is `created_at + window`, but a queue has two windows: its own (5 minutes by default) for
//!   producers' keys, and at least an hour (`REDRIVE_DEDUP_WINDOW`) for the records of dead-letter moves and
//!   redrives into it. In one FIFO, every key produced behind an hour-long record waited for it: a queue that took
//!   redrives kept an hour of its producers' keys instead of its window's (memory and store growing by about 10 MB
//!   a minute at 2,500 keyed items/s, `scripts/soak.py`). So a group goes to the lane whose last group ends latest
//!   but not after it (each lane stays in expiry order, and each window gets a lane of its own), at most
//!   [`MAX_LANES`]; past that (windows changed often, the clock stepped back) it goes behind the lane that ends
//!   latest, where it is only kept longer, never obeyed: [`DedupSet::live`] checks `until`.
//! - A key recorded again (the engine found its record ended) leaves both records until their turn; readers keep
//!   the later `until` of a key.

use std::collections::VecDeque;

use lessor_core::time::Ts;
use lessor_core::types::{DedupRecord, ItemId};

/// Most lanes a partition's records use (see the module docs): two windows need two.
const MAX_LANES: usize = 4;

#[derive(Debug)]
struct Record {
    until: Ts,
    id: u64,
    /// Length of its key in its lane's `keys`.
    len: u32,
}

/// The records of one produce call.
#[derive(Debug, Clone, Copy)]
struct Group {
    /// How many records, consecutive in the lane.
    n: u32,
    /// Its first record's `(until, id)`: the group's name in a store.
    name: (Ts, ItemId),
    /// The last `until` of its records: when it leaves.
    last: Ts,
}

/// Groups in expiry order (but when [`MAX_LANES`] are taken), with their records and keys.
#[derive(Debug, Default)]
struct Lane {
    fifo: VecDeque<Record>,
    keys: VecDeque<u8>,
    groups: VecDeque<Group>,
}

impl Lane {
    /// When its last group leaves.
    fn last(&self) -> Option<Ts> {
        self.groups.back().map(|g| g.last)
    }

    /// Its records with their keys, in order.
    fn records(&self) -> impl Iterator<Item = (&Record, Vec<u8>)> {
        let mut bytes = self.keys.iter();
        self.fifo
            .iter()
            .map(move |r| (r, bytes.by_ref().take(r.len as usize).copied().collect()))
    }
}

/// A partition's dedup records.
#[derive(Debug, Default)]
pub(crate) struct DedupSet {
    /// Lanes are never removed (an empty one is taken again first), so that `open_lane` stays valid.
    lanes: Vec<Lane>,
    /// Records added since the last [`DedupSet::seal`], not yet in a group: the last `open` records of lane
    /// `open_lane` (the lane of the last group, where the next one most likely goes, so that a seal moves nothing).
    open: u32,
    open_lane: usize,
}

fn record(r: &Record, key: Vec<u8>) -> DedupRecord {
    DedupRecord {
        // Keys were strings when they came in; a lossy read can only matter if memory was corrupted.
        dedup_id: String::from_utf8(key)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        id: ItemId(r.id),
        until: r.until,
    }
}

impl DedupSet {
    /// Records `key` for item `id` until `until`.
    pub(crate) fn insert(&mut self, key: &str, id: ItemId, until: Ts) {
        if self.lanes.is_empty() {
            self.lanes.push(Lane::default());
        }
        let lane = &mut self.lanes[self.open_lane];
        lane.keys.extend(key.as_bytes());
        lane.fifo.push_back(Record {
            until,
            id: id.0,
            len: key.len() as u32,
        });
        self.open += 1;
    }

    /// The records added since the last seal.
    fn open_records(&self) -> impl Iterator<Item = &Record> {
        let fifo = self.lanes.get(self.open_lane).map(|l| &l.fifo);
        let skip = fifo.map_or(0, |f| f.len() - self.open as usize);
        fifo.into_iter().flat_map(move |f| f.iter().skip(skip))
    }

    /// Closes the records added since the last call into one group, named by the first of them; returns that name,
    /// or `None` when nothing was added.
    pub(crate) fn seal(&mut self) -> Option<(Ts, ItemId)> {
        let first = self.open_records().next()?;
        let name = (first.until, ItemId(first.id));
        let last = self.open_records().map(|r| r.until).max().unwrap_or(first.until);
        let n = std::mem::take(&mut self.open);
        // The lane that ends latest but not after this group; else an empty or a new one; else (all taken) the one
        // that ends latest.
        let fits = self
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.last().filter(|&t| t <= last).map(|t| (t, i)))
            .max()
            .map(|(_, i)| i);
        let at = match fits.or_else(|| self.lanes.iter().position(|l| l.groups.is_empty())) {
            Some(i) => i,
            None if self.lanes.len() < MAX_LANES => {
                self.lanes.push(Lane::default());
                self.lanes.len() - 1
            }
            None => self
                .lanes
                .iter()
                .enumerate()
                .max_by_key(|(_, l)| l.last())
                .map_or(0, |(i, _)| i),
        };
        if at != self.open_lane {
            // The records move from the tail of the lane they were added to.
            let from = &mut self.lanes[self.open_lane];
            let records: Vec<Record> = from.fifo.drain(from.fifo.len() - n as usize..).collect();
            let bytes: usize = records.iter().map(|r| r.len as usize).sum();
            let keys: Vec<u8> = from.keys.drain(from.keys.len() - bytes..).collect();
            let to = &mut self.lanes[at];
            to.fifo.extend(records);
            to.keys.extend(keys);
            self.open_lane = at;
        }
        self.lanes[at].groups.push_back(Group { n, name, last });
        Some(name)
    }

    /// The room of the record queues, the key rings and the group queues (tests).
    #[cfg(test)]
    pub(crate) fn capacities(&self) -> (usize, usize, usize) {
        self.lanes.iter().fold((0, 0, 0), |(f, k, g), l| {
            (
                f + l.fifo.capacity(),
                k + l.keys.capacity(),
                g + l.groups.capacity(),
            )
        })
    }

    /// Drops the groups at the front of each lane whose records all ended at or before `now`, about `limit` records
    /// at most, calling `dropped(until, id)` with each group's name. Records not sealed into a group yet are never
    /// dropped.
    pub(crate) fn prune(&mut self, now: Ts, limit: usize, mut dropped: impl FnMut(Ts, ItemId)) {
        let mut budget = limit;
        for lane in &mut self.lanes {
            while budget > 0 {
                let Some(g) = lane.groups.front().copied().filter(|g| g.last <= now) else {
                    break;
                };
                lane.groups.pop_front();
                for r in lane.fifo.drain(..g.n as usize) {
                    lane.keys.drain(..r.len as usize);
                }
                dropped(g.name.0, g.name.1);
                budget = budget.saturating_sub(g.n as usize);
            }
            // A burst of keys leaves its room behind once its window ends (see `PartitionState::shrink_drained`).
            super::shrink_deque(&mut lane.fifo);
            super::shrink_deque(&mut lane.keys);
            super::shrink_deque(&mut lane.groups);
        }
    }

    /// The records that live at `now` (`until > now`), lane by lane. A key recorded twice while both records live
    /// (only when the caller broke the contract, or the clock stepped back) is listed twice; the engine keeps the
    /// later `until`.
    pub(crate) fn live(&self, now: Ts) -> Vec<DedupRecord> {
        let mut out = Vec::new();
        // Open records included: they are the tail of their lane.
        for lane in &self.lanes {
            out.extend(
                lane.records()
                    .filter(|(r, _)| r.until > now)
                    .map(|(r, k)| record(r, k)),
            );
        }
        out
    }

    /// Every record, ended ones not yet dropped included, in its group, each group under its name (its first
    /// record: a store that writes its groups whole, as the log store's checkpoints do). Groups leave whole, so
    /// none is ever renamed.
    pub(crate) fn named_groups(&self) -> Vec<Vec<DedupRecord>> {
        let mut out = Vec::new();
        let mut open = Vec::new();
        for (i, lane) in self.lanes.iter().enumerate() {
            let mut records = lane.records();
            for g in &lane.groups {
                out.push(
                    records
                        .by_ref()
                        .take(g.n as usize)
                        .map(|(r, k)| record(r, k))
                        .collect(),
                );
            }
            if i == self.open_lane {
                open = records.map(|(r, k)| record(r, k)).collect();
            }
        }
        // Records not sealed into a group yet (none between two calls of a partition).
        if !open.is_empty() {
            out.push(open);
        }
        out
    }

    /// Adds stored groups of records (any order, expired ones included: they are dropped in turn, and reported so);
    /// a group is named by its first record.
    pub(crate) fn restore(&mut self, groups: impl IntoIterator<Item = Vec<DedupRecord>>) {
        let mut groups: Vec<Vec<DedupRecord>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        groups.sort_by_key(|g| (g.iter().map(|r| r.until).max(), g[0].until, g[0].id));
        // Sealed in the order they end, each group's records as they were written (its name stays its first's). A
        // restore comes before any produce; records still open would join the first group, so they are sealed first.
        self.seal();
        for g in groups {
            for r in g {
                self.insert(&r.dedup_id, r.id, r.until);
            }
            self.seal();
        }
    }

    /// Records held, expired ones not yet dropped included.
    pub(crate) fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.fifo.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(s: &mut DedupSet, key: &str, id: u64, until: i64) {
        s.insert(key, ItemId(id), Ts(until));
        s.seal();
    }

    /// Records of a short window behind one of a long window (a redrive's hour before a queue's own keys) leave on
    /// time: they used to wait for it.
    #[test]
    fn a_long_record_does_not_hold_back_the_short_ones_behind_it() {
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
        assert_eq!(dropped, vec![(Ts(10), ItemId(2)), (Ts(30), ItemId(3))]);
        assert_eq!(s.len(), 1);
        s.prune(Ts(1000), 10, |t, id| dropped.push((t, id)));
        assert_eq!(dropped.last(), Some(&(Ts(1000), ItemId(1))));
        assert_eq!(s.len(), 0);
    }

    /// A steady mix of two windows (a queue's own keys, 30 ticks, and redrive records, 3,600) keeps only the records
    /// that live, plus one call's worth: it used to keep every record of the last 3,600 ticks.
    #[test]
    fn two_windows_keep_only_what_lives() {
        let mut s = DedupSet::default();
        let mut id = 0;
        for now in 0..10_000i64 {
            for _ in 0..10 {
                id += 1;
                add(&mut s, &format!("k{id}"), id, now + 30);
            }
            if now % 10 == 0 {
                id += 1;
                add(&mut s, &format!("r{id}"), id, now + 3600);
            }
            s.prune(Ts(now), 100, |_, _| {});
            assert!(s.lanes.len() <= 2, "{} lanes", s.lanes.len());
        }
        let live = s.live(Ts(9_999)).len();
        assert!(s.len() <= live + 20, "{} records held for {live} live", s.len());
        assert_eq!(live, 30 * 10 + 360);
    }

    /// Past MAX_LANES windows, a group goes behind the lane that ends latest: only kept longer.
    #[test]
    fn more_windows_than_lanes_only_keep_records_longer() {
        let mut s = DedupSet::default();
        for (i, until) in [100, 90, 80, 70, 60, 50].into_iter().enumerate() {
            add(&mut s, "k", i as u64, until);
        }
        assert_eq!(s.lanes.len(), MAX_LANES);
        // 60 went behind 100 (the lane that ended latest), then 50 behind 90.
        let mut dropped = Vec::new();
        s.prune(Ts(95), 100, |t, _| dropped.push(t.0));
        dropped.sort();
        assert_eq!(dropped, vec![50, 70, 80, 90], "60 waits behind 100");
        assert_eq!(s.live(Ts(95)).len(), 1, "60 ended: kept, not obeyed");
        s.prune(Ts(100), 100, |t, _| dropped.push(t.0));
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
            s.lanes.iter().map(|l| l.keys.len()).sum::<usize>(),
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
