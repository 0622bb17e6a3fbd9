//! Complete and retry: the requests of a pass grouped by partition, one storage call per partition per kind; a
//! request naming any id that cannot be applied changes nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::future::join_all;

use super::{CompleteGroups, ExtendGroups, QueueTask, RetryGroups};
use crate::error::QueueError;
use crate::storage::{Partition, RetryAction, RetryOp};
use crate::time::Ts;
use crate::types::ItemId;
use crate::validate;

impl QueueTask {
    /// The partition a complete or retry names, or the error to answer with.
    pub(super) fn target(&self, partition: u32) -> Result<Arc<dyn Partition>, QueueError> {
        let Some(p) = self.parts.get(partition as usize) else {
            return Err(validate::no_such_partition(partition));
        };
        p.healthy().ok_or(QueueError::PartitionUnavailable(partition))
    }

    /// Applies the completes of one pass, one storage call per partition.
    pub(super) async fn complete(&mut self, groups: CompleteGroups, now: Ts) {
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
                                self.holders.release(partition, &ids);
                                let p = &mut self.parts[partition as usize];
                                p.counts.leased = p.counts.leased.saturating_sub(ids.len() as u64);
                                self.metrics
                                    .completed
                                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(QueueError::cannot_complete(e)));
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

    /// Applies the retries of one pass, one storage call per partition: each item is requeued now, scheduled, or
    /// dead-lettered.
    pub(super) async fn retry(&mut self, groups: RetryGroups, now: Ts) {
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
                                .map(|it| RetryOp {
                                    id: it.id,
                                    action: if it.dead {
                                        RetryAction::Dead
                                    } else if it.retry_at.is_zero() && policy.backoff.is_on() {
                                        // No time given: the queue's backoff policy decides.
                                        RetryAction::Backoff(now)
                                    } else if it.retry_at < threshold {
                                        RetryAction::Requeue
                                    } else {
                                        RetryAction::Schedule(it.retry_at)
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
                                let ids: Vec<ItemId> = ops.iter().map(|op| op.id).collect();
                                self.holders.release(partition, &ids);
                                p.counts.leased = p.counts.leased.saturating_sub(ops.len() as u64);
                                p.counts.ready += o.requeued;
                                if o.requeued > 0 {
                                    p.top_priority = crate::types::MAX_PRIORITY;
                                }
                                p.counts.scheduled += o.scheduled;
                                for op in &ops {
                                    match op.action {
                                        RetryAction::Schedule(at) => p.pull_deadline(at),
                                        // The delay depends on each item's attempts, which only storage knows:
                                        // look again after the shortest possible one.
                                        RetryAction::Backoff(now) => p.pull_deadline(
                                            now.add(
                                                policy
                                                    .backoff
                                                    .base
                                                    .mul_f64(1.0 - policy.backoff.jitter.clamp(0.0, 1.0)),
                                            ),
                                        ),
                                        _ => {}
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
                                let _ = reply.send(Err(QueueError::cannot_retry(e)));
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

    /// Applies the lease extensions of one pass, one storage call per partition: each request's ids get the
    /// deadline now + its lease timeout, all of them or none.
    pub(super) async fn extend(&mut self, groups: ExtendGroups, now: Ts) {
        let max = self.info.effective_max_lease();
        let mut calls = Vec::new();
        for (partition, reqs) in groups {
            let h = match self.target(partition) {
                Ok(h) => h,
                Err(e) => {
                    for (_, _, reply) in reqs {
                        let _ = reply.send(Err(e.clone()));
                    }
                    continue;
                }
            };
            let mut valid = Vec::with_capacity(reqs.len());
            for (ids, timeout, reply) in reqs {
                let timeout = timeout.unwrap_or(self.info.lease_timeout);
                if timeout > max {
                    let _ = reply.send(Err(validate::invalid(
                        "lease_timeout",
                        format!(
                            "cannot be greater than the queue's max_lease_timeout '{}'",
                            validate::fmt_secs(max)
                        ),
                    )));
                    continue;
                }
                valid.push((ids, now.add(timeout), reply));
            }
            if valid.is_empty() {
                continue;
            }
            calls.push(async move {
                let reqs: Vec<(Vec<ItemId>, Ts)> = valid.iter().map(|r| (r.0.clone(), r.1)).collect();
                let res = h.extend(reqs).await;
                (partition, valid, res)
            });
        }
        for (partition, reqs, res) in join_all(calls).await {
            match res {
                Ok(results) => {
                    for ((ids, deadline, reply), r) in reqs.into_iter().zip(results) {
                        match r {
                            Ok(()) => {
                                // The new deadline may be earlier than the lease's (a shorter lease_timeout):
                                // the lifecycle must look then, not at the old deadline.
                                self.parts[partition as usize].pull_deadline(deadline);
                                self.holders.extend(partition, &ids, deadline);
                                self.metrics
                                    .extended
                                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(QueueError::cannot_extend(e)));
                            }
                        }
                    }
                }
                Err(e) => {
                    let name = self.info.name.clone();
                    self.parts[partition as usize].fail(now, &name, &e);
                    for (_, _, reply) in reqs {
                        let _ = reply.send(Err(QueueError::from_storage(&e)));
                    }
                }
            }
        }
    }
}
