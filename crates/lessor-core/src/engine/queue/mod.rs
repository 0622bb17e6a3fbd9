//! The task that owns one queue's partitions.
//!
//! The loop: wait for a message or the next deadline; drain the inbox; run due lifecycle work; apply produces,
//! completes and retries as one storage call per partition per kind; register new lease requests; serve waiting
//! leases from the fullest healthy partition, round-robin across waiting consumers; answer expired long-polls;
//! answer cold requests (stats, clear, storage...) one by one. Items that become ready (produce, retry, lease
//! expiry, schedule) are handed to waiting leases in the same pass, so no consumer waits for another request to
//! arrive.
//!
//! # Layout
//! - this file: the messages, the task's state, the loop and one pass over a drained batch;
//! - [`produce`]: placing produced items on the least-loaded healthy partition, with fail-over;
//! - [`lease`]: serving long-polling lease requests round-robin, and expiring them;
//! - [`ack`]: complete and retry, one storage call per partition;
//! - [`lifecycle`]: lease expiry, schedules and item expiry as their deadlines come due;
//! - [`dead_letter`]: moving dead items to the dead-letter queue (through a [`DeadLetterSink`]) and accepting
//!   items moved here;
//! - [`cold`]: stats, clear, reload and the storage API, answered one by one (definition updates arrive beside
//!   the inbox, see [`NextInfo`], and are taken at the start of each pass);
//! - [`health`]: opening partitions, probing failed ones and re-reading shared ones.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

mod ack;
mod browse;
mod cold;
mod dead_letter;
mod dedup;
mod drain;
mod health;
mod lease;
mod lifecycle;
mod produce;
mod restore;

pub(crate) use dead_letter::DeadLetterSink;
pub(crate) use dedup::KeyHash;
pub(crate) use drain::{
    Plan as RebalancePlan, Report as RebalanceReport, JOURNAL_TAG, SOURCE_PREFIX as REBALANCE_SOURCE_PREFIX,
};
use health::MissingStore;

use super::{BrowsePage, BrowseRequest, EngineConfig, LeaseResult, ProduceItem, QueueMetrics, QueueStats};
use crate::durability::{self, Gate, Pass};
use crate::error::{QueueError, StorageError};
use crate::storage::{LifecyclePolicy, Partition, PartitionSnapshot, PartitionStore};
use crate::time::Ts;
use crate::types::{
    ClearRequest, Item, ItemId, NewItem, PartitionCounts, PartitionInfo, QueueInfo, RetryItem,
};

/// What a reply carries: the answer, the gate of the pass that sent it, and the gates of earlier passes it vouches
/// for (see [`Reply::send_vouching`]).
type Sent<T> = (Result<T, QueueError>, Option<Gate>, Vec<Gate>);

/// The answer to one request: sent by the queue task, awaited by the caller with [`Answer::recv`].
pub(crate) struct Reply<T>(oneshot::Sender<Sent<T>>);

/// The caller's side of a [`Reply`].
pub(crate) struct Answer<T>(oneshot::Receiver<Sent<T>>);

/// A reply channel.
pub(crate) fn reply<T>() -> (Reply<T>, Answer<T>) {
    let (tx, rx) = oneshot::channel();
    (Reply(tx), Answer(rx))
}

impl<T> Reply<T> {
    /// Sends the answer; when it is sent from a pass whose writes are deferred (see [`crate::durability`]), the
    /// caller gets it once they are durable. Gives the answer back when the caller stopped waiting.
    pub(crate) fn send(self, r: Result<T, QueueError>) -> Result<(), Result<T, QueueError>> {
        self.0
            .send((r, durability::gate(), Vec::new()))
            .map_err(|(r, ..)| r)
    }

    /// [`Reply::send`] for an answer that vouches for writes of earlier passes as well (a duplicate produce says
    /// its key's item is stored, which an earlier pass wrote and may not have made durable yet): the caller gets it
    /// once those passes' writes are durable too, and an error if one of them failed.
    pub(crate) fn send_vouching(
        self,
        r: Result<T, QueueError>,
        earlier: &[Gate],
    ) -> Result<(), Result<T, QueueError>> {
        self.0
            .send((r, durability::gate(), earlier.to_vec()))
            .map_err(|(r, ..)| r)
    }

    /// Whether the caller stopped waiting.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

impl<T> Answer<T> {
    /// The answer, once what the request wrote is durable; `Err(())` when the queue task dropped the request.
    pub(crate) async fn recv(self) -> Result<Result<T, QueueError>, ()> {
        let (r, gate, earlier) = self.0.await.map_err(|_| ())?;
        let Ok(v) = r else { return Ok(r) };
        for g in gate.into_iter().chain(earlier) {
            if let Err(e) = g.wait().await {
                return Ok(Err(QueueError::from(e)));
            }
        }
        Ok(Ok(v))
    }
}
/// Complete requests of one pass, by partition.
type CompleteGroups = HashMap<u32, Vec<(Vec<ItemId>, Reply<()>)>>;
/// Retry requests of one pass, by partition.
type RetryGroups = HashMap<u32, Vec<(Vec<RetryItem>, Reply<()>)>>;
/// Extend requests of one pass, by partition: ids, lease timeout, reply.
type ExtendGroups = HashMap<u32, Vec<(Vec<ItemId>, Option<Duration>, Reply<()>)>>;

/// Most messages taken from the inbox per pass.
const MAX_DRAIN: usize = 8192;
/// Most dead items handed to the dead-letter queue per call.
const DEAD_BATCH: usize = 1000;

/// A request to the queue task.
///
/// Its size matters to a loaded idle queue: the inbox takes its first block of 32 messages when the queue loads,
/// and keeps it (an 80-byte message made that block 2.6 KB; 56 bytes make it 1.8 KB). Variants are kept at most 48
/// bytes besides the tag, a rare large one and a produce's dedup keys boxed; `tests::message_size` checks it.
pub(crate) enum Msg {
    Produce {
        items: Vec<ProduceItem>,
        /// The hashes of the items' dedup keys, one per item (`None`: no key), computed by the caller off the
        /// queue's task; empty when no item has a key.
        /// Boxed (`None`: no key), to keep the message small (see [`Msg`]): a keyed produce's keys take one more
        /// allocation, next to the one of their list. A boxed slice would take one, but its 16 bytes make the
        /// message 64 bytes (`tests::message_size`); a thin 8-byte pointer needs the `Box` around the `Vec`.
        #[allow(clippy::box_collection)]
        keys: Option<Box<Vec<Option<KeyHash>>>>,
        /// When the caller stops waiting: a request still in the inbox then is answered, not stored.
        deadline: Ts,
        reply: Reply<()>,
    },
    Lease {
        n: usize,
        client_id: String,
        deadline: Ts,
        reply: Reply<LeaseResult>,
    },
    Complete {
        partition: u32,
        ids: Vec<ItemId>,
        reply: Reply<()>,
    },
    Retry {
        partition: u32,
        items: Vec<RetryItem>,
        reply: Reply<()>,
    },
    Extend {
        partition: u32,
        ids: Vec<ItemId>,
        lease_timeout: Option<Duration>,
        reply: Reply<()>,
    },
    DeadLetter {
        items: Vec<NewItem>,
        reply: Reply<()>,
    },
    /// Items moved here by a redrive: each goes to the partition its source id hashes to, so a repeated move
    /// meets the earlier copy (source id) or its dedup record and is not doubled.
    Moved {
        items: Vec<NewItem>,
        reply: Reply<()>,
    },
    Cold(Cold),
    /// Another server made items ready in this partition (a store notice): re-read it now.
    Wake(u32),
    /// A new definition waits in the task's [`NextInfo`]: only a wake-up, since every pass looks there first.
    Definition,
    Shutdown(oneshot::Sender<()>),
}

/// The newest definition stored for a loaded queue that its task has not taken yet (see `Engine::push_info`), and
/// the number of the last one it took.
///
/// Handed over beside the inbox rather than through it: the engine stores a definition and hands it over under its
/// load lock (so tasks take definitions in store order), and waiting there for room in the inbox of a task stuck in
/// a storage call held that lock, and with it every other queue's load, update and delete, for as long as the call
/// hung. Putting a definition here never waits; a [`Msg::Definition`] wakes an idle task, and a task with a full
/// inbox looks here at its next pass anyway. Only the newest definition is kept: each one is whole, and taking it
/// also takes the ones it replaced.
#[derive(Debug)]
pub(crate) struct NextInfo {
    /// The definition waiting, with its number (numbers grow in store order).
    slot: std::sync::Mutex<Option<(u64, Box<QueueInfo>)>>,
    /// The number of the last definition the task took.
    taken: watch::Sender<u64>,
}

impl NextInfo {
    /// A slot for a task that loaded definition number `seq` (or a newer one) from the store.
    pub(crate) fn new(seq: u64) -> NextInfo {
        NextInfo {
            slot: std::sync::Mutex::new(None),
            taken: watch::Sender::new(seq),
        }
    }

    /// Leaves definition number `seq` for the task, unless a newer one waits already.
    pub(crate) fn put(&self, seq: u64, info: QueueInfo) {
        if let Ok(mut slot) = self.slot.lock() {
            if slot.as_ref().is_none_or(|(s, _)| *s < seq) {
                *slot = Some((seq, Box::new(info)));
            }
        }
    }

    /// Drops the waiting definition (its task stopped: the next one reads the store).
    pub(crate) fn clear(&self) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = None;
        }
    }

    /// Follows the number of the last definition the task took.
    pub(crate) fn taken(&self) -> watch::Receiver<u64> {
        self.taken.subscribe()
    }

    fn take(&self) -> Option<(u64, Box<QueueInfo>)> {
        self.slot.lock().ok()?.take()
    }
}

/// A request answered on its own, after the batched work of a pass.
pub(crate) enum Cold {
    Stats(Reply<QueueStats>),
    Clear(ClearRequest, Reply<()>),
    Reload(Reply<()>),
    List {
        partition: u32,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        /// The page (bounded by `limits.max_lease_bytes`) and whether the bound cut it (more items may follow).
        reply: Reply<(Vec<Item>, bool)>,
    },
    Import {
        partition: u32,
        items: Vec<Item>,
        reply: Reply<Vec<Item>>,
    },
    Delete {
        partition: u32,
        ids: Vec<ItemId>,
        reply: Reply<()>,
    },
    /// A redrive's batch, before its copies are written to their targets: the ids still ready (present and not
    /// leased) are claimed, replacing the partition's earlier claims, and returned; until the batch is deleted, a
    /// consumer's complete or retry of a claimed id is answered as for an id that is gone (see `redriving`).
    Claim {
        partition: u32,
        ids: Vec<ItemId>,
        reply: Reply<Vec<ItemId>>,
    },
    Browse {
        request: BrowseRequest,
        reply: Reply<BrowsePage>,
    },
    /// A point-in-time read of one partition, taken between the task's other calls (see [`restore`]).
    Snapshot {
        partition: u32,
        reply: Reply<Box<dyn PartitionSnapshot>>,
    },
    /// One page of a restore, starting at item `offset` of the partition's backup stream.
    RestoreImport {
        partition: u32,
        offset: u64,
        items: Vec<Item>,
        reply: Reply<u64>,
    },
    /// Installs a rebalance (see [`drain`]); ignored when that task is installed already.
    /// Boxed: a rare message, larger than any other (see [`Msg`]).
    RebalanceInstall(Box<drain::Plan>, oneshot::Sender<()>),
    /// Where the rebalance `id` stands; `finish` drops it when it is done (its outcome was persisted).
    RebalanceReport {
        id: String,
        finish: bool,
        reply: oneshot::Sender<drain::Report>,
    },
}

/// What the task knows about one partition: its handle, its health and the counts it balances load by.
struct Part {
    /// Partition number.
    num: u32,
    /// The store that holds it.
    store: Arc<dyn PartitionStore>,
    /// That store's configured name.
    store_name: String,
    /// Being drained by a rebalance: takes no new items and serves no lease (see [`drain`]).
    draining: bool,
    /// Whether other servers may change it (counts are then re-read every [`health`] refresh).
    shared: bool,
    /// Open handle; `None` until the first successful probe.
    handle: Option<Arc<dyn Partition>>,
    /// Counts as of the last storage call, adjusted by every call since.
    counts: PartitionCounts,
    /// Consecutive failures; 0 means healthy.
    failures: u32,
    /// When a failed partition is probed again.
    retry_at: Ts,
    /// The earliest lifecycle deadline (lease end, schedule, expiry) in the partition.
    next_deadline: Option<Ts>,
    /// When a shared partition's counts are re-read.
    refresh_at: Ts,
    /// No ready item of the partition has a higher priority than this (an upper bound: raised by produce and by
    /// anything that may make items ready, lowered by what a lease returns).
    top_priority: u8,
}

impl Part {
    fn healthy(&self) -> Option<Arc<dyn Partition>> {
        if self.failures == 0 {
            self.handle.clone()
        } else {
            None
        }
    }

    fn fail(&mut self, now: Ts, queue: &str, e: &StorageError) {
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
    fn pull_deadline(&mut self, t: Ts) {
        self.next_deadline = Some(self.next_deadline.map_or(t, |d| d.min(t)));
    }
}

/// A lease request waiting (long-polling) for items.
struct Waiter {
    client_id: String,
    n: usize,
    deadline: Ts,
    reply: Reply<LeaseResult>,
}

/// One queue's task: its definition, its partitions, its waiting leases and its inbox.
pub(crate) struct QueueTask {
    info: QueueInfo,
    parts: Vec<Part>,
    /// Lease requests in arrival order (the order items are dealt in).
    waiters: VecDeque<Waiter>,
    rx: mpsc::Receiver<Msg>,
    /// Where dead items go; given by the engine, so the task needs nothing else from it.
    dead_letters: Arc<dyn DeadLetterSink>,
    /// The engine's, shared: a copy per task was 216 bytes and a list of stores held by every loaded queue.
    config: Arc<EngineConfig>,
    metrics: Arc<QueueMetrics>,
    /// When a failed dead-letter move is tried again.
    dead_retry_at: Ts,
    /// The queue-wide index of recent dedup keys (see [`dedup`]).
    dedup: dedup::DedupIndex,
    /// Who holds the leases this server handed out, for browse (see [`browse`]).
    holders: browse::Holders,
    /// The rebalance in progress, if any (see [`drain`]). Boxed: a few hundred bytes that every loaded queue held
    /// inline, for a task that rarely runs.
    rebalance: Option<Box<drain::Rebalance>>,
    /// Per partition, the ids of this (dead-letter) queue a redrive is moving: read, being copied to their
    /// target, not deleted yet ([`Cold::Claim`]). A consumer that leased one of them meanwhile loses the race: its
    /// complete or retry is refused as for an id that is gone, since the item is delivered again from its target.
    /// (A complete that went through used to leave the item both completed and redriven.)
    redriving: HashMap<u32, std::collections::HashSet<ItemId>>,
    /// The engine's count of serving requests (any queue): a rebalance yields while it moves (see [`drain`]).
    activity: Arc<std::sync::atomic::AtomicU64>,
    /// When the tier figures of `/metrics` are read next (`None`: nothing changed since the last read).
    tiers_due: Option<Ts>,
    /// When they were last read.
    tiers_at: Ts,
    /// The gates of earlier passes whose deferred writes were not known durable when this pass began (or failed):
    /// a produce answered as a duplicate (wholly or in part) waits for them, since the item its key came with first
    /// may be among those writes (see `produce`).
    unsettled: Vec<Gate>,
    /// When the definition is re-read next, for a queue on shared stores (see `refresh_definition`).
    definition_at: Ts,
    /// The definition was deleted (or deleted and created anew) by another server: the task stops after this
    /// pass, and the engine loads the queue afresh on its next request.
    gone: bool,
    /// When the last request arrived (or the task started): the queue unloads itself once it has had none for
    /// `limits.queue_idle_unload` and holds nothing that needs the task (see [`QueueTask::idle`]).
    last_request: Ts,
    /// Definitions stored since the task loaded, handed over beside the inbox (see [`NextInfo`]).
    next_info: Arc<NextInfo>,
}

/// How a task ended (see [`QueueTask::run`]).
pub(crate) enum Exit {
    /// Shut down, or stopped because the queue was deleted here: whatever was in the inbox was answered.
    Stopped,
    /// Stopped because another server sharing the store deleted the queue (or deleted it and created it anew):
    /// whatever was in the inbox was answered. Unlike [`Exit::Stopped`], no one here removes the queue's handle, so
    /// the engine does (see `Engine::gone`).
    Gone,
    /// Unloaded for being idle: its inbox is closed and its partitions are closed. The requests that reached the
    /// inbox between the decision and the close are handed back unanswered, for the engine to give to the queue's
    /// next task (serving them here could leave work that needs a task: a long-poll, leased items). With them, the
    /// earliest deadline its partitions held (a ready item's expiry): the engine loads the queue again then, so
    /// items expire, and reach the dead-letter queue, on time even if no request comes.
    Unloaded(Vec<Msg>, Option<Ts>),
}

impl QueueTask {
    /// A task for `info`, reading requests from `rx`; start it with [`QueueTask::run`].
    pub(crate) fn new(
        info: QueueInfo,
        rx: mpsc::Receiver<Msg>,
        dead_letters: Arc<dyn DeadLetterSink>,
        config: Arc<EngineConfig>,
        metrics: Arc<QueueMetrics>,
    ) -> Self {
        let mut t = QueueTask {
            info: QueueInfo::default(),
            parts: Vec::new(),
            waiters: VecDeque::new(),
            rx,
            dead_letters,
            config,
            metrics,
            dead_retry_at: Ts::ZERO,
            dedup: dedup::DedupIndex::default(),
            holders: browse::Holders::default(),
            rebalance: None,
            activity: Arc::default(),
            // The first pass reads them (after opening the partitions).
            tiers_due: Some(Ts::ZERO),
            tiers_at: Ts::ZERO,
            unsettled: Vec::new(),
            definition_at: Ts::ZERO,
            gone: false,
            redriving: HashMap::new(),
            last_request: Ts::ZERO,
            next_info: Arc::new(NextInfo::new(0)),
        };
        t.last_request = t.now();
        t.set_info(info);
        t
    }

    /// A task that reads the engine's count of serving requests (see `activity`).
    pub(crate) fn with_activity(mut self, activity: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.activity = activity;
        self
    }

    /// A task that takes the definitions the engine stores later from `next` (see [`NextInfo`]).
    pub(crate) fn with_next_info(mut self, next: Arc<NextInfo>) -> Self {
        self.next_info = next;
        self
    }

    /// A task for `info` that resumes the rebalance `plan` before serving anything.
    pub(crate) fn with_rebalance(mut self, plan: Option<drain::Plan>) -> Self {
        if let Some(plan) = plan {
            self.install_rebalance(plan);
        }
        self
    }

    /// Takes a new definition; partitions it adds start unopened (the next pass opens them).
    fn set_info(&mut self, mut info: QueueInfo) {
        if self.rebalance.is_some() {
            // The task's placement is ahead of the stored one while a rebalance runs (the engine persists it
            // after each step): keep it.
            info.partitions = self.info.partitions.clone();
            info.requested_partitions = self.info.requested_partitions;
        }
        // Exactly the room the definition needs: pushed one at a time, a queue of one partition took room for four
        // (a `Part` is 128 bytes).
        self.parts
            .reserve_exact(info.partitions.len().saturating_sub(self.parts.len()));
        for p in &info.partitions[self.parts.len().min(info.partitions.len())..] {
            let store = self.find_store(p);
            let shared = store.shared();
            self.parts.push(Part {
                num: p.partition,
                store,
                store_name: p.storage_name.clone(),
                draining: false,
                shared,
                handle: None,
                counts: PartitionCounts::default(),
                // Not opened yet: "failed" with a retry due now, so the first pass opens it.
                failures: 1,
                retry_at: Ts::ZERO,
                next_deadline: None,
                refresh_at: Ts::ZERO,
                top_priority: crate::types::MAX_PRIORITY,
            });
        }
        self.info = info;
    }

    fn find_store(&self, p: &PartitionInfo) -> Arc<dyn PartitionStore> {
        match self.config.stores.iter().find(|s| s.name == p.storage_name) {
            Some(s) => s.store.clone(),
            // Placement names a store the configuration no longer has: the partition stays failed and
            // says why on every probe.
            None => Arc::new(MissingStore(p.storage_name.clone())),
        }
    }

    /// Whether a rebalance drains partition `num` (it must take no new item).
    fn is_draining(&self, num: u32) -> bool {
        self.parts.iter().any(|p| p.num == num && p.draining)
    }

    fn policy(&self) -> LifecyclePolicy {
        LifecyclePolicy {
            max_attempts: self.info.max_attempts,
            has_dead_queue: !self.info.dead_queue.is_empty(),
            backoff: self.info.retry_backoff,
        }
    }

    fn now(&self) -> Ts {
        self.config.clock.now()
    }

    /// The task loop; returns once the queue is stopped (shutdown message or closed inbox) or unloaded.
    ///
    /// Memory: this future lives as long as the queue is loaded, and an async fn's future holds, inline, the state
    /// of the largest future it awaits. A pass's state (every storage call it may make) is several kilobytes, which
    /// a loaded idle queue held all the time it waited for a request: the pass, the stop and the unload are boxed,
    /// so they take their memory while they run (one allocation per pass, next to the many a pass makes), and an
    /// idle queue holds only the task's own fields and its wait.
    ///
    /// A plain function returning an async block, not an `async fn`: an `async fn`'s future keeps its arguments
    /// apart from the locals it moves them to, so `self` (a kilobyte) was held twice for as long as the queue was
    /// loaded; the block uses the `self` it captured in place.
    #[allow(clippy::manual_async_fn)] // On purpose: see the paragraph above.
    pub(crate) fn run(mut self) -> impl std::future::Future<Output = Exit> + Send {
        async move {
            // Empty while the task waits: a batch's room is taken when messages arrive and given back when the task
            // waits again (see below), so an idle queue holds none and a burst's room (up to `MAX_DRAIN` messages) is
            // not kept.
            let mut batch: Vec<Msg> = Vec::new();
            loop {
                // One reading of the clock for the idle check and the wake-up: with two, the idle time could pass
                // between them, and the loop would leave the idle deadline out as passed without having checked it
                // (the queue then stayed loaded until its next request).
                let now = self.now();
                if self.idle(now) {
                    let wake = self.parts.iter().filter_map(|p| p.next_deadline).min();
                    return Exit::Unloaded(Box::pin(self.unload()).await, wake);
                }
                let wake = self.next_wake(now);
                if wake > now {
                    if batch.capacity() > 0 {
                        batch = Vec::new();
                    }
                    let sleep = self.config.clock.sleep_until(wake);
                    tokio::select! {
                        biased;
                        m = self.rx.recv() => match m {
                            Some(m) => {
                                // Room for what is in the inbox now, at once, rather than growing 4, 8, 16...
                                batch.reserve_exact(1 + self.rx.len().min(MAX_DRAIN));
                                batch.push(m);
                            }
                            None => { Box::pin(self.stop()).await; return Exit::Stopped; }
                        },
                        _ = sleep => {}
                    }
                }
                while batch.len() < MAX_DRAIN {
                    match self.rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                if let Some(done) = Box::pin(self.pass(&mut batch)).await {
                    Box::pin(self.stop()).await;
                    let _ = done.send(());
                    return Exit::Stopped;
                }
                if self.gone {
                    // Requests of the pass that found it gone were dropped unanswered (their callers see the queue
                    // shutting down); those still queued get the same answer, and a retry finds the queue missing.
                    Box::pin(self.stop()).await;
                    return Exit::Gone;
                }
            }
        }
    }

    /// Whether the queue may unload: no request for `limits.queue_idle_unload` (zero: never), and nothing that
    /// needs this task to make progress. Leased items (their expiry), scheduled items (their schedule), waiting
    /// lease requests, lifecycle work due (dead items to hand over, a dead-letter move to retry), a rebalance or a
    /// redrive claim, a failing partition (its probe; its counts are unknown) or tier figures still to read keep
    /// it. Ready items do not: they wait in storage, and the next task finds them (the engine loads the queue
    /// again at their earliest expiry, see [`Exit::Unloaded`]; `/metrics` keeps their count meanwhile).
    fn idle(&self, now: Ts) -> bool {
        let after = self.config.limits.queue_idle_unload;
        if after.is_zero() || now < self.last_request.add(after) {
            return false;
        }
        self.waiters.is_empty()
            && self.rebalance.is_none()
            && self.redriving.values().all(|ids| ids.is_empty())
            && self.tiers_due.is_none()
            && now >= self.dead_retry_at
            && self.parts.iter().all(|p| {
                p.failures == 0
                    && p.counts.leased == 0
                    && p.counts.scheduled == 0
                    && p.next_deadline.is_none_or(|d| d > now)
            })
    }

    /// Stops the idle queue and frees its state; returns the requests that reached the inbox meanwhile, unanswered
    /// (see [`Exit::Unloaded`]). The dedup index is rebuilt from the partitions' records by the next task, so
    /// nothing of it is lost.
    async fn unload(&mut self) -> Vec<Msg> {
        // A duplicate produce answered by the next task must not overtake the durability of the item its key came
        // with: those writes are made durable (or failed) before the task lets go.
        for g in self.unsettled.drain(..) {
            let _ = g.wait().await;
        }
        // From here a sender finds the inbox closed and loads the queue again; what got in before is handed back.
        self.rx.close();
        let mut left = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            left.push(m);
        }
        for p in &mut self.parts {
            if let Some(h) = p.handle.take() {
                h.close().await;
            }
        }
        // What the unloaded queue holds in memory: nothing. Its depths stay as they were (see `Engine::queue_metrics`).
        self.metrics.dedup_keys.store(0, Ordering::Relaxed);
        self.metrics.lease_waiting.store(0, Ordering::Relaxed);
        self.metrics.unloaded.store(true, Ordering::Relaxed);
        tracing::debug!(queue = %self.info.name, handed_on = left.len(), "idle queue unloaded");
        left
    }

    /// One pass over a drained batch. Returns the shutdown acknowledgement when asked to stop.
    async fn pass(&mut self, batch: &mut Vec<Msg>) -> Option<oneshot::Sender<()>> {
        let now = self.now();
        // A pass with requests, or one whose lifecycle changed the counts, may have changed the tier figures. A
        // stats request alone changes nothing (and publishes the figures it reads anyway).
        let changed_before = batch.iter().any(|m| !matches!(m, Msg::Cold(Cold::Stats(_))));
        // A store notice is no request: it wakes consumers waiting here, if any.
        if batch.iter().any(|m| !matches!(m, Msg::Wake(_))) {
            self.last_request = now;
        }
        if let Some((seq, info)) = self.next_info.take() {
            // Before the partitions are probed: the ones a grown definition adds are opened in this pass.
            self.apply_info(*info, now);
            self.next_info.taken.send_replace(seq);
        }
        let counts_before = self.total_counts();
        self.recover(now).await;
        if self.gone {
            // Nothing of this batch may reach partitions of a queue deleted elsewhere (see `run`).
            batch.clear();
            return None;
        }
        if self.info.restoring {
            // Nothing may change the partitions but the restore itself: its resume point is their item count.
            self.refuse_while_restoring(batch);
        } else {
            // Before the lifecycle and before anything is served: a chunk in flight when the server stopped is
            // replayed first (see `drain`).
            self.rebalance_step(now).await;
            self.lifecycle(now).await;
        }
        self.holders.prune(now);

        let mut produces = Vec::new();
        let mut dead_letters = Vec::new();
        let mut moved = Vec::new();
        let mut completes: CompleteGroups = HashMap::new();
        let mut retries: RetryGroups = HashMap::new();
        let mut extends: ExtendGroups = HashMap::new();
        let mut colds = Vec::new();
        let mut woken: Vec<usize> = Vec::new();
        let mut shutdown = None;
        for m in batch.drain(..) {
            match m {
                Msg::Produce {
                    items,
                    keys,
                    deadline,
                    reply,
                } => produces.push((items, keys.map_or_else(Vec::new, |k| *k), deadline, reply)),
                Msg::DeadLetter { items, reply } => dead_letters.push((items, reply)),
                Msg::Moved { items, reply } => moved.push((items, reply)),
                Msg::Lease {
                    n,
                    client_id,
                    deadline,
                    reply,
                } => {
                    if self
                        .waiters
                        .iter()
                        .any(|w| w.client_id == client_id && !w.reply.is_closed())
                    {
                        let _ = reply.send(Err(QueueError::DuplicateClientId));
                    } else {
                        self.waiters.push_back(Waiter {
                            client_id,
                            n,
                            deadline,
                            reply,
                        });
                    }
                }
                Msg::Complete {
                    partition,
                    ids,
                    reply,
                } => match self.redriven(partition, ids.iter().copied()) {
                    Some(id) => drop(reply.send(Err(QueueError::NoSuchId(id.to_string())))),
                    None => completes.entry(partition).or_default().push((ids, reply)),
                },
                Msg::Retry {
                    partition,
                    items,
                    reply,
                } => match self.redriven(partition, items.iter().map(|it| it.id)) {
                    Some(id) => drop(reply.send(Err(QueueError::NoSuchId(id.to_string())))),
                    None => retries.entry(partition).or_default().push((items, reply)),
                },
                Msg::Extend {
                    partition,
                    ids,
                    lease_timeout,
                    reply,
                } => extends
                    .entry(partition)
                    .or_default()
                    .push((ids, lease_timeout, reply)),
                Msg::Cold(c) => colds.push(c),
                Msg::Wake(p) => {
                    if let Some(i) = self.parts.iter().position(|x| x.num == p && x.shared) {
                        if !woken.contains(&i) {
                            woken.push(i);
                        }
                    }
                }
                // Taken at the start of the pass (see `NextInfo`).
                Msg::Definition => {}
                Msg::Shutdown(done) => shutdown = Some(done),
            }
        }
        // A woken partition has ready items another server made: it goes first when the waiters are served (a
        // lease is the one round trip that finds them; its counts are re-read at the periodic refresh).
        for i in woken {
            let p = &mut self.parts[i];
            p.counts.ready = p.counts.ready.max(1);
            p.top_priority = crate::types::MAX_PRIORITY;
        }
        // Produce, complete, retry, extend and lease depend on durability only for their replies: their writes are
        // deferred to the pass, which answers them once an fsync covers them while the task goes on (see
        // `durability`). Everything else in the pass is durable when its call returns.
        let deferred = Pass::new();
        // A pass whose writes failed to become durable stays: the keys it claimed are still in the index, so a
        // duplicate of one of them must not be acknowledged. (A failed fsync poisons a fjall store, which stores
        // nothing more until the server restarts and rebuilds the index from what is on disk.)
        self.unsettled.retain(|g| !g.is_durable());
        if !produces.is_empty() {
            deferred.scope(self.produce(produces, now)).await;
        }
        if !dead_letters.is_empty() {
            self.accept_dead_letters(dead_letters, now).await;
        }
        for (items, reply) in moved {
            self.accept_moved(items, reply, now).await;
        }
        if !completes.is_empty() {
            deferred.scope(self.complete(completes, now)).await;
        }
        if !retries.is_empty() {
            deferred.scope(self.retry(retries, now)).await;
        }
        if !extends.is_empty() {
            deferred.scope(self.extend(extends, now)).await;
        }
        for c in colds {
            self.cold(c, now).await;
        }
        deferred.scope(self.serve_leases(now)).await;
        self.unsettled.extend(deferred.pending());
        deferred.finish();
        self.expire_waiters(now);
        if changed_before || self.total_counts() != counts_before {
            self.tiers_changed(now);
        }
        self.refresh_tiers(now).await;
        self.publish();
        shutdown
    }

    /// Ready, leased and scheduled items over every partition.
    fn total_counts(&self) -> (u64, u64, u64) {
        self.parts.iter().fold((0, 0, 0), |(r, l, s), p| {
            (r + p.counts.ready, l + p.counts.leased, s + p.counts.scheduled)
        })
    }

    /// Schedules a read of the tier figures, at most one per [`super::TIER_REFRESH`].
    fn tiers_changed(&mut self, now: Ts) {
        if self.tiers_due.is_none() {
            self.tiers_due = Some(now.max(self.tiers_at.add(super::TIER_REFRESH)));
        }
    }

    /// Reads every healthy partition's tier figures for `/metrics` when due. A partition that fails is left out
    /// (its figures come back with it).
    async fn refresh_tiers(&mut self, now: Ts) {
        if self.tiers_due.is_none_or(|due| due > now) {
            return;
        }
        let mut sum = crate::types::TierStats::default();
        for p in &self.parts {
            if let Some(h) = p.healthy() {
                match h.stats(now).await {
                    Ok(s) => sum.add(&s.tiers),
                    Err(e) => {
                        tracing::debug!(queue = %self.info.name, partition = p.num, error = %e, "tier figures not read")
                    }
                }
            }
        }
        self.metrics.set_tiers(&sum);
        self.tiers_due = None;
        self.tiers_at = now;
    }

    /// When the loop must wake even without a message: a long-poll ending, a partition probe, a deadline.
    fn next_wake(&self, now: Ts) -> Ts {
        let mut wake = self.rebalance_wake();
        let after = self.config.limits.queue_idle_unload;
        if !after.is_zero() {
            // Once passed, the idle deadline wakes nothing more (it would spin): whatever keeps the queue loaded
            // then (a lease end, a schedule, a probe...) has its own wake, and the check follows that pass.
            let at = self.last_request.add(after);
            if at > now {
                wake = wake.min(at);
            }
        }
        if let Some(due) = self.tiers_due {
            wake = wake.min(due);
        }
        for w in &self.waiters {
            wake = wake.min(w.deadline);
        }
        for (i, p) in self.parts.iter().enumerate() {
            if p.failures > 0 {
                wake = wake.min(p.retry_at);
            } else {
                // A lifecycle held by the rebalance waits for its next step (in `rebalance_wake`): its deadline,
                // passed already, would wake the loop at once, over and over.
                if let Some(d) = p.next_deadline.filter(|_| !self.lifecycle_held(i)) {
                    wake = wake.min(d);
                }
                if p.shared {
                    wake = wake.min(p.refresh_at);
                }
            }
        }
        wake
    }

    /// Publishes the gauges `/metrics` reads.
    fn publish(&self) {
        let (mut ready, mut leased, mut scheduled) = (0, 0, 0);
        for p in &self.parts {
            ready += p.counts.ready;
            leased += p.counts.leased;
            scheduled += p.counts.scheduled;
        }
        self.metrics.ready.store(ready, Ordering::Relaxed);
        self.metrics.leased_now.store(leased, Ordering::Relaxed);
        self.metrics.scheduled.store(scheduled, Ordering::Relaxed);
        self.metrics
            .lease_waiting
            .store(self.waiters.len() as u64, Ordering::Relaxed);
        self.metrics
            .dedup_keys
            .store(self.dedup.len() as u64, Ordering::Relaxed);
    }

    /// Answers everything still waiting with "queue is shutting down" and closes the partitions.
    async fn stop(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(QueueError::QueueShuttingDown));
        }
        self.rx.close();
        while let Ok(m) = self.rx.try_recv() {
            refuse(m, QueueError::QueueShuttingDown);
        }
        for p in &mut self.parts {
            if let Some(h) = p.handle.take() {
                h.close().await;
            }
        }
    }
}

/// Answers a request that will not be served with `e` (a shutdown or definition update is acknowledged).
pub(crate) fn refuse(m: Msg, e: QueueError) {
    match m {
        Msg::Produce { reply, .. }
        | Msg::Complete { reply, .. }
        | Msg::Retry { reply, .. }
        | Msg::Extend { reply, .. }
        | Msg::Moved { reply, .. }
        | Msg::DeadLetter { reply, .. } => drop(reply.send(Err(e))),
        Msg::Lease { reply, .. } => drop(reply.send(Err(e))),
        Msg::Cold(c) => match c {
            Cold::Stats(r) => drop(r.send(Err(e))),
            Cold::Clear(_, r) | Cold::Reload(r) | Cold::Delete { reply: r, .. } => drop(r.send(Err(e))),
            Cold::List { reply, .. } => drop(reply.send(Err(e))),
            Cold::Import { reply, .. } => drop(reply.send(Err(e))),
            Cold::Claim { reply, .. } => drop(reply.send(Err(e))),
            Cold::Browse { reply, .. } => drop(reply.send(Err(e))),
            Cold::Snapshot { reply, .. } => drop(reply.send(Err(e))),
            Cold::RestoreImport { reply, .. } => drop(reply.send(Err(e))),
            Cold::RebalanceInstall(_, done) => drop(done.send(())),
            Cold::RebalanceReport { reply, .. } => drop(reply),
        },
        Msg::Wake(_) | Msg::Definition => {}
        Msg::Shutdown(done) => drop(done.send(())),
    }
}

#[cfg(test)]
mod tests {
    /// A message stays small: the inbox's first block holds 32 of them for as long as the queue is loaded (see
    /// [`super::Msg`]).
    #[test]
    fn message_size() {
        let size = std::mem::size_of::<super::Msg>();
        println!(
            "Msg: {size} bytes, QueueTask: {} bytes",
            std::mem::size_of::<super::QueueTask>()
        );
        assert!(size <= 56, "a message is {size} bytes");
    }
}
