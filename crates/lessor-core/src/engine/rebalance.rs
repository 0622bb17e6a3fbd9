//! Online rebalance (`queues.rebalance`): moving partitions between partition stores and shrinking a queue's
//! partitions while it serves, as a server-side task with an id and progress that survives restarts.
//!
//! The queue task does the data work a chunk per pass (see the queue module's `drain`); this module validates a
//! request, persists the task in the metadata store (the ordered store that also holds users and redrive tasks),
//! and runs a watcher per task that polls the queue task, persists the placement as it changes (before destroying
//! any old partition), saves progress and marks the task finished. A server killed mid-move loads the task with
//! the queue and resumes it before serving anything; see `drain` for why nothing is lost or doubled.
//!
//! Stores shared by several servers (PostgreSQL) are refused: the other servers serve the same partition from its
//! old place and know nothing of the move, so they would keep writing to a partition being emptied.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::queue::{Cold, RebalancePlan, RebalanceReport, JOURNAL_TAG};
use super::task_records::TaskTable;
use super::{shares, Engine};
use crate::auth::records::key;
use crate::auth::store::Commit;
use crate::error::QueueError;
use crate::time::Ts;
use crate::validate;

/// Table tag of rebalance tasks in the metadata store.
const TAG: u8 = b'P';
/// Where the tasks are stored.
const TASKS: TaskTable = TaskTable {
    tag: TAG,
    what: "rebalance",
};
/// How often a watcher polls its queue task.
const POLL: Duration = Duration::from_millis(200);
/// Pause after a failed poll before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Tasks kept; starting one more forgets the oldest finished ones.
const KEEP: usize = 200;

/// One partition to move.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMove {
    /// The partition number.
    pub partition: u32,
    /// The `partition-storage` name it moves to.
    pub to_store: String,
}

/// What a rebalance does: exactly one of explicit moves, a spread, or a new partition count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebalanceRequest {
    /// The queue.
    pub queue: String,
    /// Partitions to move to other stores, one after the other.
    pub moves: Vec<PartitionMove>,
    /// Move partitions so that each store holds its share by the current affinities.
    pub spread: bool,
    /// A new partition count (0: unchanged). More: the queue grows at once (as `queues.update`); fewer: the
    /// removed partitions (the highest numbers) are drained into the others.
    pub partitions: u32,
    /// Most items moved per second (0: as fast as the queue's passes allow), so a move leaves the machine to the
    /// serving path.
    pub max_items_per_sec: u32,
}

/// Where a rebalance task stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RebalanceStatus {
    /// Moving items.
    #[default]
    Running,
    /// Done: the placement and the partition count are the requested ones.
    Completed,
    /// Stopped (the queue was deleted); see the task's `error`.
    Failed,
    /// Cancelled, and finishing the partition move it had started (see [`Engine::rebalance_cancel`]).
    Cancelling,
    /// Stopped by a cancel: what was moved stays moved, the rest stays where it was.
    Cancelled,
}

impl RebalanceStatus {
    /// The status as a word, on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            RebalanceStatus::Running => "running",
            RebalanceStatus::Completed => "completed",
            RebalanceStatus::Failed => "failed",
            RebalanceStatus::Cancelling => "cancelling",
            RebalanceStatus::Cancelled => "cancelled",
        }
    }
}

/// A rebalance task as reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebalanceTask {
    /// The task id.
    pub id: String,
    /// The queue.
    pub queue: String,
    /// The partition moves (a spread is resolved into moves when it starts).
    pub moves: Vec<PartitionMove>,
    /// The partition count asked for (0: unchanged).
    pub partitions: u32,
    /// The rate limit (items per second; 0: none).
    pub max_items_per_sec: u32,
    /// Where it stands.
    pub status: RebalanceStatus,
    /// Items moved so far.
    pub moved: u64,
    /// Items left in the partitions still to drain, when last looked at.
    pub remaining: u64,
    /// The last error (a step that failed and is retried, or why the task failed).
    pub error: String,
    /// When it was started.
    pub created_at: Ts,
    /// When its progress was last saved.
    pub updated_at: Ts,
}

/// Progress of the rebalance tasks running in this process, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct RebalanceProgress {
    /// The task id.
    pub id: String,
    /// The queue.
    pub queue: String,
    /// Items moved so far.
    pub moved: u64,
    /// Items left to move.
    pub remaining: u64,
}

/// A partition in one store: a place the task empties, destroyed once the stored placement no longer names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Place {
    partition: u32,
    store: String,
}

/// A task as stored.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Stored {
    id: String,
    queue: String,
    moves: Vec<PartitionMove>,
    partitions: u32,
    #[serde(default)]
    max_items_per_sec: u32,
    status: String,
    moved: u64,
    remaining: u64,
    error: String,
    created_at: i64,
    updated_at: i64,
    /// A cancel was asked for; the status stays "running" until the queue task settled it.
    #[serde(default)]
    cancelled: bool,
    /// The partitions the task empties, where they were when it started (moves' sources, a shrink's removed
    /// partitions). Each is destroyed once the stored placement no longer names it, by whichever watcher sees
    /// that first, before or after a restart: the destroy is part of the task, not of one process's memory.
    /// Empty in tasks saved by older versions (they destroy what the queue task reports instead).
    #[serde(default)]
    sources: Vec<Place>,
    /// The sources destroyed so far (a destroy repeated after a crash is harmless: stores destroy idempotently).
    #[serde(default)]
    destroyed: Vec<Place>,
    /// The incarnation of the queue the task moves (its definition's `created_at`, see
    /// [`PartitionStore::create_incarnation`](crate::storage::PartitionStore::create_incarnation)): the destinations
    /// are made for it and only its partitions are destroyed, also once the queue was deleted and maybe created
    /// again under the name. A store that keeps incarnations apart (PostgreSQL) names their partitions apart, so a
    /// destroy of another incarnation would leave this one's partitions, with the moved items' old copies, to be
    /// served again by a later move back to the store. 0 in tasks saved by older builds: they create and destroy the
    /// partitions of incarnation 0, as those builds did.
    #[serde(default)]
    incarnation: i64,
}

impl Stored {
    fn task(&self) -> RebalanceTask {
        RebalanceTask {
            id: self.id.clone(),
            queue: self.queue.clone(),
            moves: self.moves.clone(),
            partitions: self.partitions,
            max_items_per_sec: self.max_items_per_sec,
            status: match self.status.as_str() {
                "completed" => RebalanceStatus::Completed,
                "failed" => RebalanceStatus::Failed,
                "cancelled" => RebalanceStatus::Cancelled,
                _ if self.cancelled => RebalanceStatus::Cancelling,
                _ => RebalanceStatus::Running,
            },
            moved: self.moved,
            remaining: self.remaining,
            error: self.error.clone(),
            created_at: Ts(self.created_at),
            updated_at: Ts(self.updated_at),
        }
    }

    fn plan(&self, current_partitions: usize) -> RebalancePlan {
        RebalancePlan {
            id: self.id.clone(),
            moves: self
                .moves
                .iter()
                .map(|m| (m.partition, m.to_store.clone()))
                .collect(),
            shrink_to: (self.partitions > 0 && (self.partitions as usize) < current_partitions)
                .then_some(self.partitions),
            moved: self.moved,
            max_items_per_sec: self.max_items_per_sec,
            cancelled: self.cancelled,
        }
    }
}

impl Engine {
    async fn load_rebalance(&self, id: &str) -> Result<Option<Stored>, QueueError> {
        TASKS.load(self, id).await
    }

    async fn save_rebalance(&self, t: &Stored) -> Result<(), QueueError> {
        TASKS.save(self, &t.id, t).await
    }

    async fn all_rebalances(&self) -> Result<Vec<Stored>, QueueError> {
        TASKS.all(self).await
    }

    /// The running rebalance of `queue`, as the plan its task resumes when it loads. A task older than the queue
    /// belongs to a deleted queue of the same name: it is not handed to the new one.
    pub(crate) async fn rebalance_plan_for(
        &self,
        queue: &str,
        partitions: usize,
        queue_created: Ts,
    ) -> Result<Option<RebalancePlan>, QueueError> {
        Ok(self
            .all_rebalances()
            .await?
            .into_iter()
            .find(|t| t.queue == queue && t.status == "running" && t.created_at >= queue_created.0)
            .map(|t| t.plan(partitions)))
    }

    /// Ends the running rebalances of `queue`, which is being deleted (its task is stopped; the caller holds the
    /// load lock): destroys their moves' destinations and the old partitions not destroyed yet, and marks them
    /// failed, so that no watcher hands them to a
    /// queue created again under the name. The records are read and written under the task lock, as the watcher's
    /// progress saves are: without it, a save that loaded the record before this write and stored it after put the
    /// task back to running, and until the watcher's next poll a queue created again under the name could not be
    /// rebalanced nor have its partition count changed. Taking it under the load lock is safe: no holder of the
    /// task lock waits for the load lock (see `rebalance_start`).
    ///
    /// `incarnation` is the deleted queue's: a task of a newer one (a queue created again under the name, on another
    /// server sharing the stores, while this delete of the old one was late) is left running with its partitions.
    pub(crate) async fn end_rebalances_of_deleted(
        &self,
        queue: &str,
        incarnation: Ts,
    ) -> Result<(), QueueError> {
        let _tasks = self.inner.task_lock.lock().await;
        for mut t in self.all_rebalances().await? {
            if t.queue != queue || t.status != "running" {
                continue;
            }
            // Tasks saved by older builds do not know their incarnation (0): ended as before. One of an older
            // incarnation is ended too: its destroys reach its own partitions only.
            if t.incarnation != 0 && t.incarnation > incarnation.0 {
                continue;
            }
            for m in &t.moves {
                self.destroy_partition(&t, &m.to_store, m.partition).await?;
            }
            // And the partitions it emptied that no placement names any more (switched away, or dropped by a
            // shrink) and its watcher has not destroyed yet: the delete destroyed the placement it read, and one
            // left behind kept its dedup records, which a queue created again under the name and placed there
            // took for its own (a produce of such a key stored nothing). Those still named are gone already.
            for s in t.sources.iter().filter(|s| !t.destroyed.contains(s)) {
                self.destroy_partition(&t, &s.store, s.partition).await?;
            }
            t.status = "failed".into();
            t.error = "the queue was deleted".into();
            t.updated_at = self.clock().now().0;
            self.delete_journal(&t.id).await;
            self.save_rebalance(&t).await?;
            tracing::warn!(task = %t.id, queue, "rebalance failed: the queue was deleted");
        }
        Ok(())
    }

    /// Whether a rebalance runs on `queue` (definition changes that touch partitions wait for it).
    pub(crate) async fn rebalancing(&self, queue: &str) -> Result<Option<String>, QueueError> {
        Ok(self
            .all_rebalances()
            .await?
            .into_iter()
            .find(|t| t.queue == queue && t.status == "running")
            .map(|t| t.id))
    }

    /// Starts a rebalance (see [`RebalanceRequest`]); it runs in the background and survives restarts. A growth
    /// is applied at once and returns a completed task.
    pub async fn rebalance_start(&self, request: RebalanceRequest) -> Result<RebalanceTask, QueueError> {
        self.check_running()?;
        validate::queue_name("queue_name", &request.queue)?;
        let info = self.queue_info(&request.queue).await?;
        if info.restoring {
            return Err(QueueError::Restoring(info.name));
        }
        let asked = usize::from(!request.moves.is_empty())
            + usize::from(request.spread)
            + usize::from(request.partitions > 0);
        if asked != 1 {
            return Err(validate::invalid(
                "rebalance request",
                "give exactly one of 'moves', 'spread' or 'partitions'",
            ));
        }
        // The check that no task runs and the save of this one happen under the task lock: two starts checking
        // before either saved both ran, and the second installed replaced the first in the queue task (a move's
        // chunks already in its new store were left behind when a shrink took over and dropped the partition).
        // It is let go before anything that takes the load lock (the growth's update, loading the queue to hand
        // it the plan): a queue delete takes the task lock under the load lock, so holding both the other way
        // round could deadlock.
        let starting = self.inner.task_lock.lock().await;
        if let Some(id) = self.rebalancing(&info.name).await? {
            return Err(validate::invalid(
                "queue_name",
                format!("rebalance task '{id}' is already running on '{}'", info.name),
            ));
        }
        let have = info.partitions.len();
        let mut moves: Vec<PartitionMove> = Vec::new();
        let mut shrink = 0u32;
        if request.partitions > 0 {
            validate::partition_count(request.partitions)?;
            let n = request.partitions as usize;
            if n == have {
                return Err(validate::invalid(
                    "partitions",
                    format!("'{}' already has '{have}' partitions", info.name),
                ));
            }
            if n > have {
                // The update refuses a partition count change itself while a rebalance runs, so a shrink started
                // once the lock is let go cannot be overtaken.
                drop(starting);
                self.update_queue(super::QueueUpdate {
                    name: info.name.clone(),
                    requested_partitions: Some(request.partitions),
                    ..Default::default()
                })
                .await?;
                return self.record_finished(&info.name, request.partitions).await;
            }
            shrink = request.partitions;
            for p in &info.partitions[n..] {
                self.refuse_shared(&p.storage_name, "partition", p.partition)?;
            }
            for p in &info.partitions[..n] {
                self.refuse_shared(&p.storage_name, "partition", p.partition)?;
            }
        } else if request.spread {
            moves = self.spread_moves(&info);
        } else {
            moves = request.moves.clone();
        }
        for (i, m) in moves.iter().enumerate() {
            let field = || format!("moves[{i}]");
            let Some(current) = info.partitions.get(m.partition as usize) else {
                return Err(validate::invalid(
                    &format!("{}.partition", field()),
                    format!("'{}' has no partition {}", info.name, m.partition),
                ));
            };
            if !self.inner.config.stores.iter().any(|s| s.name == m.to_store) {
                return Err(validate::invalid(
                    &format!("{}.to_store", field()),
                    format!("partition storage '{}' is not in the configuration", m.to_store),
                ));
            }
            if current.storage_name == m.to_store {
                return Err(validate::invalid(
                    &format!("{}.to_store", field()),
                    format!("partition {} is already in '{}'", m.partition, m.to_store),
                ));
            }
            if moves[..i].iter().any(|o| o.partition == m.partition) {
                return Err(validate::invalid(
                    &format!("{}.partition", field()),
                    format!("partition {} is moved twice", m.partition),
                ));
            }
            self.refuse_shared(&current.storage_name, "partition", m.partition)?;
            self.refuse_shared(&m.to_store, "partition", m.partition)?;
        }
        if !moves.is_empty() && have < 2 {
            return Err(validate::invalid(
                "moves",
                format!(
                    "'{}' has one partition; a partition is moved while another one takes its traffic, so grow \
                     the queue first (partitions: 2), move, then shrink it back",
                    info.name
                ),
            ));
        }
        if request.spread && moves.is_empty() {
            return self.record_finished(&info.name, 0).await;
        }
        // Every destination starts empty: a partition left there by an earlier crash between the switch and
        // its destruction holds copies of items that were moved on since.
        let mut after = info.partitions.clone();
        for m in &moves {
            after[m.partition as usize].storage_name = m.to_store.clone();
        }
        for s in &self.inner.config.stores {
            let n = after.iter().filter(|p| p.storage_name == s.name).count();
            if n > s.store.max_partitions() as usize {
                return Err(validate::invalid(
                    "moves",
                    format!(
                        "partition storage '{}' holds at most '{}' partitions of one queue",
                        s.name,
                        s.store.max_partitions()
                    ),
                ));
            }
        }
        // Of the queue's incarnation, as its other partitions: the queue task opens the destination as its own.
        for m in &moves {
            if let Some(s) = self.inner.config.stores.iter().find(|s| s.name == m.to_store) {
                s.store
                    .destroy_incarnation(&info.name, info.created_at, m.partition)
                    .await?;
                s.store
                    .create_incarnation(&info.name, info.created_at, &[m.partition])
                    .await?;
            }
        }
        self.forget_old_rebalances().await?;
        let now = self.clock().now();
        let emptied: Vec<u32> = if shrink > 0 {
            (shrink..have as u32).collect()
        } else {
            moves.iter().map(|m| m.partition).collect()
        };
        let sources = emptied
            .into_iter()
            .filter_map(|p| {
                info.partitions.get(p as usize).map(|x| Place {
                    partition: p,
                    store: x.storage_name.clone(),
                })
            })
            .collect();
        let stored = Stored {
            id: new_id(now)?,
            queue: info.name.clone(),
            moves,
            partitions: shrink,
            max_items_per_sec: request.max_items_per_sec,
            status: "running".into(),
            created_at: now.0,
            updated_at: now.0,
            sources,
            incarnation: info.created_at.0,
            ..Default::default()
        };
        self.save_rebalance(&stored).await?;
        // Saved as running: a start from here on sees it and is refused.
        drop(starting);
        let plan = stored.plan(have);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let msg = super::Msg::Cold(Cold::RebalanceInstall(Box::new(plan), tx));
        // Bounded: a queue task stuck in a storage call takes the plan later, or its watcher hands it over again
        // (a report says whether it is installed); the task is saved and running either way.
        let install = async {
            if self
                .deliver(&info.name, msg, Some(self.admin_deadline()))
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
            Ok(())
        };
        if let Err(e) = self.untimed("rebalance start", install).await {
            tracing::warn!(task = %stored.id, queue = %stored.queue, error = %e, "rebalance plan not taken yet; its watcher hands it over");
        }
        tracing::info!(task = %stored.id, queue = %stored.queue, moves = stored.moves.len(), partitions = shrink, "rebalance started");
        let task = stored.task();
        self.spawn_rebalance(stored);
        Ok(task)
    }

    /// A 400 naming why a shared store cannot take part in a move.
    fn refuse_shared(&self, store: &str, what: &str, partition: u32) -> Result<(), QueueError> {
        let Some(s) = self.inner.config.stores.iter().find(|s| s.name == store) else {
            return Ok(());
        };
        if s.store.shared() {
            return Err(QueueError::Invalid(format!(
                "partition storage is invalid; {what} {partition} involves '{store}' ({}), a store shared by several \
                 servers: the others keep serving the partition from its old place, so it cannot be moved or \
                 drained online (stop the other servers and use 'lessor migrate', or back up and restore)",
                s.store.driver()
            )));
        }
        Ok(())
    }

    /// The moves that give each store its share of the queue's partitions by the current affinities, moving as
    /// few partitions as possible (a store over its share gives its highest-numbered ones to stores under theirs).
    fn spread_moves(&self, info: &crate::types::QueueInfo) -> Vec<PartitionMove> {
        let weights = self.weights();
        let want = shares(&weights, info.partitions.len() as u32);
        let mut have: HashMap<&str, Vec<u32>> = HashMap::new();
        for p in &info.partitions {
            have.entry(p.storage_name.as_str()).or_default().push(p.partition);
        }
        let mut surplus: Vec<u32> = Vec::new();
        for p in &info.partitions {
            // A store missing from the configuration has a share of zero.
            let share = weights
                .iter()
                .position(|w| w.name == p.storage_name)
                .map_or(0, |i| want[i] as usize);
            let mine = &have[p.storage_name.as_str()];
            let rank = mine.iter().position(|&x| x == p.partition).unwrap_or(0);
            if rank >= share {
                surplus.push(p.partition);
            }
        }
        let mut moves = Vec::new();
        for (i, w) in weights.iter().enumerate() {
            let held = have.get(w.name.as_str()).map_or(0, Vec::len);
            for _ in held..want[i] as usize {
                if let Some(p) = surplus.pop() {
                    moves.push(PartitionMove {
                        partition: p,
                        to_store: w.name.clone(),
                    });
                }
            }
        }
        moves.sort_by_key(|m| m.partition);
        moves
    }

    /// Saves and returns a task that had nothing to wait for (a growth, a spread with nothing to move).
    async fn record_finished(&self, queue: &str, partitions: u32) -> Result<RebalanceTask, QueueError> {
        self.forget_old_rebalances().await?;
        let now = self.clock().now();
        let stored = Stored {
            id: new_id(now)?,
            queue: queue.to_string(),
            partitions,
            status: "completed".into(),
            created_at: now.0,
            updated_at: now.0,
            ..Default::default()
        };
        self.save_rebalance(&stored).await?;
        Ok(stored.task())
    }

    async fn forget_old_rebalances(&self) -> Result<(), QueueError> {
        let mut all = self.all_rebalances().await?;
        all.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        for old in all.iter().skip(KEEP - 1).filter(|t| t.status != "running") {
            let mut c = Commit {
                silent: true,
                ..Default::default()
            };
            c.delete(TASKS.key(&old.id));
            let _ = self.auth_store().commit(c).await;
        }
        Ok(())
    }

    /// One rebalance task by id.
    pub async fn rebalance_get(&self, id: &str) -> Result<RebalanceTask, QueueError> {
        self.load_rebalance(id)
            .await?
            .map(|t| t.task())
            .ok_or_else(|| validate::invalid("task_id", format!("no rebalance task '{id}'")))
    }

    /// Rebalance tasks, newest first; only those of `queue` when it is not empty.
    pub async fn rebalance_list(&self, queue: &str) -> Result<Vec<RebalanceTask>, QueueError> {
        let mut all = self.all_rebalances().await?;
        all.retain(|t| queue.is_empty() || t.queue == queue);
        all.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(all.iter().map(Stored::task).collect())
    }

    /// Cancels a running rebalance task and returns it as it stands ("cancelling" until the queue settles it, then
    /// "cancelled"); a task that already ended is returned unchanged. What the cancel leaves: a shrink stops where
    /// it is (items drained so far stay in the partitions that took them, the partitions not yet removed keep the
    /// rest and serve again, the partition count is unchanged); moves already done stay done; the move under way
    /// is finished if any of its items reached the destination (moving them back would put them behind the
    /// source's newer items and break the partition's order), and dropped if none did. Nothing is lost or doubled
    /// either way: the chunk in flight is settled first, as after a crash. The watcher picks the cancel up at its
    /// next poll; it survives a restart (it is part of the stored task).
    pub async fn rebalance_cancel(&self, id: &str) -> Result<RebalanceTask, QueueError> {
        self.check_running()?;
        if id.is_empty() {
            return Err(validate::invalid("task_id", "cannot be empty"));
        }
        let now = self.clock().now().0;
        let t = TASKS
            .update(self, id, |s: &mut Stored| {
                if s.status == "running" && !s.cancelled {
                    s.cancelled = true;
                    s.updated_at = now;
                }
            })
            .await?
            .ok_or_else(|| validate::invalid("task_id", format!("no rebalance task '{id}'")))?;
        if t.status == "running" {
            tracing::info!(task = %t.id, queue = %t.queue, "rebalance cancel requested");
        }
        Ok(t.task())
    }

    /// Progress of the tasks running in this process.
    pub fn rebalance_progress(&self) -> Vec<RebalanceProgress> {
        self.inner
            .rebalances
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Resumes the watchers of running tasks (a restart); the server calls it at start and periodically. The
    /// queue's task resumes the data work itself as soon as the queue loads, which this does too.
    pub async fn resume_rebalances(&self) -> Result<usize, QueueError> {
        self.check_running()?;
        let mut n = 0;
        for t in self.all_rebalances().await? {
            if t.status != "running" || self.rebalance_running_here(&t.id) {
                continue;
            }
            tracing::info!(task = %t.id, queue = %t.queue, moved = t.moved, "resuming rebalance");
            self.spawn_rebalance(t);
            n += 1;
        }
        Ok(n)
    }

    fn rebalance_running_here(&self, id: &str) -> bool {
        self.inner
            .rebalances
            .lock()
            .map(|m| m.contains_key(id))
            .unwrap_or(false)
    }

    fn spawn_rebalance(&self, t: Stored) {
        let engine = Engine {
            inner: self.inner.clone(),
        };
        if let Ok(mut m) = self.inner.rebalances.lock() {
            m.insert(
                t.id.clone(),
                RebalanceProgress {
                    id: t.id.clone(),
                    queue: t.queue.clone(),
                    moved: t.moved,
                    remaining: t.remaining,
                },
            );
        }
        tokio::spawn(async move {
            let id = t.id.clone();
            if let Err(e) = engine.watch_rebalance(t).await {
                tracing::warn!(task = %id, error = %e, "rebalance watcher stopped");
            }
            if let Ok(mut m) = engine.inner.rebalances.lock() {
                m.remove(&id);
            }
        });
    }

    async fn report(&self, t: &Stored, finish: bool) -> Result<RebalanceReport, QueueError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let msg = super::Msg::Cold(Cold::RebalanceReport {
            id: t.id.clone(),
            finish,
            reply: tx,
        });
        // Bounded: the watcher retries a report that failed, so a queue task stuck in a storage call does not
        // hold it for good.
        self.untimed("rebalance report", async {
            self.deliver(&t.queue, msg, Some(self.admin_deadline()))
                .await
                .map_err(|(_, e)| e)?;
            rx.await.map_err(|_| QueueError::QueueShuttingDown)
        })
        .await
    }

    /// The watcher: polls the queue task, persists the placement before destroying old partitions, saves
    /// progress, and marks the task finished.
    async fn watch_rebalance(&self, mut t: Stored) -> Result<(), QueueError> {
        loop {
            if self.inner.shutting_down.load(Ordering::Acquire) {
                return Ok(());
            }
            let report = match self.report(&t, false).await {
                Ok(r) => r,
                Err(QueueError::QueueNotFound(_)) => {
                    return self.fail_rebalance(&mut t, "the queue was deleted", true).await
                }
                Err(e) => {
                    tracing::warn!(task = %t.id, error = %e, "rebalance watcher will retry");
                    self.sleep(RETRY_AFTER).await;
                    continue;
                }
            };
            if !report.installed {
                // The queue task runs without the plan (it loaded before the task was saved): hand it over, unless
                // the task ended meanwhile (its queue was deleted) or the queue is a new one of the same name.
                if self
                    .load_rebalance(&t.id)
                    .await?
                    .is_none_or(|s| s.status != "running")
                {
                    return Ok(());
                }
                let info = self.queue_info(&t.queue).await?;
                if info.created_at.0 > t.created_at {
                    // Nothing is destroyed: the partitions now belong to the new queue.
                    return self.fail_rebalance(&mut t, "the queue was deleted", false).await;
                }
                self.install_plan(&t, info.partitions.len()).await?;
                continue;
            }
            if let Err(e) = self.persist_placement(&t, &report).await {
                tracing::warn!(task = %t.id, error = %e, "rebalance placement not saved yet; will retry");
                self.sleep(RETRY_AFTER).await;
                continue;
            }
            if t.sources.is_empty() {
                // A task saved by an older version: destroy what the queue task reports retired.
                for (store, partition) in &report.retired {
                    if let Err(e) = self.destroy_partition(&t, store, *partition).await {
                        tracing::warn!(task = %t.id, store = %store, partition, error = %e, "old partition not removed");
                    }
                }
            }
            let cleaned = self.destroy_left_behind(&mut t, report.done).await;
            t.moved = report.moved;
            t.remaining = report.remaining;
            t.error = report.error.clone();
            t.updated_at = self.clock().now().0;
            if let Ok(mut m) = self.inner.rebalances.lock() {
                if let Some(p) = m.get_mut(&t.id) {
                    p.moved = t.moved;
                    p.remaining = t.remaining;
                }
            }
            if report.done && cleaned {
                // A cancel that arrived once everything was done changed nothing: the task completed.
                t.status = if report.cancelled {
                    "cancelled"
                } else {
                    "completed"
                }
                .into();
                t.remaining = 0;
                t.error.clear();
                if !self.save_progress(&mut t).await? {
                    return Ok(());
                }
                let _ = self.report(&t, true).await;
                self.delete_journal(&t.id).await;
                tracing::info!(task = %t.id, queue = %t.queue, moved = t.moved, status = %t.status, "rebalance finished");
                return Ok(());
            }
            if !self.save_progress(&mut t).await? {
                return Ok(());
            }
            if t.cancelled && !report.done {
                // A cancel saved since the last look (by a request, or before a restart): the queue task applies
                // it at its next step.
                let info = self.queue_info(&t.queue).await?;
                self.install_plan(&t, info.partitions.len()).await?;
            }
            self.sleep(POLL).await;
        }
    }

    /// Hands the task's plan (with its cancel flag) to the queue task and waits until it took it.
    async fn install_plan(&self, t: &Stored, partitions: usize) -> Result<(), QueueError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let msg = super::Msg::Cold(Cold::RebalanceInstall(Box::new(t.plan(partitions)), tx));
        let install = async {
            match self.deliver(&t.queue, msg, Some(self.admin_deadline())).await {
                Ok(()) => {
                    let _ = rx.await;
                    Ok(())
                }
                // As before: a queue that is gone is the watcher's next look to find.
                Err((_, QueueError::QueueShuttingDown)) => Ok(()),
                Err((_, e)) => Err(e),
            }
        };
        match self.untimed("rebalance install", install).await {
            // A queue task stuck in a storage call: the watcher's next report says whether it took the plan.
            Err(QueueError::Untimed(..)) => Ok(()),
            r => r,
        }
    }

    /// Saves the watcher's copy of the task, keeping a cancel stored since it was loaded (and taking it into the
    /// copy), under the task lock so neither write undoes the other. A task stored as no longer running (finished
    /// by another watcher of it: a resume that raced a start, or a stale read) is left as it is, and the call
    /// returns false: this watcher stops, instead of putting a finished task back to "running".
    async fn save_progress(&self, t: &mut Stored) -> Result<bool, QueueError> {
        let mine = t.clone();
        let mut saved = false;
        if let Some(cur) = TASKS
            .update(self, &t.id, |s: &mut Stored| {
                if s.status != "running" {
                    return;
                }
                let cancelled = s.cancelled;
                *s = mine;
                s.cancelled |= cancelled;
                saved = true;
            })
            .await?
        {
            t.cancelled = cur.cancelled;
        }
        Ok(saved)
    }

    /// Destroys the task's sources that the stored placement no longer names (moved away, or dropped by a
    /// shrink), and records them; at the end of a cancelled task, also the destinations of moves it dropped
    /// (they hold nothing: see `apply_cancel`). Returns false when a destroy failed (it is tried again at the next
    /// poll, and the task does not finish before it succeeded).
    async fn destroy_left_behind(&self, t: &mut Stored, done: bool) -> bool {
        let info = match self.inner.config.queues.get(&t.queue).await {
            Ok(Some(info)) => info,
            _ => return false,
        };
        let named = |p: u32, store: &str| {
            info.partitions
                .get(p as usize)
                .is_some_and(|x| x.storage_name == store)
        };
        let mut ok = true;
        let mut gone = Vec::new();
        for s in &t.sources {
            if t.destroyed.contains(s) || named(s.partition, &s.store) {
                continue;
            }
            match self.destroy_partition(t, &s.store, s.partition).await {
                Ok(()) => gone.push(s.clone()),
                Err(e) => {
                    tracing::warn!(task = %t.id, store = %s.store, partition = s.partition, error = %e, "old partition not removed yet; will retry");
                    ok = false;
                }
            }
        }
        t.destroyed.extend(gone);
        if done && t.cancelled {
            for m in &t.moves {
                if named(m.partition, &m.to_store) {
                    continue;
                }
                if let Err(e) = self.destroy_partition(t, &m.to_store, m.partition).await {
                    tracing::warn!(task = %t.id, store = %m.to_store, partition = m.partition, error = %e, "unused destination not removed yet; will retry");
                    ok = false;
                }
            }
        }
        ok
    }

    /// Destroys partition `partition` of the task's queue in `store`: the partition of the task's incarnation only (a
    /// queue created again under the name since has its own).
    async fn destroy_partition(&self, t: &Stored, store: &str, partition: u32) -> Result<(), QueueError> {
        match self.inner.config.stores.iter().find(|s| s.name == store) {
            Some(s) => Ok(s
                .store
                .destroy_incarnation(&t.queue, Ts(t.incarnation), partition)
                .await?),
            // A store gone from the configuration holds nothing this server can reach.
            None => Ok(()),
        }
    }

    /// Stores the queue task's placement when it differs from the stored one.
    async fn persist_placement(&self, t: &Stored, report: &RebalanceReport) -> Result<(), QueueError> {
        let queue = t.queue.as_str();
        // Not while the queue is being deleted: the delete destroys the partitions of the placement it read.
        let _guard = self.lock_queue(queue).await?;
        let Some(mut info) = self.inner.config.queues.get(queue).await? else {
            return Err(QueueError::QueueNotFound(queue.to_string()));
        };
        if info.created_at.0 > t.created_at {
            // The report came from the deleted queue's task; the queue is a new one of the same name.
            return Err(QueueError::QueueNotFound(queue.to_string()));
        }
        if info.partitions == report.placement || report.placement.is_empty() {
            return Ok(());
        }
        info.partitions = report.placement.clone();
        info.requested_partitions = u32::try_from(info.partitions.len()).unwrap_or(u32::MAX);
        info.updated_at = self.clock().now();
        self.inner.config.queues.update(&info).await?;
        Ok(())
    }

    async fn fail_rebalance(&self, t: &mut Stored, error: &str, destroy: bool) -> Result<(), QueueError> {
        // Destinations of moves hold copies nobody will read (the queue is gone; a queue created again under the
        // same name since owns its partitions, so then nothing is destroyed).
        let gone = destroy && matches!(self.inner.config.queues.get(&t.queue).await, Ok(None));
        for m in t.moves.iter().filter(|_| gone) {
            let _ = self.destroy_partition(t, &m.to_store, m.partition).await;
        }
        t.status = "failed".into();
        t.error = error.into();
        t.updated_at = self.clock().now().0;
        self.delete_journal(&t.id).await;
        tracing::warn!(task = %t.id, queue = %t.queue, error, "rebalance failed");
        self.save_rebalance(t).await
    }

    async fn delete_journal(&self, id: &str) {
        let mut c = Commit {
            silent: true,
            ..Default::default()
        };
        c.delete(key(JOURNAL_TAG, &[id]));
        let _ = self.auth_store().commit(c).await;
    }

    async fn sleep(&self, d: Duration) {
        self.clock().sleep_until(self.clock().now().add(d)).await;
    }
}

fn new_id(now: Ts) -> Result<String, QueueError> {
    let mut raw = [0u8; 4];
    getrandom::fill(&mut raw).map_err(|e| QueueError::StorageFailed(e.to_string()))?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("rb-{:012x}-{hex}", now.0.max(0)))
}
