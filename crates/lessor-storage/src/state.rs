//! The item state machine of one partition over in-memory ordered indexes.
//!
//! [`PartitionState`] implements every rule of the [`lessor_core::storage::Partition`] contract synchronously and
//! reports each change as a [`Changes`] set (items written, ids removed). The memory backend is this state behind a
//! mutex; a persistent backend can keep the same state as its index and write each change set to disk, so rules
//! live in one place. Every operation costs O(log n) per item touched: heads of ordered sets, never scans.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use lessor_core::error::ItemError;
use lessor_core::storage::{LifecycleOutcome, LifecyclePolicy, RetryAction, RetryOp, RetryOutcome};
use lessor_core::time::Ts;
use lessor_core::types::{ClearRequest, Item, ItemId, NewItem, PartitionCounts, PartitionStats};

/// What an operation changed, for a persistent backend to write in one atomic batch.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Items written (inserted or replaced), keyed by their id.
    pub put: Vec<Item>,
    /// Ids removed.
    pub del: Vec<ItemId>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.del.is_empty()
    }
}

/// One partition's items and indexes.
#[derive(Debug, Default)]
pub struct PartitionState {
    next_id: u64,
    /// Ready and leased items, in id (FIFO) order.
    live: BTreeMap<u64, Item>,
    /// Ids of ready items.
    ready: BTreeSet<u64>,
    /// (lease deadline, id) of leased items.
    leased: BTreeSet<(Ts, u64)>,
    /// (expire deadline, id) of live items.
    expire: BTreeSet<(Ts, u64)>,
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
}

impl PartitionState {
    /// An empty partition whose ids start above `floor` (use the current time in microseconds, so ids stay unique
    /// across a delete and re-create).
    pub fn new(floor: u64) -> Self {
        PartitionState {
            next_id: floor.max(1),
            ..Default::default()
        }
    }

    /// Rebuilds the state from stored items (any order). Ids continue above the largest seen and `floor`.
    pub fn load(items: impl IntoIterator<Item = Item>, floor: u64) -> Self {
        let mut s = PartitionState::new(floor);
        for it in items {
            s.next_id = s.next_id.max(it.id.0 + 1);
            s.insert(it);
        }
        s
    }

    fn alloc(&mut self) -> ItemId {
        let id = ItemId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Puts an item in the indexes its fields call for.
    fn insert(&mut self, it: Item) {
        let id = it.id.0;
        if !it.source_id.is_empty() {
            self.by_source.insert(it.source_id.clone(), id);
        }
        self.payload_bytes += it.payload.len() as u64;
        if it.dead {
            self.dead.insert(id, it);
        } else if it.is_scheduled() {
            self.sched_idx.insert((it.enqueue_at, id));
            self.sched.insert(id, it);
        } else {
            if it.is_leased {
                self.leased.insert((it.lease_deadline, id));
                self.sum_lease += i128::from(it.lease_deadline.0);
            } else {
                self.ready.insert(id);
            }
            self.expire.insert((it.expire_deadline, id));
            self.sum_created += i128::from(it.created_at.0);
            self.live.insert(id, it);
        }
    }

    /// Takes an item out of every index.
    fn remove(&mut self, id: u64) -> Option<Item> {
        let it = if let Some(it) = self.live.remove(&id) {
            if it.is_leased {
                self.leased.remove(&(it.lease_deadline, id));
                self.sum_lease -= i128::from(it.lease_deadline.0);
            } else {
                self.ready.remove(&id);
            }
            self.expire.remove(&(it.expire_deadline, id));
            self.sum_created -= i128::from(it.created_at.0);
            it
        } else if let Some(it) = self.sched.remove(&id) {
            self.sched_idx.remove(&(it.enqueue_at, id));
            it
        } else {
            self.dead.remove(&id)?
        };
        if !it.source_id.is_empty() && self.by_source.get(&it.source_id) == Some(&id) {
            self.by_source.remove(&it.source_id);
        }
        self.payload_bytes -= it.payload.len() as u64;
        Some(it)
    }

    /// Re-inserts `it` at the tail with a fresh id, recording the move.
    fn requeue(&mut self, mut it: Item, ch: &mut Changes) {
        ch.del.push(it.id);
        it.id = self.alloc();
        it.is_leased = false;
        it.lease_deadline = Ts::ZERO;
        it.enqueue_at = Ts::ZERO;
        ch.put.push(it.clone());
        self.insert(it);
    }

    /// Kills an item: kept for transfer when a dead-letter queue exists, dropped otherwise.
    fn die(&mut self, mut it: Item, policy: LifecyclePolicy, ch: &mut Changes) {
        if policy.has_dead_queue {
            it.dead = true;
            it.is_leased = false;
            it.lease_deadline = Ts::ZERO;
            ch.put.push(it.clone());
            self.insert(it);
        } else {
            ch.del.push(it.id);
        }
    }

    /// See [`lessor_core::storage::Partition::produce`].
    pub fn produce(&mut self, items: Vec<NewItem>) -> (Vec<ItemId>, Changes) {
        let mut ids = Vec::with_capacity(items.len());
        let mut ch = Changes::default();
        for n in items {
            if !n.source_id.is_empty() {
                if let Some(&existing) = self.by_source.get(&n.source_id) {
                    ids.push(ItemId(existing));
                    continue;
                }
            }
            let id = self.alloc();
            let it = Item {
                id,
                source_id: n.source_id,
                is_leased: false,
                lease_deadline: Ts::ZERO,
                expire_deadline: n.expire_deadline,
                enqueue_at: n.enqueue_at,
                created_at: n.created_at,
                attempts: 0,
                max_attempts: 0,
                reference: n.reference,
                encoding: n.encoding,
                kind: n.kind,
                payload: n.payload,
                dead: false,
            };
            ids.push(id);
            ch.put.push(it.clone());
            self.insert(it);
        }
        (ids, ch)
    }

    /// See [`lessor_core::storage::Partition::lease`].
    pub fn lease(&mut self, n: usize, deadline: Ts) -> (Vec<Item>, Changes) {
        let mut out = Vec::with_capacity(n.min(self.ready.len()));
        while out.len() < n {
            let Some(id) = self.ready.pop_first() else { break };
            let Some(it) = self.live.get_mut(&id) else {
                continue;
            };
            it.is_leased = true;
            it.lease_deadline = deadline;
            it.attempts = it.attempts.saturating_add(1);
            self.leased.insert((deadline, id));
            self.sum_lease += i128::from(deadline.0);
            out.push(it.clone());
        }
        let ch = Changes {
            put: out.clone(),
            del: Vec::new(),
        };
        (out, ch)
    }

    fn check_leased(&self, ids: impl Iterator<Item = ItemId>) -> Result<(), ItemError> {
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(id) {
                return Err(ItemError::Duplicate(id.to_string()));
            }
            match self.live.get(&id.0) {
                None => return Err(ItemError::NotFound(id.to_string())),
                Some(it) if !it.is_leased => return Err(ItemError::NotLeased(id.to_string())),
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
                self.remove(id.0);
                ch.del.push(id);
            }
            out.push(Ok(()));
        }
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
                let Some(mut it) = self.remove(op.id.0) else {
                    continue;
                };
                let action = match op.action {
                    RetryAction::Dead => RetryAction::Dead,
                    _ if policy.exhausted(it.attempts) => RetryAction::Dead,
                    a => a,
                };
                match action {
                    RetryAction::Dead => {
                        o.dead += 1;
                        self.die(it, policy, &mut ch);
                    }
                    RetryAction::Requeue => {
                        o.requeued += 1;
                        self.requeue(it, &mut ch);
                    }
                    RetryAction::Schedule(at) => {
                        o.scheduled += 1;
                        it.is_leased = false;
                        it.lease_deadline = Ts::ZERO;
                        it.enqueue_at = at;
                        ch.put.push(it.clone());
                        self.insert(it);
                    }
                }
            }
            out.push(Ok(o));
        }
        (out, ch)
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
        let mut done = 0;
        while done < limit {
            let lease = self.leased.first().filter(|(d, _)| *d <= now).copied();
            let sched = self.sched_idx.first().filter(|(t, _)| *t <= now).copied();
            let exp = self.expire.first().filter(|(e, _)| *e <= now).copied();
            if let Some((d, id)) = lease {
                // Drop the index entry first, so a stale entry can never spin this loop.
                self.leased.remove(&(d, id));
                let Some(it) = self.remove(id) else { continue };
                if policy.exhausted(it.attempts) {
                    o.dead += 1;
                    self.die(it, policy, &mut ch);
                } else {
                    o.lease_expired += 1;
                    self.requeue(it, &mut ch);
                }
            } else if let Some((t, id)) = sched {
                self.sched_idx.remove(&(t, id));
                let Some(it) = self.remove(id) else { continue };
                o.enqueued += 1;
                self.requeue(it, &mut ch);
            } else if let Some((e, id)) = exp {
                self.expire.remove(&(e, id));
                let Some(it) = self.remove(id) else { continue };
                o.dead += 1;
                self.die(it, policy, &mut ch);
            } else {
                return (o, ch);
            }
            done += 1;
        }
        o.more = self.next_deadline().is_some_and(|d| d <= now);
        (o, ch)
    }

    /// See [`lessor_core::storage::Partition::dead_items`].
    pub fn dead_items(&self, limit: usize) -> Vec<Item> {
        self.dead.values().take(limit).cloned().collect()
    }

    /// See [`lessor_core::storage::Partition::remove_dead`].
    pub fn remove_dead(&mut self, ids: Vec<ItemId>) -> Changes {
        let mut ch = Changes::default();
        for id in ids {
            if self.dead.contains_key(&id.0) {
                self.remove(id.0);
                ch.del.push(id);
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
            self.leased.first().map(|x| x.0),
            self.sched_idx.first().map(|x| x.0),
            self.expire.first().map(|x| x.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// See [`lessor_core::storage::Partition::counts`].
    pub fn counts(&self) -> PartitionCounts {
        PartitionCounts {
            ready: self.ready.len() as u64,
            leased: self.leased.len() as u64,
            scheduled: self.sched.len() as u64,
        }
    }

    /// See [`lessor_core::storage::Partition::stats`].
    pub fn stats(&self, now: Ts) -> PartitionStats {
        let live = self.live.len() as i128;
        let leased = self.leased.len() as i128;
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
            average_age: avg(self.sum_created, live, false),
            average_leased_age: avg(self.sum_lease, leased, true),
            payload_bytes: self.payload_bytes,
        }
    }

    /// See [`lessor_core::storage::Partition::list`].
    pub fn list(&self, pivot: Option<ItemId>, limit: usize, scheduled: bool) -> Vec<Item> {
        let from = pivot.map_or(0, |p| p.0);
        let map = if scheduled { &self.sched } else { &self.live };
        map.range(from..).take(limit).map(|(_, it)| it.clone()).collect()
    }

    /// See [`lessor_core::storage::Partition::import`].
    pub fn import(&mut self, items: Vec<Item>) -> (Vec<Item>, Changes) {
        let mut ch = Changes::default();
        let mut out = Vec::with_capacity(items.len());
        for mut it in items {
            if !it.source_id.is_empty() && self.by_source.contains_key(&it.source_id) {
                continue;
            }
            it.id = self.alloc();
            it.dead = false;
            if !it.is_leased {
                it.lease_deadline = Ts::ZERO;
            }
            if it.is_scheduled() {
                it.is_leased = false;
                it.lease_deadline = Ts::ZERO;
            }
            ch.put.push(it.clone());
            out.push(it.clone());
            self.insert(it);
        }
        (out, ch)
    }

    /// See [`lessor_core::storage::Partition::delete`].
    pub fn delete(&mut self, ids: Vec<ItemId>) -> Changes {
        let mut ch = Changes::default();
        for id in ids {
            if self.remove(id.0).is_some() {
                ch.del.push(id);
            }
        }
        ch
    }

    /// See [`lessor_core::storage::Partition::clear`].
    pub fn clear(&mut self, req: ClearRequest) -> Changes {
        let mut victims: Vec<u64> = Vec::new();
        if req.queue {
            if req.destructive {
                victims.extend(self.live.keys().copied());
            } else {
                victims.extend(self.ready.iter().copied());
            }
        }
        if req.scheduled {
            victims.extend(self.sched.keys().copied());
        }
        let mut ch = Changes::default();
        for id in victims {
            if self.remove(id).is_some() {
                ch.del.push(ItemId(id));
            }
        }
        ch
    }

    /// Number of items of every kind (for memory accounting).
    pub fn len(&self) -> usize {
        self.live.len() + self.sched.len() + self.dead.len()
    }

    /// Whether the partition holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
