//! The lifecycle pass: when a partition's earliest deadline (lease end, schedule, expiry) comes due, storage
//! applies it, and dead items go to the dead-letter queue or are dropped.

use std::sync::atomic::Ordering;

use super::{QueueTask, DEAD_BATCH};
use crate::time::Ts;

/// Most lifecycle actions per partition per pass, so one pass cannot stall the queue.
const LIFECYCLE_LIMIT: usize = 10_000;

impl QueueTask {
    /// Runs storage's lifecycle on every healthy partition whose earliest deadline has come, then re-reads its
    /// next deadline and its counts (or follows them with what the pass reports moved, see `counts_delta`).
    pub(super) async fn lifecycle(&mut self, now: Ts) {
        let policy = self.policy();
        for i in 0..self.parts.len() {
            let Some(h) = self.parts[i].healthy() else {
                continue;
            };
            let due = matches!(self.parts[i].next_deadline, Some(d) if d <= now);
            if !due || self.lifecycle_held(i) {
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
                if let Ok((items, _)) = h
                    .dead_items_within(DEAD_BATCH, self.config.limits.max_lease_bytes)
                    .await
                {
                    if !items.is_empty() {
                        let ids = items.iter().map(|it| it.id).collect();
                        if let Err(e) = h.remove_dead(ids).await {
                            self.parts[i].fail(now, &name, &e);
                        }
                    }
                }
            }
            // A shared store (PostgreSQL) tells how its statements changed the counts: counting its rows instead
            // costs time that grows with the partition's depth, and a pass comes due at every lease end, schedule
            // and expiry. The counts then follow what this server did, exactly (each due action is taken by one
            // server only, under the rows' locks); what other servers do (their produces, leases, lifecycle) shows
            // at the partition's periodic refresh, which counts at most one `shared_refresh` (or twenty times the
            // last count's time) later, or in an explicit `queue.stats`. Stores that count in O(1) are counted.
            let counts = match outcome.counts_delta {
                Some(delta) => Ok(delta.apply(self.parts[i].counts)),
                None => h.counts().await,
            };
            match (counts, h.next_deadline().await) {
                (Ok(c), Ok(d)) => {
                    let p = &mut self.parts[i];
                    p.counts = c;
                    p.top_priority = crate::types::MAX_PRIORITY;
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
}
