//! Online rebalance, the queue task's side: draining partitions into others (shrink) or into a new home on
//! another partition store (move), a bounded chunk per pass while the queue keeps serving.
//!
//! A draining partition takes no produce, no dead letters, no redriven items and serves no lease; its leases in
//! flight stay valid (complete, retry and extend still reach it) and its lifecycle keeps running, so an expired
//! lease comes back at its tail and is drained with the rest. Each pass moves up to [`CHUNK`] non-leased items
//! (ready and scheduled, in id order, with their state, attempts, priority and deadlines) into the target with
//! `import` (new ids in input order: order within the partition is kept), then deletes them from the source.
//!
//! Exactly once across a crash: before a chunk is imported its ids are written to a journal in the metadata store,
//! and every imported item carries a source id naming the rebalance task and its old place. A task that starts
//! with a journal redoes that chunk before anything else (before the lifecycle and before any lease is served):
//! the import skips the items the target already holds (by source id), then the chunk leaves the source. Until
//! then the lifecycle of the partitions being drained waits (see [`QueueTask::lifecycle_held`]): it would give
//! items of the chunk new ids, which the replay does not find. Since
//! the copy of a chunk cannot be served before its source is deleted in the same step, "already in the target"
//! and "imported" are the same thing, so no item is lost, doubled or brought back after completion.
//!
//! A move is finished when its source holds nothing (no item in any state, no dead item waiting for transfer):
//! the task then serves the partition from the destination. A shrink is finished when every removed partition is
//! empty: the task drops them. The engine's watcher (`engine::rebalance`) persists the new placement, then
//! destroys the old partitions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::QueueTask;
use crate::auth::records::key;
use crate::auth::store::Commit;
use crate::storage::{Partition, PartitionStore};
use crate::time::Ts;
use crate::types::{Item, ItemId, PartitionInfo};

/// Most items moved per pass: bounds how long one pass of the queue is held up by the rebalance.
pub(crate) const CHUNK: usize = 500;
/// Most pages of leased items one pass scans past.
const SCAN_PAGES: usize = 16;
/// Table tag of the chunk journals in the metadata store.
pub(crate) const JOURNAL_TAG: u8 = b'J';
/// Pause after a failed step before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// How often a move waiting for leases in flight checks its source again.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// While the server serves requests, a move pauses after each chunk for this many times the chunk's time (as a
/// backup does after each block).
const YIELD_FACTOR: u32 = 3;
/// Prefix of the source ids the rebalance gives the items it moves: users cannot send control characters.
pub(crate) const SOURCE_PREFIX: &str = "\u{1}rb:";

/// What a rebalance task asks of the queue task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The task id (journal key, source ids).
    pub id: String,
    /// Partitions to move, one after the other: (partition, destination store name).
    pub moves: Vec<(u32, String)>,
    /// Drain partitions from this number up into the lower ones, then drop them.
    pub shrink_to: Option<u32>,
    /// Items moved before this task (re)started.
    pub moved: u64,
    /// Most items moved per second (0: no limit).
    pub max_items_per_sec: u32,
    /// The task was cancelled: once the chunk in flight is settled, a shrink stops where it is and a move
    /// finishes only the partition it has started (see [`QueueTask::apply_cancel`]).
    pub cancelled: bool,
}

/// Where a rebalance stands, as the queue task reports it to the engine.
#[derive(Clone, Debug, Default)]
pub(crate) struct Report {
    /// Whether a rebalance with this id is installed.
    pub installed: bool,
    /// Items moved so far (including before a restart).
    pub moved: u64,
    /// Items left in the partitions still to drain (ready, leased, scheduled).
    pub remaining: u64,
    /// The task's current placement (the engine persists it).
    pub placement: Vec<PartitionInfo>,
    /// Old partitions the engine may destroy once it persisted `placement`: (store name, partition).
    pub retired: Vec<(String, u32)>,
    /// Every move and the shrink are finished.
    pub done: bool,
    /// A cancel cut the plan short (a cancel that came after everything was done did not).
    pub cancelled: bool,
    /// The last error of a step (it is retried); empty when the last step went well.
    pub error: String,
}

/// The destination of the move in progress.
struct Dest {
    partition: u32,
    store_name: String,
    store: Arc<dyn PartitionStore>,
    handle: Arc<dyn Partition>,
}

/// The rebalance installed in a queue task.
pub(super) struct Rebalance {
    plan: Plan,
    moved: u64,
    dest: Option<Dest>,
    /// Per source partition, where the scan of its ready and leased items goes on (ids below were looked at: what
    /// is still there is leased, and items that become ready again get new, larger ids).
    pivots: HashMap<u32, ItemId>,
    /// The journal of the last chunk was replayed.
    reconciled: bool,
    retry_at: Ts,
    /// Set while the source holds only leased items: the next look is due then, not at once.
    waiting_until: Ts,
    retired: Vec<(String, u32)>,
    /// The cancel was applied to the plan (after the journal replay).
    cancel_applied: bool,
    done: bool,
    error: String,
}

/// The journal of the chunk in flight.
#[derive(Serialize, Deserialize)]
struct Journal {
    source: u32,
    ids: Vec<u64>,
    /// The task's item count once this chunk is moved: the watcher saves the count only every poll, so a chunk
    /// moved after its last save and before a crash would otherwise be counted by nobody (the replay finds it gone
    /// from the source). Absent (0) in journals of older versions.
    #[serde(default)]
    moved: u64,
}

fn journal_key(id: &str) -> Vec<u8> {
    key(JOURNAL_TAG, &[id])
}

impl QueueTask {
    /// Installs a rebalance (at load, or when one starts); a second install of the same task is ignored.
    pub(super) fn install_rebalance(&mut self, plan: Plan) {
        if let Some(rb) = self.rebalance.as_mut().filter(|r| r.plan.id == plan.id) {
            // The same task again: only a cancel is news (applied at the next step).
            if plan.cancelled && !rb.plan.cancelled {
                rb.plan.cancelled = true;
                rb.retry_at = Ts::ZERO;
                rb.waiting_until = Ts::ZERO;
            }
            return;
        }
        for p in &mut self.parts {
            p.draining = false;
        }
        self.rebalance = Some(Box::new(Rebalance {
            moved: plan.moved,
            plan,
            dest: None,
            pivots: HashMap::new(),
            reconciled: false,
            retry_at: Ts::ZERO,
            waiting_until: Ts::ZERO,
            retired: Vec::new(),
            cancel_applied: false,
            done: false,
            error: String::new(),
        }));
        self.mark_draining();
    }

    /// The destination of the move in progress: a clear of the queue clears it too.
    pub(super) fn rebalance_dest(&self) -> Option<Arc<dyn Partition>> {
        self.rebalance
            .as_ref()
            .and_then(|r| r.dest.as_ref())
            .map(|d| d.handle.clone())
    }

    /// Marks the partitions the rebalance drains now: every one being removed, and the one being moved.
    fn mark_draining(&mut self) {
        let Some(rb) = &self.rebalance else { return };
        let shrink = rb.plan.shrink_to;
        let moving = rb.plan.moves.first().map(|m| m.0);
        // Until the chunk in flight is settled (at load, or after a step failed between import and delete), a
        // shrink's targets may hold copies whose originals are still in the source: they serve nothing either.
        let unsettled = !rb.reconciled;
        for p in &mut self.parts {
            p.draining = shrink.is_some_and(|n| p.num >= n || unsettled) || moving == Some(p.num);
        }
    }

    /// Whether partition `i`'s lifecycle waits for the rebalance: while the chunk in flight is not settled (its
    /// journal not replayed yet: at load, or after a step failed between import and delete), the partitions it
    /// drains (and a shrink's targets) are left alone. The replay finds the chunk by id, and a lifecycle pass
    /// changes ids: a scheduled item of the chunk coming due, already copied to the target, was requeued in the
    /// source with a new id, so the replay left it there and the move carried it over a second time.
    pub(super) fn lifecycle_held(&self, i: usize) -> bool {
        self.rebalance
            .as_ref()
            .is_some_and(|rb| !rb.reconciled && !rb.done)
            && self.parts.get(i).is_some_and(|p| p.draining)
    }

    /// The report the engine polls; `finish` drops a finished rebalance (the engine persisted its outcome).
    pub(super) fn rebalance_report(&mut self, id: &str, finish: bool) -> Report {
        let placement = self.info.partitions.clone();
        let Some(rb) = self.rebalance.as_mut().filter(|r| r.plan.id == id) else {
            return Report {
                placement,
                ..Default::default()
            };
        };
        let remaining = self
            .parts
            .iter()
            .filter(|p| {
                rb.plan.shrink_to.is_some_and(|n| p.num >= n) || rb.plan.moves.iter().any(|m| m.0 == p.num)
            })
            .map(|p| p.counts.ready + p.counts.leased + p.counts.scheduled)
            .sum();
        let report = Report {
            installed: true,
            moved: rb.moved,
            remaining,
            placement,
            retired: std::mem::take(&mut rb.retired),
            done: rb.done,
            cancelled: rb.cancel_applied,
            error: rb.error.clone(),
        };
        if finish && rb.done {
            self.rebalance = None;
            for p in &mut self.parts {
                p.draining = false;
            }
        }
        report
    }

    /// When the loop must wake for the rebalance: now while items remain to move, later while it waits.
    pub(super) fn rebalance_wake(&self) -> Ts {
        match &self.rebalance {
            Some(rb) if !rb.done => rb.retry_at.max(rb.waiting_until),
            _ => Ts::NEVER,
        }
    }

    /// One step of the rebalance: at most one chunk moved, or one partition switched or dropped.
    pub(super) async fn rebalance_step(&mut self, now: Ts) {
        let Some(rb) = &self.rebalance else { return };
        if rb.done || now < rb.retry_at || now < rb.waiting_until {
            return;
        }
        let r = self.rebalance_work(now).await;
        let name = self.info.name.clone();
        if let Some(rb) = &mut self.rebalance {
            match r {
                Ok(()) => rb.error.clear(),
                Err(e) => {
                    // The step may have stopped between a chunk's import and its delete: replay the journal first
                    // next time, and scan the sources from the start (the chunk's items lie below the pivots).
                    rb.reconciled = false;
                    rb.pivots.clear();
                    tracing::warn!(queue = %name, task = %rb.plan.id, error = %e, "rebalance step failed; will retry");
                    rb.error = e;
                    rb.retry_at = now.add(RETRY_AFTER);
                }
            }
        }
        self.mark_draining();
    }

    async fn rebalance_work(&mut self, now: Ts) -> Result<(), String> {
        let Some(rb) = &self.rebalance else { return Ok(()) };
        if !rb.reconciled {
            self.replay_journal(now).await?;
            if let Some(rb) = &mut self.rebalance {
                rb.reconciled = true;
            }
        }
        let Some(rb) = &self.rebalance else { return Ok(()) };
        if rb.plan.cancelled && !rb.cancel_applied {
            self.apply_cancel().await?;
        }
        let Some(rb) = &self.rebalance else { return Ok(()) };
        if rb.done {
            return Ok(());
        }
        if let Some(n) = rb.plan.shrink_to {
            return self.shrink_step(n, now).await;
        }
        let Some((partition, to)) = rb.plan.moves.first().cloned() else {
            if let Some(rb) = &mut self.rebalance {
                rb.done = true;
            }
            return Ok(());
        };
        self.move_step(partition, &to, now).await
    }

    /// Drains the first removed partition that still holds items into partition `num % n`; drops every removed
    /// partition once all are empty.
    async fn shrink_step(&mut self, n: u32, now: Ts) -> Result<(), String> {
        let n = n.max(1) as usize;
        let mut waiting = false;
        for i in n..self.parts.len() {
            let j = i % n;
            let target = self.parts[j]
                .healthy()
                .ok_or_else(|| format!("target partition {j} is unavailable"))?;
            let moved = self.move_chunk(i, target, Some(j), now).await?;
            if moved > 0 {
                return Ok(());
            }
            if !self.source_empty(i).await? {
                waiting = true;
            }
        }
        if waiting {
            self.wait_for_leases(now);
            return Ok(());
        }
        // Every removed partition is empty: their dedup records go to the partitions that took their items, then
        // they are dropped. The engine persists the placement, then destroys them.
        for i in n..self.parts.len() {
            let target = self.parts[i % n]
                .healthy()
                .ok_or_else(|| format!("target partition {} is unavailable", i % n))?;
            self.carry_dedup(i, &target, now).await?;
        }
        let dropped: Vec<_> = self.parts.drain(n..).collect();
        let mut retired = Vec::new();
        for p in dropped {
            if let Some(h) = p.handle {
                h.close().await;
            }
            retired.push((p.store_name, p.num));
        }
        self.info.partitions.truncate(n);
        self.info.requested_partitions = n as u32;
        if let Some(rb) = &mut self.rebalance {
            rb.retired.extend(retired);
            rb.plan.shrink_to = None;
            rb.pivots.clear();
            rb.done = rb.plan.moves.is_empty();
        }
        tracing::info!(queue = %self.info.name, partitions = n, "partitions drained and removed");
        Ok(())
    }

    /// Moves a chunk of `partition` to its new store, or switches the partition there once its source is empty.
    async fn move_step(&mut self, partition: u32, to: &str, now: Ts) -> Result<(), String> {
        let Some(i) = self.parts.iter().position(|p| p.num == partition) else {
            return Err(format!("partition {partition} does not exist"));
        };
        if self.parts[i].store_name == to {
            self.next_move();
            return Ok(());
        }
        let dest = self.open_dest(partition, to).await?;
        let moved = self.move_chunk(i, dest.clone(), None, now).await?;
        if moved > 0 {
            return Ok(());
        }
        if !self.source_empty(i).await? {
            self.wait_for_leases(now);
            return Ok(());
        }
        // The source is empty: its dedup records go along (they outlive the items they name), and the partition
        // lives in its new store from now on.
        self.carry_dedup(i, &dest, now).await?;
        let Some(d) = self.rebalance.as_mut().and_then(|r| r.dest.take()) else {
            return Ok(());
        };
        let old_store = self.parts[i].store_name.clone();
        if let Some(h) = self.parts[i].handle.take() {
            h.close().await;
        }
        let p = &mut self.parts[i];
        p.store = d.store;
        p.store_name = d.store_name.clone();
        p.shared = false;
        p.handle = Some(d.handle);
        p.draining = false;
        p.top_priority = crate::types::MAX_PRIORITY;
        if let Some(info) = self.info.partitions.get_mut(i) {
            info.storage_name = d.store_name.clone();
        }
        self.probe(i, now).await;
        if let Some(rb) = &mut self.rebalance {
            rb.retired.push((old_store, partition));
        }
        tracing::info!(queue = %self.info.name, partition, store = %d.store_name, "partition moved");
        self.next_move();
        Ok(())
    }

    /// Cuts a cancelled plan down to what must still happen for the queue to be whole: a shrink stops at once
    /// (items drained so far stay in the partitions that took them; the partitions not yet removed keep the rest
    /// and serve again, the partition count is unchanged); of the moves, those finished stay finished and the one
    /// under way is finished if its destination already holds items (moving them back would put them behind the
    /// source's newer items, breaking the partition's order), dropped if it holds none. Runs after the journal
    /// replay, so the chunk in flight is settled and "the destination holds items" is exact.
    async fn apply_cancel(&mut self) -> Result<(), String> {
        let current = {
            let Some(rb) = &self.rebalance else { return Ok(()) };
            rb.plan
                .moves
                .iter()
                .find(|(p, to)| self.parts.iter().any(|x| x.num == *p && x.store_name != *to))
                .cloned()
        };
        let keep = match current {
            Some((partition, to)) => {
                let dest = self.open_dest(partition, &to).await?;
                let c = dest.counts().await.map_err(|e| e.to_string())?;
                let started = c.ready + c.leased + c.scheduled > 0
                    || !dest.dead_items(1).await.map_err(|e| e.to_string())?.is_empty();
                started.then_some((partition, to))
            }
            None => None,
        };
        let dropped_dest = match (&keep, self.rebalance.as_mut()) {
            (None, Some(rb)) => rb.dest.take(),
            _ => None,
        };
        if let Some(d) = dropped_dest {
            // Nothing reached it: the engine destroys the empty destination when the task ends.
            d.handle.close().await;
        }
        if let Some(rb) = &mut self.rebalance {
            rb.plan.shrink_to = None;
            rb.plan.moves = keep.into_iter().collect();
            rb.pivots.clear();
            rb.cancel_applied = true;
            rb.done = rb.plan.moves.is_empty();
        }
        tracing::info!(queue = %self.info.name, "rebalance cancelled");
        Ok(())
    }

    fn next_move(&mut self) {
        if let Some(rb) = &mut self.rebalance {
            if !rb.plan.moves.is_empty() {
                rb.plan.moves.remove(0);
            }
            rb.dest = None;
            rb.pivots.clear();
            rb.done = rb.plan.moves.is_empty() && rb.plan.shrink_to.is_none();
        }
    }

    fn wait_for_leases(&mut self, now: Ts) {
        if let Some(rb) = &mut self.rebalance {
            rb.waiting_until = now.add(WAIT_POLL);
        }
    }

    /// The destination of the move of `partition` to store `to`, opened on first use.
    async fn open_dest(&mut self, partition: u32, to: &str) -> Result<Arc<dyn Partition>, String> {
        if let Some(d) = self.rebalance.as_ref().and_then(|r| r.dest.as_ref()) {
            if d.partition == partition && d.store_name == to {
                return Ok(d.handle.clone());
            }
        }
        let Some(s) = self.config.stores.iter().find(|s| s.name == to) else {
            return Err(format!("partition storage '{to}' is not in the configuration"));
        };
        let store = s.store.clone();
        let handle = store
            .open_incarnation(&self.info.name, self.info.created_at, partition)
            .await
            .map_err(|e| format!("opening partition {partition} in '{to}': {e}"))?;
        if let Some(rb) = &mut self.rebalance {
            rb.dest = Some(Dest {
                partition,
                store_name: to.to_string(),
                store,
                handle: handle.clone(),
            });
        }
        Ok(handle)
    }

    /// Copies partition `i`'s live dedup records into `target`.
    async fn carry_dedup(&mut self, i: usize, target: &Arc<dyn Partition>, now: Ts) -> Result<(), String> {
        let src = self.parts[i]
            .healthy()
            .ok_or_else(|| format!("partition {} is unavailable", self.parts[i].num))?;
        let records = src.dedup_records(now).await.map_err(|e| e.to_string())?;
        if !records.is_empty() {
            target.import_dedup(records).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Whether partition `i` holds nothing at all (no item in any state, no dead item waiting for transfer).
    async fn source_empty(&mut self, i: usize) -> Result<bool, String> {
        let h = self.parts[i]
            .healthy()
            .ok_or_else(|| format!("partition {} is unavailable", self.parts[i].num))?;
        let c = h.counts().await.map_err(|e| e.to_string())?;
        self.parts[i].counts = c;
        if c.ready + c.leased + c.scheduled > 0 {
            return Ok(false);
        }
        Ok(h.dead_items(1).await.map_err(|e| e.to_string())?.is_empty())
    }

    /// Moves up to [`CHUNK`] non-leased items of partition `i` into `target` (partition `target_part` of this
    /// queue, or a move's destination): journal, import, delete. Returns how many moved.
    async fn move_chunk(
        &mut self,
        i: usize,
        target: Arc<dyn Partition>,
        target_part: Option<usize>,
        now: Ts,
    ) -> Result<u64, String> {
        let src = self.parts[i]
            .healthy()
            .ok_or_else(|| format!("partition {} is unavailable", self.parts[i].num))?;
        let num = self.parts[i].num;
        let err = |e: crate::error::StorageError| e.to_string();
        // A chunk is bounded in bytes as a lease is (each read, and the chunk imported at once): 500 items of 5 MB
        // would be 2.5 GB imported in one call, and a read of 1,000 of them 5 GB.
        let max_bytes = self.config.limits.max_lease_bytes;
        let (mut chunk, sched_capped) = src.list_within(None, CHUNK, true, max_bytes).await.map_err(err)?;
        let mut bytes: u64 = chunk.iter().map(crate::storage::item_bytes).sum();
        let mut pivot = self.rebalance.as_ref().and_then(|r| r.pivots.get(&num).copied());
        let mut at_end = false;
        // Leased items stay where they are (their holders complete them there): scan past them, a bounded number
        // of pages per pass.
        'scan: for _ in 0..SCAN_PAGES {
            if chunk.len() >= CHUNK || sched_capped {
                break;
            }
            let (page, capped) = src
                .list_within(pivot, CHUNK * 2, false, max_bytes)
                .await
                .map_err(err)?;
            let full = page.len() == CHUNK * 2 || capped;
            for it in page {
                if chunk.len() == CHUNK {
                    break;
                }
                let next = Some(ItemId(it.id.0.saturating_add(1)));
                if !it.is_leased {
                    let size = crate::storage::item_bytes(&it);
                    if !chunk.is_empty() && bytes + size > max_bytes {
                        // The next pass starts at this item.
                        break 'scan;
                    }
                    bytes += size;
                    chunk.push(it);
                }
                pivot = next;
            }
            if !full {
                at_end = true;
                break;
            }
        }
        if at_end {
            // Items that come back ready (a retry, an expired lease, a due schedule) take ids from their
            // priority's block, which may lie below the pivot: the next look starts over.
            pivot = None;
        }
        if let Some(rb) = &mut self.rebalance {
            match pivot {
                Some(p) => {
                    rb.pivots.insert(num, p);
                }
                None => {
                    rb.pivots.remove(&num);
                }
            }
        }
        if chunk.is_empty() {
            return Ok(0);
        }
        let id = self
            .rebalance
            .as_ref()
            .map(|r| r.plan.id.clone())
            .unwrap_or_default();
        let ids: Vec<ItemId> = chunk.iter().map(|it| it.id).collect();
        let work = std::time::Instant::now();
        let served = self.activity.load(Ordering::Relaxed);
        let moved_after = self.rebalance.as_ref().map_or(0, |r| r.moved) + ids.len() as u64;
        self.write_journal(&id, num, &ids, moved_after).await?;
        let n = self.import_and_delete(&id, num, &src, &target, chunk).await?;
        let took = work.elapsed();
        self.probe(i, now).await;
        if let Some(j) = target_part {
            self.probe(j, now).await;
        }
        let busy = self.activity.load(Ordering::Relaxed) != served;
        let after = self.now();
        if let Some(rb) = &mut self.rebalance {
            rb.moved += n;
            if rb.plan.max_items_per_sec > 0 {
                // Paced: the next chunk is due once this one's share of a second has passed.
                let pause = Duration::from_secs_f64(n as f64 / f64::from(rb.plan.max_items_per_sec));
                rb.waiting_until = now.add(pause);
            }
            if busy {
                // The server answered requests while this chunk moved: leave it YIELD_FACTOR times the chunk's
                // time before the next one, so the move takes at most a quarter of the machine while anything
                // else is served (an idle server moves at full speed).
                rb.waiting_until = rb.waiting_until.max(after.add(took.saturating_mul(YIELD_FACTOR)));
            }
        }
        Ok(n)
    }

    /// Imports `items` of partition `num` into `target` (skipping those it already holds), then deletes them from
    /// the source.
    async fn import_and_delete(
        &mut self,
        task: &str,
        num: u32,
        src: &Arc<dyn Partition>,
        target: &Arc<dyn Partition>,
        items: Vec<Item>,
    ) -> Result<u64, String> {
        let err = |e: crate::error::StorageError| e.to_string();
        let ids: Vec<ItemId> = items.iter().map(|it| it.id).collect();
        let n = items.len() as u64;
        let copies: Vec<Item> = items
            .into_iter()
            .map(|mut it| {
                if it.source_id.is_empty() {
                    // Names the item's old place within this task: the key that makes a replayed chunk
                    // land once.
                    it.source_id = format!("{SOURCE_PREFIX}{task}/{num}/{}", it.id);
                }
                it.is_leased = false;
                it.lease_deadline = Ts::ZERO;
                it
            })
            .collect();
        target.import_moved(copies).await.map_err(err)?;
        src.delete(ids).await.map_err(err)?;
        Ok(n)
    }

    async fn write_journal(&self, task: &str, source: u32, ids: &[ItemId], moved: u64) -> Result<(), String> {
        let j = Journal {
            source,
            ids: ids.iter().map(|i| i.0).collect(),
            moved,
        };
        let mut c = Commit {
            silent: true,
            ..Default::default()
        };
        c.put(
            journal_key(task),
            serde_json::to_vec(&j).map_err(|e| e.to_string())?,
        );
        self.config
            .queues
            .auth()
            .commit(c)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "rebalance journal write refused".to_string())
    }

    /// Redoes the chunk in flight when the task stopped (see the module docs).
    async fn replay_journal(&mut self, now: Ts) -> Result<(), String> {
        let Some(rb) = &self.rebalance else { return Ok(()) };
        let task = rb.plan.id.clone();
        let Some(raw) = self
            .config
            .queues
            .auth()
            .get(&journal_key(&task))
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        let Ok(j) = serde_json::from_slice::<Journal>(&raw) else {
            return Ok(());
        };
        let Some(i) = self.parts.iter().position(|p| p.num == j.source) else {
            return Ok(());
        };
        let (target, target_part) = match rb.plan.shrink_to {
            Some(n) if j.source >= n => {
                let t = (j.source % n.max(1)) as usize;
                let h = self.parts[t]
                    .healthy()
                    .ok_or_else(|| format!("target partition {t} is unavailable"))?;
                (h, Some(t))
            }
            _ => match rb.plan.moves.iter().find(|m| m.0 == j.source).cloned() {
                Some((p, to)) => (self.open_dest(p, &to).await?, None),
                None => return Ok(()),
            },
        };
        let src = self.parts[i]
            .healthy()
            .ok_or_else(|| format!("partition {} is unavailable", j.source))?;
        let wanted: HashSet<u64> = j.ids.iter().copied().collect();
        let (Some(&lo), Some(&hi)) = (j.ids.iter().min(), j.ids.iter().max()) else {
            return Ok(());
        };
        let err = |e: crate::error::StorageError| e.to_string();
        let mut found = Vec::new();
        for scheduled in [true, false] {
            let mut pivot = Some(ItemId(lo));
            loop {
                let (page, capped) = src
                    .list_within(pivot, CHUNK * 2, scheduled, self.config.limits.max_lease_bytes)
                    .await
                    .map_err(err)?;
                let full = page.len() == CHUNK * 2 || capped;
                let mut past = false;
                for it in page {
                    pivot = Some(ItemId(it.id.0.saturating_add(1)));
                    if it.id.0 > hi {
                        past = true;
                        break;
                    }
                    if wanted.contains(&it.id.0) && !it.is_leased {
                        found.push(it);
                    }
                }
                if past || !full {
                    break;
                }
            }
        }
        // Settled below or before the crash: the chunk counts either way.
        if let Some(rb) = &mut self.rebalance {
            rb.moved = rb.moved.max(j.moved.saturating_sub(found.len() as u64));
        }
        if found.is_empty() {
            return Ok(());
        }
        found.sort_by_key(|it| it.id);
        tracing::info!(queue = %self.info.name, task = %task, items = found.len(), "replaying the rebalance chunk in flight");
        let n = self
            .import_and_delete(&task, j.source, &src, &target, found)
            .await?;
        self.probe(i, now).await;
        if let Some(t) = target_part {
            self.probe(t, now).await;
        }
        if let Some(rb) = &mut self.rebalance {
            rb.moved += n;
        }
        Ok(())
    }
}
