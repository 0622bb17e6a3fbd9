//! Cold requests, answered one by one after the batched work of a pass: stats, clear, reload, the storage API
//! (list, import, delete), backup and restore, and rebalance hand-overs. (Definition updates come beside the inbox:
//! see [`super::NextInfo`].)

use std::collections::HashSet;

use super::{Cold, QueueTask};
use crate::engine::{PartitionReport, QueueStats};
use crate::error::QueueError;
use crate::time::Ts;
use crate::types::ItemId;

impl QueueTask {
    /// Answers one cold request.
    pub(super) async fn cold(&mut self, c: Cold, now: Ts) {
        let c = match self.refuse_cold_while_restoring(c) {
            Some(c) => c,
            None => return,
        };
        match c {
            Cold::Stats(reply) => {
                let mut out = QueueStats {
                    lease_waiting: self.waiters.len() as u64,
                    in_flight: self.rx.len() as u64,
                    ..Default::default()
                };
                let mut tiers = crate::types::TierStats::default();
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
                                r.oldest_ready_age = s.oldest_ready_age;
                                r.tiers = s.tiers;
                                tiers.add(&s.tiers);
                            }
                            Err(e) => {
                                tracing::warn!(queue = %self.info.name, partition = p.num, error = %e, "stats failed")
                            }
                        }
                    }
                    out.partitions.push(r);
                }
                // Read anyway: `/metrics` gets the fresh figures for free.
                self.metrics.set_tiers(&tiers);
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
                // Items a move already carried to the partition's new store are the queue's items too.
                if let Some(d) = self.rebalance_dest() {
                    if let Err(e) = d.clear(req).await {
                        result = Err(QueueError::from_storage(&e));
                    }
                }
                let _ = reply.send(result);
            }
            Cold::Reload(reply) => {
                self.refresh_definition(now, true).await;
                if self.gone {
                    let _ = reply.send(Err(QueueError::QueueNotFound(self.info.name.clone())));
                    return;
                }
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
                // Bounded in bytes as a lease is: a page of 65,536 items of 5 MB would otherwise be 327 GB.
                let max_bytes = self.config.limits.max_lease_bytes;
                let r = match self.target(partition) {
                    Ok(h) => h
                        .list_within(pivot, limit, scheduled, max_bytes)
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
                if self.is_draining(partition) {
                    // A rebalance drains this partition: nothing may land in it (see `drain`).
                    let _ = reply.send(Err(QueueError::PartitionUnavailable(partition)));
                    return;
                }
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
                let r = match self.target(partition) {
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
                let r = match self.target(partition) {
                    Ok(h) => h
                        .delete(ids.clone())
                        .await
                        .map_err(|e| QueueError::from_storage(&e)),
                    Err(e) => Err(e),
                };
                if r.is_ok() {
                    if let Some(claimed) = self.redriving.get_mut(&partition) {
                        for id in &ids {
                            claimed.remove(id);
                        }
                    }
                    self.probe(partition as usize, now).await;
                }
                let _ = reply.send(r);
            }
            Cold::Claim {
                partition,
                ids,
                reply,
            } => {
                let r = self.claim(partition, ids).await;
                let _ = reply.send(r);
            }
            Cold::Browse { request, reply } => {
                let r = self.browse(request).await;
                let _ = reply.send(r);
            }
            Cold::Snapshot { partition, reply } => {
                if self.is_draining(partition) {
                    // Its items are split between two places until the rebalance is done: no single
                    // point-in-time read exists.
                    let _ = reply.send(Err(QueueError::Invalid(format!(
                        "partition is invalid; partition {partition} of '{}' is being drained by a rebalance, \
                         back it up once the rebalance is done",
                        self.info.name
                    ))));
                    return;
                }
                let r = match self.target(partition) {
                    Ok(h) => h.snapshot().await.map_err(|e| QueueError::from_storage(&e)),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Cold::RestoreImport {
                partition,
                offset,
                items,
                reply,
            } => {
                let r = self.restore_import(partition, offset, items, now).await;
                let _ = reply.send(r);
            }
            Cold::RebalanceInstall(plan, done) => {
                self.install_rebalance(*plan);
                let _ = done.send(());
            }
            Cold::RebalanceReport { id, finish, reply } => {
                let _ = reply.send(self.rebalance_report(&id, finish));
            }
        }
    }

    /// Claims for a redrive the ids of `partition` that are still ready (see [`Cold::Claim`]).
    async fn claim(&mut self, partition: u32, ids: Vec<ItemId>) -> Result<Vec<ItemId>, QueueError> {
        self.redriving.remove(&partition);
        let (Some(&lo), Some(&hi)) = (ids.iter().min(), ids.iter().max()) else {
            return Ok(Vec::new());
        };
        let h = self.target(partition)?;
        let wanted: HashSet<ItemId> = ids.into_iter().collect();
        let mut ready = HashSet::new();
        let mut pivot = Some(lo);
        let max_bytes = self.config.limits.max_lease_bytes;
        'pages: loop {
            // Only states are needed, but a page carries payloads: bounded in bytes as a lease is.
            let (page, capped) = h
                .list_within(pivot, PAGE, false, max_bytes)
                .await
                .map_err(|e| QueueError::from_storage(&e))?;
            let full = page.len() == PAGE || capped;
            for it in page {
                if it.id > hi {
                    break 'pages;
                }
                pivot = Some(ItemId(it.id.0.saturating_add(1)));
                if !it.is_leased && wanted.contains(&it.id) {
                    ready.insert(it.id);
                }
            }
            if !full {
                break;
            }
        }
        let claimed: Vec<ItemId> = ready.iter().copied().collect();
        if !ready.is_empty() {
            self.redriving.insert(partition, ready);
        }
        Ok(claimed)
    }

    /// The first of `ids` a redrive claimed in `partition`, if any.
    pub(super) fn redriven(&self, partition: u32, mut ids: impl Iterator<Item = ItemId>) -> Option<ItemId> {
        let claimed = self.redriving.get(&partition)?;
        ids.find(|id| claimed.contains(id))
    }
}

/// Items read per page when a claim checks its ids.
const PAGE: usize = 500;
