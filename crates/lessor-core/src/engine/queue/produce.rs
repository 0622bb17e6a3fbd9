//! Produce: every produce of a pass goes to the least-loaded healthy partition, one storage call per partition;
//! requests whose partition fails move to another healthy partition in the next round.

use std::sync::atomic::Ordering;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use futures::future::join_all;

use super::dedup::{HashSet128, KeyHash};
use super::{QueueTask, Reply};
use crate::engine::ProduceItem;
use crate::error::{QueueError, StorageError};
use crate::time::Ts;
use crate::types::NewItem;

/// A produce request on its way to storage: items, reply, the partitions it already failed on, and the hashes of
/// its items' dedup keys. Before [`QueueTask::dedup_filter`] they are one per item (`None`: no key; empty: no item
/// has one), as the caller computed them; after it, the keys of the items left to store, entered into the
/// queue-wide index when the write succeeds.
type ProduceRequest = (Vec<NewItem>, Reply<()>, Vec<usize>, Keys);
/// A produce request as the queue's task receives it: items, their key hashes (see [`ProduceRequest`]), the
/// caller's deadline and the reply.
pub(super) type IncomingProduce = (Vec<ProduceItem>, Vec<Option<KeyHash>>, Ts, Reply<()>);
/// See [`ProduceRequest`].
enum Keys {
    PerItem(Vec<Option<KeyHash>>),
    /// The keys the request claimed, and whether some of its items were duplicates (its answer then vouches for
    /// earlier writes: see [`super::Reply::send_vouching`]).
    Stored(Vec<KeyHash>, bool),
}

impl Keys {
    /// The keys the request claimed in the index.
    fn stored(self) -> Vec<KeyHash> {
        match self {
            Keys::Stored(k, _) => k,
            // Only requests without keys skip the filter.
            Keys::PerItem(k) => k.into_iter().flatten().collect(),
        }
    }
}
/// Produce requests bound for one partition.
type ProduceGroup = Vec<ProduceRequest>;

impl QueueTask {
    /// The healthy partitions by load (ready and scheduled items; ties: lowest number), least loaded first, for
    /// one round of a pass's produce requests: each request takes the top one and puts it back with its items
    /// counted, so the next goes elsewhere. It replaced a scan of every partition per request: 2,000 single-item
    /// calls from 50 clients into 65,535 partitions took 4.4 s, now 2.5 s (0.38 s with 4 partitions; what is left
    /// is the pass's other scans of the partitions).
    fn by_load(&self) -> BinaryHeap<Reverse<(u64, usize)>> {
        self.parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.failures == 0 && p.handle.is_some() && !p.draining)
            .map(|(i, p)| Reverse((p.counts.ready + p.counts.scheduled, i)))
            .collect()
    }

    /// Takes the least loaded partition of `heap` not in `exclude` (the partitions that already failed this
    /// request), leaving the others in it.
    fn least_loaded(heap: &mut BinaryHeap<Reverse<(u64, usize)>>, exclude: &[usize]) -> Option<usize> {
        let mut skipped = Vec::new();
        let found = loop {
            match heap.pop() {
                Some(Reverse((load, i))) if exclude.contains(&i) => skipped.push(Reverse((load, i))),
                Some(Reverse((_, i))) => break Some(i),
                None => break None,
            }
        };
        heap.extend(skipped);
        found
    }

    /// Stores the produce requests of one pass. A request whose caller already gave up (its request_timeout
    /// passed while it waited in the inbox) is answered with a timeout and not stored, so a producer that retries
    /// after the timeout does not find its items stored twice.
    pub(super) async fn produce(&mut self, requests: Vec<IncomingProduce>, now: Ts) {
        let threshold = now.add(self.config.limits.schedule_threshold);
        let expire = self.info.expire_timeout;
        let mut pending: Vec<ProduceRequest> = requests
            .into_iter()
            .filter_map(|(items, keys, deadline, reply)| {
                if reply.is_closed() {
                    return None;
                }
                if deadline <= now {
                    let _ = reply.send(Err(QueueError::RequestTimeout("produce")));
                    return None;
                }
                Some((items, keys, reply))
            })
            .map(|(items, keys, reply)| {
                let items = items
                    .into_iter()
                    .map(|it| {
                        let scheduled = it.enqueue_at >= threshold;
                        let enqueue_at = if scheduled { it.enqueue_at } else { Ts::ZERO };
                        // Expiry counts from when the item becomes ready, so a far schedule does not expire on arrival.
                        let start = if scheduled { it.enqueue_at } else { now };
                        NewItem {
                            source_id: String::new(),
                            enqueue_at,
                            expire_deadline: start.add(expire),
                            created_at: now,
                            reference: it.reference,
                            encoding: it.encoding,
                            kind: it.kind,
                            payload: it.payload,
                            priority: it.priority,
                            dedup_id: it.dedup_id,
                            dedup_until: Ts::ZERO,
                        }
                    })
                    .collect();
                (items, reply, Vec::new(), Keys::PerItem(keys))
            })
            .collect();
        // Requests that share a dedup key with an earlier request of this pass wait until that one's write is
        // known: then the key is in the index (the later request is a duplicate) or it is not (the write failed,
        // and the later request stores the item). So a duplicate is never acknowledged for an item that failed.
        loop {
            let (now_batch, later) = self.dedup_filter(pending, now);
            self.store(now_batch, now).await;
            if later.is_empty() {
                return;
            }
            pending = later;
        }
    }

    /// Splits requests into those to store now (items whose dedup key is known dropped: they are acknowledged
    /// without being stored again) and those that must wait for an earlier request of the pass with a common key.
    fn dedup_filter(
        &mut self,
        pending: Vec<ProduceRequest>,
        now: Ts,
    ) -> (Vec<ProduceRequest>, Vec<ProduceRequest>) {
        if pending
            .iter()
            .all(|r| matches!(&r.3, Keys::PerItem(k) if k.is_empty()))
        {
            return (pending, Vec::new());
        }
        let until = now.add(self.info.effective_dedup_window());
        // Every claim of this round ends at `until`, so a claim refused with that end met a key claimed in this
        // round: earlier in the same request (a repeated key: a duplicate), or by an earlier request whose write is
        // not known yet, which this request must wait for. Telling the two apart needs the earlier requests' keys
        // as a set, built only when such a refusal comes: the usual pass, with no key twice, pays no set at all
        // (where a set filled with every key of the pass cost each key an insert and a lookup).
        let mut earlier: Option<HashSet128> = None;
        let mut claimed_before = 0usize;
        let mut store: Vec<ProduceRequest> = Vec::with_capacity(pending.len());
        let mut later = Vec::new();
        for (mut items, reply, tried, keys) in pending {
            let hashes = match keys {
                Keys::PerItem(h) if h.is_empty() => {
                    store.push((items, reply, tried, Keys::Stored(Vec::new(), false)));
                    continue;
                }
                Keys::PerItem(h) => h,
                // Not reached: requests are filtered once per round of the pass, before they are stored.
                Keys::Stored(..) => {
                    store.push((items, reply, tried, keys));
                    continue;
                }
            };
            // The index's memory is bounded: a request whose new keys would take the queue past the limit stores
            // nothing (its duplicates are not acknowledged either: the client retries the whole request).
            // (Keys claimed earlier in the pass are in the index already.)
            let max = self.config.limits.max_dedup_keys;
            if self.dedup.len() + hashes.len() > max {
                self.dedup.purge_for_limit(now);
                let new = hashes
                    .iter()
                    .flatten()
                    .filter(|h| !self.dedup.contains(**h, now))
                    .count();
                if new > 0 && self.dedup.len() + new > max {
                    let _ = reply.send(Err(QueueError::DedupFull(max)));
                    continue;
                }
            }
            // All of the request's table lines are fetched at once before the claims, which then hit the cache.
            self.dedup.warm(hashes.iter().flatten().copied());
            let mut keys = Vec::with_capacity(hashes.iter().flatten().count());
            // Positions of the duplicates (usually none, so usually no allocation).
            let mut skip = Vec::new();
            let mut wait = false;
            for (i, h) in hashes.iter().enumerate() {
                let Some(h) = *h else { continue };
                // Claimed in the index now, and given back if the write fails (see `store`); refused when live.
                match self.dedup.claim(h, until, now) {
                    Ok(()) => keys.push(h),
                    Err(end) => {
                        // Live: a duplicate, unless an earlier request of this round claimed it.
                        if end == until && claimed_before > 0 {
                            let set = earlier.get_or_insert_with(|| {
                                let mut set =
                                    HashSet128::with_capacity_and_hasher(claimed_before, Default::default());
                                for r in &store {
                                    if let Keys::Stored(k, _) = &r.3 {
                                        set.extend(k.iter().copied());
                                    }
                                }
                                set
                            });
                            if set.contains(&h) {
                                wait = true;
                                break;
                            }
                        }
                        skip.push(i);
                    }
                }
            }
            if wait {
                // Nothing of this request is decided yet: its claims are given back, and it comes again in the
                // next round, after the write of the request it shares a key with.
                for h in keys {
                    self.dedup.release(h);
                }
                later.push((items, reply, tried, Keys::PerItem(hashes)));
                continue;
            }
            let mut i = 0;
            let mut next_skip = skip.iter().peekable();
            items.retain_mut(|it| {
                let at = i;
                i += 1;
                if next_skip.next_if_eq(&&at).is_some() {
                    return false;
                }
                if hashes.get(at).is_some_and(Option::is_some) {
                    it.dedup_until = until;
                }
                true
            });
            if !skip.is_empty() {
                self.metrics
                    .deduplicated
                    .fetch_add(skip.len() as u64, Ordering::Relaxed);
            }
            if items.is_empty() {
                // Every item is a duplicate: the answer says they are stored, so it waits until the writes of
                // earlier passes are durable (the writes of this pass's earlier rounds are in its own gate).
                let _ = reply.send_vouching(Ok(()), &self.unsettled);
            } else {
                claimed_before += keys.len();
                if let Some(set) = &mut earlier {
                    set.extend(keys.iter().copied());
                }
                store.push((items, reply, tried, Keys::Stored(keys, !skip.is_empty())));
            }
        }
        (store, later)
    }

    /// Gives back the dedup keys a request claimed when its write failed: a retry stores the items.
    fn release(&mut self, keys: Keys) {
        for h in keys.stored() {
            self.dedup.release(h);
        }
    }

    /// Writes produce requests, one storage call per partition per round.
    async fn store(&mut self, mut pending: Vec<ProduceRequest>, now: Ts) {
        // Each round writes every pending request to one partition (one storage call per partition); requests
        // whose partition failed fail over to another healthy partition in the next round.
        while !pending.is_empty() {
            let mut groups: HashMap<usize, ProduceGroup> = HashMap::new();
            let mut by_load = self.by_load();
            for (items, reply, tried, keys) in pending.drain(..) {
                match Self::least_loaded(&mut by_load, &tried) {
                    Some(i) => {
                        let c = &mut self.parts[i].counts;
                        c.ready += items.len() as u64; // provisional, so the next request goes elsewhere
                        by_load.push(Reverse((c.ready + c.scheduled, i)));
                        groups.entry(i).or_default().push((items, reply, tried, keys));
                    }
                    None => {
                        self.release(keys);
                        let _ = reply.send(Err(QueueError::NoAvailablePartitions));
                    }
                }
            }
            // A copy of the items is kept for failover only when another healthy partition could take them;
            // otherwise they move into the call (a key costs an allocation and a copy per item otherwise).
            let spare = self
                .parts
                .iter()
                .filter(|p| p.failures == 0 && p.handle.is_some() && !p.draining)
                .count()
                > 1;
            let calls = groups.into_iter().map(|(i, mut reqs)| {
                let h = self.parts[i].healthy();
                let shared = self.parts[i].shared;
                let sums: Vec<Summary> = reqs.iter().map(|r| Summary::of(&r.0)).collect();
                let all: Vec<NewItem> = if spare {
                    reqs.iter().flat_map(|r| r.0.iter().cloned()).collect()
                } else {
                    reqs.iter_mut().flat_map(|r| std::mem::take(&mut r.0)).collect()
                };
                // A shared store reports which items it stored (see the `Ok` arm below); which of them carry a
                // key is read before the items move into the call.
                let keyed: Vec<bool> = if shared {
                    all.iter().map(|it| !it.dedup_id.is_empty()).collect()
                } else {
                    Vec::new()
                };
                async move {
                    let res = match h {
                        Some(h) if shared => h.produce_reporting(all).await.map(|(_, stored)| Some(stored)),
                        Some(h) => h.produce(all).await.map(|_| None),
                        None => Err(StorageError::unavailable("partition closed")),
                    };
                    (i, reqs, sums, keyed, res)
                }
            });
            for (i, reqs, sums, keyed, res) in join_all(calls).await {
                let total: u64 = sums.iter().map(|s| s.ready + s.scheduled).sum();
                self.parts[i].counts.ready -= total;
                match res {
                    Ok(outcome) => {
                        let mut ready = 0;
                        let mut scheduled = 0;
                        let mut top = self.parts[i].top_priority;
                        // The items' keys were claimed in the index before the write (see `dedup_filter`).
                        let mut at = 0;
                        for ((_, reply, _, keys), sum) in reqs.into_iter().zip(sums) {
                            let sum_len = (sum.ready + sum.scheduled) as usize;
                            ready += sum.ready;
                            scheduled += sum.scheduled;
                            top = top.max(sum.top);
                            if let Some(t) = sum.earliest {
                                self.parts[i].pull_deadline(t);
                            }
                            if matches!(keys, Keys::Stored(_, true)) {
                                let _ = reply.send_vouching(Ok(()), &self.unsettled);
                            } else {
                                let _ = reply.send(Ok(()));
                            }
                            // A shared store checked the keys itself, against records other servers wrote too,
                            // and skipped the items whose key it holds: a claim kept for one of those would start
                            // a window of its own for an item this server never stored, and answer "duplicate"
                            // after the stored record's window ended (an item acknowledged and not stored). Such
                            // claims are given back; the store's record answers the next produce of the key.
                            let span = at..at + sum_len;
                            if let (Some(mine), Some(keyed), Keys::Stored(claimed, _)) = (
                                outcome.as_ref().and_then(|s| s.get(span.clone())),
                                keyed.get(span),
                                keys,
                            ) {
                                let mut claimed = claimed.into_iter();
                                for (s, k) in mine.iter().zip(keyed) {
                                    if !*k {
                                        continue;
                                    }
                                    let Some(h) = claimed.next() else { break };
                                    if !*s {
                                        self.dedup.release(h);
                                        self.metrics.deduplicated.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            at += sum_len;
                        }
                        // Items a shared store skipped as duplicates were not stored: they count neither as
                        // produced nor in the depth (which of them were scheduled is not known here; the depth is
                        // re-read from a shared store within `shared_refresh` anyway).
                        let skipped = outcome
                            .as_ref()
                            .map_or(0, |o| o.iter().filter(|stored| !**stored).count() as u64);
                        let p = &mut self.parts[i];
                        p.counts.ready += ready.saturating_sub(skipped);
                        p.top_priority = top;
                        p.counts.scheduled += scheduled.saturating_sub(skipped.saturating_sub(ready));
                        self.metrics
                            .produced
                            .fetch_add((ready + scheduled).saturating_sub(skipped), Ordering::Relaxed);
                    }
                    Err(e) if !spare => {
                        // No other partition could take them (and their items moved into the call).
                        let name = self.info.name.clone();
                        if !e.partition_healthy() {
                            self.parts[i].fail(now, &name, &e);
                        }
                        for (_, reply, _, keys) in reqs {
                            self.release(keys);
                            let _ = reply.send(Err(QueueError::from_storage(&e)));
                        }
                    }
                    Err(e) => {
                        let name = self.info.name.clone();
                        if !e.partition_healthy() {
                            self.parts[i].fail(now, &name, &e);
                        }
                        for (items, reply, mut tried, keys) in reqs {
                            tried.push(i);
                            if tried.len() >= self.parts.len() {
                                self.release(keys);
                                let _ = reply.send(Err(QueueError::from_storage(&e)));
                            } else {
                                pending.push((items, reply, tried, keys));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a stored produce request changes in the queue task's bookkeeping, taken before its items go to storage.
struct Summary {
    ready: u64,
    scheduled: u64,
    /// Highest priority among its ready items.
    top: u8,
    /// Earliest schedule or expiry deadline among its items.
    earliest: Option<Ts>,
}

impl Summary {
    fn of(items: &[NewItem]) -> Summary {
        let mut s = Summary {
            ready: 0,
            scheduled: 0,
            top: 0,
            earliest: None,
        };
        for it in items {
            let mut pull = |t: Ts| s.earliest = Some(s.earliest.map_or(t, |d| d.min(t)));
            if it.enqueue_at.is_zero() {
                pull(it.expire_deadline);
                s.ready += 1;
                s.top = s.top.max(it.priority);
            } else {
                pull(it.enqueue_at);
                pull(it.expire_deadline);
                s.scheduled += 1;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::QueueTask;

    #[test]
    fn the_least_loaded_partition_not_excluded_is_taken_and_the_rest_stay() {
        let mut heap: BinaryHeap<Reverse<(u64, usize)>> = [(5, 0), (1, 1), (1, 2), (0, 3), (9, 4)]
            .into_iter()
            .map(Reverse)
            .collect();
        // Ties go to the lowest number; excluded partitions are skipped but not lost.
        assert_eq!(QueueTask::least_loaded(&mut heap, &[3, 1]), Some(2));
        assert_eq!(heap.len(), 4);
        assert_eq!(QueueTask::least_loaded(&mut heap, &[]), Some(3));
        assert_eq!(QueueTask::least_loaded(&mut heap, &[1, 0, 4]), None);
        assert_eq!(heap.len(), 3);
        assert_eq!(QueueTask::least_loaded(&mut heap, &[]), Some(1));
    }
}
