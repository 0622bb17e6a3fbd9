//! The storage traits every backend implements, and their contracts.
//!
//! A backend provides a [`QueuesStore`] (queue definitions) and/or a [`PartitionStore`] (queue items). A partition
//! store hands out [`Partition`] handles; each partition is owned by exactly one queue task in this process, which
//! calls it with whole batches: one call per partition per kind of request. Backends implement the item state
//! machine themselves, with ordered indexes, so no call costs more as the partition grows:
//!
//! ```text
//!            produce (enqueue_at > now)        schedule due (new id, tail)
//!   ---------------------------------> SCHEDULED ----------------------------+
//!   produce                                 ^ retry with retry_at             v
//!   -----------------------------------> READY ---- lease ----> LEASED ----- complete ---> gone
//!                                           ^  lease expiry / retry (new id)   |
//!                                           +----------------------------------+
//!   LEASED/READY --(max attempts reached at expiry or retry, expire_deadline, retry dead)--> DEAD
//!   DEAD: deleted at once when the queue has no dead-letter queue, otherwise kept hidden until the engine has
//!   written it to the dead-letter queue (idempotent by source_id) and calls `remove_dead`.
//! ```
//!
//! Contracts shared by every method:
//! - A returned `Err` means the call changed nothing. Backends that cannot promise that for a failure (a failed
//!   fsync) must poison themselves and refuse later writes with [`StorageErrorKind::Poisoned`].
//! - `Ok` from a write means the write is as durable as the store's configured durability mode says
//!   (memory: in RAM; fjall `sync`: fsynced; postgres: committed).
//! - Ids only grow within a partition, including across restarts; a moved item gets a fresh, larger id.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

#[allow(unused_imports)]
use crate::error::StorageErrorKind;
use crate::error::{ItemError, StorageError};
use crate::time::Ts;
use crate::types::{ClearRequest, Item, ItemId, NewItem, PartitionCounts, PartitionStats, QueueInfo};

/// Queue definitions.
#[async_trait]
pub trait QueuesStore: Send + Sync + Debug + 'static {
    /// The queue named `name`, if any.
    async fn get(&self, name: &str) -> Result<Option<QueueInfo>, StorageError>;
    /// Adds a queue; [`StorageErrorKind::AlreadyExists`] when the name is taken.
    async fn add(&self, info: &QueueInfo) -> Result<(), StorageError>;
    /// Replaces an existing queue's definition.
    async fn update(&self, info: &QueueInfo) -> Result<(), StorageError>;
    /// Removes a queue's definition; removing a missing queue is `Ok`.
    async fn delete(&self, name: &str) -> Result<(), StorageError>;
    /// Removes the definition of `name` only while it is the incarnation created at `created_at` (see
    /// [`PartitionStore::create_incarnation`]); another one (the queue was deleted and created again meanwhile, by
    /// another server sharing the store) stays, as does a missing one (`Ok`). Stores shared by several servers do it
    /// in one atomic write; the default reads, then deletes, which is atomic for a store owned by one server.
    async fn delete_incarnation(&self, name: &str, created_at: Ts) -> Result<(), StorageError> {
        match self.get(name).await? {
            Some(info) if info.created_at == created_at => self.delete(name).await,
            _ => Ok(()),
        }
    }
    /// Up to `limit` queues in name order, starting at `pivot` (inclusive).
    async fn list(&self, pivot: &str, limit: usize) -> Result<Vec<QueueInfo>, StorageError>;
    /// A cheap round trip that proves the store answers (health checks).
    async fn ping(&self) -> Result<(), StorageError> {
        self.list("", 1).await.map(|_| ())
    }
    /// The store of users, keys, roles and bindings that lives with these queue definitions (the same database
    /// or directory), so that several servers sharing the queues also share who may use them.
    fn auth(&self) -> Arc<dyn crate::auth::AuthStore>;

    /// Releases resources; later calls may fail.
    async fn close(&self);
}

/// A backend that holds partitions, one `partition-storage` entry of the configuration.
#[async_trait]
pub trait PartitionStore: Send + Sync + Debug + 'static {
    /// The driver name, for logs.
    fn driver(&self) -> &'static str;
    /// Most partitions of one queue this store holds. The engine refuses (400) a queue whose placement would put
    /// more partitions than this into the store, so that no valid request can make the store do unbounded work.
    fn max_partitions(&self) -> u32 {
        crate::validate::MAX_PARTITIONS
    }
    /// Prepares partitions `partitions` of `queue` before the queue's definition is stored (queue creation or
    /// growth, a rebalance's destination), so that the request asking for many partitions pays for them, not the
    /// first produce. Idempotent: partitions that exist stay as they are; a destroyed one is made again, empty. The
    /// default does nothing (`open` creates on first use).
    async fn create(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        let _ = (queue, partitions);
        Ok(())
    }
    /// Opens (creating on first use) partition `partition` of `queue`. Fails while the backend is down; the engine
    /// keeps the partition marked failed and tries again.
    ///
    /// A partition that [`destroy`](Self::destroy) removed may be refused until [`create`](Self::create) makes it
    /// again, and a [`shared`](Self::shared) store must refuse it: the engine destroys a queue's partitions before
    /// its definition, and another server that still serves the queue (or loads it meanwhile) would otherwise make
    /// the deleted partition again and store items into it, which a queue created later under the name would find.
    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError>;
    /// Deletes a partition's items for good (queue deletion). Deleting a missing partition is `Ok`. Only
    /// [`create`](Self::create) makes the partition again (see [`open`](Self::open)).
    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError>;
    /// Deletes several partitions of `queue` for good (queue deletion). Stores that can do it in one write
    /// override this; the default destroys them one by one and stops at the first failure.
    async fn destroy_many(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        for &p in partitions {
            self.destroy(queue, p).await?;
        }
        Ok(())
    }
    /// True when other servers may change the same partitions (a shared database): the engine then refreshes its
    /// counts from [`Partition::counts`] periodically instead of trusting its own bookkeeping alone.
    fn shared(&self) -> bool {
        false
    }
    /// Notices of items made ready by other servers sharing this store, as they happen (PostgreSQL's
    /// LISTEN/NOTIFY), so that a consumer waiting here is served at once instead of at the next periodic refresh.
    /// Best effort: a notice lost (a dropped connection, a lagging receiver) only delays the item until that
    /// refresh. `None` (the default): the store pushes nothing. Called from within the async runtime.
    fn notices(&self) -> Option<tokio::sync::broadcast::Receiver<Notice>> {
        None
    }
    /// For stores that keep their items in RAM under a budget (`max-memory` of the memory and log drivers): the
    /// estimate of what the partitions hold and the most they may hold, in bytes, for `/metrics`. `None` (the
    /// default): no budget.
    fn memory(&self) -> Option<(u64, u64)> {
        None
    }
    /// Runs the store's sweeper of orphaned payload objects now (an operator's `offload.sweep`) and says what it
    /// did. `None` (the default): the store has no object storage, so there is nothing to sweep.
    async fn sweep_objects(&self) -> Option<Result<crate::types::SweepReport, StorageError>> {
        None
    }
    /// [`create`](Self::create) for one incarnation of the queue: `incarnation` is the `created_at` of the definition
    /// the partitions are made for (the engine's identity of a queue: a queue deleted and created again under its
    /// name is another one). A [`shared`](Self::shared) store keeps each incarnation's partitions apart, so that a
    /// delete of an older incarnation still running on another server (it read the definition before the queue was
    /// deleted and created again) destroys only that incarnation's partitions, and an open for it cannot reach the
    /// new queue's. `Ts::ZERO` names the partitions a store made before it knew incarnations. The default ignores
    /// the incarnation: a store owned by one server sees one delete of a name at a time.
    async fn create_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        let _ = incarnation;
        self.create(queue, partitions).await
    }
    /// [`open`](Self::open) of a partition of one incarnation of the queue (see
    /// [`create_incarnation`](Self::create_incarnation)). The default ignores the incarnation.
    async fn open_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<Arc<dyn Partition>, StorageError> {
        let _ = incarnation;
        self.open(queue, partition).await
    }
    /// [`destroy`](Self::destroy) of a partition of one incarnation of the queue (see
    /// [`create_incarnation`](Self::create_incarnation)): another incarnation's partition is left as it is. The
    /// default ignores the incarnation.
    async fn destroy_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<(), StorageError> {
        let _ = incarnation;
        self.destroy(queue, partition).await
    }
    /// [`destroy_many`](Self::destroy_many) of partitions of one incarnation of the queue (see
    /// [`create_incarnation`](Self::create_incarnation)): partitions of another incarnation are left as they are.
    /// The default ignores the incarnation.
    async fn destroy_many_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        let _ = incarnation;
        self.destroy_many(queue, partitions).await
    }
    /// Releases resources.
    async fn close(&self);
}

/// Another server made items ready in a partition of a shared store (see [`PartitionStore::notices`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The queue.
    pub queue: Arc<str>,
    /// The partition.
    pub partition: u32,
}

/// What the lifecycle and retries need to know about the queue's current settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LifecyclePolicy {
    /// 0 = unlimited. An item whose attempts reached this when its lease ends (expiry or retry) is dead.
    pub max_attempts: u32,
    /// Whether dead items are kept for transfer to a dead-letter queue (true) or deleted (false).
    pub has_dead_queue: bool,
    /// When on, an expired lease puts the item into the schedule until `now + backoff.delay(attempts, id)` (the
    /// item keeps its id there, as any scheduled item) instead of at the tail of the ready queue.
    pub backoff: crate::types::Backoff,
}

impl LifecyclePolicy {
    /// Whether an item leased `attempts` times has no attempt left.
    pub fn exhausted(&self, attempts: u32) -> bool {
        self.max_attempts != 0 && attempts >= self.max_attempts
    }
}

/// What to do with one leased item of a retry request (the engine resolves the schedule threshold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAction {
    /// Back to the tail of the ready queue now, with a new id.
    Requeue,
    /// Into the schedule until the given time (same id until it comes due).
    Schedule(Ts),
    /// Dead: dead-lettered or deleted according to the policy.
    Dead,
    /// A retry without a time under a backoff policy: schedule until `now + policy.backoff.delay(attempts, id)`
    /// (attempts as stored, i.e. counting the lease being retried), or requeue when the policy has no backoff.
    /// The value is `now`.
    Backoff(Ts),
    /// Back to the ready queue now, as if the lease had not been taken: the lease's attempt is not counted and
    /// the item is never dead-lettered for it. For leases that were never delivered (the caller left while the
    /// storage call ran, or the payload could not be read). A backend may keep the item's id and its place in
    /// the queue, or requeue it at the tail with a new id.
    Release,
}

/// One id of a retry request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryOp {
    /// The leased item.
    pub id: ItemId,
    /// What to do with it.
    pub action: RetryAction,
}

/// How many items a retry request moved where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOutcome {
    /// Re-queued at the tail.
    pub requeued: u64,
    /// Scheduled for later.
    pub scheduled: u64,
    /// Dead (dead-lettered or deleted).
    pub dead: u64,
}

/// What one lifecycle pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifecycleOutcome {
    /// Leases that expired and went back to the tail.
    pub lease_expired: u64,
    /// Scheduled items that came due and joined the tail.
    pub enqueued: u64,
    /// Items that died (max attempts at lease expiry, or expire_deadline passed).
    pub dead: u64,
    /// True when `limit` stopped the pass before every due action was taken.
    pub more: bool,
    /// How the pass changed the partition's counts, from what its statements moved, for a store whose
    /// [`Partition::counts`] costs time that grows with the partition's depth (PostgreSQL counts rows): the engine
    /// then follows its counts with this instead of counting after every pass. `None` (stores that count in O(1)):
    /// the engine calls [`Partition::counts`].
    pub counts_delta: Option<CountsDelta>,
}

/// A change of a partition's [`PartitionCounts`] (see [`LifecycleOutcome::counts_delta`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountsDelta {
    /// Change of the ready items.
    pub ready: i64,
    /// Change of the leased items.
    pub leased: i64,
    /// Change of the scheduled items.
    pub scheduled: i64,
}

impl CountsDelta {
    /// `counts` changed by this delta, each count kept at zero or above (counts of a shared store may be behind
    /// what another server did).
    pub fn apply(&self, counts: PartitionCounts) -> PartitionCounts {
        let add = |c: u64, d: i64| {
            if d >= 0 {
                c.saturating_add(d.unsigned_abs())
            } else {
                c.saturating_sub(d.unsigned_abs())
            }
        };
        PartitionCounts {
            ready: add(counts.ready, self.ready),
            leased: add(counts.leased, self.leased),
            scheduled: add(counts.scheduled, self.scheduled),
        }
    }
}

/// One partition of one queue. Not shared: one queue task calls it, one call at a time.
#[async_trait]
pub trait Partition: Send + Sync + Debug + 'static {
    /// Appends items in order. Items with a non-zero `enqueue_at` go to the schedule instead of the ready queue.
    /// Items whose non-empty `source_id` is already present are skipped (idempotent dead-letter moves); their slot in
    /// the returned vector holds the id of the item already stored. Returns the ids in input order.
    ///
    /// Deduplication depends on who can see every write of the queue:
    /// - Stores owned by one process (memory, fjall): the caller (the engine's queue-wide index) is the only check;
    ///   the partition does not look keys up. It stores every item and, for an item with a non-empty `dedup_id` and
    ///   `dedup_until` after its `created_at`, a record `(dedup_id, id, dedup_until)` in the same atomic write, so
    ///   that [`Partition::dedup_records`] can rebuild the caller's index after a restart.
    /// - Shared stores (postgres, [`PartitionStore::shared`]): several servers write the queue, so the store checks
    ///   the whole queue itself: an item whose key has a live record (`until` > the item's `created_at`) is
    ///   skipped, its slot holding the recorded id; a second item with the same key in the same call is skipped the
    ///   same way; otherwise the item is stored with its record in the same atomic write.
    ///
    /// Either way, expired records are dropped by later calls, at least as many per call as the call adds, so their
    /// number stays bounded by the produce rate times the window. A shared store may keep them for a grace period
    /// after their window ends (another server's items stamped within the window may reach it late); the bound is
    /// then the rate times the window and the grace.
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError>;

    /// [`Partition::produce`], also telling for each item whether this call stored it (`true`) or skipped it as a
    /// duplicate of a live dedup record (`false`). Shared stores must implement it: the engine calls it on them so
    /// that its index keeps only the keys it stored itself (a key the store skipped has the record's own end, which
    /// the engine does not know). The default, for stores that do not check keys, reports every item stored.
    async fn produce_reporting(&self, items: Vec<NewItem>) -> Result<(Vec<ItemId>, Vec<bool>), StorageError> {
        let ids = self.produce(items).await?;
        let stored = vec![true; ids.len()];
        Ok((ids, stored))
    }

    /// Leases up to `n` ready items from the head, highest priority first and in id order within a priority: each
    /// gets `is_leased`, `lease_deadline` and `attempts + 1`; the result is in that serving order. Returns the leased items (fewer than `n`, possibly none, when fewer are ready).
    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError>;

    /// [`Partition::lease`] bounded in bytes: it stops before the item whose payload would take the total over
    /// `max_bytes` (the first item is always taken, whatever its size), and tells whether it stopped there with
    /// ready items left (`true`), so that the caller asks again rather than taking the partition for empty. The
    /// engine leases through this, so that a lease of many large items (a thousand of 5 MB) cannot build a reply
    /// of gigabytes. The default ignores the bound: stores that do not override it answer as `lease` does.
    async fn lease_within(
        &self,
        n: usize,
        lease_deadline: Ts,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let _ = max_bytes;
        Ok((self.lease(n, lease_deadline).await?, false))
    }

    /// Completes (deletes) leased items. Each inner request is applied whole or not at all: if any of its ids is
    /// missing, not leased, or repeated, that request gets the first such [`ItemError`] and none of its ids change.
    /// Valid requests of the same call are applied together in one write.
    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError>;

    /// Extends leases: each request `(ids, deadline)` sets the lease deadline of every id to `deadline`, with the
    /// same all-or-nothing rule per request as [`Partition::complete`] (an id that is missing, not leased or
    /// repeated fails the request and changes nothing). The lease expiry index follows the new deadlines.
    async fn extend(
        &self,
        requests: Vec<(Vec<ItemId>, Ts)>,
    ) -> Result<Vec<Result<(), ItemError>>, StorageError>;

    /// Retries leased items; the same all-or-nothing rule per request as [`Partition::complete`]. A requeue or
    /// schedule of an item whose attempts are exhausted under `policy` makes it dead instead.
    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError>;

    /// Applies every lifecycle action due at `now`, at most `limit` of them, using the ordered deadline indexes:
    /// expired leases go to the tail (new id), or into the schedule under a backoff policy (see
    /// [`LifecyclePolicy::backoff`]), or die when their attempts are exhausted; due scheduled items go to
    /// the tail (new id); items past `expire_deadline` die. Expired dedup records may be dropped here too.
    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError>;

    /// The live dedup records (`until` > `now`), so the engine can check keys across partitions after a restart.
    /// Stores that check the whole queue themselves (shared stores) may return none.
    async fn dedup_records(&self, now: Ts) -> Result<Vec<crate::types::DedupRecord>, StorageError>;

    /// Adds dedup records taken from another partition (a rebalance moving or draining that one into this one), so
    /// that [`Partition::dedup_records`] still reports them after a restart. The default refuses: stores that check
    /// keys themselves (shared ones) are not rebalanced.
    async fn import_dedup(&self, records: Vec<crate::types::DedupRecord>) -> Result<(), StorageError> {
        let _ = records;
        Err(StorageError::other(
            "this partition store cannot import dedup records",
        ))
    }

    /// Up to `limit` dead items waiting for transfer to the dead-letter queue, in id order.
    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError>;

    /// [`Partition::dead_items`] bounded in bytes as [`Partition::lease_within`] is: it stops before the item whose
    /// bytes would take the total over `max_bytes` (the first is always taken), and tells whether it stopped there
    /// (`true`: more dead items wait). The engine moves dead items in batches through this, so a batch of a thousand
    /// 5 MB items cannot hold gigabytes. The default reads the whole batch, then cuts it: stores that can stop
    /// reading at the bound override it.
    async fn dead_items_within(
        &self,
        limit: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        Ok(cut_at_bytes(self.dead_items(limit).await?, max_bytes))
    }

    /// How many dead items wait for transfer, without reading them (a restore resuming counts them). The default
    /// reads them all: stores override it with a count.
    async fn dead_count(&self) -> Result<u64, StorageError> {
        Ok(self.dead_items(usize::MAX).await?.len() as u64)
    }

    /// Removes dead items once the dead-letter queue holds them. Missing ids are ignored.
    async fn remove_dead(&self, ids: Vec<ItemId>) -> Result<(), StorageError>;

    /// The earliest instant at which [`Partition::lifecycle`] has something to do: the earliest lease deadline,
    /// schedule time or expire deadline, or `Ts::ZERO` when dead items wait for transfer. `None` when nothing is
    /// pending. Must be cheap (the head of an index), never a scan.
    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError>;

    /// Current counts (also a health probe).
    async fn counts(&self) -> Result<PartitionCounts, StorageError>;

    /// Counts and ages, without scanning items.
    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError>;

    /// Up to `limit` items in id order from `pivot` (inclusive; the next greater id when it is gone). With
    /// `scheduled` false: ready and leased items; with `scheduled` true: scheduled items.
    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError>;

    /// [`Partition::list`] bounded in bytes: it stops before the item whose bytes would take the page over
    /// `max_bytes` (the first item is always taken), and tells whether it stopped there (`true`: items may follow
    /// the page, which a caller must not take for the end even when it holds fewer than `limit`). The page is still
    /// the first items from `pivot` in id order, so the next page starts after its last id: nothing is skipped.
    /// The list route, browse, redrive and rebalance read through this. The default reads the whole page, then
    /// cuts it: stores that can stop reading at the bound override it.
    async fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        Ok(cut_at_bytes(self.list(pivot, limit, scheduled).await?, max_bytes))
    }

    /// Adds items as given (state, deadlines, attempts, source_id, `dead`), with new ids (in input order) and
    /// `created_at` kept when set. Items whose non-empty `source_id` is already present are skipped. Returns the
    /// stored items.
    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError>;

    /// [`Partition::import`] of items the engine moves out of another partition (a rebalance), which deletes them
    /// there right after. A store with a memory budget takes them as long as it is not over its budget: a move
    /// within the store adds nothing once the source's copies are gone, and one from another store passes the
    /// budget by one chunk at most before it waits like any import. The default is `import`.
    async fn import_moved(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.import(items).await
    }

    /// A point-in-time read of every item of the partition, in every state (ready, leased, scheduled, dead and
    /// waiting for transfer), in id order, for backups. The snapshot sees the partition as it was when this call
    /// returned; later calls on the partition do not change what it reads, and it does not hold the partition up
    /// while it is being read (the queue task goes on serving). The default refuses: a store that cannot take one
    /// says so instead of returning a torn copy.
    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        Err(StorageError::other("this partition store cannot take snapshots"))
    }

    /// A snapshot for finding which offloaded payload objects the partition's items reference (the payload
    /// sweeper): like [`Partition::snapshot`], except that a store may leave out the items it keeps in object
    /// storage itself (cold segments), which by construction never reference an offloaded payload, instead of
    /// fetching them back as a full snapshot must. The default is the full snapshot.
    async fn reference_snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        self.snapshot().await
    }

    /// Deletes items by id, whatever their state. Missing ids are ignored.
    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError>;

    /// Removes items as the request says.
    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError>;

    /// Flushes and releases resources.
    async fn close(&self);
}

/// The bytes an item carries against a byte bound: its payload and its strings (they are user bytes too).
pub fn item_bytes(it: &Item) -> u64 {
    (it.payload.len() + it.source_id.len() + it.reference.len() + it.encoding.len() + it.kind.len()) as u64
}

/// Cuts `items` before the first item that would take their [`item_bytes`] over `max_bytes` (the first item is
/// always kept); tells whether it cut anything.
pub fn cut_at_bytes(mut items: Vec<Item>, max_bytes: u64) -> (Vec<Item>, bool) {
    let mut total = 0u64;
    let keep = items
        .iter()
        .position(|it| {
            total = total.saturating_add(item_bytes(it));
            total > max_bytes
        })
        .map_or(items.len(), |i| i.max(1));
    let cut = keep < items.len();
    items.truncate(keep);
    (items, cut)
}

/// Keeps of `items` (a page being merged from several sources, in any order) the prefix in id order a bounded
/// list may answer: ids below `ceiling`, at most `limit` items, within `max_bytes` (at least one item). The first
/// id it drops becomes the new ceiling, so that items read later from another source cannot fill the page past an
/// item it left out (that item would be skipped: the next page starts after the last id answered).
pub fn keep_page(items: &mut Vec<Item>, limit: usize, max_bytes: u64, ceiling: &mut Option<u64>) {
    items.sort_unstable_by_key(|it| it.id);
    if let Some(c) = *ceiling {
        items.retain(|it| it.id.0 < c);
    }
    let mut keep = items.len().min(limit);
    let mut total = 0u64;
    for (i, it) in items.iter().enumerate().take(keep) {
        total = total.saturating_add(item_bytes(it));
        if i > 0 && total > max_bytes {
            keep = i;
            break;
        }
    }
    if let Some(first_out) = items.get(keep) {
        *ceiling = Some(first_out.id.0);
        items.truncate(keep);
    }
}

/// A point-in-time read of one partition (see [`Partition::snapshot`]), consumed page by page. Owned: it may be
/// read from any task while the partition keeps serving.
#[async_trait]
pub trait PartitionSnapshot: Send + Debug + 'static {
    /// Up to `limit` items following the ones already returned, in id order; empty once every item was read.
    async fn next(&mut self, limit: usize) -> Result<Vec<Item>, StorageError>;

    /// [`PartitionSnapshot::next`] bounded in bytes as [`Partition::list_within`] is: the page stops before the
    /// item whose [`item_bytes`] would take it over `max_bytes` (the first item is always taken, so a page is never
    /// empty before the end), and the next call starts with that item: the pages together are still the whole
    /// snapshot, nothing skipped or repeated. Backups and migrations read through this, so that a page of
    /// thousands of 5 MB items is never held at once.
    ///
    /// The default is [`PartitionSnapshot::next`], bounded in items only: a snapshot cannot cut a page after
    /// reading it without keeping what it cut, so only the snapshot itself can stop at the bound. Every store's
    /// snapshot overrides it; a wrapper that does not forward it reads as it did before the bound existed.
    async fn next_within(&mut self, limit: usize, max_bytes: u64) -> Result<Vec<Item>, StorageError> {
        let _ = max_bytes;
        self.next(limit).await
    }
}

/// A snapshot over items already copied out of the partition (stores that keep their items in memory).
#[derive(Debug)]
pub struct CopiedSnapshot {
    items: std::iter::Peekable<std::vec::IntoIter<Item>>,
}

impl CopiedSnapshot {
    /// A snapshot reading `items` (already in id order).
    pub fn new(items: Vec<Item>) -> Self {
        CopiedSnapshot {
            items: items.into_iter().peekable(),
        }
    }
}

#[async_trait]
impl PartitionSnapshot for CopiedSnapshot {
    async fn next(&mut self, limit: usize) -> Result<Vec<Item>, StorageError> {
        self.next_within(limit, u64::MAX).await
    }

    async fn next_within(&mut self, limit: usize, max_bytes: u64) -> Result<Vec<Item>, StorageError> {
        // The items are in memory already; the bound keeps the page (what the caller then encodes or sends) small.
        // The item that does not fit stays first for the next call.
        let mut page = Vec::new();
        let mut total = 0u64;
        while page.len() < limit.max(1) {
            let Some(it) = self.items.peek() else { break };
            total = total.saturating_add(item_bytes(it));
            if !page.is_empty() && total > max_bytes {
                break;
            }
            page.extend(self.items.next());
        }
        Ok(page)
    }
}
