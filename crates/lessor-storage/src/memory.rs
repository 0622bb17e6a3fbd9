//! The memory backend: queues and partitions in RAM.
//!
//! Nothing survives the process. A partition is a [`PartitionState`] behind a mutex; the queue task is its only
//! caller, so the lock is never contended and no call blocks for long. Partitions live in the store until their
//! queue is deleted, so a queue task that reloads finds its items again.
//!
//! With `cold-segments` (builds with the `s3` feature) the store's partitions are [`cold::ColdPartition`]s
//! instead, which keep a bounded part of their backlog in RAM and move the rest to object storage (see `cold`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use lessor_core::auth::memory::MemoryAuthStore;
use lessor_core::auth::AuthStore;
use lessor_core::error::{ItemError, StorageError, StorageErrorKind};
use lessor_core::storage::{
    CopiedSnapshot, LifecycleOutcome, LifecyclePolicy, Partition, PartitionSnapshot, PartitionStore,
    QueuesStore, RetryOp, RetryOutcome,
};
use lessor_core::time::Ts;
use lessor_core::types::{
    ClearRequest, DedupRecord, Item, ItemId, NewItem, PartitionCounts, PartitionStats, QueueInfo,
};

use crate::state::PartitionState;

#[cfg(feature = "s3")]
pub mod cold;

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, StorageError> {
    m.lock().map_err(|_| {
        StorageError::new(
            StorageErrorKind::Poisoned,
            "memory store lock poisoned by a panic",
        )
    })
}

/// Queue definitions in RAM.
#[derive(Debug, Default)]
pub struct MemoryQueues {
    queues: Mutex<BTreeMap<String, QueueInfo>>,
    auth: Arc<MemoryAuthStore>,
}

impl MemoryQueues {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl QueuesStore for MemoryQueues {
    fn auth(&self) -> Arc<dyn AuthStore> {
        self.auth.clone()
    }

    async fn get(&self, name: &str) -> Result<Option<QueueInfo>, StorageError> {
        Ok(lock(&self.queues)?.get(name).cloned())
    }

    async fn add(&self, info: &QueueInfo) -> Result<(), StorageError> {
        let mut q = lock(&self.queues)?;
        if q.contains_key(&info.name) {
            return Err(StorageError::new(
                StorageErrorKind::AlreadyExists,
                format!("queue '{}' exists", info.name),
            ));
        }
        q.insert(info.name.clone(), info.clone());
        Ok(())
    }

    async fn update(&self, info: &QueueInfo) -> Result<(), StorageError> {
        lock(&self.queues)?.insert(info.name.clone(), info.clone());
        Ok(())
    }

    async fn delete(&self, name: &str) -> Result<(), StorageError> {
        lock(&self.queues)?.remove(name);
        Ok(())
    }

    async fn list(&self, pivot: &str, limit: usize) -> Result<Vec<QueueInfo>, StorageError> {
        Ok(lock(&self.queues)?
            .range(pivot.to_string()..)
            .take(limit)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn close(&self) {}
}

/// Longest a memory store with cold segments spends at open deleting the previous run's segments.
#[cfg(feature = "s3")]
const SWEEP_AT_OPEN: std::time::Duration = std::time::Duration::from_secs(30);

/// Partitions in RAM.
#[derive(Default)]
pub struct MemoryStore {
    partitions: Mutex<HashMap<(String, u32), Part>>,
    /// `max-memory`, when set (plain partitions only; see [`MemoryBudget`]).
    budget: Option<Arc<MemoryBudget>>,
    /// Where cold segments go (`cold-segments`), when set.
    #[cfg(feature = "s3")]
    cold: Option<Arc<cold::ColdCtx>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

/// A partition of either kind.
#[derive(Clone)]
enum Part {
    Plain(Arc<MemoryPartition>),
    #[cfg(feature = "s3")]
    Cold(Arc<cold::ColdPartition>),
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose partitions may hold about `max` bytes (`max-memory`, see [`MemoryBudget`]).
    pub fn with_max_memory(max: u64) -> Self {
        MemoryStore {
            budget: Some(Arc::new(MemoryBudget::new(max))),
            ..Self::default()
        }
    }

    /// The memory budget's estimate of what the partitions hold and its most, when it has one.
    pub fn memory(&self) -> Option<(u64, u64)> {
        self.budget.as_ref().map(|b| (b.used(), b.max()))
    }

    /// An empty store whose partitions move their backlog beyond `settings.after_depth` ready items per partition
    /// to cold segments in object storage; `store_name` goes into every object key. Deletes the segments a
    /// previous run of the store left under its prefix (nothing of a memory store survives a restart, so none is
    /// live); object storage being down then is logged, not fatal.
    #[cfg(feature = "s3")]
    pub async fn with_cold(
        settings: crate::registry::ColdSettings,
        store_name: &str,
    ) -> Result<Self, StorageError> {
        Self::with_cold_clock(settings, store_name, Arc::new(lessor_core::time::SystemClock)).await
    }

    /// [`MemoryStore::with_cold`] whose retry pauses of segments that could not be fetched are timed by `clock`
    /// (tests: a manual clock passes a pause without waiting for it).
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub async fn with_cold_clock(
        settings: crate::registry::ColdSettings,
        store_name: &str,
        clock: lessor_core::time::SharedClock,
    ) -> Result<Self, StorageError> {
        let ctx = Arc::new(cold::ColdCtx::new(settings, store_name, clock)?);
        // Bounded, so a slow object store delays the start by that much at most; what is left stays for a later
        // start. (Not in the background: objects this run writes must never be in the listing.)
        match tokio::time::timeout(SWEEP_AT_OPEN, ctx.sweep_all()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                store = store_name,
                deleted = n,
                "cold segments of a previous run deleted"
            ),
            Ok(Err(e)) => {
                tracing::warn!(store = store_name, error = %e, "cold segments of a previous run not deleted")
            }
            Err(_) => tracing::warn!(
                store = store_name,
                "cold segments of a previous run not all deleted: object storage too slow"
            ),
        }
        Ok(MemoryStore {
            partitions: Mutex::default(),
            // Cold partitions keep a bounded part of their backlog in RAM: no budget.
            budget: None,
            cold: Some(ctx),
        })
    }

    /// Tests: every call spills and loads what is due and waits for it (cold segments only).
    #[cfg(feature = "s3")]
    pub fn set_cold_eager(&self, eager: bool) {
        if let Some(c) = &self.cold {
            c.eager.store(eager, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Segments written, loaded, and failed to load by this store since it opened (cold segments only).
    #[cfg(feature = "s3")]
    pub fn segment_counters(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.cold.as_ref().map_or((0, 0, 0), |c| {
            (
                c.written.load(Relaxed),
                c.loaded.load(Relaxed),
                c.failed.load(Relaxed),
            )
        })
    }

    /// Tests: the next `n` segment rewrites (the write-back of a delete by id or an expiry that took items out of a
    /// segment) fail as a failed PUT would, after their segment was fetched (cold segments only).
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub fn fail_segment_rewrites(&self, n: u64) {
        if let Some(c) = &self.cold {
            c.fail_rewrites.store(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Tests: while `hold`, every spill waits before it writes its object, as an upload to a slow object store
    /// would, until released (cold segments only).
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub fn hold_cold_spills(&self, hold: bool) {
        if let Some(c) = &self.cold {
            c.hold.send_replace(hold);
        }
    }

    /// Tests: waits until `n` spills in all have reached the wait of [`MemoryStore::hold_cold_spills`].
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub async fn cold_spills_held(&self, n: u64) {
        if let Some(c) = &self.cold {
            let _ = c.held.subscribe().wait_for(|&k| k >= n).await;
        }
    }

    /// Spills a produce waited for because producers outran object storage (cold segments only).
    #[cfg(feature = "s3")]
    pub fn throttled_produces(&self) -> u64 {
        self.cold
            .as_ref()
            .map_or(0, |c| c.throttled.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Spills whose object was written but which were abandoned at their commit because a change removed some of
    /// their records meanwhile (cold segments only; tests).
    #[cfg(feature = "s3")]
    #[doc(hidden)]
    pub fn abandoned_spills(&self) -> u64 {
        self.cold
            .as_ref()
            .map_or(0, |c| c.abandoned.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The open cold partition `partition` of `queue` (tests).
    #[cfg(feature = "s3")]
    pub fn cold_partition(&self, queue: &str, partition: u32) -> Option<Arc<cold::ColdPartition>> {
        match lock(&self.partitions)
            .ok()?
            .get(&(queue.to_string(), partition))?
        {
            Part::Cold(p) => Some(p.clone()),
            Part::Plain(_) => None,
        }
    }
}

#[async_trait]
impl PartitionStore for MemoryStore {
    fn driver(&self) -> &'static str {
        "memory"
    }

    fn memory(&self) -> Option<(u64, u64)> {
        MemoryStore::memory(self)
    }

    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        let mut parts = lock(&self.partitions)?;
        let p = parts.entry((queue.to_string(), partition)).or_insert_with(|| {
            #[cfg(feature = "s3")]
            if let Some(ctx) = &self.cold {
                return Part::Cold(cold::ColdPartition::create(ctx.clone(), queue, partition));
            }
            // Ids start at the current time in microseconds, so a deleted and re-created queue never reuses an id,
            // offset per partition so that two partitions never share one.
            let floor = ItemId::floor_for(partition).0;
            // Nothing to persist: building change sets would only copy every item written.
            Part::Plain(Arc::new(MemoryPartition::new(
                PartitionState::new(floor).without_changes(),
                self.budget.clone(),
            )))
        });
        Ok(match p {
            Part::Plain(p) => p.clone(),
            #[cfg(feature = "s3")]
            Part::Cold(p) => p.clone(),
        })
    }

    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        let gone = lock(&self.partitions)?.remove(&(queue.to_string(), partition));
        // Freeing millions of items takes a while: do it off the async workers.
        match gone {
            Some(Part::Plain(p)) => {
                let _ = tokio::task::spawn_blocking(move || drop(p)).await;
            }
            #[cfg(feature = "s3")]
            Some(Part::Cold(p)) => {
                // Its segments go with it; a queue created again under the name writes under another number.
                p.destroy().await;
                let _ = tokio::task::spawn_blocking(move || drop(p)).await;
            }
            None => {}
        }
        Ok(())
    }

    async fn close(&self) {}
}

/// A memory budget shared by a store's partitions (`max-memory` of the memory and log drivers): an estimate of
/// what they hold ([`PartitionState::footprint`]), kept up to date by every mutation, and the most it may reach. A
/// call that adds items (produce, import) is refused with [`StorageErrorKind::Full`] when they would take it past
/// the most (but for the engine's moves, see `produce`); every other call goes on, so consumers make room.
/// Concurrent calls on different partitions are admitted against the same figure, so the budget can be passed by
/// what they add together (one batch per partition at most).
#[derive(Debug)]
pub struct MemoryBudget {
    max: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `max` bytes, nothing used.
    pub fn new(max: u64) -> Self {
        MemoryBudget {
            max,
            used: AtomicU64::new(0),
        }
    }

    /// The estimate of what the partitions hold now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The most the partitions may hold.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Refuses `adding` more bytes when they would pass the budget.
    fn admit(&self, adding: u64) -> Result<(), StorageError> {
        let used = self.used();
        if used.saturating_add(adding) <= self.max {
            return Ok(());
        }
        Err(StorageError::new(
            StorageErrorKind::Full,
            format!(
                "the store is full: its partitions hold about {used} bytes of the {} its max-memory allows, and \
                 these items need about {adding} more; try again once consumers have taken items",
                self.max
            ),
        ))
    }

    /// Refuses a move's items only when the partitions hold more than the budget already (see
    /// [`Partition::import_moved`]).
    fn admit_move(&self) -> Result<(), StorageError> {
        match self.used() {
            used if used > self.max => self.admit(1),
            _ => Ok(()),
        }
    }

    /// Records a partition going from `before` to `after` bytes.
    fn moved(&self, before: u64, after: u64) {
        if after >= before {
            self.used.fetch_add(after - before, Ordering::Relaxed);
        } else {
            let less = before - after;
            let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(less))
            });
        }
    }
}

/// What `items` add to a partition's [`PartitionState::footprint`], about.
fn footprint_of<'a>(payloads: impl Iterator<Item = &'a [u8]>) -> u64 {
    payloads.map(|p| p.len() as u64 + crate::state::ITEM_COST).sum()
}

/// One partition in RAM; in the log store, with the log its changes go to.
pub struct MemoryPartition {
    state: Mutex<PartitionState>,
    #[cfg(feature = "fjall")]
    log: Option<crate::log::PartLog>,
    /// The store's memory budget, when it has one: this partition's footprint is in it.
    budget: Option<Arc<MemoryBudget>>,
}

impl Drop for MemoryPartition {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            let held = match self.state.get_mut() {
                Ok(st) => st.footprint(),
                Err(e) => e.into_inner().footprint(),
            };
            b.moved(held, 0);
        }
    }
}

impl std::fmt::Debug for MemoryPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPartition").finish_non_exhaustive()
    }
}

impl MemoryPartition {
    fn new(state: PartitionState, budget: Option<Arc<MemoryBudget>>) -> Self {
        if let Some(b) = &budget {
            b.moved(0, state.footprint());
        }
        MemoryPartition {
            state: Mutex::new(state),
            #[cfg(feature = "fjall")]
            log: None,
            budget,
        }
    }

    /// A partition of the log store: `state` builds change sets, which go to `log`; its footprint counts in
    /// `budget` from here until it is dropped.
    #[cfg(feature = "fjall")]
    pub(crate) fn logged(
        state: PartitionState,
        log: crate::log::PartLog,
        budget: Option<Arc<MemoryBudget>>,
    ) -> Self {
        if let Some(b) = &budget {
            b.moved(0, state.footprint());
        }
        MemoryPartition {
            state: Mutex::new(state),
            log: Some(log),
            budget,
        }
    }

    /// Refuses items whose payloads are `payloads` when the store's budget cannot take them. A poisoned log
    /// (or a destroyed partition) answers first: `Full` is transient (the client retries), the poison lasts until
    /// a restart.
    fn admit<'a>(&self, payloads: impl Iterator<Item = &'a [u8]>) -> Result<(), StorageError> {
        self.writable()?;
        self.budget
            .as_ref()
            .map_or(Ok(()), |b| b.admit(footprint_of(payloads)))
    }

    /// [`MemoryPartition::admit`] of the items of a move (see [`Partition::import_moved`]).
    fn admit_move(&self) -> Result<(), StorageError> {
        self.writable()?;
        self.budget.as_ref().map_or(Ok(()), |b| b.admit_move())
    }

    /// Fails when the log store's log is poisoned or the partition destroyed (nothing for the memory store).
    fn writable(&self) -> Result<(), StorageError> {
        #[cfg(feature = "fjall")]
        if let Some(log) = &self.log {
            log.check_write()?;
        }
        Ok(())
    }

    fn state(&self) -> Result<MutexGuard<'_, PartitionState>, StorageError> {
        let st = lock(&self.state)?;
        // Checked under the lock: a write that failed (and poisoned the log) held it until then.
        #[cfg(feature = "fjall")]
        if let Some(log) = &self.log {
            log.check()?;
        }
        Ok(st)
    }

    /// Runs a mutation; in the log store, appends its change set under the partition's lock (so the log has the
    /// partition's changes in the order they were made) and returns its sequence for [`MemoryPartition::settle`].
    /// `relies` says the call may answer success for work a concurrent call logged (a produce repeating a source
    /// id, a delete of ids already deleted): when it logs nothing itself, it waits for the partition's last record.
    fn apply<R>(
        &self,
        relies: bool,
        f: impl FnOnce(&mut PartitionState) -> (R, crate::state::Changes),
    ) -> Result<(R, Option<u64>), StorageError> {
        let mut st = self.state()?;
        let before = self.budget.as_ref().map(|_| st.footprint());
        let moved = |st: &PartitionState| {
            if let (Some(b), Some(before)) = (&self.budget, before) {
                b.moved(before, st.footprint());
            }
        };
        #[cfg(feature = "fjall")]
        if let Some(log) = &self.log {
            log.check_write()?;
            let (r, ch) = f(&mut st);
            moved(&st);
            return Ok((r, log.append(&ch, relies)?));
        }
        let _ = relies;
        let r = f(&mut st).0;
        moved(&st);
        Ok((r, None))
    }

    /// Waits for the durability of what [`MemoryPartition::apply`] logged (nothing on the memory store).
    async fn settle(&self, seq: Option<u64>) -> Result<(), StorageError> {
        #[cfg(feature = "fjall")]
        if let Some(log) = &self.log {
            return log.settle(seq).await;
        }
        let _ = seq;
        Ok(())
    }

    /// [`MemoryPartition::apply`] then [`MemoryPartition::settle`], for a call whose answer rests on its own
    /// changes only (a lease, a complete: nothing to lease, or an unknown id, is not a success).
    async fn mutate<R>(
        &self,
        f: impl FnOnce(&mut PartitionState) -> (R, crate::state::Changes),
    ) -> Result<R, StorageError> {
        let (r, seq) = self.apply(false, f)?;
        self.settle(seq).await?;
        Ok(r)
    }

    /// [`MemoryPartition::mutate`] for a call that may answer success for a concurrent call's work (see `apply`).
    async fn mutate_relying<R>(
        &self,
        f: impl FnOnce(&mut PartitionState) -> (R, crate::state::Changes),
    ) -> Result<R, StorageError> {
        let (r, seq) = self.apply(true, f)?;
        self.settle(seq).await?;
        Ok(r)
    }

    /// Writes this partition's checkpoint to the log store's log: its begin record, a copy of its items page by
    /// page (the lock held for one page at a time), and, when `end` (false: tests of a checkpoint cut by a crash),
    /// its end record. The bytes written; a partition destroyed meanwhile stops its checkpoint.
    #[cfg(feature = "fjall")]
    pub(crate) fn write_checkpoint(
        &self,
        queue: &str,
        partition: u32,
        end: bool,
    ) -> Result<u64, StorageError> {
        let Some(log) = &self.log else { return Ok(0) };
        let (mut bytes, dedup) = {
            let st = self.state()?;
            // Every record, ended ones not yet dropped included: which have ended is the engine's clock's call. Each
            // group is copied under the name its drop will be logged under (groups are never renamed).
            let groups = st.dedup_groups();
            let Some(b) = log.checkpoint_begin(&st, queue, partition)? else {
                return Ok(0);
            };
            (b, groups)
        };
        let mut after = None;
        let mut dedup = Some(dedup);
        let mut unsynced = 0;
        loop {
            let st = self.state()?;
            let (items, next) = st.items_page(after, crate::log::CHECKPOINT_PAGE);
            let Some(b) = log.checkpoint_page(&items, dedup.take().unwrap_or_default())? else {
                return Ok(bytes);
            };
            drop(st);
            bytes += b;
            unsynced += b;
            // The copy shares the active segment with the requests' records: an fsync for a request must also write
            // whatever the copy left dirty, so it is written back a little at a time, not all at the end.
            if unsynced >= crate::log::CHECKPOINT_SYNC_BYTES {
                log.sync()?;
                unsynced = 0;
            }
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        if end {
            let _st = self.state()?;
            bytes += log.checkpoint_end()?.unwrap_or(0);
        }
        Ok(bytes)
    }

    /// Runs `f` holding this partition's lock (tests).
    #[cfg(feature = "fjall")]
    pub(crate) fn hold(&self, f: impl FnOnce()) {
        let _st = lock(&self.state);
        f();
    }

    /// Logs this partition's destruction, under its lock; the sequence to wait for.
    #[cfg(feature = "fjall")]
    pub(crate) fn log_destroy(&self) -> Result<u64, StorageError> {
        let _st = self.state()?;
        match &self.log {
            Some(log) => log.destroy(),
            None => Ok(0),
        }
    }
}

#[async_trait]
impl Partition for MemoryPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        // Items carrying a source id are the engine's moves (a dead-letter transfer, a redrive): the store holds
        // them already, in the partition they leave once written here, so they are not refused. Refused, a full
        // store whose items all died stayed full for good: dead items are no consumer's to take, and the
        // dead-letter queue had nothing to serve. (Clients' items never carry one.)
        self.admit(
            items
                .iter()
                .filter(|it| it.source_id.is_empty())
                .map(|it| &it.payload[..]),
        )?;
        self.mutate_relying(|s| s.produce(items)).await
    }

    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        self.mutate(|s| s.lease(n, lease_deadline)).await
    }

    async fn lease_within(
        &self,
        n: usize,
        lease_deadline: Ts,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        self.mutate(|s| {
            let (out, ch, capped) = s.lease_within(n, lease_deadline, max_bytes);
            ((out, capped), ch)
        })
        .await
    }

    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        self.mutate(|s| s.complete(requests)).await
    }

    async fn extend(
        &self,
        requests: Vec<(Vec<ItemId>, Ts)>,
    ) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        self.mutate(|s| s.extend(requests)).await
    }

    async fn dedup_records(&self, now: Ts) -> Result<Vec<DedupRecord>, StorageError> {
        Ok(self.state()?.dedup_records(now))
    }

    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        self.mutate(|s| s.retry(requests, policy)).await
    }

    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        self.mutate(|s| s.lifecycle(now, policy, limit)).await
    }

    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError> {
        Ok(self.state()?.dead_items(limit))
    }

    async fn dead_items_within(
        &self,
        limit: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        Ok(self.state()?.dead_items_within(limit, max_bytes))
    }

    async fn dead_count(&self) -> Result<u64, StorageError> {
        Ok(self.state()?.dead_count())
    }

    async fn remove_dead(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        self.mutate(|s| ((), s.remove_dead(ids))).await
    }

    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        Ok(self.state()?.next_deadline())
    }

    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        Ok(self.state()?.counts())
    }

    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError> {
        let st = self.state()?;
        #[cfg_attr(not(feature = "fjall"), allow(unused_mut))]
        let mut stats = st.stats(now);
        // In the log store every item held in memory is in the log too.
        #[cfg(feature = "fjall")]
        if self.log.is_some() {
            stats.tiers.disk = st.tier_counters().held();
        }
        Ok(stats)
    }

    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        Ok(self.state()?.list(pivot, limit, scheduled))
    }

    async fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        Ok(self.state()?.list_within(pivot, limit, scheduled, max_bytes))
    }

    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.admit(items.iter().map(|it| &it.payload[..]))?;
        self.mutate_relying(|s| s.import(items)).await
    }

    async fn import_moved(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.admit_move()?;
        self.mutate_relying(|s| s.import(items)).await
    }

    async fn import_dedup(&self, records: Vec<lessor_core::types::DedupRecord>) -> Result<(), StorageError> {
        self.mutate_relying(|s| s.import_dedup(records)).await
    }

    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        self.mutate_relying(|s| ((), s.delete(ids))).await
    }

    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError> {
        self.mutate_relying(|s| ((), s.clear(request))).await
    }

    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        // A copy under the lock: one instant of the partition. The memory store serves tests and small setups,
        // where copying the items is cheaper than anything cleverer.
        Ok(Box::new(CopiedSnapshot::new(self.state()?.all_items())))
    }

    async fn close(&self) {}
}
