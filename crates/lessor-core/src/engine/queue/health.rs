//! Partition health: opening partitions, probing failed ones on their backoff, re-reading partitions on shared
//! stores (another server may change them), and the stand-in for a store the configuration lost.

use std::sync::Arc;

use futures::stream::{self, StreamExt};

use super::QueueTask;
use crate::error::{StorageError, StorageErrorKind};
use crate::storage::{Partition, PartitionStore};
use crate::time::Ts;

/// Partitions probed at once. Enough to hide a store's latency; bounded so a queue with 65,536 partitions does not
/// queue 65,536 futures on one store's locks (a wake storm that took 11 s to open them all).
const PROBE_CONCURRENCY: usize = 64;
/// A shared partition's refresh waits at least this many times as long as the last refresh took.
const REFRESH_COST_FACTOR: u32 = 20;

impl QueueTask {
    /// Probes the failed partitions whose backoff is over and the shared ones due a refresh.
    pub(super) async fn recover(&mut self, now: Ts) {
        self.refresh_definition(now, false).await;
        let due: Vec<usize> = (0..self.parts.len())
            .filter(|&i| {
                let p = &self.parts[i];
                (p.failures > 0 && p.retry_at <= now) || (p.failures == 0 && p.shared && p.refresh_at <= now)
            })
            .collect();
        self.probe_many(&due, now).await;
    }

    /// Re-reads the queue's definition when its partitions live on a shared store, at most once per shared refresh
    /// interval unless `force`: another server sharing the store may have changed it (a pause, new partitions, the
    /// dead-letter queue, the dedup window...) or deleted it, and this task would otherwise serve its first copy
    /// until the process restarts (a paused queue still leased here; items in partitions added elsewhere never
    /// served here). A definition that is gone, or was created anew under the same name, stops the task (`gone`).
    /// A failed read keeps the definition held and tries again next time.
    pub(super) async fn refresh_definition(&mut self, now: Ts, force: bool) {
        if self.gone || !self.parts.iter().any(|p| p.shared) || (!force && now < self.definition_at) {
            return;
        }
        self.definition_at = now.add(self.config.limits.shared_refresh);
        match self.config.queues.get(&self.info.name).await {
            Ok(Some(mut info)) if info.created_at == self.info.created_at => {
                // Growth is followed (new partitions are opened and served). Any other change of placement is a
                // rebalance: this task's own runs ahead of the stored placement (see `set_info`), and one run by
                // another server is not followed here (docs/operations.md), so the task keeps its placement.
                let grown = info.partitions.len() >= self.info.partitions.len()
                    && info
                        .partitions
                        .iter()
                        .zip(&self.info.partitions)
                        .all(|(a, b)| a.partition == b.partition && a.storage_name == b.storage_name);
                if self.rebalance.is_some() || !grown {
                    info.partitions = self.info.partitions.clone();
                    info.requested_partitions = self.info.requested_partitions;
                }
                // The whole definition, not `updated_at` alone: two servers' clocks can stamp two changes alike.
                if info != self.info {
                    tracing::debug!(queue = %self.info.name, "definition changed by another server");
                    self.apply_info(info, now);
                }
            }
            Ok(_) => {
                tracing::info!(queue = %self.info.name, "queue deleted by another server; unloading it");
                self.gone = true;
            }
            Err(e) => {
                tracing::warn!(queue = %self.info.name, error = %e, "cannot re-read the queue's definition");
            }
        }
    }

    /// Takes a new definition (from this engine, or re-read from a shared store).
    pub(super) fn apply_info(&mut self, info: crate::types::QueueInfo, now: Ts) {
        self.set_info(info);
        // A lowered max_attempts or a new dead-letter queue applies to items already dead or leased.
        for p in &mut self.parts {
            if p.failures == 0 {
                p.pull_deadline(now);
            }
        }
    }

    /// Opens (if needed) and re-reads a partition; marks it healthy or failed.
    pub(super) async fn probe(&mut self, i: usize, now: Ts) {
        self.probe_many(&[i], now).await;
    }

    /// Probes several partitions at once (at most [`PROBE_CONCURRENCY`]): opening a partition can take
    /// milliseconds (a database round trip), and a queue with a hundred partitions must not open them one after
    /// another.
    pub(super) async fn probe_many(&mut self, which: &[usize], now: Ts) {
        if which.is_empty() {
            return;
        }
        let name = self.info.name.clone();
        // The incarnation this task serves: an open never reaches partitions of a queue created again under the name.
        let incarnation = self.info.created_at;
        let probes: Vec<_> = which
            .iter()
            .filter(|&&i| i < self.parts.len())
            .map(|&i| {
                let p = &self.parts[i];
                let (store, handle, num, name) = (p.store.clone(), p.handle.clone(), p.num, name.clone());
                async move {
                    let result = async {
                        // A partition opened for the first time hands its dedup records to the queue-wide index.
                        let (h, records) = match handle {
                            Some(h) => (h, Vec::new()),
                            None => {
                                let h = store.open_incarnation(&name, incarnation, num).await?;
                                let records = h.dedup_records(now).await?;
                                (h, records)
                            }
                        };
                        let counts = h.counts().await?;
                        let deadline = h.next_deadline().await?;
                        Ok::<_, StorageError>((h, counts, deadline, records))
                    }
                    .await;
                    (i, result)
                }
            })
            .collect();
        let started = self.config.clock.now();
        let results: Vec<_> = stream::iter(probes)
            .buffer_unordered(PROBE_CONCURRENCY)
            .collect()
            .await;
        // Re-reading a partition costs the store time that grows with its depth (PostgreSQL counts the rows of
        // each state), and the queue waits for it: the next refresh comes after at least REFRESH_COST_FACTOR
        // times what this one took, so refreshes take at most 1/REFRESH_COST_FACTOR of the queue's time and of
        // a database connection whatever the depth. Notifications, not refreshes, wake consumers.
        let took = self.config.clock.now().since(started);
        let refresh = self
            .config
            .limits
            .shared_refresh
            .max(took.saturating_mul(REFRESH_COST_FACTOR));
        for (i, result) in results {
            match result {
                Ok((h, counts, deadline, records)) => {
                    for r in records {
                        let k = super::dedup::KeyHash::of(&r.dedup_id);
                        self.dedup.insert(k, r.until, now);
                    }
                    let p = &mut self.parts[i];
                    p.handle = Some(h);
                    p.counts = counts;
                    p.top_priority = crate::types::MAX_PRIORITY;
                    p.next_deadline = deadline;
                    if p.failures > 1 {
                        tracing::info!(queue = %name, partition = p.num, "partition recovered");
                    }
                    p.failures = 0;
                    p.refresh_at = now.add(refresh);
                }
                Err(e) => self.parts[i].fail(now, &name, &e),
            }
        }
    }
}

/// Stands in for a store the configuration no longer defines, so the partition reports why it fails.
#[derive(Debug)]
pub(super) struct MissingStore(pub(super) String);

#[async_trait::async_trait]
impl PartitionStore for MissingStore {
    fn driver(&self) -> &'static str {
        "missing"
    }
    async fn open(&self, _queue: &str, _partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        Err(StorageError::new(
            StorageErrorKind::Config,
            format!("partition storage '{}' is not in the configuration", self.0),
        ))
    }
    async fn destroy(&self, _queue: &str, _partition: u32) -> Result<(), StorageError> {
        Ok(())
    }
    async fn close(&self) {}
}
