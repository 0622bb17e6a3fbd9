//! Dead-letter redrive: a server-side task that moves items from a dead-letter queue back to the queues they came
//! from (or to one named queue), optionally filtered and rate-limited, with an id, progress and cancellation.

use crate::time::Ts;

/// What a redrive moves, and where.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedriveRequest {
    /// The dead-letter queue to move items out of (it must be some queue's `dead_queue`).
    pub dead_queue: String,
    /// Where items go; empty: back to the queue each item came from.
    pub target_queue: String,
    /// Filter: only items that came from this queue (empty: any).
    pub source_queue: String,
    /// Filter: only items of this kind (empty: any).
    pub kind: String,
    /// Most items moved per second (0: as fast as storage allows).
    pub rate_per_sec: u32,
    /// Most items moved in all (0: every matching item present when the task runs).
    pub max_items: u64,
}

/// Where a redrive task stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedriveStatus {
    /// Moving items.
    #[default]
    Running,
    /// Every matching item was moved (or `max_items` reached).
    Completed,
    /// Stopped by a cancel request; items moved so far stay moved.
    Cancelled,
    /// Stopped by an error that retrying does not fix (a target queue deleted...); see the task's `error`.
    Failed,
}

impl RedriveStatus {
    /// The status as a word, on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            RedriveStatus::Running => "running",
            RedriveStatus::Completed => "completed",
            RedriveStatus::Cancelled => "cancelled",
            RedriveStatus::Failed => "failed",
        }
    }
}

/// A redrive task as reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RedriveTask {
    /// The task id.
    pub id: String,
    /// What it moves.
    pub request: RedriveRequest,
    /// Where it stands.
    pub status: RedriveStatus,
    /// Items moved so far.
    pub moved: u64,
    /// Items looked at and left in the dead-letter queue (filtered out, or leased by a consumer).
    pub skipped: u64,
    /// Items of the dead-letter queue when the task last looked (ready, leased and scheduled).
    pub remaining: u64,
    /// Why the task failed; empty otherwise.
    pub error: String,
    /// When it was started.
    pub created_at: Ts,
    /// When its progress was last saved.
    pub updated_at: Ts,
}

// ---- the runner ----------------------------------------------------------------------------------------------

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::queue::{Cold, Msg, REBALANCE_SOURCE_PREFIX};
use super::task_records::TaskTable;
use super::Engine;
use crate::auth::store::Commit;
use crate::error::QueueError;
use crate::types::{ItemId, NewItem};
use crate::validate;

/// Table tag of redrive tasks in the metadata store (the ordered store that also holds users and keys, so every
/// server sharing the queue definitions sees the same tasks).
const TAG: u8 = b'T';
/// Where the tasks are stored.
const TASKS: TaskTable = TaskTable {
    tag: TAG,
    what: "redrive",
};
/// Items moved per batch at most.
const BATCH: usize = 100;
/// Tasks kept; starting one more forgets the oldest finished ones.
const KEEP: usize = 1000;
/// A running task whose progress is older than this is taken over by a server that starts (its runner died).
const STALE: Duration = Duration::from_secs(10);
/// Pause after a failed batch before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Prefix of the dedup keys redrive writes: users cannot send control characters, so these never meet theirs.
const DEDUP_PREFIX: &str = "\u{1}redrive:";

/// A task as stored.
#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    id: String,
    dead_queue: String,
    target_queue: String,
    source_queue: String,
    kind: String,
    rate_per_sec: u32,
    max_items: u64,
    status: String,
    moved: u64,
    skipped: u64,
    remaining: u64,
    error: String,
    created_at: i64,
    updated_at: i64,
    /// The server running it.
    owner: String,
}

impl Stored {
    fn task(&self) -> RedriveTask {
        RedriveTask {
            id: self.id.clone(),
            request: RedriveRequest {
                dead_queue: self.dead_queue.clone(),
                target_queue: self.target_queue.clone(),
                source_queue: self.source_queue.clone(),
                kind: self.kind.clone(),
                rate_per_sec: self.rate_per_sec,
                max_items: self.max_items,
            },
            status: match self.status.as_str() {
                "completed" => RedriveStatus::Completed,
                "cancelled" => RedriveStatus::Cancelled,
                "failed" => RedriveStatus::Failed,
                _ => RedriveStatus::Running,
            },
            moved: self.moved,
            skipped: self.skipped,
            remaining: self.remaining,
            error: self.error.clone(),
            created_at: Ts(self.created_at),
            updated_at: Ts(self.updated_at),
        }
    }
}

/// The queue a dead item came from: dead-letter moves set its source id to `queue/partition/id`.
pub(crate) fn source_queue_of(source_id: &str) -> Option<&str> {
    let mut parts = source_id.rsplitn(3, '/');
    let id = parts.next()?;
    let partition = parts.next()?;
    let queue = parts.next()?;
    // A rebalance's source id (`\u{1}rb:<task>/<partition>/<id>`) names no queue: queue names have no control
    // characters.
    (id.parse::<ItemId>().is_ok()
        && partition.parse::<u32>().is_ok()
        && !queue.is_empty()
        && !queue.starts_with('\u{1}'))
    .then_some(queue)
}

/// The source id a redrive gives an item of partition `partition` of `dead_queue` (and its dedup key): the item's
/// own, or for an item that has none, its place in the dead-letter queue. A rebalance moving such an item gives it a
/// source id naming its place before the move, `\u{1}rb:<task>/<partition>/<id>`: that place is what the redrive
/// names, so an item the redrive wrote to its target just before a move took it (with a new id) is recognised by
/// the target when the redrive meets it again, instead of being delivered twice.
fn redrive_source(dead_queue: &str, partition: u32, it: &crate::types::Item) -> String {
    if it.source_id.is_empty() {
        return format!("{dead_queue}/{partition}/{}", it.id);
    }
    if let Some(rest) = it.source_id.strip_prefix(REBALANCE_SOURCE_PREFIX) {
        let mut parts = rest.rsplitn(3, '/');
        if let (Some(id), Some(p), Some(_task)) = (parts.next(), parts.next(), parts.next()) {
            if id.parse::<ItemId>().is_ok() && p.parse::<u32>().is_ok() {
                return format!("{dead_queue}/{p}/{id}");
            }
        }
    }
    it.source_id.clone()
}

impl Engine {
    async fn load_task(&self, id: &str) -> Result<Option<Stored>, QueueError> {
        TASKS.load(self, id).await
    }

    async fn save_task(&self, t: &Stored) -> Result<(), QueueError> {
        TASKS.save(self, &t.id, t).await
    }

    async fn all_tasks(&self) -> Result<Vec<Stored>, QueueError> {
        TASKS.all(self).await
    }

    /// Starts a redrive task (see [`RedriveRequest`]); it runs in the background and survives restarts.
    pub async fn redrive_start(&self, request: RedriveRequest) -> Result<RedriveTask, QueueError> {
        self.check_running()?;
        validate::queue_name("dead_queue", &request.dead_queue)?;
        self.queue_info(&request.dead_queue).await?;
        if !self.is_dead_letter_queue(&request.dead_queue).await? {
            return Err(validate::invalid(
                "dead_queue",
                format!(
                    "'{}' is not the dead_queue of any queue; only a dead-letter queue can be redriven",
                    request.dead_queue
                ),
            ));
        }
        if !request.target_queue.is_empty() {
            validate::queue_name("target_queue", &request.target_queue)?;
            if request.target_queue == request.dead_queue {
                return Err(validate::invalid(
                    "target_queue",
                    "cannot be the dead-letter queue itself",
                ));
            }
            if self
                .inner
                .config
                .queues
                .get(&request.target_queue)
                .await?
                .is_none()
            {
                return Err(validate::invalid(
                    "target_queue",
                    format!("queue '{}' does not exist", request.target_queue),
                ));
            }
        }
        if !request.source_queue.is_empty() {
            validate::queue_name("source_queue", &request.source_queue)?;
        }
        // The check that no task runs on this queue and the save of this one happen under the task lock, so two
        // starts at once cannot both pass it.
        let _starting = self.inner.task_lock.lock().await;
        let mut all = self.all_tasks().await?;
        if let Some(t) = all
            .iter()
            .find(|t| t.dead_queue == request.dead_queue && t.status == "running")
        {
            return Err(validate::invalid(
                "dead_queue",
                format!("redrive task '{}' is already running on '{}'", t.id, t.dead_queue),
            ));
        }
        // Forget the oldest finished tasks beyond the number kept.
        all.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        for old in all.iter().skip(KEEP - 1).filter(|t| t.status != "running") {
            let mut c = Commit {
                silent: true,
                ..Default::default()
            };
            c.delete(TASKS.key(&old.id));
            let _ = self.auth_store().commit(c).await;
        }
        let now = self.clock().now();
        let mut raw = [0u8; 4];
        getrandom::fill(&mut raw).map_err(|e| QueueError::StorageFailed(e.to_string()))?;
        let stored = Stored {
            id: format!("rd-{:012x}-{}", now.0.max(0), hex(&raw)),
            dead_queue: request.dead_queue,
            target_queue: request.target_queue,
            source_queue: request.source_queue,
            kind: request.kind,
            rate_per_sec: request.rate_per_sec,
            max_items: request.max_items,
            status: "running".into(),
            moved: 0,
            skipped: 0,
            remaining: 0,
            error: String::new(),
            created_at: now.0,
            updated_at: now.0,
            owner: self.inner.instance.clone(),
        };
        self.save_task(&stored).await?;
        let task = stored.task();
        self.spawn_redrive(stored);
        Ok(task)
    }

    /// Whether some queue names `name` as its dead-letter queue.
    async fn is_dead_letter_queue(&self, name: &str) -> Result<bool, QueueError> {
        Ok(self.dead_letter_user(name).await?.is_some())
    }

    /// Every queue that names `name` as its dead-letter queue, in name order (a scan of the definitions: for deletes,
    /// not for the per-item paths).
    pub(crate) async fn dead_letter_users(&self, name: &str) -> Result<Vec<String>, QueueError> {
        let mut from = String::new();
        let mut out = Vec::new();
        loop {
            let page = self.inner.config.queues.list(&from, 1000).await?;
            out.extend(
                page.iter()
                    .filter(|q| q.dead_queue == name)
                    .map(|q| q.name.clone()),
            );
            match page.last() {
                Some(l) if page.len() == 1000 => from = format!("{}\0", l.name),
                _ => return Ok(out),
            }
        }
    }

    /// The first queue (in name order) that names `name` as its dead-letter queue, if any.
    pub(crate) async fn dead_letter_user(&self, name: &str) -> Result<Option<String>, QueueError> {
        let mut from = String::new();
        loop {
            let page = self.inner.config.queues.list(&from, 1000).await?;
            if let Some(q) = page.iter().find(|q| q.dead_queue == name) {
                return Ok(Some(q.name.clone()));
            }
            match page.last() {
                Some(l) if page.len() == 1000 => from = format!("{}\0", l.name),
                _ => return Ok(None),
            }
        }
    }

    /// One redrive task by id.
    pub async fn redrive_get(&self, id: &str) -> Result<RedriveTask, QueueError> {
        self.load_task(id)
            .await?
            .map(|t| t.task())
            .ok_or_else(|| no_such_task(id))
    }

    /// Redrive tasks, newest first; only those of `dead_queue` when it is not empty.
    pub async fn redrive_list(&self, dead_queue: &str) -> Result<Vec<RedriveTask>, QueueError> {
        let mut all = self.all_tasks().await?;
        all.retain(|t| dead_queue.is_empty() || t.dead_queue == dead_queue);
        all.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(all.iter().map(Stored::task).collect())
    }

    /// Cancels a running redrive task; items moved so far stay moved. Returns the task as it stands. The runner
    /// (on this server or another sharing the store) stops before its next batch.
    pub async fn redrive_cancel(&self, id: &str) -> Result<RedriveTask, QueueError> {
        let now = self.clock().now().0;
        let t = TASKS
            .update(self, id, |t: &mut Stored| {
                if t.status == "running" {
                    t.status = "cancelled".into();
                    t.updated_at = now;
                }
            })
            .await?
            .ok_or_else(|| no_such_task(id))?;
        Ok(t.task())
    }

    /// Resumes the running tasks whose runner is gone (a restart, or a server that died); the server calls it
    /// periodically. A task that made progress recently is left to whoever runs it: its runner saves progress at
    /// least every second or so, so a task silent for [`STALE`] has no live runner.
    pub async fn resume_redrives(&self) -> Result<usize, QueueError> {
        self.check_running()?;
        let now = self.clock().now();
        let mut n = 0;
        for mut t in self.all_tasks().await? {
            if t.status != "running" || self.running_here(&t.id) {
                continue;
            }
            let fresh = now.0.saturating_sub(t.updated_at) < STALE.as_micros() as i64;
            if fresh && !t.owner.is_empty() {
                continue;
            }
            t.owner = self.inner.instance.clone();
            t.updated_at = now.0;
            self.save_task(&t).await?;
            tracing::info!(task = %t.id, dead_queue = %t.dead_queue, moved = t.moved, "resuming redrive");
            self.spawn_redrive(t);
            n += 1;
        }
        Ok(n)
    }

    fn running_here(&self, id: &str) -> bool {
        self.inner
            .redrives
            .lock()
            .map(|s| s.contains(id))
            .unwrap_or(false)
    }

    fn spawn_redrive(&self, t: Stored) {
        let engine = Engine {
            inner: self.inner.clone(),
        };
        if let Ok(mut s) = self.inner.redrives.lock() {
            s.insert(t.id.clone());
        }
        tokio::spawn(async move {
            let id = t.id.clone();
            if let Err(e) = engine.run_redrive(t).await {
                tracing::warn!(task = %id, error = %e, "redrive stopped");
            }
            if let Ok(mut s) = engine.inner.redrives.lock() {
                s.remove(&id);
            }
        });
    }

    /// The runner: batches of ready items from each partition of the dead-letter queue, moved to their targets
    /// (idempotent by source id and dedup record), then deleted from the dead-letter queue. Progress is saved after
    /// every batch; a killed server resumes the task and repeats at most the batch in flight, which the targets
    /// recognise, so nothing is lost or doubled.
    async fn run_redrive(&self, t: Stored) -> Result<(), QueueError> {
        let dead_queue = t.dead_queue.clone();
        let mut held = HashMap::new();
        let r = self.redrive_rounds(t, &mut held).await;
        // Whatever way the runner stopped (done, failed, cancelled, taken over, shutting down), the claims it still
        // holds go: a claim left behind made the dead-letter queue answer its consumers' completes and retries of
        // those items as if the ids were gone, for as long as the queue stayed loaded, and kept it from unloading.
        for p in held.into_keys() {
            self.release_claim(&dead_queue, p).await;
        }
        r
    }

    /// Gives up the claim of a redrive on `partition` of `dead_queue` (best effort: a queue that is gone or
    /// unloaded holds no claims).
    async fn release_claim(&self, dead_queue: &str, partition: u32) {
        let release = self.call(dead_queue, |reply| {
            Msg::Cold(Cold::Claim {
                partition,
                ids: Vec::new(),
                reply,
            })
        });
        let _ = self.untimed("redrive release", release).await;
    }

    /// The rounds of [`Engine::run_redrive`]. `held` tracks the partitions where this runner holds a claim, each
    /// with whether some of its claimed items may have reached their target without leaving the dead-letter queue
    /// (a failed delete): those stay claimed until a later round moves them, so that a consumer of the dead-letter
    /// queue cannot complete an item that also lives in its target.
    async fn redrive_rounds(&self, mut t: Stored, held: &mut HashMap<u32, bool>) -> Result<(), QueueError> {
        let started = self.clock().now();
        let moved_at_start = t.moved;
        let mut pivots: HashMap<u32, Option<ItemId>> = HashMap::new();
        loop {
            if self
                .inner
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire)
            {
                return Ok(());
            }
            // Cancelled (here or on another server), or taken over by another server: stop.
            match self.load_task(&t.id).await {
                Ok(Some(cur)) if cur.status != "running" || cur.owner != t.owner => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(task = %t.id, error = %e, "redrive cannot read its task; will retry");
                    self.clock()
                        .sleep_until(self.clock().now().add(RETRY_AFTER))
                        .await;
                    continue;
                }
            }
            let info = match self.queue_info(&t.dead_queue).await {
                Ok(i) => i,
                Err(QueueError::QueueNotFound(_)) => {
                    return self.finish(&mut t, "failed", "dead_queue was deleted").await
                }
                Err(e) => {
                    tracing::warn!(task = %t.id, error = %e, "redrive will retry");
                    self.clock()
                        .sleep_until(self.clock().now().add(RETRY_AFTER))
                        .await;
                    continue;
                }
            };
            let mut want = BATCH;
            if t.rate_per_sec > 0 {
                want = want.min(t.rate_per_sec as usize);
            }
            if t.max_items > 0 {
                want = want.min(t.max_items.saturating_sub(t.moved) as usize);
                if want == 0 {
                    return self.finish(&mut t, "completed", "").await;
                }
            }
            let mut progressed = false;
            let mut exhausted = true;
            // Per round: whether each origin queue names this dead-letter queue (see below).
            let mut owners: HashMap<String, bool> = HashMap::new();
            for p in 0..info.partitions.len() as u32 {
                // What is left of max_items, partition by partition: a round takes up to `want` from each.
                let want = if t.max_items > 0 {
                    want.min(t.max_items.saturating_sub(t.moved) as usize)
                } else {
                    want
                };
                if want == 0 {
                    break;
                }
                let pivot = pivots.get(&p).copied().flatten();
                // The page is bounded in bytes too (limits.max_lease_bytes), so a batch of 5 MB items stays small.
                let items = match self
                    .storage_list_page(&t.dead_queue, p, pivot, want * 4, false)
                    .await
                {
                    Ok((items, capped)) => {
                        if capped {
                            exhausted = false;
                        }
                        items
                    }
                    Err(e) => {
                        tracing::warn!(task = %t.id, partition = p, error = %e, "redrive list failed; will retry");
                        exhausted = false;
                        continue;
                    }
                };
                if items.len() == want * 4 {
                    exhausted = false;
                }
                // An item goes back to the queue its source id names only when that queue names this dead-letter
                // queue as its own: a source id is data (`storage/items.import` and restores take it from the
                // client), and a forged one would otherwise write into any queue, in any namespace, with no
                // check of the caller's rights there. A queue that does not exist fails the move as before.
                // A definition that cannot be read now (a store error) decides nothing: the partition waits for the
                // next round. Taking it as the owner, as before, let a forged source id through whenever the queue
                // store failed a read.
                let mut unsure = false;
                if t.target_queue.is_empty() {
                    for it in &items {
                        let Some(origin) = source_queue_of(&it.source_id) else {
                            continue;
                        };
                        if !owners.contains_key(origin) {
                            let ok = match self.queue_info(origin).await {
                                Ok(info) => info.dead_queue == t.dead_queue,
                                // The move fails the task, as for a target that does not exist.
                                Err(QueueError::QueueNotFound(_)) => true,
                                Err(e) => {
                                    tracing::warn!(task = %t.id, queue = origin, error = %e, "redrive cannot read a source queue; will retry");
                                    unsure = true;
                                    break;
                                }
                            };
                            owners.insert(origin.to_string(), ok);
                        }
                    }
                }
                if unsure {
                    exhausted = false;
                    continue;
                }
                let mut batch: Vec<(String, ItemId, NewItem)> = Vec::new();
                let mut next_pivot = pivot;
                for it in items {
                    if batch.len() == want {
                        exhausted = false;
                        break;
                    }
                    next_pivot = Some(ItemId(it.id.0.saturating_add(1)));
                    let origin = source_queue_of(&it.source_id).map(str::to_string);
                    let target = if t.target_queue.is_empty() {
                        origin.clone().filter(|o| owners.get(o).copied().unwrap_or(false))
                    } else {
                        Some(t.target_queue.clone())
                    };
                    let matches = !it.is_leased
                        && (t.source_queue.is_empty() || origin.as_deref() == Some(&t.source_queue))
                        && (t.kind.is_empty() || it.kind == t.kind);
                    let Some(target) = target.filter(|_| matches) else {
                        t.skipped += 1;
                        continue;
                    };
                    let source_id = redrive_source(&t.dead_queue, p, &it);
                    batch.push((
                        target,
                        it.id,
                        NewItem {
                            dedup_id: format!("{DEDUP_PREFIX}{source_id}"),
                            source_id,
                            reference: it.reference,
                            encoding: it.encoding,
                            kind: it.kind,
                            payload: it.payload,
                            priority: it.priority,
                            ..Default::default()
                        },
                    ));
                }
                if batch.is_empty() {
                    pivots.insert(p, next_pivot);
                    self.drop_settled_claim(&t.dead_queue, p, held).await;
                    continue;
                }
                // Claim the batch in the dead-letter queue before its copies are written: what a consumer leased
                // since the list stays (counted as skipped), and a consumer that leases a claimed item before it is
                // deleted cannot complete or retry it (it is delivered again from its target). Without the claim a
                // consumer could complete an item between the list and the delete, and the item was redriven too.
                let ids: Vec<ItemId> = batch.iter().map(|b| b.1).collect();
                let claim = self.call(&t.dead_queue, |reply| {
                    Msg::Cold(Cold::Claim {
                        partition: p,
                        ids,
                        reply,
                    })
                });
                // Bounded, as every call to a queue task: a dead-letter queue stuck in a storage call fails the
                // round, which is retried.
                let claimed = match self.untimed("redrive claim", claim).await {
                    Ok(c) => {
                        // The claim replaced this partition's last one, items in doubt included: those still
                        // ready are in this batch again and move with it (their target knows them by their dedup
                        // key). One a consumer leased since loses its claim here (a failed delete, then a lease of
                        // a claimed item, before this round): it may then be delivered from both queues, which an
                        // at-least-once queue allows.
                        held.insert(p, false);
                        c.into_iter().collect::<HashSet<ItemId>>()
                    }
                    Err(e) => {
                        tracing::warn!(task = %t.id, partition = p, error = %e, "redrive claim failed; will retry");
                        exhausted = false;
                        continue;
                    }
                };
                let before = batch.len();
                batch.retain(|b| claimed.contains(&b.1));
                t.skipped += (before - batch.len()) as u64;
                if batch.is_empty() {
                    pivots.insert(p, next_pivot);
                    held.remove(&p);
                    continue;
                }
                match self.move_batch(&t.dead_queue, p, batch).await {
                    Ok(n) => {
                        t.moved += n;
                        progressed = true;
                        // Every claimed item left the dead-letter queue, and its claim with it.
                        held.remove(&p);
                        // Moved items are gone and skipped ones stay skipped: continue after the last one looked at.
                        pivots.insert(p, next_pivot);
                    }
                    Err(MoveError::Fatal(n, msg)) => {
                        t.moved += n;
                        // What is left of the batch was not written anywhere: consumers may have it.
                        held.remove(&p);
                        self.release_claim(&t.dead_queue, p).await;
                        return self.finish(&mut t, "failed", &msg).await;
                    }
                    Err(MoveError::Retry(n, e, in_doubt)) => {
                        // The targets that took their items before the failure are done (their items left the
                        // dead-letter queue); the rest is listed again next round. Items a target took but the
                        // dead-letter queue did not delete stay claimed; otherwise no claimed item was written
                        // anywhere, and consumers may have them back until the next round claims them again.
                        t.moved += n;
                        progressed |= n > 0;
                        if in_doubt {
                            held.insert(p, true);
                        } else {
                            held.remove(&p);
                            self.release_claim(&t.dead_queue, p).await;
                        }
                        tracing::warn!(task = %t.id, partition = p, error = %e, "redrive batch failed; will retry");
                        exhausted = false;
                    }
                }
                if t.max_items > 0 && t.moved >= t.max_items {
                    break;
                }
            }
            t.remaining = self.remaining(&t.dead_queue).await;
            t.updated_at = self.clock().now().0;
            if !self.save_redrive(&t).await? {
                return Ok(());
            }
            if exhausted && !progressed {
                return self.finish(&mut t, "completed", "").await;
            }
            if !progressed {
                self.clock()
                    .sleep_until(self.clock().now().add(RETRY_AFTER))
                    .await;
                continue;
            }
            if t.rate_per_sec > 0 {
                // Keep the average at or below the rate since this runner started.
                let done = (t.moved - moved_at_start) as f64;
                let due = started.add(Duration::from_secs_f64(done / f64::from(t.rate_per_sec)));
                if due > self.clock().now() {
                    self.clock().sleep_until(due).await;
                }
            }
        }
    }

    /// Moves one batch, target by target: a target's items reach it first, then leave the dead-letter queue, before
    /// the next target's. A batch whose second target failed used to leave the first target's items in the
    /// dead-letter queue too, so a later redrive (once the target's dedup window had passed) delivered them again
    /// after consumers had completed them. Errors carry how many items were moved before them.
    async fn move_batch(
        &self,
        dead_queue: &str,
        partition: u32,
        batch: Vec<(String, ItemId, NewItem)>,
    ) -> Result<u64, MoveError> {
        let mut by_target: HashMap<String, (Vec<NewItem>, Vec<ItemId>)> = HashMap::new();
        for (target, id, item) in batch {
            let e = by_target.entry(target).or_default();
            e.0.push(item);
            e.1.push(id);
        }
        let mut moved = 0;
        for (target, (items, ids)) in by_target {
            let r = self
                .untimed(
                    "redrive move",
                    self.call(&target, |reply| Msg::Moved { items, reply }),
                )
                .await;
            match r {
                Ok(()) => {}
                Err(QueueError::QueueNotFound(q)) => {
                    return Err(MoveError::Fatal(
                        moved,
                        format!("target queue '{q}' does not exist"),
                    ))
                }
                Err(e) => return Err(MoveError::Retry(moved, e, false)),
            }
            let n = ids.len() as u64;
            self.storage_delete(dead_queue, partition, ids)
                .await
                .map_err(|e| MoveError::Retry(moved, e, true))?;
            moved += n;
        }
        Ok(moved)
    }

    /// A round found nothing to move in `partition`: the runner's claim there goes, unless it covers items that
    /// may be in their target too (see [`Engine::redrive_rounds`]).
    async fn drop_settled_claim(&self, dead_queue: &str, partition: u32, held: &mut HashMap<u32, bool>) {
        if held.get(&partition) == Some(&false) {
            held.remove(&partition);
            self.release_claim(dead_queue, partition).await;
        }
    }

    /// Items left in the dead-letter queue (ready, leased and scheduled), for progress.
    async fn remaining(&self, dead_queue: &str) -> u64 {
        match self.stats(dead_queue).await {
            Ok(s) => s.partitions.iter().map(|p| p.total + p.scheduled).sum(),
            Err(_) => 0,
        }
    }

    async fn finish(&self, t: &mut Stored, status: &str, error: &str) -> Result<(), QueueError> {
        let mut done = t.clone();
        done.status = status.into();
        done.error = error.into();
        done.remaining = self.remaining(&t.dead_queue).await;
        done.updated_at = self.clock().now().0;
        if self.save_redrive(&done).await? {
            tracing::info!(task = %t.id, status, moved = t.moved, skipped = t.skipped, "redrive finished");
            *t = done;
        }
        Ok(())
    }

    /// Stores the runner's copy of its task, unless the stored task stopped running or changed owner since the
    /// runner read it (a cancel, another server taking it over); returns whether it was stored. Read, check and
    /// write happen under the engine's task lock, which a cancel takes too: a check outside it let a runner's save
    /// land just after a cancel and undo it, and the "cancelled" task went on moving items.
    async fn save_redrive(&self, t: &Stored) -> Result<bool, QueueError> {
        let mut stored = false;
        TASKS
            .update(self, &t.id, |cur: &mut Stored| {
                if cur.status == "running" && cur.owner == t.owner {
                    *cur = t.clone();
                    stored = true;
                }
            })
            .await?;
        Ok(stored)
    }
}

enum MoveError {
    /// Stops the task; the items moved before it.
    Fatal(u64, String),
    /// Tried again; the items moved before it, and whether the failed step was a delete from the dead-letter
    /// queue after the target took the items (they may be in both places until a later round).
    Retry(u64, QueueError, bool),
}

fn no_such_task(id: &str) -> QueueError {
    validate::invalid("task_id", format!("no redrive task '{id}'"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_queue_is_read_from_dead_letter_source_ids() {
        assert_eq!(source_queue_of("orders/3/0000000000000a1f"), Some("orders"));
        assert_eq!(source_queue_of("a.b-c/0/0000000000000001"), Some("a.b-c"));
        assert_eq!(source_queue_of("orders/x/0000000000000a1f"), None);
        assert_eq!(source_queue_of("orders/3/zz"), None);
        assert_eq!(source_queue_of("imported-key"), None);
        assert_eq!(source_queue_of("\u{1}rb:rb-1-2/3/0000000000000a1f"), None);
    }
}
