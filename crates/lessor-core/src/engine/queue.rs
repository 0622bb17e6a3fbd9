//! The task that owns one queue's partitions.
//!
//! The loop: wait for a message or the next deadline; drain the inbox; run due lifecycle work; apply produces,
//! completes and retries as one storage call per partition per kind; register new lease requests; serve waiting
//! leases from the fullest healthy partition, round-robin across waiting consumers; answer expired long-polls;
//! answer cold requests (stats, clear, storage...) one by one. Items that become ready (produce, retry, lease
//! expiry, schedule) are handed to waiting leases in the same pass, so no consumer waits for another request to
//! arrive.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::{EngineConfig, Inner, LeaseResult, PartitionReport, QueueMetrics, QueueStats};
use crate::error::{QueueError, StorageError};
use crate::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use crate::time::Ts;
use crate::types::{ClearRequest, Item, ItemId, NewItem, PartitionCounts, PartitionInfo, QueueInfo};

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;
/// Complete requests of one pass, by partition.
type CompleteGroups = HashMap<u32, Vec<(Vec<ItemId>, Reply<()>)>>;
/// Retry requests of one pass, by partition: (id, retry_at, dead) per item.
type RetryGroups = HashMap<u32, Vec<(Vec<(ItemId, Ts, bool)>, Reply<()>)>>;
/// Produce requests bound for one partition, with the partitions each already failed on.
type ProduceGroup = Vec<(Vec<NewItem>, Reply<()>, Vec<usize>)>;

/// Most messages taken from the inbox per pass.
const MAX_DRAIN: usize = 8192;
/// Most lifecycle actions per partition per pass, so one pass cannot stall the queue.
const LIFECYCLE_LIMIT: usize = 10_000;
/// Most dead items handed to the dead-letter queue per call.
const DEAD_BATCH: usize = 1000;
/// How often counts of partitions on shared stores are re-read.
const SHARED_REFRESH: Duration = Duration::from_millis(500);

pub(crate) enum Msg {
    Produce {
        items: Vec<super::ProduceItem>,
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
        items: Vec<(ItemId, Ts, bool)>,
        reply: Reply<()>,
    },
    DeadLetter {
        items: Vec<NewItem>,
        reply: Reply<()>,
    },
    Cold(Cold),
    Shutdown(oneshot::Sender<()>),
}

pub(crate) enum Cold {
    Stats(Reply<QueueStats>),
    Clear(ClearRequest, Reply<()>),
    Reload(Reply<()>),
    List {
        partition: u32,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        reply: Reply<Vec<Item>>,
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
    UpdateInfo(Box<QueueInfo>, oneshot::Sender<()>),
}

struct Part {
    num: u32,
    store: Arc<dyn PartitionStore>,
    shared: bool,
    handle: Option<Arc<dyn Partition>>,
    counts: PartitionCounts,
    failures: u32,
    retry_at: Ts,
    next_deadline: Option<Ts>,
    refresh_at: Ts,
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
        self.failures = self.failures.saturating_add(1);
        // Back off 500 ms growing by 1.5x up to 5 s, so a dead backend is probed but not hammered.
        let backoff = (500.0 * 1.5f64.powi(self.failures.min(10) as i32 - 1)).min(5000.0);
        self.retry_at = now.add(Duration::from_millis(backoff as u64));
        tracing::warn!(queue, partition = self.num, failures = self.failures, error = %e, "partition failing");
    }

    fn pull_deadline(&mut self, t: Ts) {
        self.next_deadline = Some(self.next_deadline.map_or(t, |d| d.min(t)));
    }
}

struct Waiter {
    client_id: String,
    n: usize,
    deadline: Ts,
    reply: Reply<LeaseResult>,
}

pub(crate) struct QueueTask {
    info: QueueInfo,
    parts: Vec<Part>,
    waiters: VecDeque<Waiter>,
    rx: mpsc::Receiver<Msg>,
    engine: Weak<Inner>,
    config: EngineConfig,
    metrics: Arc<QueueMetrics>,
    dead_retry_at: Ts,
}

impl QueueTask {
    pub(crate) fn new(
        info: QueueInfo,
        rx: mpsc::Receiver<Msg>,
        engine: Weak<Inner>,
        config: EngineConfig,
        metrics: Arc<QueueMetrics>,
    ) -> Self {
        let mut t = QueueTask {
            info: QueueInfo::default(),
            parts: Vec::new(),
            waiters: VecDeque::new(),
            rx,
            engine,
            config,
            metrics,
            dead_retry_at: Ts::ZERO,
        };
        t.set_info(info);
        t
    }

    fn set_info(&mut self, info: QueueInfo) {
        for p in &info.partitions[self.parts.len().min(info.partitions.len())..] {
            let store = self.find_store(p);
            let shared = store.shared();
            self.parts.push(Part {
                num: p.partition,
                store,
                shared,
                handle: None,
                counts: PartitionCounts::default(),
                // Not opened yet: "failed" with a retry due now, so the first pass opens it.
                failures: 1,
                retry_at: Ts::ZERO,
                next_deadline: None,
                refresh_at: Ts::ZERO,
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

    fn policy(&self) -> LifecyclePolicy {
        LifecyclePolicy {
            max_attempts: self.info.max_attempts,
            has_dead_queue: !self.info.dead_queue.is_empty(),
        }
    }

    fn now(&self) -> Ts {
        self.config.clock.now()
    }

    pub(crate) async fn run(mut self) {
        let mut batch: Vec<Msg> = Vec::new();
        loop {
            let wake = self.next_wake();
            let now = self.now();
            if wake > now {
                let sleep = self.config.clock.sleep_until(wake);
                tokio::select! {
                    biased;
                    m = self.rx.recv() => match m {
                        Some(m) => batch.push(m),
                        None => { self.stop().await; return; }
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
            if let Some(done) = self.pass(&mut batch).await {
                self.stop().await;
                let _ = done.send(());
                return;
            }
        }
    }

    /// One pass over a drained batch. Returns the shutdown acknowledgement when asked to stop.
    async fn pass(&mut self, batch: &mut Vec<Msg>) -> Option<oneshot::Sender<()>> {
        let now = self.now();
        self.recover(now).await;
        self.lifecycle(now).await;

        let mut produces = Vec::new();
        let mut dead_letters = Vec::new();
        let mut completes: CompleteGroups = HashMap::new();
        let mut retries: RetryGroups = HashMap::new();
        let mut colds = Vec::new();
        let mut shutdown = None;
        for m in batch.drain(..) {
            match m {
                Msg::Produce { items, reply } => produces.push((items, reply)),
                Msg::DeadLetter { items, reply } => dead_letters.push((items, reply)),
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
                } => completes.entry(partition).or_default().push((ids, reply)),
                Msg::Retry {
                    partition,
                    items,
                    reply,
                } => retries.entry(partition).or_default().push((items, reply)),
                Msg::Cold(c) => colds.push(c),
                Msg::Shutdown(done) => shutdown = Some(done),
            }
        }
        if !produces.is_empty() {
            self.produce(produces, now).await;
        }
        if !dead_letters.is_empty() {
            self.accept_dead_letters(dead_letters, now).await;
        }
        if !completes.is_empty() {
            self.complete(completes, now).await;
        }
        if !retries.is_empty() {
            self.retry(retries, now).await;
        }
        for c in colds {
            self.cold(c, now).await;
        }
        self.serve_leases(now).await;
        self.expire_waiters(now);
        self.publish();
        shutdown
    }

    fn next_wake(&self) -> Ts {
        let mut wake = Ts::NEVER;
        for w in &self.waiters {
            wake = wake.min(w.deadline);
        }
        for p in &self.parts {
            if p.failures > 0 {
                wake = wake.min(p.retry_at);
            } else {
                if let Some(d) = p.next_deadline {
                    wake = wake.min(d);
                }
                if p.shared {
                    wake = wake.min(p.refresh_at);
                }
            }
        }
        wake
    }

    // ---- health ------------------------------------------------------------------------------------------------

    async fn recover(&mut self, now: Ts) {
        let due: Vec<usize> = (0..self.parts.len())
            .filter(|&i| {
                let p = &self.parts[i];
                (p.failures > 0 && p.retry_at <= now) || (p.failures == 0 && p.shared && p.refresh_at <= now)
            })
            .collect();
        self.probe_many(&due, now).await;
    }

    /// Opens (if needed) and re-reads a partition; marks it healthy or failed.
    async fn probe(&mut self, i: usize, now: Ts) {
        self.probe_many(&[i], now).await;
    }

    /// Probes several partitions at once: opening a new partition can take milliseconds (a persistent store
    /// creates and syncs it), and a queue with a hundred partitions must not open them one after another.
    async fn probe_many(&mut self, which: &[usize], now: Ts) {
        if which.is_empty() {
            return;
        }
        let name = self.info.name.clone();
        let probes = which.iter().filter(|&&i| i < self.parts.len()).map(|&i| {
            let p = &self.parts[i];
            let (store, handle, num, name) = (p.store.clone(), p.handle.clone(), p.num, name.clone());
            async move {
                let result = async {
                    let h = match handle {
                        Some(h) => h,
                        None => store.open(&name, num).await?,
                    };
                    let counts = h.counts().await?;
                    let deadline = h.next_deadline().await?;
                    Ok::<_, StorageError>((h, counts, deadline))
                }
                .await;
                (i, result)
            }
        });
        for (i, result) in join_all(probes).await {
            let p = &mut self.parts[i];
            match result {
                Ok((h, counts, deadline)) => {
                    p.handle = Some(h);
                    p.counts = counts;
                    p.next_deadline = deadline;
                    if p.failures > 1 {
                        tracing::info!(queue = %name, partition = p.num, "partition recovered");
                    }
                    p.failures = 0;
                    p.refresh_at = now.add(SHARED_REFRESH);
                }
                Err(e) => p.fail(now, &name, &e),
            }
        }
    }

    // ---- lifecycle ---------------------------------------------------------------------------------------------

    async fn lifecycle(&mut self, now: Ts) {
        let policy = self.policy();
        for i in 0..self.parts.len() {
            let Some(h) = self.parts[i].healthy() else {
                continue;
            };
            let due = matches!(self.parts[i].next_deadline, Some(d) if d <= now);
            if !due {
                continue;
            }
            let name = self.info.name.clone();
            let outcome = match h.lifecycle(now, policy, LIFECYCLE_LIMIT).await {
                Ok(o) => o,
                Err(e) => {
                    self.parts[i].fail(now, &name, &e);
                    continue;
                }
            };
            self.metrics
                .lease_expired
                .fetch_add(outcome.lease_expired, Ordering::Relaxed);
            self.metrics
                .dead_lettered
                .fetch_add(outcome.dead, Ordering::Relaxed);
            if outcome.dead > 0 || outcome.lease_expired > 0 || outcome.enqueued > 0 {
                tracing::debug!(queue = %name, partition = self.parts[i].num, ?outcome, "lifecycle");
            }
            if policy.has_dead_queue && now >= self.dead_retry_at {
                self.transfer_dead(i, &h, now).await;
            } else if !policy.has_dead_queue {
                // Items left dead while a dead-letter queue was configured, which has since been removed.
                if let Ok(items) = h.dead_items(DEAD_BATCH).await {
                    if !items.is_empty() {
                        let ids = items.iter().map(|it| it.id).collect();
                        if let Err(e) = h.remove_dead(ids).await {
                            self.parts[i].fail(now, &name, &e);
                        }
                    }
                }
            }
            match (h.counts().await, h.next_deadline().await) {
                (Ok(c), Ok(d)) => {
                    let p = &mut self.parts[i];
                    p.counts = c;
                    p.next_deadline = d;
                    if outcome.more {
                        p.next_deadline = Some(now);
                    }
                    // Dead items still waiting for a dead-letter queue that failed: come back after the backoff,
                    // not in a tight loop.
                    if let Some(d) = p.next_deadline {
                        if d < self.dead_retry_at && d <= now {
                            p.next_deadline = Some(self.dead_retry_at);
                        }
                    }
                }
                (Err(e), _) | (_, Err(e)) => self.parts[i].fail(now, &name, &e),
            }
        }
    }

    async fn transfer_dead(&mut self, i: usize, h: &Arc<dyn Partition>, now: Ts) {
        let name = self.info.name.clone();
        let num = self.parts[i].num;
        loop {
            let items = match h.dead_items(DEAD_BATCH).await {
                Ok(items) if items.is_empty() => return,
                Ok(items) => items,
                Err(e) => return self.parts[i].fail(now, &name, &e),
            };
            let Some(engine) = self.engine.upgrade() else {
                return;
            };
            let ids: Vec<ItemId> = items.iter().map(|it| it.id).collect();
            let news: Vec<NewItem> = items
                .into_iter()
                .map(|it| NewItem {
                    // The key that makes the move idempotent: the same dead item always carries the same source id.
                    source_id: format!("{name}/{num}/{}", it.id),
                    enqueue_at: Ts::ZERO,
                    expire_deadline: Ts::ZERO,
                    created_at: it.created_at,
                    reference: it.reference,
                    encoding: it.encoding,
                    kind: it.kind,
                    payload: it.payload,
                })
                .collect();
            let full = ids.len() == DEAD_BATCH;
            let dlq = self.info.dead_queue.clone();
            // The dead-letter queue's task never waits on this one (a dead-letter queue cannot have its own), so
            // waiting here cannot deadlock; the timeout bounds how long this queue stalls if it is slow.
            let sent = tokio::time::timeout(
                Duration::from_secs(5),
                super::Engine::dead_letter(&engine, &dlq, news),
            )
            .await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(queue = %name, dead_queue = %dlq, error = %e, "dead-letter move failed; will retry");
                    self.dead_retry_at = now.add(Duration::from_secs(1));
                    return;
                }
                Err(_) => {
                    tracing::warn!(queue = %name, dead_queue = %dlq, "dead-letter move timed out; will retry");
                    self.dead_retry_at = now.add(Duration::from_secs(1));
                    return;
                }
            }
            if let Err(e) = h.remove_dead(ids).await {
                return self.parts[i].fail(now, &name, &e);
            }
            if !full {
                return;
            }
        }
    }

    // ---- produce -----------------------------------------------------------------------------------------------

    /// Picks the healthy partition with the fewest ready items (ties: lowest number), skipping `exclude`.
    fn least_loaded(&self, exclude: &[usize]) -> Option<usize> {
        (0..self.parts.len())
            .filter(|i| {
                self.parts[*i].failures == 0 && self.parts[*i].handle.is_some() && !exclude.contains(i)
            })
            .min_by_key(|&i| (self.parts[i].counts.ready + self.parts[i].counts.scheduled, i))
    }

    async fn produce(&mut self, requests: Vec<(Vec<super::ProduceItem>, Reply<()>)>, now: Ts) {
        let threshold = now.add(self.config.limits.schedule_threshold);
        let expire = self.info.expire_timeout;
        let mut pending: Vec<(Vec<NewItem>, Reply<()>, Vec<usize>)> = requests
            .into_iter()
            .map(|(items, reply)| {
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
                        }
                    })
                    .collect();
                (items, reply, Vec::new())
            })
            .collect();
        // Each round writes every pending request to one partition (one storage call per partition); requests
        // whose partition failed fail over to another healthy partition in the next round.
        while !pending.is_empty() {
            let mut groups: HashMap<usize, ProduceGroup> = HashMap::new();
            for (items, reply, tried) in pending.drain(..) {
                match self.least_loaded(&tried) {
                    Some(i) => {
                        let c = &mut self.parts[i].counts;
                        c.ready += items.len() as u64; // provisional, so the next request goes elsewhere
                        groups.entry(i).or_default().push((items, reply, tried));
                    }
                    None => {
                        let _ = reply.send(Err(QueueError::NoAvailablePartitions));
                    }
                }
            }
            let calls = groups.into_iter().map(|(i, reqs)| {
                let h = self.parts[i].healthy();
                async move {
                    let all: Vec<NewItem> = reqs.iter().flat_map(|r| r.0.iter().cloned()).collect();
                    let res = match h {
                        Some(h) => h.produce(all).await,
                        None => Err(StorageError::unavailable("partition closed")),
                    };
                    (i, reqs, res)
                }
            });
            for (i, reqs, res) in join_all(calls).await {
                let total: u64 = reqs.iter().map(|r| r.0.len() as u64).sum();
                self.parts[i].counts.ready -= total;
                match res {
                    Ok(_) => {
                        let mut ready = 0;
                        let mut scheduled = 0;
                        for (items, reply, _) in reqs {
                            for it in &items {
                                if it.enqueue_at.is_zero() {
                                    ready += 1;
                                } else {
                                    scheduled += 1;
                                    self.parts[i].pull_deadline(it.enqueue_at);
                                }
                                self.parts[i].pull_deadline(it.expire_deadline);
                            }
                            let _ = reply.send(Ok(()));
                        }
                        let p = &mut self.parts[i];
                        p.counts.ready += ready;
                        p.counts.scheduled += scheduled;
                        self.metrics
                            .produced
                            .fetch_add(ready + scheduled, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let name = self.info.name.clone();
                        self.parts[i].fail(now, &name, &e);
                        for (items, reply, mut tried) in reqs {
                            tried.push(i);
                            if tried.len() >= self.parts.len() {
                                let _ = reply.send(Err(QueueError::from_storage(&e)));
                            } else {
                                pending.push((items, reply, tried));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Dead items from another queue: always written to partition 0, so a repeated move finds the earlier copy by
    /// its source id and is not doubled.
    async fn accept_dead_letters(&mut self, requests: Vec<(Vec<NewItem>, Reply<()>)>, now: Ts) {
        let Some(h) = self.parts.first().and_then(|p| p.healthy()) else {
            for (_, reply) in requests {
                let _ = reply.send(Err(QueueError::PartitionUnavailable(0)));
            }
            return;
        };
        let expire = now.add(self.info.expire_timeout);
        let all: Vec<NewItem> = requests
            .iter()
            .flat_map(|r| r.0.iter().cloned())
            .map(|mut it| {
                it.expire_deadline = expire;
                it
            })
            .collect();
        let n = all.len() as u64;
        match h.produce(all).await {
            Ok(_) => {
                self.parts[0].pull_deadline(expire);
                // Duplicates were skipped by the store; re-read the exact count rather than guess.
                match h.counts().await {
                    Ok(c) => self.parts[0].counts = c,
                    Err(_) => self.parts[0].counts.ready += n,
                }
                self.metrics.produced.fetch_add(n, Ordering::Relaxed);
                for (_, reply) in requests {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                let name = self.info.name.clone();
                self.parts[0].fail(now, &name, &e);
                for (_, reply) in requests {
                    let _ = reply.send(Err(QueueError::from_storage(&e)));
                }
            }
        }
    }

    // ---- complete and retry ------------------------------------------------------------------------------------

    /// The partition a complete or retry names, or the error to answer with.
    fn target(&self, partition: u32) -> Result<Arc<dyn Partition>, QueueError> {
        let Some(p) = self.parts.get(partition as usize) else {
            return Err(QueueError::Invalid(format!(
                "partition is invalid; '{partition}' is not a valid partition"
            )));
        };
        p.healthy().ok_or(QueueError::PartitionUnavailable(partition))
    }

    async fn complete(&mut self, groups: CompleteGroups, now: Ts) {
        let mut calls = Vec::new();
        for (partition, reqs) in groups {
            match self.target(partition) {
                Ok(h) => calls.push(async move {
                    let ids: Vec<Vec<ItemId>> = reqs.iter().map(|r| r.0.clone()).collect();
                    let res = h.complete(ids).await;
                    (partition, reqs, res)
                }),
                Err(e) => {
                    for (_, reply) in reqs {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        for (partition, reqs, res) in join_all(calls).await {
            match res {
                Ok(results) => {
                    for ((ids, reply), r) in reqs.into_iter().zip(results) {
                        match r {
                            Ok(()) => {
                                let p = &mut self.parts[partition as usize];
                                p.counts.leased = p.counts.leased.saturating_sub(ids.len() as u64);
                                self.metrics
                                    .completed
                                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(QueueError::CannotComplete(e)));
                            }
                        }
                    }
                }
                Err(e) => {
                    let name = self.info.name.clone();
                    self.parts[partition as usize].fail(now, &name, &e);
                    for (_, reply) in reqs {
                        let _ = reply.send(Err(QueueError::from_storage(&e)));
                    }
                }
            }
        }
    }

    async fn retry(&mut self, groups: RetryGroups, now: Ts) {
        let threshold = now.add(self.config.limits.schedule_threshold);
        let policy = self.policy();
        let mut calls = Vec::new();
        for (partition, reqs) in groups {
            match self.target(partition) {
                Ok(h) => {
                    let ops: Vec<Vec<RetryOp>> = reqs
                        .iter()
                        .map(|(items, _)| {
                            items
                                .iter()
                                .map(|&(id, at, dead)| RetryOp {
                                    id,
                                    action: if dead {
                                        RetryAction::Dead
                                    } else if at < threshold {
                                        RetryAction::Requeue
                                    } else {
                                        RetryAction::Schedule(at)
                                    },
                                })
                                .collect()
                        })
                        .collect();
                    calls.push(async move {
                        let res = h.retry(ops.clone(), policy).await;
                        (partition, reqs, ops, res)
                    })
                }
                Err(e) => {
                    for (_, reply) in reqs {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        for (partition, reqs, ops, res) in join_all(calls).await {
            let p = &mut self.parts[partition as usize];
            match res {
                Ok(results) => {
                    for (((_, reply), ops), r) in reqs.into_iter().zip(ops).zip(results) {
                        match r {
                            Ok(o) => {
                                p.counts.leased = p.counts.leased.saturating_sub(ops.len() as u64);
                                p.counts.ready += o.requeued;
                                p.counts.scheduled += o.scheduled;
                                for op in &ops {
                                    if let RetryAction::Schedule(at) = op.action {
                                        p.pull_deadline(at);
                                    }
                                }
                                if o.dead > 0 && policy.has_dead_queue {
                                    p.pull_deadline(now); // transfer the dead items on the next pass
                                }
                                self.metrics
                                    .retried
                                    .fetch_add(o.requeued + o.scheduled, Ordering::Relaxed);
                                self.metrics.dead_lettered.fetch_add(o.dead, Ordering::Relaxed);
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(QueueError::CannotRetry(e)));
                            }
                        }
                    }
                }
                Err(e) => {
                    p.fail(now, &self.info.name, &e);
                    for (_, reply) in reqs {
                        let _ = reply.send(Err(QueueError::from_storage(&e)));
                    }
                }
            }
        }
    }

    // ---- leases ------------------------------------------------------------------------------------------------

    /// Serves waiting lease requests. Each round picks the healthy partition with the most ready items and makes
    /// one storage call for everything the waiters still want, then deals the items out one at a time in turn
    /// (round-robin), so concurrent consumers share fairly. A waiter that got anything is answered.
    async fn serve_leases(&mut self, now: Ts) {
        self.waiters.retain(|w| !w.reply.is_closed());
        let mut tried: Vec<usize> = Vec::new();
        while !self.waiters.is_empty() {
            let pick = (0..self.parts.len())
                .filter(|i| {
                    !tried.contains(i) && self.parts[*i].failures == 0 && self.parts[*i].handle.is_some()
                })
                .filter(|i| self.parts[*i].counts.ready > 0 || self.parts[*i].shared)
                .max_by_key(|&i| (self.parts[i].counts.ready, std::cmp::Reverse(i)));
            let Some(i) = pick else { return };
            tried.push(i);
            let Some(h) = self.parts[i].healthy() else {
                continue;
            };
            let wanted: usize = self.waiters.iter().map(|w| w.n).sum();
            let want = wanted.min(self.config.limits.max_items_per_storage_call);
            let deadline = now.add(self.info.lease_timeout);
            let items = match h.lease(want, deadline).await {
                Ok(items) => items,
                Err(e) => {
                    let name = self.info.name.clone();
                    self.parts[i].fail(now, &name, &e);
                    continue;
                }
            };
            let p = &mut self.parts[i];
            let got = items.len() as u64;
            if got < want as u64 {
                // The partition had fewer ready items than we believed (shared store, or drift): trust storage.
                p.counts.ready = 0;
            } else {
                p.counts.ready = p.counts.ready.saturating_sub(got);
            }
            p.counts.leased += got;
            if got > 0 {
                p.pull_deadline(deadline);
            }
            self.metrics.leased.fetch_add(got, Ordering::Relaxed);
            let num = p.num;
            self.deal(num, items);
        }
    }

    fn deal(&mut self, partition: u32, items: Vec<Item>) {
        if items.is_empty() {
            return;
        }
        let n = self.waiters.len();
        let mut hands: Vec<Vec<Item>> = (0..n).map(|_| Vec::new()).collect();
        let mut it = items.into_iter();
        'deal: loop {
            let mut gave = false;
            for (k, w) in self.waiters.iter().enumerate() {
                if hands[k].len() < w.n {
                    match it.next() {
                        Some(item) => {
                            hands[k].push(item);
                            gave = true;
                        }
                        None => break 'deal,
                    }
                }
            }
            if !gave {
                break;
            }
        }
        let waiters = std::mem::take(&mut self.waiters);
        for (w, hand) in waiters.into_iter().zip(hands) {
            if hand.is_empty() {
                self.waiters.push_back(w);
            } else {
                let _ = w.reply.send(Ok(LeaseResult {
                    partition,
                    items: hand,
                }));
            }
        }
        // Items nobody could take stay leased until their deadline, which the storage call already set; that only
        // happens when a waiter vanished between the count and the call.
    }

    fn expire_waiters(&mut self, now: Ts) {
        let mut keep = VecDeque::with_capacity(self.waiters.len());
        for w in self.waiters.drain(..) {
            if w.deadline <= now {
                let _ = w.reply.send(Err(QueueError::LeaseTimeout));
            } else {
                keep.push_back(w);
            }
        }
        self.waiters = keep;
    }

    // ---- cold requests -----------------------------------------------------------------------------------------

    fn part_handle(&self, partition: u32) -> Result<Arc<dyn Partition>, QueueError> {
        self.target(partition)
    }

    async fn cold(&mut self, c: Cold, now: Ts) {
        match c {
            Cold::Stats(reply) => {
                let mut out = QueueStats {
                    lease_waiting: self.waiters.len() as u64,
                    in_flight: self.rx.len() as u64,
                    ..Default::default()
                };
                for p in &self.parts {
                    let mut r = PartitionReport {
                        partition: p.num,
                        failures: p.failures,
                        ..Default::default()
                    };
                    if let Some(h) = p.healthy() {
                        match h.stats(now).await {
                            Ok(s) => {
                                r.total = s.counts.ready + s.counts.leased;
                                r.total_leased = s.counts.leased;
                                r.scheduled = s.counts.scheduled;
                                r.average_age = s.average_age;
                                r.average_leased_age = s.average_leased_age;
                            }
                            Err(e) => {
                                tracing::warn!(queue = %self.info.name, partition = p.num, error = %e, "stats failed")
                            }
                        }
                    }
                    out.partitions.push(r);
                }
                let _ = reply.send(Ok(out));
            }
            Cold::Clear(req, reply) => {
                let mut result = Ok(());
                for i in 0..self.parts.len() {
                    let Some(h) = self.parts[i].healthy() else {
                        result = Err(QueueError::PartitionUnavailable(self.parts[i].num));
                        continue;
                    };
                    if let Err(e) = h.clear(req).await {
                        result = Err(QueueError::from_storage(&e));
                        continue;
                    }
                    if let Ok(c) = h.counts().await {
                        self.parts[i].counts = c;
                    }
                }
                let _ = reply.send(result);
            }
            Cold::Reload(reply) => {
                let all: Vec<usize> = (0..self.parts.len()).collect();
                self.probe_many(&all, now).await;
                let _ = reply.send(Ok(()));
            }
            Cold::List {
                partition,
                pivot,
                limit,
                scheduled,
                reply,
            } => {
                let r = match self.part_handle(partition) {
                    Ok(h) => h
                        .list(pivot, limit, scheduled)
                        .await
                        .map_err(|e| QueueError::from_storage(&e)),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Cold::Import {
                partition,
                mut items,
                reply,
            } => {
                // Querator reads an omitted expire_deadline as 1970 and expires the item at once; here an omitted
                // deadline means the queue's expire_timeout from now, and an omitted created_at means now.
                for it in &mut items {
                    if it.expire_deadline.is_zero() {
                        it.expire_deadline = now.add(self.info.expire_timeout);
                    }
                    if it.created_at.is_zero() {
                        it.created_at = now;
                    }
                }
                let r = match self.part_handle(partition) {
                    Ok(h) => h.import(items).await.map_err(|e| QueueError::from_storage(&e)),
                    Err(e) => Err(e),
                };
                // Unlike Querator, counts and deadlines follow an import at once: no reload needed.
                self.probe(partition as usize, now).await;
                let _ = reply.send(r);
            }
            Cold::Delete {
                partition,
                ids,
                reply,
            } => {
                let r = match self.part_handle(partition) {
                    Ok(h) => h.delete(ids).await.map_err(|e| QueueError::from_storage(&e)),
                    Err(e) => Err(e),
                };
                if r.is_ok() {
                    self.probe(partition as usize, now).await;
                }
                let _ = reply.send(r);
            }
            Cold::UpdateInfo(info, done) => {
                self.set_info(*info);
                // A lowered max_attempts or a new dead-letter queue applies to items already dead or leased.
                for p in &mut self.parts {
                    if p.failures == 0 {
                        p.pull_deadline(now);
                    }
                }
                let _ = done.send(());
            }
        }
    }

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
    }

    /// Answers everything still waiting with "queue is shutting down" and closes the partitions.
    async fn stop(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(QueueError::QueueShuttingDown));
        }
        self.rx.close();
        while let Ok(m) = self.rx.try_recv() {
            let e = Err(QueueError::QueueShuttingDown);
            match m {
                Msg::Produce { reply, .. } => drop(reply.send(e)),
                Msg::Lease { reply, .. } => drop(reply.send(Err(QueueError::QueueShuttingDown))),
                Msg::Complete { reply, .. } | Msg::Retry { reply, .. } | Msg::DeadLetter { reply, .. } => {
                    drop(reply.send(e))
                }
                Msg::Cold(c) => match c {
                    Cold::Stats(r) => drop(r.send(Err(QueueError::QueueShuttingDown))),
                    Cold::Clear(_, r) | Cold::Reload(r) | Cold::Delete { reply: r, .. } => drop(r.send(e)),
                    Cold::List { reply, .. } | Cold::Import { reply, .. } => {
                        drop(reply.send(Err(QueueError::QueueShuttingDown)))
                    }
                    Cold::UpdateInfo(_, done) => drop(done.send(())),
                },
                Msg::Shutdown(done) => drop(done.send(())),
            }
        }
        for p in &mut self.parts {
            if let Some(h) = p.handle.take() {
                h.close().await;
            }
        }
    }
}

/// Stands in for a store the configuration no longer defines, so the partition reports why it fails.
#[derive(Debug)]
struct MissingStore(String);

#[async_trait::async_trait]
impl PartitionStore for MissingStore {
    fn driver(&self) -> &'static str {
        "missing"
    }
    async fn open(&self, _queue: &str, _partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        Err(StorageError::new(
            crate::error::StorageErrorKind::Config,
            format!("partition storage '{}' is not in the configuration", self.0),
        ))
    }
    async fn destroy(&self, _queue: &str, _partition: u32) -> Result<(), StorageError> {
        Ok(())
    }
    async fn close(&self) {}
}
