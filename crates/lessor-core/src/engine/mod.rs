//! The queue engine: the [`Engine`] handle the server calls, and one task per queue that owns its partitions.
//!
//! Every queue runs as one tokio task (see the private `queue` module). Requests reach it through a bounded inbox;
//! the task drains whatever has arrived, then applies it as batches: one storage call per partition per kind of
//! request (produce, lease, complete, retry). While a storage call is in flight new requests pile up in the inbox
//! and form the next batch, so concurrent requests share each write (and each fsync on persistent stores). Lease
//! expiry, schedules and item expiry come from the partitions' ordered deadline indexes through one timer per
//! queue.
//!
//! The engine speaks domain types only (partition numbers, [`ItemId`]s, [`Duration`]s, [`Ts`]): turning wire
//! shapes into them is the server's job, in one place (`lessor-server`'s `convert`), with the messages of
//! [`crate::validate`]. Rules that need the engine's limits (batch sizes, timeout bounds) are checked here.

mod placement;
mod queue;
mod rebalance;
mod redrive;
mod task_records;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Mutex, MutexGuard};

pub use placement::{place, shares, StoreWeight};
pub use rebalance::{PartitionMove, RebalanceProgress, RebalanceRequest, RebalanceStatus, RebalanceTask};
pub use redrive::{RedriveRequest, RedriveStatus, RedriveTask};

use crate::error::{QueueError, StorageError, StorageErrorKind};
use crate::storage::{PartitionStore, QueuesStore};
use crate::time::{BoxFuture, SharedClock, Ts};
use crate::types::{
    ClearRequest, Item, ItemId, Limits, NewItem, PartitionInfo, QueueInfo, RetryItem, DEFAULT_NAMESPACE,
};
use crate::validate;
use queue::{Cold, DeadLetterSink, Msg, NextInfo, QueueTask};

/// One configured partition store.
#[derive(Clone, Debug)]
pub struct NamedStore {
    /// The `partition-storage` name.
    pub name: String,
    /// Placement weight.
    pub affinity: f64,
    /// The backend.
    pub store: Arc<dyn PartitionStore>,
}

/// Everything the engine needs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Queue definitions.
    pub queues: Arc<dyn QueuesStore>,
    /// Partition stores, in configuration order.
    pub stores: Vec<NamedStore>,
    /// Limits and defaults.
    pub limits: Limits,
    /// Time source.
    pub clock: SharedClock,
}

/// Counters and gauges of one queue, updated by its task and read by `/metrics`.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Items produced.
    pub produced: AtomicU64,
    /// Items leased.
    pub leased: AtomicU64,
    /// Sum over leased items of their age when leased (now - created_at), in microseconds: with `leased`, the mean
    /// time items waited from produce to lease (the dashboard's latency chart).
    pub lease_age_us: AtomicU64,
    /// Items completed.
    pub completed: AtomicU64,
    /// Items retried (requeued or scheduled).
    pub retried: AtomicU64,
    /// Leases that expired.
    pub lease_expired: AtomicU64,
    /// Items that died (moved to the dead-letter queue or deleted).
    pub dead_lettered: AtomicU64,
    /// Produced items acknowledged without being stored again (their dedup key was seen within the window).
    pub deduplicated: AtomicU64,
    /// Leases extended.
    pub extended: AtomicU64,
    /// Dedup keys held in memory now.
    pub dedup_keys: AtomicU64,
    /// Ready items now.
    pub ready: AtomicU64,
    /// Leased items now.
    pub leased_now: AtomicU64,
    /// Scheduled items now.
    pub scheduled: AtomicU64,
    /// Lease requests waiting now.
    pub lease_waiting: AtomicU64,
    /// Items per storage tier (memory, disk, object; see [`crate::types::TierStats`]), summed over the partitions,
    /// as of the queue's last tier refresh (at most [`TIER_REFRESH`] old while the queue changes).
    pub tier_items: [AtomicU64; 3],
    /// Payload bytes per storage tier, like `tier_items`.
    pub tier_bytes: [AtomicU64; 3],
    /// The queue is unloaded for being idle (see [`Limits::queue_idle_unload`]): these figures are the last its
    /// task published, kept so `/metrics` goes on reporting the queue's depth; its counters go on from them when it
    /// loads again.
    pub unloaded: AtomicBool,
    /// The engine's sequence number at the queue's latest load or unload (see [`MetricsEntry::transition`]): how
    /// `/metrics` tells the queues loaded longest and those unloaded most recently when it reports only some.
    pub transition: AtomicU64,
    /// The creation time of the definition these figures count for (see [`QueueInfo::created_at`]): a queue loaded
    /// again whose definition has another one was deleted and created anew under its name meanwhile (by another
    /// server sharing the store), and must not go on with the old queue's counters.
    created_at: AtomicI64,
    /// The counters as they were when the queue last loaded, in the order of `counters` (0 for a queue's first
    /// load): what a reader of deltas (the dashboard's history) counts from when it sees the queue loaded again,
    /// so that it need not keep a baseline of its own for every unloaded queue.
    at_load: [AtomicU64; 9],
}

/// One queue in [`Engine::metrics_snapshot`].
#[derive(Debug)]
pub struct MetricsEntry {
    /// The queue's name.
    pub name: String,
    /// Its figures.
    pub metrics: Arc<QueueMetrics>,
    /// Whether it is loaded now (its task running), as of the snapshot.
    pub loaded: bool,
    /// [`QueueMetrics::transition`] as of the snapshot: for a loaded queue, when it loaded; for an unloaded one,
    /// when it unloaded (so, as queues unload after the same idle time, how recently it was active). Read once, so
    /// that an order over entries stays an order while queues load and unload.
    pub transition: u64,
}

/// [`Engine::metrics_snapshot`]: every queue's figures, and what deleted queues counted.
#[derive(Debug)]
pub struct MetricsSnapshot {
    /// Every queue this process has loaded and not deleted, loaded or unloaded for being idle.
    pub queues: Vec<MetricsEntry>,
    /// The counters of the queues deleted since start-up (its gauges are zero), as of the same instant as `queues`:
    /// a server-wide total counter adds them, so that deleting a queue never takes it back.
    pub deleted: QueueMetrics,
}

/// The storage tiers of [`QueueMetrics::tier_items`] and `tier_bytes`, in their order.
pub const TIERS: [&str; 3] = ["memory", "disk", "object"];

/// How often a queue that changes re-reads its partitions' tier figures for `/metrics` (a stats call per
/// partition: a query each on PostgreSQL, so not on every pass). A quiet queue reads none.
pub const TIER_REFRESH: Duration = Duration::from_secs(10);
/// How long past its request timeout a lease, complete or extend waits for a queue task stuck in storage (see
/// [`Engine::unstuck`]): long enough that a task which answers at the deadline itself is never beaten to it.
const STUCK_GRACE: Duration = Duration::from_secs(1);

impl QueueMetrics {
    /// The counters, in one list (the gauges are left out): what a deleted queue leaves to the engine's totals.
    fn counters(&self) -> [&AtomicU64; 9] {
        [
            &self.produced,
            &self.leased,
            &self.lease_age_us,
            &self.completed,
            &self.retried,
            &self.lease_expired,
            &self.dead_lettered,
            &self.deduplicated,
            &self.extended,
        ]
    }

    /// Adds `other`'s counters to these.
    fn add_counters(&self, other: &QueueMetrics) {
        for (mine, theirs) in self.counters().into_iter().zip(other.counters()) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Records the counters as they are now as those at the queue's load (see [`QueueMetrics::at_load`]). The
    /// engine calls it when it loads the queue, before its task counts anything; public so that a test of a reader
    /// can stand for a load.
    pub fn mark_loaded(&self) {
        for (at, now) in self.at_load.iter().zip(self.counters()) {
            at.store(now.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// The counters as they were at the queue's latest load (see [`QueueMetrics::mark_loaded`]), as figures whose
    /// gauges are 0.
    pub fn at_load(&self) -> QueueMetrics {
        let out = QueueMetrics::default();
        for (to, at) in out.counters().into_iter().zip(&self.at_load) {
            to.store(at.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        out
    }

    /// Publishes tier figures summed over a queue's partitions.
    pub fn set_tiers(&self, t: &crate::types::TierStats) {
        for (i, f) in [t.memory, t.disk, t.object].into_iter().enumerate() {
            self.tier_items[i].store(f.items, Ordering::Relaxed);
            self.tier_bytes[i].store(f.bytes, Ordering::Relaxed);
        }
    }
}

/// A produce item as the server hands it over.
#[derive(Clone, Debug, Default)]
pub struct ProduceItem {
    /// Zero for "now"; a time closer than the schedule threshold also means now.
    pub enqueue_at: Ts,
    /// See [`Item::reference`].
    pub reference: String,
    /// See [`Item::encoding`].
    pub encoding: String,
    /// See [`Item::kind`].
    pub kind: String,
    /// The payload.
    pub payload: bytes::Bytes,
    /// 0..=[`crate::types::MAX_PRIORITY`]; higher is served first.
    pub priority: u8,
    /// Empty, or the producer's idempotency key (see [`crate::types::NewItem::dedup_id`]).
    pub dedup_id: String,
}

/// A lease answer: the items all come from one partition.
#[derive(Clone, Debug, Default)]
pub struct LeaseResult {
    /// The partition to name in complete and retry.
    pub partition: u32,
    /// The leased items.
    pub items: Vec<Item>,
}

/// Which fields an update sets; `None` leaves the stored value alone.
#[derive(Clone, Debug, Default)]
pub struct QueueUpdate {
    /// The queue to update.
    pub name: String,
    /// New lease timeout.
    pub lease_timeout: Option<Duration>,
    /// New expire timeout.
    pub expire_timeout: Option<Duration>,
    /// New max attempts (0 = unlimited).
    pub max_attempts: Option<u32>,
    /// New dead-letter queue ("" removes it).
    pub dead_queue: Option<String>,
    /// New reference.
    pub reference: Option<String>,
    /// New partition count (may only grow).
    pub requested_partitions: Option<u32>,
    /// New deduplication window.
    pub dedup_window: Option<Duration>,
    /// New retry backoff policy (`base` zero turns it off).
    pub retry_backoff: Option<crate::types::Backoff>,
    /// New longest lease extension (zero: the expire timeout).
    pub max_lease_timeout: Option<Duration>,
}

/// Which items a browse returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BrowseState {
    /// Ready and leased items (id order).
    #[default]
    Queued,
    /// Ready items only.
    Ready,
    /// Leased items only.
    Leased,
    /// Scheduled items.
    Scheduled,
}

/// A browse request: one page of one partition's items, without leasing them.
#[derive(Clone, Debug, Default)]
pub struct BrowseRequest {
    /// The partition.
    pub partition: u32,
    /// Which items.
    pub state: BrowseState,
    /// Only this priority, when set.
    pub priority: Option<u8>,
    /// Start at this id (inclusive); `None` starts at the head.
    pub pivot: Option<ItemId>,
    /// Most items returned.
    pub limit: usize,
}

/// A browsed item: the item, and for leased items who holds it when this server handed the lease out.
#[derive(Clone, Debug, Default)]
pub struct BrowsedItem {
    /// The item.
    pub item: Item,
    /// The `client_id` of the lease request that got it; empty when unknown (leased before a restart, or by
    /// another server sharing the store).
    pub holder: String,
}

/// A page of [`Engine::list_queues`].
#[derive(Debug, Default)]
pub struct QueuePage {
    /// The definitions, in name order.
    pub queues: Vec<QueueInfo>,
    /// Whether more definitions may follow (the next page starts after the last one here); false at the end.
    pub more: bool,
}

/// One page of a browse.
#[derive(Clone, Debug, Default)]
pub struct BrowsePage {
    /// The items, in id order.
    pub items: Vec<BrowsedItem>,
    /// Where the next page starts; `None` at the end. A page may hold fewer than `limit` items (even none) and
    /// still have a next pivot: the scan per request is bounded, so a filter matching few items cannot make one
    /// request read a whole partition.
    pub next_pivot: Option<ItemId>,
}

/// Statistics of one partition as reported by `queue.stats`.
#[derive(Clone, Debug, Default)]
pub struct PartitionReport {
    /// Partition number.
    pub partition: u32,
    /// Ready plus leased items.
    pub total: u64,
    /// Leased items.
    pub total_leased: u64,
    /// Consecutive storage failures (0 = healthy).
    pub failures: u32,
    /// Mean age of items.
    pub average_age: Duration,
    /// Mean time left on leases.
    pub average_leased_age: Duration,
    /// Scheduled items.
    pub scheduled: u64,
    /// Age of the oldest item next in line (see [`crate::types::PartitionStats::oldest_ready_age`]).
    pub oldest_ready_age: Duration,
    /// Items and payload bytes by storage tier (see [`crate::types::TierStats`]).
    pub tiers: crate::types::TierStats,
}

/// `queue.stats` answer.
#[derive(Clone, Debug, Default)]
pub struct QueueStats {
    /// Produce requests waiting in the inbox.
    pub produce_waiting: u64,
    /// Lease requests long-polling.
    pub lease_waiting: u64,
    /// Complete requests waiting in the inbox.
    pub complete_waiting: u64,
    /// Requests in the inbox.
    pub in_flight: u64,
    /// One entry per partition.
    pub partitions: Vec<PartitionReport>,
}

#[derive(Debug)]
struct QueueHandle {
    /// The queue's namespace, for authorisation without a storage read.
    namespace: Arc<str>,
    tx: mpsc::Sender<Msg>,
    metrics: Arc<QueueMetrics>,
    /// Its sender is dropped when the task has ended (partitions closed, metrics moved aside when it unloaded):
    /// any number of waiters see it, none of them holding a lock meanwhile (see [`QueueHandle::wait_stopped`]).
    stopped: watch::Receiver<()>,
    /// Where definitions stored after the load wait for the task (see [`NextInfo`]).
    next_info: Arc<NextInfo>,
    /// Which load of the queue this is (see `Inner::loads`): an unloading task removes its own handle, never the
    /// next one's.
    load: u64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// Shared with every queue task (see `QueueTask::config`).
    config: Arc<EngineConfig>,
    queues: RwLock<HashMap<String, Arc<QueueHandle>>>,
    /// The metrics of queues unloaded for being idle, with the last figures their tasks published: `/metrics`
    /// keeps reporting their depth, and the next load goes on from them. A few hundred bytes per queue, against the
    /// tens of kilobytes of a loaded one, and the task that loads the queue again at its earliest deadline. Lock
    /// order: `queues` first.
    unloaded: RwLock<HashMap<String, Unloaded>>,
    /// Tasks waiting to load an unloaded queue at its deadline (see [`Engine::wake_tasks`]).
    wake_tasks: Arc<AtomicUsize>,
    /// The counters of deleted queues, summed (see [`MetricsSnapshot::deleted`]). Added to under the `unloaded`
    /// lock, in the same critical section that drops the queue's metrics, and read under it: a snapshot counts a
    /// deleted queue either in its table or here, never in both or neither.
    deleted: QueueMetrics,
    /// Loads and unloads so far, for [`QueueMetrics::transition`].
    transitions: AtomicU64,
    /// Queue loads so far (each task's `QueueHandle::load`).
    loads: AtomicU64,
    /// Serialises the loads of queues with the changes of their definitions (update, delete), so that a task
    /// takes definitions in store order and no queue loads while it is deleted. Held only for storage calls on
    /// the queue definitions and for changes of the tables, never while waiting for a queue's task: a task stuck
    /// in a storage call would hold every other queue's load, update and delete with it. What waits for one
    /// queue's task (its delete stopping it, a load waiting for its previous task to end) does so without it, and
    /// `deleting` keeps that queue's loads and changes out meanwhile.
    load_lock: Mutex<()>,
    /// The queues being deleted, each with a receiver whose sender the delete drops when it ends (see
    /// [`Engine::lock_queue`]). Changed under `load_lock`.
    deleting: std::sync::Mutex<HashMap<String, watch::Receiver<()>>>,
    /// Numbers the definitions handed to queue tasks (see [`NextInfo`]), in store order: taken under `load_lock`.
    info_seq: AtomicU64,
    shutting_down: AtomicBool,
    /// This engine's id among servers sharing a store (owner of the redrive tasks it runs).
    instance: String,
    /// Ids of the redrive tasks running in this process.
    redrives: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The rebalance tasks watched by this process, with their progress.
    rebalances: std::sync::Mutex<HashMap<String, RebalanceProgress>>,
    /// Serialises read-modify-write updates of task records (see `task_records`), and the starts of redrive and
    /// rebalance tasks (their "one running task" check and their save). Taken after `load_lock` (a queue delete
    /// ends the queue's rebalances under it), never before: no holder of this lock waits for `load_lock`.
    task_lock: Mutex<()>,
    /// Requests of the serving path (produce, lease, complete, retry, extend) taken by any queue so far: background
    /// work (a rebalance) reads it to see whether the server is serving and yields when it is.
    activity: Arc<AtomicU64>,
    /// Tests only: runs in [`Engine::unloaded`] before it takes the tables' locks, so a test can act between the
    /// unload and the queue's entry in the unloaded table (see `tests::a_deadline_passed_during_the_unload_still_loads_the_queue`).
    #[cfg(test)]
    unload_hook: std::sync::Mutex<Option<TestHook>>,
}

/// A test's callback (see `Inner::unload_hook`).
#[cfg(test)]
#[derive(Clone)]
struct TestHook(Arc<dyn Fn() + Send + Sync>);

#[cfg(test)]
impl std::fmt::Debug for TestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHook")
    }
}

/// The partitions of `placement` placed in the store named `store`, by number.
fn placed_in(placement: &[PartitionInfo], store: &str) -> Vec<u32> {
    placement
        .iter()
        .filter(|p| p.storage_name == store)
        .map(|p| p.partition)
        .collect()
}

/// Shortest period of [`Engine::forget_deleted_elsewhere`]'s sweep (otherwise the idle-unload time).
const MIN_FORGET_SWEEP: Duration = Duration::from_secs(10);
/// Definitions read per page by [`Engine::forget_deleted_elsewhere`].
const FORGET_PAGE: usize = 1000;

/// An entry of the unloaded table: the queue's metrics, and the task that loads it again at its earliest deadline.
#[derive(Debug)]
struct Unloaded {
    metrics: Arc<QueueMetrics>,
    /// Dropped with the entry (the queue loaded again, deleted, or forgotten), which ends the task.
    _wake: Option<WakeTask>,
}

/// Ends its waiting task when dropped, unless the task has begun to load the queue: whichever of the two claims
/// `started` first decides, so a load under way is never cut short (the task drops this very entry when it loads
/// the queue).
#[derive(Debug)]
struct WakeTask {
    started: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl Drop for WakeTask {
    fn drop(&mut self) {
        if !self.started.swap(true, Ordering::AcqRel) {
            self.task.abort();
        }
    }
}

/// Counts a waiting task in [`Inner::wake_tasks`] while it exists; moved into the task, so an aborted one counts
/// off too.
struct WakeCount(Arc<AtomicUsize>);

impl WakeCount {
    fn new(n: &Arc<AtomicUsize>) -> WakeCount {
        n.fetch_add(1, Ordering::Relaxed);
        WakeCount(n.clone())
    }
}

impl Drop for WakeCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engine handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Builds an engine; queues load lazily on first use.
    pub fn new(config: EngineConfig) -> Result<Engine, QueueError> {
        if config.stores.is_empty() {
            return Err(validate::invalid(
                "partition-storage",
                "at least one store is required",
            ));
        }
        if !config.stores.iter().any(|s| s.affinity > 0.0) {
            return Err(validate::invalid(
                "partition-storage",
                "at least one store needs an affinity greater than 0",
            ));
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                config: Arc::new(config),
                queues: RwLock::new(HashMap::new()),
                unloaded: RwLock::new(HashMap::new()),
                wake_tasks: Arc::new(AtomicUsize::new(0)),
                deleted: QueueMetrics::default(),
                transitions: AtomicU64::new(0),
                loads: AtomicU64::new(0),
                load_lock: Mutex::new(()),
                deleting: Default::default(),
                info_seq: AtomicU64::new(0),
                shutting_down: AtomicBool::new(false),
                instance: instance_id(),
                redrives: Default::default(),
                rebalances: Default::default(),
                task_lock: Mutex::new(()),
                activity: Arc::new(AtomicU64::new(0)),
                #[cfg(test)]
                unload_hook: Default::default(),
            }),
        })
    }

    /// Forwards the stores' notices (items another server sharing a store made ready) to the queue tasks holding
    /// those partitions, so consumers waiting here are served at once rather than at the next periodic refresh
    /// (which stays, and covers any notice lost). Call once, from within the runtime; the forwarding tasks end with
    /// the engine or the store. With a shared store, also starts the sweep that forgets queues unloaded here and
    /// deleted by another server (see [`Engine::forget_deleted_elsewhere`]).
    pub fn watch_notices(&self) {
        let idle = self.inner.config.limits.queue_idle_unload;
        if !idle.is_zero() && self.inner.config.stores.iter().any(|s| s.store.shared()) {
            let inner = Arc::downgrade(&self.inner);
            let clock = self.inner.config.clock.clone();
            let every = idle.max(MIN_FORGET_SWEEP);
            tokio::spawn(async move {
                loop {
                    clock.sleep_until(clock.now().add(every)).await;
                    let Some(inner) = inner.upgrade() else { return };
                    if inner.shutting_down.load(Ordering::Acquire) {
                        return;
                    }
                    if let Err(e) = (Engine { inner }).forget_deleted_elsewhere().await {
                        tracing::debug!(error = %e, "sweep of queues deleted by other servers failed");
                    }
                }
            });
        }
        for s in &self.inner.config.stores {
            let Some(mut rx) = s.store.notices() else {
                continue;
            };
            let inner = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                loop {
                    let notice = match rx.recv().await {
                        Ok(n) => n,
                        // Skipped notices only wait for the periodic refresh.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    let Some(inner) = inner.upgrade() else { return };
                    if inner.shutting_down.load(Ordering::Acquire) {
                        return;
                    }
                    // A queue not loaded here has no one waiting here.
                    let handle = inner
                        .queues
                        .read()
                        .ok()
                        .and_then(|q| q.get(&*notice.queue).cloned());
                    if let Some(h) = handle {
                        // A full inbox is busy anyway: its next pass serves the waiters.
                        let _ = h.tx.try_send(Msg::Wake(notice.partition));
                    }
                }
            });
        }
    }

    /// The engine's clock.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.config.clock
    }

    /// The auth store that lives with the queue definitions.
    pub fn auth_store(&self) -> Arc<dyn crate::auth::AuthStore> {
        self.inner.config.queues.auth()
    }

    /// Whether any queue belongs to `namespace`.
    pub async fn has_queues_in(&self, namespace: &str) -> Result<bool, QueueError> {
        Ok(!self.list_queues("", 1, namespace).await?.queues.is_empty())
    }

    /// The engine's limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    fn check_running(&self) -> Result<(), QueueError> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(QueueError::ShuttingDown);
        }
        Ok(())
    }

    // ---- queue definitions -------------------------------------------------------------------------------------

    /// Creates a queue.
    pub async fn create_queue(&self, info: QueueInfo) -> Result<(), QueueError> {
        self.create_queue_at(info, Ts::ZERO).await
    }

    /// [`Engine::create_queue`], with the creation time `created_at` unless it is zero (a restore keeps the
    /// backed-up queue's). The creation time is the queue's incarnation (see
    /// [`PartitionStore::create_incarnation`]): its partitions are made for it before the definition is stored.
    async fn create_queue_at(&self, mut info: QueueInfo, created_at: Ts) -> Result<(), QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", &info.name)?;
        validate_options(&info)?;
        if info.lease_timeout.is_zero() {
            return Err(validate::required("lease_timeout", "'1m' is a typical value"));
        }
        if info.expire_timeout.is_zero() {
            return Err(validate::required("expire_timeout", "'24h' is a typical value"));
        }
        if info.namespace.is_empty() {
            info.namespace = DEFAULT_NAMESPACE.to_string();
        }
        if info.requested_partitions == 0 {
            // As Querator: a queue asks for at least one partition (configuration files default it themselves).
            if info.partitions.is_empty() {
                return Err(validate::invalid(
                    "requested_partitions",
                    "cannot be less than '1'",
                ));
            }
            info.requested_partitions = u32::try_from(info.partitions.len()).unwrap_or(u32::MAX);
        }
        self.validate_dead_queue(&info.name, &info.dead_queue).await?;
        if info.partitions.is_empty() {
            info.partitions = place(&self.weights(), 0, info.requested_partitions);
        } else {
            self.validate_placement(&info)?;
        }
        // A queue that exists is not touched: creating its partitions would make again, empty, those that a delete
        // running on another server has just destroyed (it removes the definition next), and servers that still
        // serve the deleted queue would store into them what a queue created later under the name then finds. A
        // definition found absent here was removed after its partitions were destroyed, so the create below starts
        // the new queue afresh.
        if self.inner.config.queues.get(&info.name).await?.is_some() {
            return Err(QueueError::QueueExists(info.name));
        }
        let now = self.clock().now();
        info.created_at = if created_at.is_zero() { now } else { created_at };
        info.updated_at = now;
        // Made for this incarnation: a delete of an older one still running on another server (it read the
        // definition before a delete there and this create) destroys only its own partitions, not these.
        if let Err(e) = self
            .prepare_partitions(&info.name, info.created_at, &info.partitions, 0)
            .await
        {
            self.forget_unstored_partitions(&info).await;
            return Err(e);
        }
        // The dead-letter queue is checked again, and the definition stored, under the load lock, as a delete's
        // check for the queues naming it is: a delete of it that ran while the partitions were prepared (outside
        // the lock: they may be many) found no user and went on, and the queue would have named a deleted one. A
        // queue created later under that name, in any namespace, would then have received its dead letters.
        let guard = self.inner.load_lock.lock().await;
        let stored = match self.validate_dead_queue(&info.name, &info.dead_queue).await {
            Ok(()) => self.inner.config.queues.add(&info).await.map_err(|e| {
                if e.kind == StorageErrorKind::AlreadyExists {
                    QueueError::QueueExists(info.name.clone())
                } else {
                    e.into()
                }
            }),
            Err(e) => Err(e),
        };
        drop(guard);
        if stored.is_err() {
            self.forget_unstored_partitions(&info).await;
        }
        stored
    }

    /// Destroys, best effort, the partitions a create made for a definition it did not store (its partitions
    /// failed half-way, or a create of the name on another server stored its definition first): nothing would
    /// ever serve or destroy them, and a shared store keeps the queue's dedup records while any of its partitions
    /// is left (see [`PartitionStore::create_incarnation`]). Only in shared stores, which keep incarnations apart: in
    /// a store that does not, the partitions may be the stored queue's own. A definition stored under the same
    /// incarnation (two creates in the same microsecond) shares them, so they stay.
    async fn forget_unstored_partitions(&self, info: &QueueInfo) {
        match self.inner.config.queues.get(&info.name).await {
            Ok(Some(stored)) if stored.created_at == info.created_at => return,
            Ok(_) => {}
            Err(_) => return,
        }
        for s in self.inner.config.stores.iter().filter(|s| s.store.shared()) {
            let mine = placed_in(&info.partitions, &s.name);
            if mine.is_empty() {
                continue;
            }
            if let Err(e) = s
                .store
                .destroy_many_incarnation(&info.name, info.created_at, &mine)
                .await
            {
                tracing::warn!(queue = %info.name, store = %s.name, error = %e, "partitions of a queue not created are left behind");
            }
        }
    }

    /// Adds a queue declared in the configuration file, unless it exists already.
    pub async fn declare_queue(&self, info: QueueInfo) -> Result<(), QueueError> {
        match self.create_queue(info).await {
            Ok(()) | Err(QueueError::QueueExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn weights(&self) -> Vec<StoreWeight> {
        self.inner
            .config
            .stores
            .iter()
            .map(|s| StoreWeight {
                name: s.name.clone(),
                affinity: s.affinity,
            })
            .collect()
    }

    fn validate_placement(&self, info: &QueueInfo) -> Result<(), QueueError> {
        for (i, p) in info.partitions.iter().enumerate() {
            if p.partition as usize != i {
                return Err(validate::invalid(
                    "partitions",
                    format!(
                        "partition numbers must run from 0 in order, found '{}' at position {i}",
                        p.partition
                    ),
                ));
            }
            if !self.inner.config.stores.iter().any(|s| s.name == p.storage_name) {
                return Err(validate::rejected(
                    "partition storage",
                    format!(
                        "queue '{}' references '{}' which is undefined",
                        info.name, p.storage_name
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn validate_dead_queue(&self, name: &str, dead_queue: &str) -> Result<(), QueueError> {
        if dead_queue.is_empty() {
            return Ok(());
        }
        validate::queue_name("dead_queue", dead_queue)?;
        if dead_queue == name {
            return Err(QueueError::Invalid("dead_queue cannot reference itself".into()));
        }
        let Some(dlq) = self.inner.config.queues.get(dead_queue).await? else {
            return Err(QueueError::Invalid(format!(
                "dead_queue does not exist; '{dead_queue}' was not found, create it first"
            )));
        };
        // A queue whose delete is under way still has its definition until the delete ends; an update naming it
        // (under the load lock, as the delete's check for users is) would be left pointing at a deleted queue.
        if self
            .inner
            .deleting
            .lock()
            .map_err(poisoned)?
            .contains_key(dead_queue)
        {
            return Err(QueueError::Invalid(format!(
                "dead_queue does not exist; '{dead_queue}' is being deleted"
            )));
        }
        if !dlq.dead_queue.is_empty() {
            return Err(validate::invalid(
                "dead_queue",
                format!("'{dead_queue}' already has its own dead_queue configured"),
            ));
        }
        Ok(())
    }

    /// Changes the fields the update sets, and only those.
    ///
    /// Returns once the queue's task took the new definition, or [`QueueError::Untimed`] when it does not within
    /// `limits.default_request_timeout` (a task stuck in a storage call): the definition is stored then, and the
    /// task takes it as soon as it is free again (a retry of the update stores the same fields and waits again).
    pub async fn update_queue(&self, update: QueueUpdate) -> Result<(), QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", &update.name)?;
        let deadline = self.admin_deadline();
        let taken = {
            let _guard = self.lock_queue(&update.name).await?;
            self.update_queue_locked(update).await?
        };
        taken.wait(deadline, "update").await
    }

    /// [`Engine::update_queue`] for a caller holding the load lock; the caller waits for the task to take the new
    /// definition (see [`InfoTaken`]).
    async fn update_queue_locked(&self, update: QueueUpdate) -> Result<InfoTaken, QueueError> {
        let Some(mut info) = self.inner.config.queues.get(&update.name).await? else {
            return Err(QueueError::QueueNotFound(update.name));
        };
        if let Some(t) = update.lease_timeout {
            info.lease_timeout = t;
        }
        if let Some(t) = update.expire_timeout {
            info.expire_timeout = t;
        }
        if let Some(m) = update.max_attempts {
            info.max_attempts = m;
        }
        if let Some(r) = update.reference {
            info.reference = r;
        }
        if let Some(d) = update.dead_queue {
            self.validate_dead_queue(&info.name, &d).await?;
            info.dead_queue = d;
        }
        if let Some(n) = update.requested_partitions {
            let have = info.partitions.len() as u32;
            if n != have {
                if let Some(id) = self.rebalancing(&info.name).await? {
                    return Err(validate::invalid(
                        "requested_partitions",
                        format!(
                            "rebalance task '{id}' is running on '{}'; change partitions once it is done",
                            info.name
                        ),
                    ));
                }
            }
            if n < have {
                return Err(validate::invalid(
                    "requested_partitions",
                    format!("cannot shrink from '{have}' to '{n}' partitions"),
                ));
            }
            validate::partition_count(n)?;
            info.partitions.extend(place(&self.weights(), have, n - have));
            info.requested_partitions = n;
            self.prepare_partitions(&info.name, info.created_at, &info.partitions, have as usize)
                .await?;
        }
        if let Some(w) = update.dedup_window {
            info.dedup_window = w;
        }
        if let Some(b) = update.retry_backoff {
            info.retry_backoff = b;
        }
        if let Some(m) = update.max_lease_timeout {
            info.max_lease_timeout = m;
        }
        validate_options(&info)?;
        info.updated_at = self.clock().now();
        self.inner.config.queues.update(&info).await?;
        Ok(self.push_info(info))
    }

    /// Deletes a queue with its items. Waiting requests get "queue is shutting down".
    ///
    /// The partitions go first and the definition last: a definition deleted first, then a failed destroy (a full
    /// disk) or a crash in between, left the items on disk under a name free for a new queue, which then served
    /// them (the stores reuse a partition that exists). Now a failed destroy fails the request and keeps the
    /// definition, so the delete can be retried; a crash leaves the queue defined, with what was not destroyed yet.
    ///
    /// A queue whose task does not stop within `limits.default_request_timeout` (stuck in a storage call) is not
    /// deleted: the request fails with [`QueueError::Untimed`] and the queue stays, with its items. Its task may
    /// still stop once its call returns (answering what waits in its inbox with "queue is shutting down"); the
    /// next request loads it again, and a retried delete goes on from there. Meanwhile only requests to that
    /// queue wait for the delete: the engine-wide load lock is not held while its task stops.
    pub async fn delete_queue(&self, name: &str) -> Result<(), QueueError> {
        self.delete_queue_with(name, false).await
    }

    /// [`Engine::delete_queue`], with `force` (Querator's `QueuesDeleteRequest.force`, which Querator ignores)
    /// deciding what happens to a dead-letter queue still in use.
    ///
    /// A queue that another queue dead-letters into is refused without `force`: deleted, its name would dangle
    /// (dead items held unseen in the other queue), and a queue created later under the name, in any namespace,
    /// would receive them without the produce permission naming a dead-letter queue takes. The other queue is not
    /// named in the error: it may be another namespace's. With `force`, every queue naming it has its `dead_queue`
    /// cleared first (its dead items are then deleted, as on a queue without one), in the same critical section.
    pub async fn delete_queue_with(&self, name: &str, force: bool) -> Result<(), QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", name)?;
        let deadline = self.admin_deadline();
        let (info, deleting, cleared) = {
            let _guard = self.lock_queue(name).await?;
            let Some(info) = self.inner.config.queues.get(name).await? else {
                return Err(QueueError::QueueNotFound(name.to_string()));
            };
            let users = self.dead_letter_users(name).await?;
            let mut cleared = Vec::new();
            if !users.is_empty() {
                if !force {
                    return Err(validate::invalid(
                        "queue_name",
                        format!(
                            "'{name}' is the dead_queue of another queue; point that queue at another dead_queue, \
                             delete it first, or delete with force to clear its dead_queue"
                        ),
                    ));
                }
                for user in users {
                    tracing::info!(queue = %user, dead_queue = name, "dead_queue cleared: its dead-letter queue is deleted");
                    cleared.push(
                        self.update_queue_locked(QueueUpdate {
                            name: user,
                            dead_queue: Some(String::new()),
                            ..Default::default()
                        })
                        .await?,
                    );
                }
            }
            // Marked in the critical section that found no user (or cleared them): from here no update may name
            // the queue as a dead-letter queue (see `validate_dead_queue`), and nothing loads it.
            (info, self.mark_deleting(name)?, cleared)
        };
        // A user's task must have taken its cleared dead_queue before the definition goes: it must not move dead
        // items to the name after the delete (a queue created under it meanwhile would receive them). A user stuck
        // in a storage call fails the delete (its dead_queue stays cleared; a retry finds no user).
        for taken in cleared {
            taken.wait(deadline, "delete").await?;
        }
        self.delete_queue_in_use(name, info, deleting, deadline).await
    }

    /// [`Engine::delete_queue`] without the dead-letter check: a restore with overwrite puts a queue of the same
    /// name back at once. The caller marked the queue as being deleted (`deleting`), under the load lock; this
    /// stops its task without that lock, by `deadline`, then destroys its partitions and, under the lock again,
    /// its definition.
    async fn delete_queue_in_use(
        &self,
        name: &str,
        info: QueueInfo,
        deleting: Deleting<'_>,
        deadline: AdminDeadline,
    ) -> Result<(), QueueError> {
        let handle = {
            let mut queues = self.inner.queues.write().map_err(poisoned)?;
            let h = queues.remove(name);
            shrink_sparse(&mut queues);
            h
        };
        if let Some(h) = &handle {
            let stopped = deadline.bound("delete", async {
                stop_queue(h).await;
                Ok(())
            });
            if let Err(e) = stopped.await {
                // Back in the table, where nothing replaced it (loads of the queue wait for `deleting`): the
                // queue stays, and requests reach its task again. If the shutdown got into its inbox, the task
                // stops once its storage call returns, and the next request loads the queue afresh.
                let mut queues = self.inner.queues.write().map_err(poisoned)?;
                queues.entry(name.to_string()).or_insert_with(|| h.clone());
                tracing::warn!(queue = name, timeout = ?deadline.limit, "queue not deleted: its task did not stop in time (stuck in a storage call?)");
                return Err(e);
            }
        }
        // After the stop: a task unloading meanwhile finds its handle gone and leaves no metrics behind, and the
        // stopped task counts nothing more, so its counters pass to the deleted queues' whole. The handle's
        // metrics and an unloaded entry's are the same figures when both exist (a load takes the unloaded entry's).
        {
            let mut unloaded = self.inner.unloaded.write().map_err(poisoned)?;
            if let Some(m) = unloaded
                .remove(name)
                .map(|u| u.metrics)
                .or_else(|| handle.as_ref().map(|h| h.metrics.clone()))
            {
                self.inner.deleted.add_counters(&m);
            }
            shrink_sparse(&mut unloaded);
        }
        // One call per store: a store that can delete many partitions in one write does (fjall).
        for s in &self.inner.config.stores {
            let mine = placed_in(&info.partitions, &s.name);
            if mine.is_empty() {
                continue;
            }
            // Only the incarnation read above: when another server deleted the queue and created it again meanwhile,
            // the new queue's partitions are not this delete's.
            if let Err(e) = s
                .store
                .destroy_many_incarnation(name, info.created_at, &mine)
                .await
            {
                tracing::warn!(queue = name, store = %s.name, partitions = mine.len(), error = %e, "partition data not removed; the queue stays defined");
                return Err(e.into());
            }
        }
        let _guard = self.inner.load_lock.lock().await;
        // A rebalance under way ends with the queue: its moves' destinations (not in the stored placement yet)
        // hold copies of moved items, and the stores reuse a partition that exists, so a queue created again under
        // the name and placed there, or the old move resumed on it, served them.
        self.end_rebalances_of_deleted(name, info.created_at).await?;
        // The definition read above, not a new queue another server created under the name meanwhile.
        self.inner
            .config
            .queues
            .delete_incarnation(name, info.created_at)
            .await?;
        // Under the lock: whoever waited for the delete finds the definition gone.
        drop(deleting);
        Ok(())
    }

    /// The deadline of an admin call's waits on a queue's task: `limits.default_request_timeout` from now, in
    /// real time (tokio's clock), as [`Engine::untimed`]'s.
    fn admin_deadline(&self) -> AdminDeadline {
        let limit = self.limits().default_request_timeout;
        AdminDeadline {
            at: tokio::time::Instant::now() + limit,
            limit,
        }
    }

    /// Takes the load lock once no delete of `name` is under way (a delete's wait for the queue's task happens
    /// without the lock; see [`Inner::load_lock`]). A delete ends by its own deadline, so this waits at most about
    /// that long (plus the delete's storage calls).
    async fn lock_queue(&self, name: &str) -> Result<MutexGuard<'_, ()>, QueueError> {
        loop {
            let guard = self.inner.load_lock.lock().await;
            let pending = self.inner.deleting.lock().map_err(poisoned)?.get(name).cloned();
            let Some(mut ended) = pending else {
                return Ok(guard);
            };
            drop(guard);
            // Resolves (with an error: nothing is ever sent) once the delete drops its sender.
            let _ = ended.changed().await;
        }
    }

    /// Marks `name` as being deleted until the returned guard drops. Called under the load lock taken with
    /// [`Engine::lock_queue`], so no other delete of it is under way.
    fn mark_deleting(&self, name: &str) -> Result<Deleting<'_>, QueueError> {
        let (tx, rx) = watch::channel(());
        self.inner
            .deleting
            .lock()
            .map_err(poisoned)?
            .insert(name.to_string(), rx);
        Ok(Deleting {
            inner: &self.inner,
            name: name.to_string(),
            _ended: tx,
        })
    }

    /// Checks that no store gets more partitions of the queue than it holds, then creates partitions
    /// `placement[from..]` in their stores, so the request that asks for them pays for them (not the first
    /// produce, and not the queue task).
    async fn prepare_partitions(
        &self,
        queue: &str,
        incarnation: Ts,
        placement: &[PartitionInfo],
        from: usize,
    ) -> Result<(), QueueError> {
        for s in &self.inner.config.stores {
            let n = placement.iter().filter(|p| p.storage_name == s.name).count();
            let max = s.store.max_partitions();
            if n > max as usize {
                return Err(QueueError::Invalid(format!(
                    "requested_partitions is invalid; partition storage '{}' ({}) holds at most '{max}' partitions \
                     of one queue, this placement puts '{n}' there",
                    s.name,
                    s.store.driver()
                )));
            }
        }
        for s in &self.inner.config.stores {
            let new = placed_in(&placement[from.min(placement.len())..], &s.name);
            if !new.is_empty() {
                s.store.create_incarnation(queue, incarnation, &new).await?;
            }
        }
        Ok(())
    }

    /// The queue's definition.
    pub async fn queue_info(&self, name: &str) -> Result<QueueInfo, QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", name)?;
        self.inner
            .config
            .queues
            .get(name)
            .await?
            .ok_or_else(|| QueueError::QueueNotFound(name.to_string()))
    }

    /// One page of queue definitions in name order, from `pivot` (inclusive), at most `limit` of them, only those
    /// of `namespace` unless it is empty. The page also stops before the definition that would take the partitions
    /// it names over [`Limits::max_list_partitions`] (always at least one definition), so it may hold fewer than
    /// `limit` before the end: [`QueuePage::more`] says whether definitions may follow, and the next page starts
    /// after the last one returned.
    pub async fn list_queues(
        &self,
        pivot: &str,
        limit: usize,
        namespace: &str,
    ) -> Result<QueuePage, QueueError> {
        self.check_running()?;
        let budget = self.limits().max_list_partitions.max(1);
        let mut page = QueuePage::default();
        let mut named = 0usize;
        let mut from = pivot.to_string();
        // Filter after fetching but keep paging, so the limit counts matching queues (Querator applies the limit
        // before the namespace filter). A filtered page reads at least MIN_LIST_CHUNK definitions per store call:
        // reading limit + 1 made a one-queue page of a small namespace cost one store read per two queues of the
        // others (50,000 reads at 100,000 queues).
        let want = |got: usize| {
            let n = limit.saturating_sub(got).max(1) + 1;
            if namespace.is_empty() {
                n
            } else {
                n.max(MIN_LIST_CHUNK)
            }
        };
        // Store reads start small and grow eightfold while the definitions stay small: a definition may name
        // 65,536 partitions (about 2.7 MB decoded), so one read of `limit` + 1 of them could take gigabytes before
        // any bound was checked. The widest definition seen sizes the next read to what the budget has left.
        let mut chunk = want(0).min(MIN_LIST_CHUNK);
        let mut widest = 1usize;
        loop {
            let read = self.inner.config.queues.list(&from, chunk).await?;
            let full = read.len() >= chunk;
            let mut last = None;
            for q in read {
                if page.queues.len() >= limit {
                    page.more = true;
                    return Ok(page);
                }
                let width = q.partitions.len().max(1);
                widest = widest.max(width);
                last = Some(q.name.clone());
                if namespace.is_empty() || q.namespace == namespace {
                    if !page.queues.is_empty() && named.saturating_add(width) > budget {
                        page.more = true;
                        return Ok(page);
                    }
                    named = named.saturating_add(width);
                    page.queues.push(q);
                }
            }
            match (full, last) {
                (true, Some(l)) if page.queues.len() < limit => {
                    from = format!("{l}\0");
                    let room = (budget.saturating_sub(named) / widest).max(1);
                    chunk = want(page.queues.len()).min(chunk.saturating_mul(8)).min(room);
                }
                (full, _) => {
                    page.more = full;
                    return Ok(page);
                }
            }
        }
    }

    /// Probes the queue store (health checks); the error keeps its kind and cause for the log.
    pub async fn health(&self) -> Result<(), StorageError> {
        self.inner.config.queues.ping().await
    }

    /// The namespace of a queue, `None` when there is no such queue (or its name is not valid). Loads the queue
    /// when it is not running yet (the request being authorised is about to use it anyway), so a running queue
    /// answers without a storage read.
    pub async fn queue_namespace(&self, name: &str) -> Result<Option<Arc<str>>, QueueError> {
        // Bounded as an admin call: a load may wait for the queue's previous task to end, or for its delete.
        let handle = self.untimed("queue lookup", self.handle(name)).await;
        match handle {
            Ok(h) => Ok(Some(h.namespace.clone())),
            Err(QueueError::QueueNotFound(_) | QueueError::Invalid(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks, in Querator's order, what comes before the ids of a complete, retry or delete: that the queue
    /// exists, then that it has `partition`. Used on the error path only (when the ids do not parse), so the answer
    /// names the first problem as Querator does; it may read the queue store.
    pub async fn check_target(&self, name: &str, partition: i64) -> Result<(), QueueError> {
        let info = self.queue_info(name).await?;
        let count = info.partitions.len().max(info.requested_partitions as usize);
        match usize::try_from(partition) {
            Ok(p) if p < count => Ok(()),
            _ => Err(validate::no_such_partition(partition)),
        }
    }

    // ---- queue operations --------------------------------------------------------------------------------------

    async fn handle(&self, name: &str) -> Result<Arc<QueueHandle>, QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", name)?;
        // A task whose inbox is closed stopped on its own (unloaded, or its queue deleted by another server sharing
        // the store, whose handle leaves the table as the task ends): load the queue afresh, which finds it missing
        // or created anew.
        if let Some(h) = self.inner.queues.read().map_err(poisoned)?.get(name) {
            if !h.tx.is_closed() {
                return Ok(h.clone());
            }
        }
        let (_guard, stale) = loop {
            let guard = self.lock_queue(name).await?;
            let current = self.inner.queues.read().map_err(poisoned)?.get(name).cloned();
            match current {
                Some(h) if !h.tx.is_closed() => return Ok(h),
                // The task is stopping: it closes its partitions and, when it unloaded, moves its metrics aside
                // before it ends. The next task opens the partitions only after that, which is waited for
                // without the load lock (a stuck close would hold every other queue's load with it).
                Some(h) if !h.has_stopped() => {
                    drop(guard);
                    h.wait_stopped().await;
                }
                // A task that ended and left its handle here (stopped by a delete that then timed out, see
                // `delete_queue_in_use`): its figures go on in the next task's.
                stale => break (guard, stale),
            }
        };
        self.check_running()?;
        let Some(info) = self.inner.config.queues.get(name).await? else {
            self.forget_deleted(name)?;
            return Err(QueueError::QueueNotFound(name.to_string()));
        };
        // A rebalance that was running when the server stopped resumes with the queue, before it serves anything.
        let plan = self
            .rebalance_plan_for(name, info.partitions.len(), info.created_at)
            .await?;
        let (tx, rx) = mpsc::channel(self.limits().max_requests_per_queue.max(1));
        // A queue loaded again goes on with the metrics it had: counters do not restart, and its depth was never
        // missing from `/metrics`. Unless its definition is another one: deleted and created again under its name
        // by another server while unloaded here, it is a new queue, whose counters start from 0. The old one's
        // pass to the deleted queues' whole in the critical section that drops them, as for a delete seen here.
        let metrics: Arc<QueueMetrics> = {
            let mut unloaded = self.inner.unloaded.write().map_err(poisoned)?;
            match unloaded.get(name) {
                Some(u) if u.metrics.created_at.load(Ordering::Relaxed) == info.created_at.0 => {
                    u.metrics.clone()
                }
                Some(_) => {
                    if let Some(old) = unloaded.remove(name) {
                        self.inner.deleted.add_counters(&old.metrics);
                    }
                    Arc::default()
                }
                None => match stale {
                    Some(h) if h.metrics.created_at.load(Ordering::Relaxed) == info.created_at.0 => {
                        h.metrics.clone()
                    }
                    Some(h) => {
                        self.inner.deleted.add_counters(&h.metrics);
                        Arc::default()
                    }
                    None => Arc::default(),
                },
            }
        };
        metrics.created_at.store(info.created_at.0, Ordering::Relaxed);
        metrics.mark_loaded();
        let namespace: Arc<str> = if info.namespace.is_empty() {
            DEFAULT_NAMESPACE.into()
        } else {
            info.namespace.as_str().into()
        };
        // The definition just read is at least as new as every one numbered so far (all stored under this lock).
        let next_info = Arc::new(NextInfo::new(self.inner.info_seq.load(Ordering::Relaxed)));
        let task = QueueTask::new(
            info,
            rx,
            Arc::new(EngineSink(Arc::downgrade(&self.inner))),
            self.inner.config.clone(),
            metrics.clone(),
        )
        .with_activity(self.inner.activity.clone())
        .with_next_info(next_info.clone())
        .with_rebalance(plan);
        let load = self.inner.loads.fetch_add(1, Ordering::Relaxed) + 1;
        let engine = Arc::downgrade(&self.inner);
        let queue = name.to_string();
        let (ended, stopped) = watch::channel(());
        tokio::spawn(async move {
            // Dropped when the task is over, its exit handled (or when it panicked): see `QueueHandle::stopped`.
            let _ended = ended;
            let exit = task.run().await;
            let Some(inner) = engine.upgrade() else { return };
            match exit {
                queue::Exit::Unloaded(left, wake) => Engine { inner }.unloaded(&queue, load, left, wake),
                queue::Exit::Gone => Engine { inner }.gone(&queue, load),
                queue::Exit::Stopped => {}
            }
        });
        let h = Arc::new(QueueHandle {
            namespace,
            tx,
            metrics: metrics.clone(),
            stopped,
            next_info,
            load,
        });
        {
            let mut queues = self.inner.queues.write().map_err(poisoned)?;
            metrics.unloaded.store(false, Ordering::Relaxed);
            metrics.transition.store(
                self.inner.transitions.fetch_add(1, Ordering::Relaxed) + 1,
                Ordering::Relaxed,
            );
            let mut unloaded = self.inner.unloaded.write().map_err(poisoned)?;
            if unloaded.remove(name).is_some() {
                shrink_sparse(&mut unloaded);
            }
            queues.insert(name.to_string(), h.clone());
        }
        Ok(h)
    }

    /// Called under the load lock when `name` has no definition: an idle-unloaded queue that another server
    /// sharing the store deleted has no task here to notice, so its last figures would stay in the unloaded table
    /// (and its depth in `/metrics`, the totals included) for as long as the process runs. As a local delete, its
    /// counters pass to the deleted queues' whole in the critical section that drops it. A handle still in the
    /// table is left to its task (see [`Engine::gone`]). Whether it forgot an entry.
    fn forget_deleted(&self, name: &str) -> Result<bool, QueueError> {
        let queues = self.inner.queues.read().map_err(poisoned)?;
        if queues.contains_key(name) {
            return Ok(false);
        }
        let mut unloaded = self.inner.unloaded.write().map_err(poisoned)?;
        let Some(u) = unloaded.remove(name) else {
            return Ok(false);
        };
        self.inner.deleted.add_counters(&u.metrics);
        shrink_sparse(&mut unloaded);
        Ok(true)
    }

    /// Forgets the queues unloaded here whose definitions are gone (another server sharing the store deleted
    /// them), as [`Engine::forget_deleted`] does when a request or a deadline looks one up: an empty queue has no
    /// deadline and may never be asked for again, and its entry (a few hundred bytes, its depth in `/metrics`) stayed
    /// for as long as the process ran. Walks the definitions in name order from each unloaded name not yet seen, a
    /// page at a time, and looks each missing one up again under the load lock before forgetting it (a queue
    /// created meanwhile stays). Returns how many it forgot.
    pub async fn forget_deleted_elsewhere(&self) -> Result<usize, QueueError> {
        let mut names: Vec<String> = self
            .inner
            .unloaded
            .read()
            .map_err(poisoned)?
            .keys()
            .cloned()
            .collect();
        names.sort_unstable();
        let mut missing = Vec::new();
        let mut next = 0;
        while next < names.len() {
            let page = self.inner.config.queues.list(&names[next], FORGET_PAGE).await?;
            let last = page.last().map(|q| q.name.clone());
            let full = page.len() == FORGET_PAGE;
            let mut found = page.into_iter().map(|q| q.name).peekable();
            // Every unloaded name up to the page's last (or all of them, when the page is the end of the list) is
            // decided by this page.
            while let Some(name) = names.get(next) {
                if full && last.as_ref().is_some_and(|l| name > l) {
                    break;
                }
                while found.next_if(|f| f < name).is_some() {}
                if found.peek() != Some(name) {
                    missing.push(name.clone());
                }
                next += 1;
            }
        }
        let mut forgot = 0;
        for name in missing {
            let _guard = self.lock_queue(&name).await?;
            if self.inner.config.queues.get(&name).await?.is_none() && self.forget_deleted(&name)? {
                forgot += 1;
            }
        }
        Ok(forgot)
    }

    /// Called by a task (load number `load`) that stopped because another server deleted its queue: as a local
    /// delete, its handle leaves the table and its counters pass to the deleted queues' whole, in one critical
    /// section. Left in the table, its last depth stayed in `/metrics` (the totals included) for as long as the
    /// process ran, and a queue created again under the name replaced it with fresh metrics, taking its counts out
    /// of the total counters. A handle that is no longer the table's (deleted here meanwhile, which accounts for it,
    /// or already replaced) is left alone.
    fn gone(&self, name: &str, load: u64) {
        if let Ok(mut queues) = self.inner.queues.write() {
            if let Some(h) = queues.get(name).filter(|h| h.load == load).cloned() {
                queues.remove(name);
                shrink_sparse(&mut queues);
                if let Ok(_unloaded) = self.inner.unloaded.write() {
                    // Under the `unloaded` lock, as every change of `deleted`: a snapshot sees the queue either in
                    // the table or in the sums.
                    self.inner.deleted.add_counters(&h.metrics);
                }
            }
        }
    }

    /// Called by a task that unloaded (load number `load`): its handle leaves the table and its metrics are kept
    /// aside; the requests it handed back go to the queue's next task. A handle that is no longer the table's (the
    /// queue was deleted meanwhile) is left alone. At `wake` (the earliest deadline the queue held: a ready item's
    /// expiry), the queue is loaded again if it is still unloaded, so its items expire on time.
    /// Starts the task that loads the unloaded queue `name` again at `at`, if it is still unloaded then.
    fn wake_task(&self, name: &str, at: Ts) -> WakeTask {
        let inner = Arc::downgrade(&self.inner);
        let clock = self.inner.config.clock.clone();
        let name = name.to_string();
        let started = Arc::new(AtomicBool::new(false));
        let claim = started.clone();
        let count = WakeCount::new(&self.inner.wake_tasks);
        let task = tokio::spawn(async move {
            let _count = count;
            clock.sleep_until(at).await;
            if claim.swap(true, Ordering::AcqRel) {
                // The entry went (the queue was loaded, deleted or forgotten) as the sleep ended.
                return;
            }
            let Some(inner) = inner.upgrade() else { return };
            let engine = Engine { inner };
            let still = engine.inner.unloaded.read().is_ok_and(|u| u.contains_key(&name));
            if still && !engine.inner.shutting_down.load(Ordering::Acquire) {
                if let Err(e) = engine.handle(&name).await {
                    tracing::debug!(queue = %name, error = %e, "unloaded queue not loaded at its deadline");
                }
            }
        });
        WakeTask {
            started,
            task: task.abort_handle(),
        }
    }

    /// How many tasks wait to load an unloaded queue at its earliest deadline: at most one per unloaded queue.
    pub fn wake_tasks(&self) -> usize {
        self.inner.wake_tasks.load(Ordering::Relaxed)
    }

    fn unloaded(&self, name: &str, load: u64, left: Vec<Msg>, wake: Option<Ts>) {
        // A sleeping task per unloaded queue with a deadline (a few hundred bytes, nothing of the queue's state); it
        // holds no strong reference, so a dropped engine is not kept alive by it. It lives in the queue's entry of
        // the unloaded table and goes with it (see `WakeTask`): each unload used to start one that slept until its
        // deadline whatever happened meanwhile, so a queue loaded and unloaded every few minutes while its oldest
        // item waited for its expiry (days, for a dead-letter queue) gathered one task per cycle.
        #[cfg(test)]
        if let Some(hook) = self.inner.unload_hook.lock().ok().and_then(|h| h.clone()) {
            (hook.0)();
        }
        if let Ok(mut queues) = self.inner.queues.write() {
            if let Some(h) = queues.get(name).filter(|h| h.load == load).cloned() {
                queues.remove(name);
                shrink_sparse(&mut queues);
                if let Ok(mut unloaded) = self.inner.unloaded.write() {
                    h.metrics.transition.store(
                        self.inner.transitions.fetch_add(1, Ordering::Relaxed) + 1,
                        Ordering::Relaxed,
                    );
                    // Started under the table's lock, which its check that the queue is still unloaded takes: a
                    // deadline already past let a task started before the entry existed find none, and end, so
                    // the queue was not loaded at its deadline (nor ever, unless asked for).
                    let wake = wake.map(|at| self.wake_task(name, at));
                    unloaded.insert(
                        name.to_string(),
                        Unloaded {
                            metrics: h.metrics.clone(),
                            _wake: wake,
                        },
                    );
                }
            }
        }
        if left.is_empty() {
            return;
        }
        let engine = self.clone();
        let name = name.to_string();
        // On its own task: loading waits for the unloading task to end, which this is still part of.
        tokio::spawn(async move {
            // One bound for all of them, as for an admin call: the next task may be stuck in a storage call with a
            // full inbox (or not load at all), and the wait for its room was unbounded, which held these requests
            // (and this task) for as long as its call hung. Their callers stop waiting at their own bounds; what is
            // still here at this one is answered 454.
            let deadline = engine.admin_deadline();
            for m in left {
                // A definition update and a rebalance plan are in the store already, where the next task reads
                // them: acknowledged, not forwarded. A store notice wakes no one in an unloaded queue; a stop has
                // nothing left to stop.
                if matches!(
                    m,
                    Msg::Wake(_) | Msg::Definition | Msg::Shutdown(_) | Msg::Cold(Cold::RebalanceInstall(..))
                ) {
                    queue::refuse(m, QueueError::QueueShuttingDown);
                    continue;
                }
                if let Err((m, e)) = engine.deliver(&name, m, Some(deadline)).await {
                    queue::refuse(m, e);
                }
            }
        });
    }

    /// Puts `msg` in the inbox of the queue's task, loading the queue when needed. An inbox found closed belongs
    /// to a task that stopped on its own (unloaded for being idle, or its queue deleted by another server): the
    /// queue is loaded again and the message goes there, so a request racing an unload is never refused for it.
    /// With `wait`, waits for room in a full inbox until that deadline, then gives up with [`QueueError::Untimed`]
    /// ("delivery"); without, a full inbox is [`QueueError::Overloaded`]. On failure the message comes back with the
    /// error.
    async fn deliver(
        &self,
        name: &str,
        mut msg: Msg,
        wait: Option<AdminDeadline>,
    ) -> Result<(), (Msg, QueueError)> {
        // More than one retry only when the queue unloads again before the message reaches its new task: a clock
        // jumping by the idle time (tests), nothing a real clock does; bounded all the same.
        for _ in 0..4 {
            let h = match self.handle(name).await {
                Ok(h) => h,
                Err(e) => return Err((msg, e)),
            };
            let closed = if let Some(deadline) = wait {
                // Room first, then the message: a wait given up on still holds it, to hand back.
                match tokio::time::timeout_at(deadline.at, h.tx.reserve()).await {
                    Ok(Ok(permit)) => {
                        permit.send(msg);
                        return Ok(());
                    }
                    Ok(Err(mpsc::error::SendError(()))) => msg,
                    Err(_) => return Err((msg, QueueError::Untimed("delivery", deadline.limit))),
                }
            } else {
                match h.tx.try_send(msg) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::TrySendError::Full(m)) => return Err((m, QueueError::Overloaded)),
                    Err(mpsc::error::TrySendError::Closed(m)) => m,
                }
            };
            msg = closed;
            if self.inner.shutting_down.load(Ordering::Acquire) {
                break;
            }
        }
        Err((msg, QueueError::QueueShuttingDown))
    }

    async fn call<T>(&self, name: &str, make: impl FnOnce(queue::Reply<T>) -> Msg) -> Result<T, QueueError> {
        let (tx, rx) = queue::reply();
        if let Err((_, e)) = self.deliver(name, make(tx), None).await {
            return Err(e);
        }
        rx.recv().await.unwrap_or(Err(QueueError::QueueShuttingDown))
    }

    /// Each partition store's memory budget, `(store name, bytes held by estimate, most)`, for the stores that have
    /// one (see [`crate::storage::PartitionStore::memory`]).
    pub fn store_memory(&self) -> Vec<(String, u64, u64)> {
        self.inner
            .config
            .stores
            .iter()
            .filter_map(|s| s.store.memory().map(|(used, max)| (s.name.clone(), used, max)))
            .collect()
    }

    /// Queues loaded now (their tasks running), and loads so far (a queue loaded again after an unload counts
    /// again).
    pub fn loaded_queues(&self) -> (usize, u64) {
        let loaded = match self.inner.queues.read() {
            Ok(m) => m.values().filter(|h| !h.tx.is_closed()).count(),
            Err(_) => 0,
        };
        (loaded, self.inner.loads.load(Ordering::Relaxed))
    }

    /// Produces items; returns once storage holds them, or with [`QueueError::RequestTimeout`] when that does not
    /// happen within `request_timeout` (a hung partition, a full inbox draining slowly).
    pub async fn produce(
        &self,
        queue: &str,
        items: Vec<ProduceItem>,
        request_timeout: Option<Duration>,
    ) -> Result<(), QueueError> {
        self.inner.activity.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits();
        let timeout = validate::request_timeout(
            request_timeout,
            limits.min_request_timeout,
            limits.max_request_timeout,
        )?;
        if items.is_empty() {
            return Err(QueueError::Invalid(
                "items cannot be empty; at least one item is required".into(),
            ));
        }
        validate::batch_len(
            "items",
            "max_produce_batch_size",
            limits.max_produce_batch,
            items.len(),
        )?;
        let mut keyed = false;
        for (i, it) in items.iter().enumerate() {
            if it.priority > crate::types::MAX_PRIORITY {
                validate::priority(|| format!("items[{i}].priority"), i64::from(it.priority))?;
            }
            if !it.dedup_id.is_empty() {
                validate::dedup_id(|| format!("items[{i}].dedup_id"), &it.dedup_id)?;
                keyed = true;
            }
        }
        // Keys are hashed here, on the caller's thread, not by the queue's task (see `KeyHash::of`).
        let keys = keyed.then(|| {
            Box::new(
                items
                    .iter()
                    .map(|it| (!it.dedup_id.is_empty()).then(|| queue::KeyHash::of(&it.dedup_id)))
                    .collect::<Vec<_>>(),
            )
        });
        let deadline = self.clock().now().add(timeout);
        self.within(
            deadline,
            "produce",
            self.call(queue, |reply| Msg::Produce {
                items,
                keys,
                deadline,
                reply,
            }),
        )
        .await
    }

    /// Leases up to `batch_size` items, waiting up to `request_timeout` for the first one.
    pub async fn lease(
        &self,
        queue: &str,
        batch_size: usize,
        client_id: &str,
        request_timeout: Option<Duration>,
    ) -> Result<LeaseResult, QueueError> {
        self.inner.activity.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits();
        validate::client_id(client_id)?;
        validate::lease_batch_size(batch_size, limits.max_lease_batch)?;
        let timeout = validate::request_timeout(
            request_timeout,
            limits.min_request_timeout,
            limits.max_request_timeout,
        )?;
        let deadline = self.clock().now().add(timeout);
        let client_id = client_id.to_string();
        self.unstuck(
            timeout,
            "lease",
            self.call(queue, |reply| Msg::Lease {
                n: batch_size,
                client_id,
                deadline,
                reply,
            }),
        )
        .await
    }

    /// Completes leased items: all of the ids or none.
    ///
    /// Bounded like lease (see [`Engine::unstuck`]): a caller whose queue's task is stuck in storage gets
    /// [`QueueError::RequestTimeout`] shortly after `request_timeout`, and the complete may still be applied
    /// afterwards (an ambiguous outcome, as for any timeout).
    pub async fn complete(
        &self,
        queue: &str,
        partition: u32,
        ids: Vec<ItemId>,
        request_timeout: Option<Duration>,
    ) -> Result<(), QueueError> {
        self.inner.activity.fetch_add(1, Ordering::Relaxed);
        let timeout = self.check_ids(&ids, request_timeout)?;
        self.unstuck(
            timeout,
            "complete",
            self.call(queue, |reply| Msg::Complete {
                partition,
                ids,
                reply,
            }),
        )
        .await
    }

    /// The checks complete and extend share: a non-empty id list within the batch limit, a valid request timeout
    /// (returned).
    fn check_ids(&self, ids: &[ItemId], request_timeout: Option<Duration>) -> Result<Duration, QueueError> {
        let limits = self.limits();
        if ids.is_empty() {
            return Err(validate::invalid("ids", "list of ids cannot be empty"));
        }
        validate::batch_len(
            "ids",
            "max_complete_batch_size",
            limits.max_complete_batch,
            ids.len(),
        )?;
        validate::request_timeout(request_timeout, Duration::ZERO, limits.max_request_timeout)
    }

    /// Retries leased items: all of them or none.
    pub async fn retry(&self, queue: &str, partition: u32, items: Vec<RetryItem>) -> Result<(), QueueError> {
        self.inner.activity.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits();
        if items.is_empty() {
            return Err(validate::invalid("items", "list of items cannot be empty"));
        }
        validate::batch_len(
            "items",
            "max_complete_batch_size",
            limits.max_complete_batch,
            items.len(),
        )?;
        self.untimed(
            "retry",
            self.call(queue, |reply| Msg::Retry {
                partition,
                items,
                reply,
            }),
        )
        .await
    }

    /// Extends the leases of `ids` (all of them or none): each deadline becomes now + `lease_timeout` (the
    /// queue's `lease_timeout` when `None`), which may not exceed the queue's max lease. Fenced like complete: an
    /// id whose lease ended (moved under a new id) is unknown, and the request changes nothing.
    pub async fn extend(
        &self,
        queue: &str,
        partition: u32,
        ids: Vec<ItemId>,
        lease_timeout: Option<Duration>,
        request_timeout: Option<Duration>,
    ) -> Result<(), QueueError> {
        self.inner.activity.fetch_add(1, Ordering::Relaxed);
        let timeout = self.check_ids(&ids, request_timeout)?;
        if lease_timeout.is_some_and(|d| d.is_zero()) {
            return Err(validate::invalid("lease_timeout", "must be greater than 0"));
        }
        self.unstuck(
            timeout,
            "extend",
            self.call(queue, |reply| Msg::Extend {
                partition,
                ids,
                lease_timeout,
                reply,
            }),
        )
        .await
    }

    /// Pauses (`true`) or resumes a queue. A paused queue accepts produce and every other request, but serves
    /// no lease: lease requests long-poll until it is resumed or their timeout ends. Stored with the definition,
    /// so a pause survives a restart (and is seen by every server sharing the store).
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), QueueError> {
        self.set_state(queue, |info| {
            std::mem::replace(&mut info.paused, paused) != paused
        })
        .await
    }

    /// Stores a change of a queue's definition that `change` makes (it returns whether it changed anything;
    /// nothing is written when not) and hands it to the queue's task: under the load lock, so tasks take
    /// definitions in store order; the wait for the task to take it comes after the lock is released (its task may
    /// need the lock meanwhile, to load a dead-letter queue), bounded as [`Engine::update_queue`]'s.
    async fn set_state(
        &self,
        queue: &str,
        change: impl FnOnce(&mut QueueInfo) -> bool,
    ) -> Result<(), QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", queue)?;
        let deadline = self.admin_deadline();
        let taken = {
            let _guard = self.lock_queue(queue).await?;
            let Some(mut info) = self.inner.config.queues.get(queue).await? else {
                return Err(QueueError::QueueNotFound(queue.to_string()));
            };
            if !change(&mut info) {
                return Ok(());
            }
            info.updated_at = self.clock().now();
            self.inner.config.queues.update(&info).await?;
            self.push_info(info)
        };
        taken.wait(deadline, "update").await
    }

    /// Hands a stored definition to the queue's task, when it runs. Called under the load lock, which numbers
    /// the definition in store order, so that the task takes definitions in the order they were stored; never
    /// waits (see [`NextInfo`]). The caller waits for the task to take it, after the lock is released (see
    /// [`InfoTaken`]).
    fn push_info(&self, info: QueueInfo) -> InfoTaken {
        let seq = self.inner.info_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let handle = self
            .inner
            .queues
            .read()
            .ok()
            .and_then(|q| q.get(&info.name).cloned());
        let Some(h) = handle else {
            return InfoTaken(None);
        };
        h.next_info.put(seq, info);
        match h.tx.try_send(Msg::Definition) {
            // A full inbox: the task is busy, and takes the definition at its next pass.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => InfoTaken(Some(PendingInfo {
                seq,
                taken: h.next_info.taken(),
                stopped: h.stopped.clone(),
            })),
            // The task is stopping; the next one reads the definition from the store.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                h.next_info.clear();
                InfoTaken(None)
            }
        }
    }

    /// One page of a partition's items, without leasing them (see [`BrowseRequest`]).
    pub async fn browse(&self, queue: &str, request: BrowseRequest) -> Result<BrowsePage, QueueError> {
        if request.limit == 0 || request.limit > validate::MAX_BROWSE {
            return Err(validate::invalid(
                "limit",
                format!("must be between 1 and {}", validate::MAX_BROWSE),
            ));
        }
        if let Some(p) = request.priority {
            validate::priority("priority", i64::from(p))?;
        }
        self.untimed(
            "browse",
            self.call(queue, |reply| Msg::Cold(Cold::Browse { request, reply })),
        )
        .await
    }

    /// Runs `request`, one without a `request_timeout` of its own (retry, stats, browse, clear, reload, the storage
    /// API, snapshots, restore pages, the engine's own calls to queue tasks), for at most
    /// `limits.default_request_timeout` of real time (see [`Engine::unstuck`] for why real time), then gives up
    /// with [`QueueError::Untimed`]: a queue task stuck in a storage call must not hold its caller forever. As
    /// with any timeout, the request may still be carried out afterwards.
    async fn untimed<T>(
        &self,
        what: &'static str,
        request: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        let limit = self.limits().default_request_timeout;
        tokio::time::timeout(limit, request)
            .await
            .unwrap_or(Err(QueueError::Untimed(what, limit)))
    }

    /// Runs `request` until `deadline` on the engine's clock, then gives up with [`QueueError::RequestTimeout`].
    /// The request may still complete in the queue task afterwards; the caller only stops waiting, as with any
    /// timeout. The engine's clock (not tokio's) decides, so tests move time instead of sleeping.
    async fn within<T>(
        &self,
        deadline: Ts,
        what: &'static str,
        request: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        tokio::select! {
            biased;
            r = request => r,
            () = self.clock().sleep_until(deadline) => Err(QueueError::RequestTimeout(what)),
        }
    }

    /// Runs `request` (a lease, complete or extend) for at most `timeout` plus [`STUCK_GRACE`] of real time, then
    /// gives up with [`QueueError::RequestTimeout`].
    ///
    /// The queue's task answers these requests itself, a lease at its deadline at the latest, but only between
    /// storage calls: a call that never returns (a database whose processes stopped answering while the connection
    /// stays open, where no lock or TCP timeout fires) held every caller until it did. A request given up here may
    /// still be carried out by the task afterwards: items leased for a caller that left are given back (see
    /// `QueueTask::deal`); a complete may be applied (the retried complete then finds no such id). Real time (tokio's clock), not the engine's: the engine's clock may be a manual one that a test moves by
    /// minutes while requests are in flight, and the task answers those on its own.
    async fn unstuck<T>(
        &self,
        timeout: Duration,
        what: &'static str,
        request: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        tokio::time::timeout(timeout.saturating_add(STUCK_GRACE), request)
            .await
            .unwrap_or(Err(QueueError::RequestTimeout(what)))
    }

    /// Statistics of the queue.
    pub async fn stats(&self, queue: &str) -> Result<QueueStats, QueueError> {
        self.untimed("stats", self.call(queue, |reply| Msg::Cold(Cold::Stats(reply))))
            .await
    }

    /// Clears items as the request says.
    pub async fn clear(&self, queue: &str, request: ClearRequest) -> Result<(), QueueError> {
        if !request.queue && !request.scheduled {
            // Querator looks the queue up before it reads the flags: a request naming a queue that does not exist
            // gets 'queue does not exist' whatever its flags. Only the refused request pays for the look-up.
            self.queue_info(queue).await?;
            return Err(validate::rejected(
                "clear request",
                "one of 'queue', 'scheduled' must be true",
            ));
        }
        self.untimed(
            "clear",
            self.call(queue, |reply| Msg::Cold(Cold::Clear(request, reply))),
        )
        .await
    }

    /// Re-reads every partition's counts and deadlines from storage and retries failed partitions now.
    pub async fn reload(&self, queue: &str) -> Result<(), QueueError> {
        self.untimed("reload", self.call(queue, |reply| Msg::Cold(Cold::Reload(reply))))
            .await
    }

    /// Lists stored items of a partition (ready and leased, or scheduled), from `pivot` (inclusive) when given.
    pub async fn storage_list(
        &self,
        queue: &str,
        partition: u32,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, QueueError> {
        Ok(self
            .storage_list_page(queue, partition, pivot, limit, scheduled)
            .await?
            .0)
    }

    /// [`Engine::storage_list`], also telling whether the page stopped at the byte bound
    /// (`limits.max_lease_bytes`): then more items may follow even though it holds fewer than `limit`.
    pub(crate) async fn storage_list_page(
        &self,
        queue: &str,
        partition: u32,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<(Vec<Item>, bool), QueueError> {
        self.untimed(
            "storage list",
            self.call(queue, |reply| {
                Msg::Cold(Cold::List {
                    partition,
                    pivot,
                    limit,
                    scheduled,
                    reply,
                })
            }),
        )
        .await
    }

    /// Imports raw items into a partition.
    pub async fn storage_import(
        &self,
        queue: &str,
        partition: u32,
        items: Vec<Item>,
    ) -> Result<Vec<Item>, QueueError> {
        if items.is_empty() {
            return Err(validate::invalid("items", "cannot be empty"));
        }
        let max = self.limits().max_produce_batch * 10;
        if items.len() > max {
            return Err(validate::invalid(
                "items",
                format!("at most {max} items per import"),
            ));
        }
        self.untimed(
            "storage import",
            self.call(queue, |reply| {
                Msg::Cold(Cold::Import {
                    partition,
                    items,
                    reply,
                })
            }),
        )
        .await
    }

    /// Deletes items of a partition by id, whatever their state.
    pub async fn storage_delete(
        &self,
        queue: &str,
        partition: u32,
        ids: Vec<ItemId>,
    ) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Err(validate::invalid("ids", "cannot be empty"));
        }
        self.untimed(
            "storage delete",
            self.call(queue, |reply| {
                Msg::Cold(Cold::Delete {
                    partition,
                    ids,
                    reply,
                })
            }),
        )
        .await
    }

    // ---- backup and restore ------------------------------------------------------------------------------------

    /// A point-in-time read of one partition (see [`crate::storage::Partition::snapshot`]). The queue task takes
    /// it between its other calls, so it is one instant of that partition; the caller reads it at its own pace
    /// while the queue keeps serving.
    pub async fn snapshot(
        &self,
        queue: &str,
        partition: u32,
    ) -> Result<Box<dyn crate::storage::PartitionSnapshot>, QueueError> {
        self.untimed(
            "snapshot",
            self.call(queue, |reply| Msg::Cold(Cold::Snapshot { partition, reply })),
        )
        .await
    }

    /// The most items one restore page (`restore_import`) takes.
    pub fn max_restore_page(&self) -> usize {
        self.limits().max_produce_batch * 10
    }

    /// Starts (or resumes) the restore of a queue: creates it from `info` with [`QueueInfo::restoring`] set, on
    /// this server's stores (the placement of the backed-up server is not kept: `info.partitions` only gives the
    /// partition count). A queue of that name that is already restoring with as many partitions is resumed; any
    /// other existing queue is [`QueueError::QueueExists`] unless `overwrite`, which deletes it first.
    pub async fn restore_begin(&self, mut info: QueueInfo, overwrite: bool) -> Result<QueueInfo, QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", &info.name)?;
        let count = u32::try_from(info.partitions.len())
            .unwrap_or(u32::MAX)
            .max(info.requested_partitions)
            .max(1);
        if let Some(existing) = self.inner.config.queues.get(&info.name).await? {
            let resumable = existing.restoring && existing.partitions.len() == count as usize;
            if resumable && !overwrite {
                return Ok(existing);
            }
            if !overwrite {
                return Err(QueueError::QueueExists(info.name));
            }
            let deadline = self.admin_deadline();
            let guard = self.lock_queue(&info.name).await?;
            // Read again under the lock (a delete may have ended meanwhile): the first read only said whether to
            // go on.
            if let Some(existing) = self.inner.config.queues.get(&info.name).await? {
                // A dead-letter queue in use is put back under its name at once, so the queues naming it keep their
                // dead letters flowing, but only into the namespace they were given: restored into another one, the
                // name would take other namespaces' dead letters there, which their owners never allowed (see
                // `delete_queue_with`).
                let namespace = |ns: &str| if ns.is_empty() { DEFAULT_NAMESPACE } else { ns }.to_string();
                if namespace(&existing.namespace) != namespace(&info.namespace)
                    && !self.dead_letter_users(&info.name).await?.is_empty()
                {
                    return Err(validate::invalid(
                        "queue",
                        format!(
                            "'{}' is the dead_queue of another queue; a restore may replace it in its namespace \
                             '{}' only, or point that queue at another dead_queue first",
                            info.name,
                            namespace(&existing.namespace)
                        ),
                    ));
                }
                let deleting = self.mark_deleting(&info.name)?;
                drop(guard);
                self.delete_queue_in_use(&info.name, existing, deleting, deadline)
                    .await?;
            }
        }
        info.partitions = Vec::new();
        info.requested_partitions = count;
        info.restoring = true;
        // The definition keeps the backed-up queue's creation time, from its create on: it is the incarnation its
        // partitions are made for (changed afterwards, the partitions would be another incarnation's).
        let created_at = info.created_at;
        self.create_queue_at(info.clone(), created_at).await?;
        self.queue_info(&info.name).await
    }

    /// Imports one restore page of `partition`, starting at item `offset` of that partition's backup stream: the
    /// items the partition already holds are skipped, so re-sending pages after an interruption imports nothing
    /// twice. Returns the partition's item count afterwards (where the next page starts).
    pub async fn restore_import(
        &self,
        queue: &str,
        partition: u32,
        offset: u64,
        items: Vec<Item>,
    ) -> Result<u64, QueueError> {
        let max = self.max_restore_page();
        if items.len() > max {
            return Err(validate::invalid(
                "items",
                format!("at most {max} items per restore page"),
            ));
        }
        self.untimed(
            "restore import",
            self.call(queue, |reply| {
                Msg::Cold(Cold::RestoreImport {
                    partition,
                    offset,
                    items,
                    reply,
                })
            }),
        )
        .await
    }

    /// Ends a restore: the queue takes traffic and runs its lifecycle again. Finishing a queue that is not
    /// restoring is `Ok` (a re-run after the first finish was answered too late).
    pub async fn restore_finish(&self, queue: &str) -> Result<(), QueueError> {
        self.set_state(queue, |info| std::mem::take(&mut info.restoring))
            .await
    }

    /// Runs the sweeper of orphaned payload objects of the partition store named `store` (every store with
    /// object storage when empty) now, store by store; returns what each did.
    ///
    /// # Errors
    /// [`QueueError::Invalid`] (400) when `store` names no partition store, or when no store it covers has object
    /// storage (nothing to sweep); a storage error when object storage or a partition snapshot fails.
    pub async fn sweep_objects(
        &self,
        store: &str,
    ) -> Result<Vec<(String, crate::types::SweepReport)>, QueueError> {
        let stores = &self.inner.config.stores;
        if !store.is_empty() && !stores.iter().any(|s| s.name == store) {
            let names: Vec<&str> = stores.iter().map(|s| s.name.as_str()).collect();
            return Err(QueueError::Invalid(format!(
                "store is invalid; no partition store is named '{store}' (this server has: {})",
                names.join(", ")
            )));
        }
        let mut out = Vec::new();
        for s in stores.iter().filter(|s| store.is_empty() || s.name == store) {
            if let Some(r) = s.store.sweep_objects().await {
                out.push((s.name.clone(), r?));
            }
        }
        if out.is_empty() {
            return Err(QueueError::Invalid(if store.is_empty() {
                "no object storage; no partition store of this server has payload-offload configured, so there is \
                 nothing to sweep"
                    .to_string()
            } else {
                format!(
                    "no object storage; partition store '{store}' has no payload-offload configured, so there is \
                     nothing to sweep"
                )
            }));
        }
        Ok(out)
    }

    /// Metrics of every queue this process has loaded and not deleted: the loaded ones, and those unloaded for
    /// being idle with the last figures their tasks published ([`QueueMetrics::unloaded`] tells them apart).
    pub fn queue_metrics(&self) -> Vec<(String, Arc<QueueMetrics>)> {
        let Ok(queues) = self.inner.queues.read() else {
            return Vec::new();
        };
        let mut out: Vec<_> = queues
            .iter()
            .map(|(k, v)| (k.clone(), v.metrics.clone()))
            .collect();
        if let Ok(unloaded) = self.inner.unloaded.read() {
            out.extend(
                unloaded
                    .iter()
                    .filter(|(k, _)| !queues.contains_key(*k))
                    .map(|(k, u)| (k.clone(), u.metrics.clone())),
            );
        }
        out
    }

    /// What `/metrics` reads: every queue's figures, as [`Engine::queue_metrics`], with whether each is loaded and
    /// its [`QueueMetrics::transition`], and the counters of deleted queues, all as of one instant (both tables'
    /// locks held).
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let deleted = QueueMetrics::default();
        let Ok(queues) = self.inner.queues.read() else {
            return MetricsSnapshot {
                queues: Vec::new(),
                deleted,
            };
        };
        let entry = |name: &String, metrics: &Arc<QueueMetrics>, loaded: bool| MetricsEntry {
            name: name.clone(),
            metrics: metrics.clone(),
            loaded,
            transition: metrics.transition.load(Ordering::Relaxed),
        };
        let mut out: Vec<_> = queues
            .iter()
            .map(|(k, h)| entry(k, &h.metrics, !h.tx.is_closed()))
            .collect();
        if let Ok(unloaded) = self.inner.unloaded.read() {
            out.extend(
                unloaded
                    .iter()
                    .filter(|(k, _)| !queues.contains_key(*k))
                    .map(|(k, u)| entry(k, &u.metrics, false)),
            );
            deleted.add_counters(&self.inner.deleted);
        }
        MetricsSnapshot { queues: out, deleted }
    }

    /// Stops every queue: waiting requests get "queue is shutting down", in-flight storage calls finish, stores
    /// close. Later calls get "service is shutting down".
    ///
    /// A queue whose task does not stop within `limits.default_request_timeout` (stuck in a storage call that
    /// never returns) is left behind with a warning, and the stores close all the same: what its call was writing
    /// was never acknowledged, and a shutdown must end.
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        // Taken under the lock (no load is half done then; later ones see `shutting_down`), stopped without it.
        let handles: Vec<_> = {
            let _guard = self.inner.load_lock.lock().await;
            match self.inner.queues.write() {
                Ok(mut m) => m.drain().collect(),
                Err(_) => Vec::new(),
            }
        };
        let limit = self.limits().default_request_timeout;
        futures::future::join_all(handles.iter().map(|(name, h)| async move {
            if tokio::time::timeout(limit, stop_queue(h)).await.is_err() {
                tracing::warn!(queue = %name, timeout = ?limit, "queue task did not stop in time (stuck in a storage call?); closing the stores without it");
            }
        }))
        .await;
        for s in &self.inner.config.stores {
            s.store.close().await;
        }
        self.inner.config.queues.close().await;
    }
}

/// The [`DeadLetterSink`] the engine gives each queue task: it loads the dead-letter queue if needed and hands it
/// the items through its inbox.
///
/// It holds the engine weakly: the engine's queue table holds every task's inbox, so a strong reference from inside
/// a task would keep every inbox open and no task would ever see its inbox close when the engine is dropped.
struct EngineSink(Weak<Inner>);

impl DeadLetterSink for EngineSink {
    fn send(&self, queue: &str, items: Vec<NewItem>) -> BoxFuture<'static, Result<(), QueueError>> {
        let engine = self.0.upgrade().map(|inner| Engine { inner });
        let queue = queue.to_string();
        Box::pin(async move {
            let Some(engine) = engine else {
                return Err(QueueError::ShuttingDown);
            };
            engine.load_aside(&queue).await?;
            engine
                .call(&queue, |reply| Msg::DeadLetter { items, reply })
                .await
        })
    }
}

/// Longest a queue's task waits for its dead-letter queue to load before the move gives up (and is retried, see
/// `DEAD_LETTER_RETRY`): an unloaded queue loads with one read of its definition.
const DEAD_LETTER_LOAD_WAIT: Duration = Duration::from_millis(500);

impl Engine {
    /// Loads `queue`, when it is not loaded, for a request another queue's task makes (a dead-letter move), on a
    /// task of its own. Loading takes the load lock, and a holder of that lock may be waiting for the requesting
    /// task (a definition update, a delete or a shutdown stopping it): waiting for the lock there stalled both
    /// until the move gave up after its 5 s timeout, and every queue load behind them. Waits at most
    /// [`DEAD_LETTER_LOAD_WAIT`]; the load goes on after that, so the move's retry finds the queue loaded.
    async fn load_aside(&self, queue: &str) -> Result<(), QueueError> {
        let loaded = self
            .inner
            .queues
            .read()
            .map_err(poisoned)?
            .get(queue)
            .is_some_and(|h| !h.tx.is_closed());
        if loaded {
            return Ok(());
        }
        let engine = self.clone();
        let name = queue.to_string();
        let load = tokio::spawn(async move { engine.handle(&name).await.map(|_| ()) });
        match tokio::time::timeout(DEAD_LETTER_LOAD_WAIT, load).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(QueueError::QueueShuttingDown),
            Err(_) => Err(QueueError::RequestTimeout("dead-letter queue load")),
        }
    }
}

/// A definition handed to a queue's task ([`Engine::push_info`]), until the task took it.
///
/// Waited for after the load lock is released: the task may be waiting for that lock itself, when a dead-letter
/// move loads its dead-letter queue (an unloaded one, as idle dead-letter queues are). Waiting under the lock
/// stalled the update, the task and every queue load until the move gave up after its timeout (5 s).
#[must_use]
struct InfoTaken(Option<PendingInfo>);

/// What [`InfoTaken`] waits for: the task taking definition number `seq`, or ending.
struct PendingInfo {
    seq: u64,
    taken: watch::Receiver<u64>,
    stopped: watch::Receiver<()>,
}

impl InfoTaken {
    /// Resolves once the task took the definition (or stopped without it: the next one reads it from the store),
    /// or with [`QueueError::Untimed`] (naming the request `what`) at `deadline`: the definition is stored, and
    /// the task takes it once its storage call returns.
    async fn wait(self, deadline: AdminDeadline, what: &'static str) -> Result<(), QueueError> {
        let Some(PendingInfo {
            seq,
            mut taken,
            stopped,
        }) = self.0
        else {
            return Ok(());
        };
        let done = async {
            tokio::select! {
                _ = taken.wait_for(|&t| t >= seq) => {}
                () = wait_ended(stopped) => {}
            }
        };
        deadline
            .bound(what, async {
                done.await;
                Ok(())
            })
            .await
    }
}

/// When an admin call stops waiting for a queue's task (see [`Engine::admin_deadline`]), and the limit it was set
/// from, for the error.
#[derive(Clone, Copy, Debug)]
struct AdminDeadline {
    at: tokio::time::Instant,
    limit: Duration,
}

impl AdminDeadline {
    /// Runs `f` until the deadline, then gives up with [`QueueError::Untimed`] naming the request `what`.
    async fn bound<T>(
        self,
        what: &'static str,
        f: impl Future<Output = Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        tokio::time::timeout_at(self.at, f)
            .await
            .unwrap_or(Err(QueueError::Untimed(what, self.limit)))
    }
}

/// The queue being deleted, marked in [`Inner::deleting`] until this drops.
struct Deleting<'a> {
    inner: &'a Inner,
    name: String,
    /// Dropped with the guard: wakes whoever waits for the delete (see [`Engine::lock_queue`]).
    _ended: watch::Sender<()>,
}

impl Drop for Deleting<'_> {
    fn drop(&mut self) {
        if let Ok(mut deleting) = self.inner.deleting.lock() {
            deleting.remove(&self.name);
            shrink_sparse(&mut deleting);
        }
    }
}

impl QueueHandle {
    /// Whether the queue's task has ended.
    fn has_stopped(&self) -> bool {
        self.stopped.has_changed().is_err()
    }

    /// Resolves once the queue's task has ended.
    async fn wait_stopped(&self) {
        wait_ended(self.stopped.clone()).await;
    }
}

/// Resolves once the sender of `rx` is dropped (nothing is ever sent on these channels).
async fn wait_ended(mut rx: watch::Receiver<()>) {
    while rx.changed().await.is_ok() {}
}

/// Stops a queue's task and waits until it has ended. Not bounded here: callers bound it (a delete by its
/// deadline, a shutdown by the admin timeout), and hold no engine-wide lock while they wait.
async fn stop_queue(h: &QueueHandle) {
    let (tx, rx) = oneshot::channel();
    // A full inbox: wait for room, the task drains it.
    if h.tx.send(Msg::Shutdown(tx)).await.is_ok() {
        let _ = rx.await;
    }
    h.wait_stopped().await;
}

/// Fewest queue definitions one store read of a namespace's page of queues asks for. Larger chunks cost fewer
/// reads when the namespace holds few of the queues; a definition may carry up to 65,536 partitions (a few MB
/// decoded), so a chunk of 100 such queues is the most one small page holds in memory at once.
pub(crate) const MIN_LIST_CHUNK: usize = 100;

/// A random id for this engine instance.
fn instance_id() -> String {
    let mut raw = [0u8; 8];
    if getrandom::fill(&mut raw).is_err() {
        // Only used to tell servers apart; the clock is unique enough then.
        raw = (crate::time::Clock::now(&crate::time::SystemClock).0 as u64).to_le_bytes();
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Gives back the slots of a table of queues that has emptied (a burst of loaded queues, or of unloaded ones loaded
/// again, left their slots, 33 bytes or more each, for the life of the process).
fn shrink_sparse<V>(map: &mut HashMap<String, V>) {
    crate::shrink::map(map, 64);
}

fn poisoned<T>(_: T) -> QueueError {
    QueueError::StorageFailed("queue table lock poisoned".into())
}

fn validate_options(info: &QueueInfo) -> Result<(), QueueError> {
    if info.reference.len() > validate::MAX_REFERENCE {
        return Err(validate::invalid(
            "reference",
            format!("cannot be greater than '{}' characters", validate::MAX_REFERENCE),
        ));
    }
    if info.max_attempts > validate::MAX_ATTEMPTS {
        return Err(validate::invalid(
            "max_attempts",
            format!("cannot be greater than '{}'", validate::MAX_ATTEMPTS),
        ));
    }
    validate::partition_count(info.requested_partitions)?;
    validate::backoff(&info.retry_backoff)?;
    if info.dedup_window > validate::MAX_DEDUP_WINDOW {
        return Err(validate::invalid("dedup_window", "cannot be greater than '168h'"));
    }
    if !info.max_lease_timeout.is_zero()
        && !info.expire_timeout.is_zero()
        && info.max_lease_timeout > info.expire_timeout
    {
        return Err(validate::invalid(
            "max_lease_timeout",
            "cannot be greater than the expire_timeout",
        ));
    }
    if !info.max_lease_timeout.is_zero() && info.max_lease_timeout < info.lease_timeout {
        return Err(validate::invalid(
            "max_lease_timeout",
            "cannot be less than the lease_timeout",
        ));
    }
    if !info.lease_timeout.is_zero()
        && !info.expire_timeout.is_zero()
        && info.lease_timeout > info.expire_timeout
    {
        return Err(QueueError::Invalid(
            "lease_timeout is too long; lease_timeout cannot be greater than the expire_timeout".into(),
        ));
    }
    Ok(())
}
