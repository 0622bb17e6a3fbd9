//! The queue task's partitions, and what a pass reads over all of them kept up to date as they change.
//!
//! A queue may have 65,535 partitions, and a pass serves a handful of them: the totals of their counts, the earliest
//! deadline, probe or refresh, the failing partitions, the least loaded and the fullest partition were each a scan
//! of every partition, several per pass (about a millisecond per pass at 65,535 partitions, whatever the pass did).
//! [`Parts`] keeps them instead: totals and ordered sets, updated as a partition changes, so a pass costs what it
//! touches.
//!
//! Every change goes through [`Parts::modify`] (the list hands out no `&mut Part` otherwise): it notes what the
//! partition contributes before and after the change and updates the figures by the difference, so no mutation can
//! leave them behind. Sets are exact (an entry is removed when its partition's value changes), not lazy: nothing
//! to re-check when reading, and their size is bounded by the partition count.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::ops::{Bound, Deref};
use std::sync::Arc;
use std::time::Duration;

use crate::error::StorageError;
use crate::storage::{Partition, PartitionStore};
use crate::time::Ts;
use crate::types::PartitionCounts;

/// What the task knows about one partition: its handle, its health and the counts it balances load by.
pub(super) struct Part {
    /// Partition number.
    pub(super) num: u32,
    /// The store that holds it.
    pub(super) store: Arc<dyn PartitionStore>,
    /// That store's configured name.
    pub(super) store_name: String,
    /// Being drained by a rebalance: takes no new items and serves no lease (see `drain`).
    pub(super) draining: bool,
    /// Whether other servers may change it (counts are then re-read every `health` refresh).
    pub(super) shared: bool,
    /// Open handle; `None` until the first successful probe.
    pub(super) handle: Option<Arc<dyn Partition>>,
    /// Counts as of the last storage call, adjusted by every call since.
    pub(super) counts: PartitionCounts,
    /// Consecutive failures; 0 means healthy.
    pub(super) failures: u32,
    /// When a failed partition is probed again.
    pub(super) retry_at: Ts,
    /// The earliest lifecycle deadline (lease end, schedule, expiry) in the partition.
    pub(super) next_deadline: Option<Ts>,
    /// When a shared partition's counts are re-read.
    pub(super) refresh_at: Ts,
    /// No ready item of the partition has a higher priority than this (an upper bound: raised by produce and by
    /// anything that may make items ready, lowered by what a lease returns).
    pub(super) top_priority: u8,
}

impl Part {
    /// A partition not opened yet: "failed" with a probe due now, so the next pass opens it.
    pub(super) fn unopened(num: u32, store: Arc<dyn PartitionStore>, store_name: String) -> Part {
        let shared = store.shared();
        Part {
            num,
            store,
            store_name,
            draining: false,
            shared,
            handle: None,
            counts: PartitionCounts::default(),
            failures: 1,
            retry_at: Ts::ZERO,
            next_deadline: None,
            refresh_at: Ts::ZERO,
            top_priority: crate::types::MAX_PRIORITY,
        }
    }

    pub(super) fn healthy(&self) -> Option<Arc<dyn Partition>> {
        if self.failures == 0 {
            self.handle.clone()
        } else {
            None
        }
    }

    /// Whether it takes new items and serves leases.
    fn servable(&self) -> bool {
        self.failures == 0 && self.handle.is_some() && !self.draining
    }

    pub(super) fn fail(&mut self, now: Ts, queue: &str, e: &StorageError) {
        // A full store refused items; the partition serves on, and its consumers are what makes room. (Every
        // caller answers its request with the error all the same.)
        if e.kind == crate::error::StorageErrorKind::Full {
            tracing::debug!(queue, partition = self.num, error = %e, "partition full");
            return;
        }
        self.failures = self.failures.saturating_add(1);
        // Back off 500 ms growing by 1.5x up to 5 s, so a dead backend is probed but not hammered.
        let backoff = (500.0 * 1.5f64.powi(self.failures.min(10) as i32 - 1)).min(5000.0);
        self.retry_at = now.add(Duration::from_millis(backoff as u64));
        tracing::warn!(queue, partition = self.num, failures = self.failures, error = %e, "partition failing");
    }

    /// Makes sure the lifecycle runs no later than `t`.
    pub(super) fn pull_deadline(&mut self, t: Ts) {
        self.next_deadline = Some(self.next_deadline.map_or(t, |d| d.min(t)));
    }
}

/// The order leases take partitions in: highest priority, then most ready items, then lowest index.
pub(super) type PickKey = (u8, u64, Reverse<usize>);

/// What one partition contributes to the figures [`Parts`] keeps.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Share {
    counts: PartitionCounts,
    failing: bool,
    /// Its lifecycle deadline, while healthy (a failing partition's lifecycle waits for its recovery).
    deadline: Option<Ts>,
    /// Its next probe, while failing.
    retry: Option<Ts>,
    /// Its next refresh, while healthy and shared.
    refresh: Option<Ts>,
    /// Its load (ready and scheduled items), while it takes new items.
    load: Option<u64>,
    /// Its place in the lease order, while it serves leases and may hold ready items.
    pick: Option<(u8, u64)>,
}

impl Share {
    fn of(p: &Part) -> Share {
        let healthy = p.failures == 0;
        let servable = p.servable();
        Share {
            counts: p.counts,
            failing: !healthy,
            deadline: p.next_deadline.filter(|_| healthy),
            retry: (!healthy).then_some(p.retry_at),
            refresh: (healthy && p.shared).then_some(p.refresh_at),
            load: servable.then(|| p.counts.ready + p.counts.scheduled),
            pick: (servable && (p.counts.ready > 0 || p.shared)).then_some((p.top_priority, p.counts.ready)),
        }
    }
}

/// The task's partitions (index = partition number), read through `Deref` and changed through [`Parts::modify`].
#[derive(Default)]
pub(super) struct Parts {
    list: Vec<Part>,
    /// The sum of every partition's counts.
    totals: PartitionCounts,
    /// Partitions failing (or not opened yet).
    failing: usize,
    /// Partitions on a shared store.
    shared: usize,
    /// Healthy partitions' lifecycle deadlines.
    deadlines: BTreeSet<(Ts, usize)>,
    /// Failing partitions' next probes.
    retries: BTreeSet<(Ts, usize)>,
    /// Healthy shared partitions' next refreshes.
    refreshes: BTreeSet<(Ts, usize)>,
    /// Partitions taking new items, by load (ties: lowest index first).
    by_load: BTreeSet<(u64, usize)>,
    /// Partitions serving leases that may hold ready items, in lease order (best last).
    picks: BTreeSet<PickKey>,
}

impl Deref for Parts {
    type Target = [Part];
    fn deref(&self) -> &[Part] {
        &self.list
    }
}

impl Parts {
    pub(super) fn reserve_exact(&mut self, n: usize) {
        self.list.reserve_exact(n);
    }

    pub(super) fn push(&mut self, p: Part) {
        let i = self.list.len();
        let share = Share::of(&p);
        self.shared += usize::from(p.shared);
        self.list.push(p);
        self.add(i, share);
    }

    /// Removes the partitions from index `n` on (a shrink).
    pub(super) fn split_off(&mut self, n: usize) -> Vec<Part> {
        for i in n..self.list.len() {
            let share = Share::of(&self.list[i]);
            self.remove(i, share);
            self.shared -= usize::from(self.list[i].shared);
        }
        self.list.split_off(n.min(self.list.len()))
    }

    /// Changes partition `i` through `f`, and the figures with it.
    pub(super) fn modify<R>(&mut self, i: usize, f: impl FnOnce(&mut Part) -> R) -> R {
        let p = &mut self.list[i];
        let (before, was_shared) = (Share::of(p), p.shared);
        let r = f(p);
        let (after, is_shared) = (Share::of(p), p.shared);
        if before != after {
            self.remove(i, before);
            self.add(i, after);
        }
        if was_shared != is_shared {
            self.shared = self.shared + usize::from(is_shared) - usize::from(was_shared);
        }
        r
    }

    /// Changes every partition through `f` (a definition update, a rebalance's marks: rare, and about every
    /// partition anyway).
    pub(super) fn modify_all(&mut self, mut f: impl FnMut(&mut Part)) {
        for i in 0..self.list.len() {
            self.modify(i, &mut f);
        }
    }

    /// [`Part::fail`] on partition `i`.
    pub(super) fn fail(&mut self, i: usize, now: Ts, queue: &str, e: &StorageError) {
        self.modify(i, |p| p.fail(now, queue, e));
    }

    /// [`Part::pull_deadline`] on partition `i`.
    pub(super) fn pull_deadline(&mut self, i: usize, t: Ts) {
        self.modify(i, |p| p.pull_deadline(t));
    }

    fn add(&mut self, i: usize, s: Share) {
        self.totals.ready += s.counts.ready;
        self.totals.leased += s.counts.leased;
        self.totals.scheduled += s.counts.scheduled;
        self.failing += usize::from(s.failing);
        if let Some(t) = s.deadline {
            self.deadlines.insert((t, i));
        }
        if let Some(t) = s.retry {
            self.retries.insert((t, i));
        }
        if let Some(t) = s.refresh {
            self.refreshes.insert((t, i));
        }
        if let Some(l) = s.load {
            self.by_load.insert((l, i));
        }
        if let Some((top, ready)) = s.pick {
            self.picks.insert((top, ready, Reverse(i)));
        }
    }

    fn remove(&mut self, i: usize, s: Share) {
        // The totals hold this share: they cannot go below zero.
        self.totals.ready -= s.counts.ready;
        self.totals.leased -= s.counts.leased;
        self.totals.scheduled -= s.counts.scheduled;
        self.failing -= usize::from(s.failing);
        if let Some(t) = s.deadline {
            self.deadlines.remove(&(t, i));
        }
        if let Some(t) = s.retry {
            self.retries.remove(&(t, i));
        }
        if let Some(t) = s.refresh {
            self.refreshes.remove(&(t, i));
        }
        if let Some(l) = s.load {
            self.by_load.remove(&(l, i));
        }
        if let Some((top, ready)) = s.pick {
            self.picks.remove(&(top, ready, Reverse(i)));
        }
    }

    /// Ready, leased and scheduled items over every partition.
    pub(super) fn totals(&self) -> PartitionCounts {
        self.totals
    }

    /// Partitions failing (or not opened yet).
    pub(super) fn failing(&self) -> usize {
        self.failing
    }

    pub(super) fn any_shared(&self) -> bool {
        self.shared > 0
    }

    /// Partitions taking new items.
    pub(super) fn servable(&self) -> usize {
        self.by_load.len()
    }

    /// The earliest lifecycle deadline of a healthy partition.
    pub(super) fn first_deadline(&self) -> Option<Ts> {
        self.deadlines.first().map(|&(t, _)| t)
    }

    /// The earliest probe of a failing partition or refresh of a shared one.
    pub(super) fn first_probe(&self) -> Option<Ts> {
        let retry = self.retries.first().map(|&(t, _)| t);
        let refresh = self.refreshes.first().map(|&(t, _)| t);
        retry.into_iter().chain(refresh).min()
    }

    /// The healthy partitions whose lifecycle deadline is `now` or earlier, by index.
    pub(super) fn due_deadlines(&self, now: Ts) -> Vec<usize> {
        Self::due(&self.deadlines, now, Vec::new())
    }

    /// The failing partitions whose probe and the shared ones whose refresh is `now` or earlier, by index.
    pub(super) fn due_probes(&self, now: Ts) -> Vec<usize> {
        let due = Self::due(&self.retries, now, Vec::new());
        Self::due(&self.refreshes, now, due)
    }

    fn due(set: &BTreeSet<(Ts, usize)>, now: Ts, mut into: Vec<usize>) -> Vec<usize> {
        into.extend(set.range(..=(now, usize::MAX)).map(|&(_, i)| i));
        into.sort_unstable();
        into
    }

    /// The least loaded partition taking new items, not in `exclude` (the partitions a request already failed on).
    pub(super) fn least_loaded(&self, exclude: &[usize]) -> Option<usize> {
        self.by_load
            .iter()
            .map(|&(_, i)| i)
            .find(|i| !exclude.contains(i))
    }

    /// The best partition for a lease below `bound` in lease order (see [`PickKey`]), with its key.
    pub(super) fn best_pick(&self, bound: Bound<PickKey>) -> Option<PickKey> {
        self.picks.range((Bound::Unbounded, bound)).next_back().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Nowhere(bool);

    #[async_trait::async_trait]
    impl PartitionStore for Nowhere {
        fn driver(&self) -> &'static str {
            "nowhere"
        }
        fn shared(&self) -> bool {
            self.0
        }
        async fn open(&self, _q: &str, _p: u32) -> Result<Arc<dyn Partition>, StorageError> {
            Err(StorageError::other("not used"))
        }
        async fn destroy(&self, _q: &str, _p: u32) -> Result<(), StorageError> {
            Ok(())
        }
        async fn close(&self) {}
    }

    /// Partitions `0..n` (every third on a shared store), not opened. Without a handle they take no items and serve
    /// no lease: the load and lease orders are checked by the engine's tests (`many_partitions_*`).
    fn parts(n: usize) -> Parts {
        let mut parts = Parts::default();
        for i in 0..n {
            let store: Arc<dyn PartitionStore> = Arc::new(Nowhere(i % 3 == 0));
            parts.push(Part::unopened(i as u32, store, String::new()));
        }
        parts
    }

    /// What the figures must be: computed by scanning, as the task did before [`Parts`] kept them.
    fn check(p: &Parts, now: Ts) {
        let mut totals = PartitionCounts::default();
        for x in p.iter() {
            totals.ready += x.counts.ready;
            totals.leased += x.counts.leased;
            totals.scheduled += x.counts.scheduled;
        }
        assert_eq!(p.totals(), totals);
        assert_eq!(p.failing(), p.iter().filter(|x| x.failures > 0).count());
        assert_eq!(p.any_shared(), p.iter().any(|x| x.shared));
        assert_eq!(p.servable(), p.iter().filter(|x| x.servable()).count());
        let healthy = || p.iter().filter(|x| x.failures == 0);
        assert_eq!(
            p.first_deadline(),
            healthy().filter_map(|x| x.next_deadline).min()
        );
        let probes = p
            .iter()
            .filter(|x| x.failures > 0)
            .map(|x| x.retry_at)
            .chain(healthy().filter(|x| x.shared).map(|x| x.refresh_at))
            .min();
        assert_eq!(p.first_probe(), probes);
        let due: Vec<usize> = (0..p.len())
            .filter(|&i| p[i].failures == 0 && p[i].next_deadline.is_some_and(|d| d <= now))
            .collect();
        assert_eq!(p.due_deadlines(now), due);
        let mut due: Vec<usize> = (0..p.len())
            .filter(|&i| {
                let x = &p[i];
                (x.failures > 0 && x.retry_at <= now) || (x.failures == 0 && x.shared && x.refresh_at <= now)
            })
            .collect();
        due.sort_unstable();
        assert_eq!(p.due_probes(now), due);
        let mut loads: Vec<(u64, usize)> = (0..p.len())
            .filter(|&i| p[i].servable())
            .map(|i| (p[i].counts.ready + p[i].counts.scheduled, i))
            .collect();
        loads.sort_unstable();
        assert_eq!(p.least_loaded(&[]), loads.first().map(|&(_, i)| i));
    }

    #[test]
    fn the_figures_follow_every_change() {
        let t = |s: i64| Ts(s * 1_000_000);
        let mut p = parts(10);
        check(&p, t(0));
        // Opened: healthy, deadlines and refreshes set.
        for i in 0..10 {
            p.modify(i, |x| {
                x.failures = 0;
                x.next_deadline = Some(t(10 + (i as i64 % 4)));
                x.refresh_at = t(20 + i as i64);
                x.counts.ready = i as u64;
                x.counts.scheduled = 1;
            });
            check(&p, t(11));
        }
        assert_eq!(p.totals().ready, 45);
        assert_eq!(p.first_deadline(), Some(t(10)));
        assert_eq!(p.due_deadlines(t(10)), vec![0, 4, 8]);
        // A pulled deadline moves the earliest; a failure takes the partition's deadline out and its probe in.
        p.pull_deadline(7, t(5));
        assert_eq!(p.first_deadline(), Some(t(5)));
        check(&p, t(5));
        let e = StorageError::unavailable("down");
        p.fail(7, t(6), "q", &e);
        assert_eq!(p.first_deadline(), Some(t(10)));
        assert_eq!(p.failing(), 1);
        assert_eq!(p.first_probe(), Some(t(6).add(Duration::from_millis(500))));
        check(&p, t(7));
        // A full store is no failure: nothing changes.
        p.fail(
            3,
            t(6),
            "q",
            &StorageError::new(crate::error::StorageErrorKind::Full, "full"),
        );
        assert_eq!(p.failing(), 1);
        check(&p, t(30));
        // Counts go down as well as up.
        p.modify(9, |x| x.counts.ready = 0);
        p.modify_all(|x| x.counts.leased += 2);
        assert_eq!(p.totals().leased, 20);
        check(&p, t(30));
        // A shrink takes the removed partitions' shares away.
        let gone = p.split_off(6);
        assert_eq!(gone.len(), 4);
        assert_eq!(p.failing(), 0);
        assert_eq!(p.totals().leased, 12);
        check(&p, t(30));
        p.modify(0, |x| x.shared = false);
        p.modify(3, |x| x.shared = false);
        assert!(!p.any_shared());
        check(&p, t(30));
    }

    #[test]
    fn many_random_changes_keep_the_figures() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % m
        };
        let mut p = parts(64);
        let e = StorageError::unavailable("down");
        for step in 0..5000 {
            let i = next(64) as usize;
            let now = Ts(next(100) as i64);
            match next(6) {
                0 => p.fail(i, now, "q", &e),
                1 => p.modify(i, |x| {
                    x.failures = 0;
                    x.next_deadline = (next(4) > 0).then(|| Ts(next(100) as i64));
                    x.refresh_at = Ts(next(100) as i64);
                }),
                2 => p.pull_deadline(i, Ts(next(100) as i64)),
                3 => p.modify(i, |x| x.counts.ready = next(10)),
                4 => p.modify(i, |x| {
                    x.counts.leased = next(10);
                    x.counts.scheduled = next(10);
                }),
                _ => p.modify(i, |x| x.next_deadline = None),
            }
            if step % 50 == 0 {
                check(&p, Ts(next(100) as i64));
            }
        }
        check(&p, Ts(50));
    }
}
