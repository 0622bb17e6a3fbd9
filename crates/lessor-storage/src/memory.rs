//! The memory backend: queues and partitions in RAM.
//!
//! Nothing survives the process. A partition is a [`PartitionState`] behind a mutex; the queue task is its only
//! caller, so the lock is never contended and no call blocks for long. Partitions live in the store until their
//! queue is deleted, so a queue task that reloads finds its items again.
//!
//! With `cold-segments` (builds with the `s3` feature) the store's partitions are [`cold::ColdPartition`]s
//! instead, which keep a bounded part of their backlog in RAM and move the rest to object storage (see `cold`).

use std::collections::{BTreeMap, HashMap};
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

    /// An empty store whose partitions move their backlog beyond `settings.after_depth` ready items per partition
    /// to cold segments in object storage; `store_name` goes into every object key. Deletes the segments a
    /// previous run of the store left under its prefix (nothing of a memory store survives a restart, so none is
    /// live); object storage being down then is logged, not fatal.
    #[cfg(feature = "s3")]
    pub async fn with_cold(
        settings: crate::registry::ColdSettings,
        store_name: &str,
    ) -> Result<Self, StorageError> {
        let ctx = Arc::new(cold::ColdCtx::new(settings, store_name)?);
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

    /// Spills a produce waited for because producers outran object storage (cold segments only).
    #[cfg(feature = "s3")]
    pub fn throttled_produces(&self) -> u64 {
        self.cold
            .as_ref()
            .map_or(0, |c| c.throttled.load(std::sync::atomic::Ordering::Relaxed))
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
            Part::Plain(Arc::new(MemoryPartition {
                // Nothing to persist: building change sets would only copy every item written.
                state: Mutex::new(PartitionState::new(floor).without_changes()),
            }))
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

/// One partition in RAM.
#[derive(Debug)]
pub struct MemoryPartition {
    state: Mutex<PartitionState>,
}

impl MemoryPartition {
    fn state(&self) -> Result<MutexGuard<'_, PartitionState>, StorageError> {
        lock(&self.state)
    }
}

#[async_trait]
impl Partition for MemoryPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        Ok(self.state()?.produce(items).0)
    }

    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        Ok(self.state()?.lease(n, lease_deadline).0)
    }

    async fn lease_within(
        &self,
        n: usize,
        lease_deadline: Ts,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let (out, _, capped) = self.state()?.lease_within(n, lease_deadline, max_bytes);
        Ok((out, capped))
    }

    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        Ok(self.state()?.complete(requests).0)
    }

    async fn extend(
        &self,
        requests: Vec<(Vec<ItemId>, Ts)>,
    ) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        Ok(self.state()?.extend(requests).0)
    }

    async fn dedup_records(&self, now: Ts) -> Result<Vec<DedupRecord>, StorageError> {
        Ok(self.state()?.dedup_records(now))
    }

    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        Ok(self.state()?.retry(requests, policy).0)
    }

    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        Ok(self.state()?.lifecycle(now, policy, limit).0)
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
        self.state()?.remove_dead(ids);
        Ok(())
    }

    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        Ok(self.state()?.next_deadline())
    }

    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        Ok(self.state()?.counts())
    }

    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError> {
        Ok(self.state()?.stats(now))
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
        Ok(self.state()?.import(items).0)
    }

    async fn import_dedup(&self, records: Vec<lessor_core::types::DedupRecord>) -> Result<(), StorageError> {
        self.state()?.import_dedup(records);
        Ok(())
    }

    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        self.state()?.delete(ids);
        Ok(())
    }

    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError> {
        self.state()?.clear(request);
        Ok(())
    }

    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        // A copy under the lock: one instant of the partition. The memory store serves tests and small setups,
        // where copying the items is cheaper than anything cleverer.
        Ok(Box::new(CopiedSnapshot::new(self.state()?.all_items())))
    }

    async fn close(&self) {}
}
