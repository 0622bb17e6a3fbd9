//! Browsing a partition's items without leasing them, and the record of who holds the leases this server handed
//! out (storage keeps a lease's deadline, not its holder).
//!
//! A browse reads the partition in id order through [`crate::storage::Partition::list`] and filters by state and
//! priority. The read per request is bounded ([`SCAN_BUDGET`] items), so a filter that matches little (leased items
//! deep in a long ready queue) returns a short page with a pivot to continue from instead of reading the whole
//! partition in one request.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use super::QueueTask;
use crate::engine::{BrowsePage, BrowseRequest, BrowseState, BrowsedItem};
use crate::error::QueueError;
use crate::time::Ts;
use crate::types::{Item, ItemId};

/// Most items one browse reads from storage.
const SCAN_BUDGET: usize = 10_000;
/// Most leases whose holder is remembered; beyond this new leases are not recorded (browse shows no holder for
/// them), so a queue with millions of leases in flight does not grow this record without bound.
const MAX_HOLDERS: usize = 1_000_000;
/// Most ids kept in lease batches (see [`Holders`]): a batch stays while any of its leases is held, so a few
/// long-held leases can keep the ids of their whole batches; beyond this, new leases are not recorded either.
const MAX_BATCHED_IDS: usize = 4 * MAX_HOLDERS;
/// Most batches [`Holders::prune`] drops per pass, so one pass after a long pause stays short.
const PRUNE_BATCHES: usize = 10_000;
/// Below this many slots the tables keep their room (see `Holders::shrink`).
const SHRINK_MIN: usize = 1024;

/// A hash map keyed by item: ids are assigned by the server, not chosen by clients, so a fast non-keyed hash is
/// safe here, and cheaper than SipHash on the lease path.
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<rustc_hash::FxHasher>>;

/// The lease call an item's holder was recorded by.
#[derive(Debug)]
struct Holder {
    client: Arc<str>,
    deadline: Ts,
    batch: u64,
}

/// The leases one lease call (or one extension) handed out with one deadline, for [`Holders::prune`].
#[derive(Debug)]
struct Batch {
    deadline: Ts,
    partition: u32,
    ids: Vec<u64>,
    /// How many of `ids` still name this batch in `by_item`; the batch goes when none does.
    live: usize,
}

/// Who holds each lease this server handed out, until it is completed, retried or its deadline passes.
///
/// Leases are recorded per lease call, not per item: a call's items share a deadline, so one batch entry (in a
/// hash map by number and an ordered set by deadline) stands for all of them and each item costs one insert into
/// `by_item`. A completion removes its items from `by_item` and counts them off their batch, which goes once
/// empty; a batch whose deadline passes drops its remaining items. The record therefore holds the leases in
/// flight, not every lease handed out within the lease timeout (an ordered entry per leased item, kept until its
/// deadline, grew to six million at 100,000 leases a second with a one-minute timeout: docs/benchmarks.md).
#[derive(Debug, Default)]
pub(super) struct Holders {
    by_item: FastMap<(u32, u64), Holder>,
    batches: FastMap<u64, Batch>,
    /// (deadline, batch) of every batch, to drop expired ones without a scan.
    by_deadline: BTreeSet<(Ts, u64)>,
    /// Ids held in `batches`.
    batched_ids: usize,
    next_batch: u64,
}

impl Holders {
    /// Records that `client` holds `items` of `partition` (one lease call's: they share a deadline).
    pub(super) fn record(&mut self, partition: u32, client: &str, items: &[Item]) {
        if items.is_empty() {
            return;
        }
        let client: Arc<str> = client.into();
        // Items of one call share their deadline; should one differ, it gets a batch of its own.
        let mut rest = items;
        while !rest.is_empty() {
            let deadline = rest[0].lease_deadline;
            let n = rest.iter().take_while(|it| it.lease_deadline == deadline).count();
            let (now, later) = rest.split_at(n);
            self.add(partition, &client, deadline, now.iter().map(|it| it.id.0));
            rest = later;
        }
    }

    /// Records a batch of `ids` held by `client` until `deadline`, unless the record is full.
    fn add(
        &mut self,
        partition: u32,
        client: &Arc<str>,
        deadline: Ts,
        ids: impl ExactSizeIterator<Item = u64>,
    ) {
        let n = ids.len();
        if self.by_item.len() + n > MAX_HOLDERS || self.batched_ids + n > MAX_BATCHED_IDS {
            return;
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        let mut kept = Vec::with_capacity(n);
        for id in ids {
            let old = self.by_item.insert(
                (partition, id),
                Holder {
                    client: client.clone(),
                    deadline,
                    batch,
                },
            );
            if let Some(old) = old {
                self.count_off(old.batch);
            }
            kept.push(id);
        }
        self.batched_ids += kept.len();
        self.by_deadline.insert((deadline, batch));
        self.batches.insert(
            batch,
            Batch {
                deadline,
                partition,
                live: kept.len(),
                ids: kept,
            },
        );
    }

    /// One of `batch`'s items no longer names it; drops the batch when none does.
    fn count_off(&mut self, batch: u64) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.live -= 1;
        if b.live == 0 {
            let deadline = b.deadline;
            self.drop_batch(batch, deadline);
        }
    }

    fn drop_batch(&mut self, batch: u64, deadline: Ts) {
        if let Some(b) = self.batches.remove(&batch) {
            self.batched_ids -= b.ids.len();
        }
        self.by_deadline.remove(&(deadline, batch));
    }

    /// Moves the deadlines of extended leases (their holders stay).
    pub(super) fn extend(&mut self, partition: u32, ids: &[ItemId], deadline: Ts) {
        // Each extended item moves to one new batch per holder (usually one holder per call).
        let mut by_client: Vec<(Arc<str>, Vec<u64>)> = Vec::new();
        for id in ids {
            let Some(h) = self.by_item.remove(&(partition, id.0)) else {
                continue;
            };
            self.count_off(h.batch);
            match by_client
                .iter_mut()
                .find(|(c, _)| Arc::ptr_eq(c, &h.client) || **c == *h.client)
            {
                Some((_, v)) => v.push(id.0),
                None => by_client.push((h.client, vec![id.0])),
            }
        }
        for (client, v) in by_client {
            self.add(partition, &client, deadline, v.into_iter());
        }
    }

    /// Forgets completed or retried leases.
    pub(super) fn release(&mut self, partition: u32, ids: &[ItemId]) {
        for id in ids {
            if let Some(h) = self.by_item.remove(&(partition, id.0)) {
                self.count_off(h.batch);
            }
        }
        self.shrink();
    }

    /// Gives back the room of a burst of leases once it has been completed or has expired: a busy queue never
    /// unloads, and kept the tables of its largest burst (up to the caps, some 60 MB) for as long as it ran. O(1)
    /// unless it shrinks, which copies what is left and comes again only once half of that has gone.
    fn shrink(&mut self) {
        crate::shrink::map(&mut self.by_item, SHRINK_MIN);
        crate::shrink::map(&mut self.batches, SHRINK_MIN);
    }

    /// Forgets leases whose deadline passed (bounded work per call).
    pub(super) fn prune(&mut self, now: Ts) {
        for _ in 0..PRUNE_BATCHES {
            let Some(&(deadline, batch)) = self.by_deadline.first() else {
                return;
            };
            if deadline > now {
                return;
            }
            self.by_deadline.pop_first();
            let Some(b) = self.batches.remove(&batch) else {
                continue;
            };
            self.batched_ids -= b.ids.len();
            for id in b.ids {
                if let Entry::Occupied(e) = self.by_item.entry((b.partition, id)) {
                    if e.get().batch == batch {
                        e.remove();
                    }
                }
            }
            // Here rather than once at the end, which the returns above skip: O(1) per batch.
            self.shrink();
        }
    }

    /// The holder of a leased item, when known.
    fn of(&self, partition: u32, it: &Item) -> String {
        match self.by_item.get(&(partition, it.id.0)) {
            Some(h) if h.deadline == it.lease_deadline => h.client.to_string(),
            _ => String::new(),
        }
    }

    /// Leases and batches recorded (for tests).
    #[cfg(test)]
    fn sizes(&self) -> (usize, usize, usize, usize) {
        (
            self.by_item.len(),
            self.batches.len(),
            self.by_deadline.len(),
            self.batched_ids,
        )
    }
}

impl QueueTask {
    /// Answers one browse request.
    pub(super) async fn browse(&mut self, req: BrowseRequest) -> Result<BrowsePage, QueueError> {
        let h = self.target(req.partition)?;
        let scheduled = req.state == BrowseState::Scheduled;
        let mut page = BrowsePage::default();
        let mut pivot = req.pivot;
        let mut scanned = 0usize;
        // A page is bounded in bytes as a lease is: each storage read, and the items answered.
        let max_bytes = self.config.limits.max_lease_bytes;
        let mut bytes = 0u64;
        while scanned < SCAN_BUDGET {
            let chunk = (SCAN_BUDGET - scanned).min(req.limit.max(100) * 2);
            let (items, capped) = h
                .list_within(pivot, chunk, scheduled, max_bytes)
                .await
                .map_err(|e| QueueError::from_storage(&e))?;
            scanned += items.len();
            let end = items.len() < chunk && !capped;
            let last = items.last().map(|it| it.id);
            for it in items {
                let wanted = match req.state {
                    BrowseState::Queued | BrowseState::Scheduled => true,
                    BrowseState::Ready => !it.is_leased,
                    BrowseState::Leased => it.is_leased,
                } && req.priority.is_none_or(|p| p == it.priority);
                if !wanted {
                    continue;
                }
                let size = crate::storage::item_bytes(&it);
                if page.items.len() == req.limit || (!page.items.is_empty() && bytes + size > max_bytes) {
                    page.next_pivot = Some(it.id);
                    return Ok(page);
                }
                bytes += size;
                let holder = if it.is_leased {
                    self.holders.of(req.partition, &it)
                } else {
                    String::new()
                };
                page.items.push(BrowsedItem { item: it, holder });
            }
            match last {
                Some(id) if !end => pivot = Some(ItemId(id.0.saturating_add(1))),
                _ => return Ok(page),
            }
        }
        page.next_pivot = pivot;
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leased(ids: std::ops::Range<u64>, deadline: i64) -> Vec<Item> {
        ids.map(|id| Item {
            id: ItemId(id),
            is_leased: true,
            lease_deadline: Ts(deadline),
            ..Item::default()
        })
        .collect()
    }

    fn holder(h: &Holders, partition: u32, id: u64, deadline: i64) -> String {
        h.of(partition, &leased(id..id + 1, deadline)[0])
    }

    #[test]
    fn a_completed_lease_call_leaves_nothing_behind() {
        let mut h = Holders::default();
        h.record(0, "w1", &leased(1..101, 60));
        h.record(1, "w2", &leased(1..51, 60));
        assert_eq!(h.sizes(), (150, 2, 2, 150));
        assert_eq!(holder(&h, 0, 7, 60), "w1");
        assert_eq!(holder(&h, 1, 7, 60), "w2");
        // Another deadline is another lease of the item: no holder known for it.
        assert_eq!(holder(&h, 0, 7, 61), "");

        let ids: Vec<ItemId> = (1..100).map(ItemId).collect();
        h.release(0, &ids);
        assert_eq!(
            h.sizes(),
            (51, 2, 2, 150),
            "the batch stays while item 100 is held"
        );
        assert_eq!(holder(&h, 0, 100, 60), "w1");
        assert_eq!(holder(&h, 0, 7, 60), "");
        h.release(0, &[ItemId(100)]);
        h.release(1, &(1..51).map(ItemId).collect::<Vec<_>>());
        assert_eq!(h.sizes(), (0, 0, 0, 0));
    }

    #[test]
    fn a_burst_of_leases_gives_its_room_back() {
        let mut h = Holders::default();
        for call in 0..1000u64 {
            h.record(0, "w", &leased(call * 100..call * 100 + 100, 60));
        }
        assert!(h.by_item.capacity() >= 100_000);
        for call in 0..1000u64 {
            h.release(0, &(call * 100..call * 100 + 100).map(ItemId).collect::<Vec<_>>());
        }
        assert_eq!(h.sizes(), (0, 0, 0, 0));
        assert!(
            h.by_item.capacity() <= 2 * SHRINK_MIN && h.batches.capacity() <= 2 * SHRINK_MIN,
            "{} / {} slots kept",
            h.by_item.capacity(),
            h.batches.capacity()
        );
        // The same once the leases expire instead.
        for call in 0..1000u64 {
            h.record(0, "w", &leased(call * 100..call * 100 + 100, 60 + call as i64));
        }
        for t in 0..2000 {
            h.prune(Ts(60 + t));
        }
        assert_eq!(h.sizes(), (0, 0, 0, 0));
        assert!(
            h.by_item.capacity() <= 2 * SHRINK_MIN && h.batches.capacity() <= 2 * SHRINK_MIN,
            "{} / {} slots kept after expiry",
            h.by_item.capacity(),
            h.batches.capacity()
        );
    }

    #[test]
    fn many_leases_completed_within_the_timeout_keep_only_those_in_flight() {
        // A minute's timeout, leases completed at once: the record must not hold every lease of the minute.
        let mut h = Holders::default();
        for call in 0..10_000u64 {
            let ids = call * 100..call * 100 + 100;
            h.record((call % 4) as u32, "w", &leased(ids.clone(), 60_000 + call as i64));
            h.release((call % 4) as u32, &ids.map(ItemId).collect::<Vec<_>>());
        }
        assert_eq!(h.sizes(), (0, 0, 0, 0));
        h.record(0, "w", &leased(5..10, 1));
        assert_eq!(h.sizes(), (5, 1, 1, 5));
    }

    #[test]
    fn expired_leases_are_pruned_and_a_new_lease_of_the_item_is_kept() {
        let mut h = Holders::default();
        h.record(0, "old", &leased(1..11, 100));
        // Items 1..5 were leased again after their lease expired (the lifecycle requeued them) by another worker.
        h.record(0, "new", &leased(1..6, 300));
        assert_eq!(h.sizes(), (10, 2, 2, 15));
        h.prune(Ts(99));
        assert_eq!(h.sizes(), (10, 2, 2, 15));
        h.prune(Ts(100));
        assert_eq!(h.sizes(), (5, 1, 1, 5));
        assert_eq!(holder(&h, 0, 3, 300), "new");
        assert_eq!(holder(&h, 0, 8, 100), "");
        h.prune(Ts(1_000));
        assert_eq!(h.sizes(), (0, 0, 0, 0));
    }

    #[test]
    fn an_extension_moves_the_deadline_and_keeps_the_holder() {
        let mut h = Holders::default();
        h.record(2, "w1", &leased(1..4, 100));
        h.record(2, "w2", &leased(4..7, 100));
        // One extension call covering leases of both holders, and an id nobody holds.
        h.extend(2, &[ItemId(2), ItemId(5), ItemId(99)], Ts(500));
        assert_eq!(holder(&h, 2, 2, 500), "w1");
        assert_eq!(holder(&h, 2, 5, 500), "w2");
        assert_eq!(holder(&h, 2, 2, 100), "");
        assert_eq!(holder(&h, 2, 1, 100), "w1");
        h.prune(Ts(100));
        assert_eq!(holder(&h, 2, 1, 100), "");
        assert_eq!(
            holder(&h, 2, 2, 500),
            "w1",
            "an extended lease outlives its first deadline"
        );
        assert_eq!(h.sizes(), (2, 2, 2, 2));
        h.release(2, &[ItemId(2), ItemId(5)]);
        assert_eq!(h.sizes(), (0, 0, 0, 0));
    }

    #[test]
    fn items_of_one_call_with_different_deadlines_get_batches_of_their_own() {
        let mut h = Holders::default();
        let mut items = leased(1..3, 100);
        items.extend(leased(3..5, 200));
        h.record(0, "w", &items);
        assert_eq!(h.sizes(), (4, 2, 2, 4));
        h.prune(Ts(150));
        assert_eq!(h.sizes(), (2, 1, 1, 2));
        assert_eq!(holder(&h, 0, 4, 200), "w");
    }

    #[test]
    fn the_record_is_bounded() {
        // Full of leases: a new lease call is not recorded at all (no partial batch).
        let mut h = Holders::default();
        for call in 0..(MAX_HOLDERS / 1000) as u64 {
            h.record(0, "w", &leased(call * 1000..call * 1000 + 1000, 100));
        }
        assert_eq!(h.sizes().0, MAX_HOLDERS);
        h.record(1, "w", &leased(0..10, 100));
        assert_eq!(holder(&h, 1, 3, 100), "");
        assert_eq!(h.sizes().0, MAX_HOLDERS);
        h.prune(Ts(100));
        assert_eq!(h.sizes(), (0, 0, 0, 0));

        // One lease of each call held, the rest completed: each batch keeps its ids, so those are bounded too.
        for call in 0..(MAX_BATCHED_IDS / 1000) as u64 {
            h.record(0, "w", &leased(call * 1000..call * 1000 + 1000, 100));
            h.release(
                0,
                &(call * 1000 + 1..call * 1000 + 1000)
                    .map(ItemId)
                    .collect::<Vec<_>>(),
            );
        }
        let calls = MAX_BATCHED_IDS / 1000;
        assert_eq!(h.sizes(), (calls, calls, calls, MAX_BATCHED_IDS));
        h.record(1, "w", &leased(0..10, 100));
        assert_eq!(holder(&h, 1, 3, 100), "");
        // Pruning drops at most PRUNE_BATCHES batches per pass.
        h.prune(Ts(100));
        assert_eq!(h.sizes().1, calls.saturating_sub(PRUNE_BATCHES));
        while h.sizes().1 > 0 {
            h.prune(Ts(100));
        }
        assert_eq!(h.sizes(), (0, 0, 0, 0));
        h.record(1, "w", &leased(0..10, 100));
        assert_eq!(holder(&h, 1, 3, 100), "w");
    }
}
