//! Dead-lettering: moving this queue's dead items to its dead-letter queue, and storing items moved here.
//!
//! The move goes through a [`DeadLetterSink`] the engine hands each task, so the task never reaches back into the
//! engine itself; the sink is idempotent by source id, so a move repeated after a failure is not doubled.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::Duration;

use super::{QueueTask, Reply, DEAD_BATCH};
use crate::error::QueueError;
use crate::storage::Partition;
use crate::time::{BoxFuture, Ts};
use crate::types::{ItemId, NewItem};

/// Where a queue task sends its dead items: the dead-letter queue named in its definition.
///
/// The engine gives each task one, so the task knows how to hand items on without knowing the engine. Stores are
/// idempotent by [`NewItem::source_id`], so sending the same items again after a failure does not double them.
pub(crate) trait DeadLetterSink: Send + Sync + 'static {
    /// Stores `items` in the queue named `queue`; resolves once that queue's storage holds them.
    ///
    /// Boxed with an explicit `Send` bound: the receiving queue may have to be loaded (a task spawned) first, a
    /// cycle through the task type the compiler cannot prove `Send` on its own.
    fn send(&self, queue: &str, items: Vec<NewItem>) -> BoxFuture<'static, Result<(), QueueError>>;
}

/// The shortest time a redriven item's key is remembered by its target (see `accept_moved`): a redrive killed
/// between writing a batch to its targets and deleting it from the dead-letter queue, and resumed within this
/// time, moves none of it twice. Longer outages may deliver that one batch (at most 100 items) again.
pub(crate) const REDRIVE_DEDUP_WINDOW: Duration = Duration::from_secs(3600);

/// The prefix of the dedup key a dead-letter queue gives each item moved to it (followed by its source id).
const DEAD_DEDUP_PREFIX: &str = "\u{1}dead-letter:";

/// How long one move may stall this queue when the dead-letter queue is slow.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait before trying a failed move again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

impl QueueTask {
    /// Moves partition `i`'s dead items to the dead-letter queue in batches, removing each batch only once the
    /// dead-letter queue holds it; a failed move backs off and is retried on a later pass.
    pub(super) async fn transfer_dead(&mut self, i: usize, h: &Arc<dyn Partition>, now: Ts) {
        let name = self.info.name.clone();
        let num = self.parts[i].num;
        loop {
            // A batch is bounded in bytes as a lease is: a thousand 5 MB items would be 5 GB read, then written.
            let (items, capped) = match h
                .dead_items_within(DEAD_BATCH, self.config.limits.max_lease_bytes)
                .await
            {
                Ok((items, _)) if items.is_empty() => return,
                Ok(r) => r,
                Err(e) => return self.parts[i].fail(now, &name, &e),
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
                    priority: it.priority,
                    dedup_id: String::new(),
                    dedup_until: Ts::ZERO,
                })
                .collect();
            let full = ids.len() == DEAD_BATCH || capped;
            let dlq = self.info.dead_queue.clone();
            // The dead-letter queue's task never waits on this one (a dead-letter queue cannot have its own), so
            // waiting here cannot deadlock; the timeout bounds how long this queue stalls if it is slow.
            let sent = tokio::time::timeout(DEAD_LETTER_TIMEOUT, self.dead_letters.send(&dlq, news)).await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(queue = %name, dead_queue = %dlq, error = %e, "dead-letter move failed; will retry");
                    self.dead_retry_at = now.add(DEAD_LETTER_RETRY);
                    return;
                }
                Err(_) => {
                    tracing::warn!(queue = %name, dead_queue = %dlq, "dead-letter move timed out; will retry");
                    self.dead_retry_at = now.add(DEAD_LETTER_RETRY);
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

    /// Dead items from another queue: always written to partition 0, so a repeated move finds the earlier copy by
    /// its source id and is not doubled.
    pub(super) async fn accept_dead_letters(&mut self, requests: Vec<(Vec<NewItem>, Reply<()>)>, now: Ts) {
        // Partition 0 being drained by a rebalance takes nothing new: the sender keeps the items and tries again
        // (writing them elsewhere would break the idempotence by source id, which looks in partition 0 only).
        let Some(h) = self
            .parts
            .first()
            .filter(|p| !p.draining)
            .and_then(|p| p.healthy())
        else {
            for (_, reply) in requests {
                let _ = reply.send(Err(QueueError::PartitionUnavailable(0)));
            }
            return;
        };
        let expire = now.add(self.info.expire_timeout);
        // A move repeated after a failed removal from its source is recognised by the copy's source id while the
        // copy exists, and by a dedup record of that id once a consumer completed it: without the record, every
        // retry of a removal that kept failing (the source's disk full) delivered the item again. The record lives
        // as long as a redrive's (see REDRIVE_DEDUP_WINDOW).
        let until = now.add(self.info.effective_dedup_window().max(REDRIVE_DEDUP_WINDOW));
        let mut keys = Vec::new();
        let mut all: Vec<NewItem> = Vec::new();
        for mut it in requests.iter().flat_map(|r| r.0.iter().cloned()) {
            it.expire_deadline = expire;
            if !it.source_id.is_empty() {
                let key = format!("{DEAD_DEDUP_PREFIX}{}", it.source_id);
                let h = super::dedup::KeyHash::of(&key);
                if self.dedup.contains(h, now) {
                    continue;
                }
                it.dedup_id = key;
                it.dedup_until = until;
                keys.push(h);
            }
            all.push(it);
        }
        if all.is_empty() {
            for (_, reply) in requests {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        let n = all.len() as u64;
        let shared = self.parts[0].shared;
        match store_counting(&h, all, shared).await {
            Ok(stored) => {
                for k in keys {
                    self.dedup.insert(k, until, now);
                }
                self.parts[0].pull_deadline(expire);
                self.parts[0].counts = recount(&h, self.parts[0].counts, stored, n).await;
                self.parts[0].top_priority = crate::types::MAX_PRIORITY;
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

    /// Items moved here by a redrive, all or nothing: each is written to the partition its source id hashes to
    /// (stable while the partition count is), with its dedup record; a request fails whole when any of its
    /// partitions fails, and the redrive tries it again.
    pub(super) async fn accept_moved(&mut self, items: Vec<NewItem>, reply: Reply<()>, now: Ts) {
        let n = self.parts.len().max(1) as u64;
        let expire = now.add(self.info.expire_timeout);
        // A move repeated after a kill (target written, dead-letter queue not yet emptied) is recognised by its key
        // for as long as its record lives: at least REDRIVE_DEDUP_WINDOW, whatever the queue's own window, so a
        // server down for longer than a short window does not deliver the batch twice.
        let until = now.add(self.info.effective_dedup_window().max(REDRIVE_DEDUP_WINDOW));
        let mut groups: std::collections::BTreeMap<usize, (Vec<NewItem>, Vec<super::dedup::KeyHash>)> =
            Default::default();
        for mut it in items {
            let p = (stable_hash(&it.source_id) % n) as usize;
            it.expire_deadline = expire;
            it.created_at = now;
            let group = groups.entry(p).or_default();
            if !it.dedup_id.is_empty() {
                // The queue-wide index is the only dedup check of stores owned by one process: an item whose
                // move already landed (and may have been consumed since) is not moved twice.
                let h = super::dedup::KeyHash::of(&it.dedup_id);
                if self.dedup.contains(h, now) {
                    continue;
                }
                it.dedup_until = until;
                group.1.push(h);
            }
            group.0.push(it);
        }
        for (p, (items, keys)) in groups {
            if items.is_empty() {
                continue;
            }
            // A partition being drained by a rebalance takes nothing new: the redrive tries the batch again.
            let Some(h) = self
                .parts
                .get(p)
                .filter(|x| !x.draining)
                .and_then(|x| x.healthy())
            else {
                let _ = reply.send(Err(QueueError::PartitionUnavailable(p as u32)));
                return;
            };
            let count = items.len() as u64;
            let top = items.iter().map(|it| it.priority).max().unwrap_or(0);
            let stored = match store_counting(&h, items, self.parts[p].shared).await {
                Ok(stored) => stored,
                Err(e) => {
                    let name = self.info.name.clone();
                    self.parts[p].fail(now, &name, &e);
                    let _ = reply.send(Err(QueueError::from_storage(&e)));
                    return;
                }
            };
            for h in keys {
                self.dedup.insert(h, until, now);
            }
            let part = &mut self.parts[p];
            part.pull_deadline(expire);
            part.counts = recount(&h, part.counts, stored, count).await;
            part.top_priority = part.top_priority.max(top);
            self.metrics.produced.fetch_add(count, Ordering::Relaxed);
        }
        let _ = reply.send(Ok(()));
    }
}

/// FNV-1a: a hash that is the same in every process and build, so a moved item goes to the same partition when a
/// redrive is resumed after a restart.
fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Stores moved items (dead letters, a redrive's batch), and how many the store took (`None`: not told, for a store
/// owned by this process, which skips duplicates by source id without saying so). A shared store tells, item by
/// item: see [`recount`].
async fn store_counting(
    h: &Arc<dyn Partition>,
    items: Vec<NewItem>,
    shared: bool,
) -> Result<Option<u64>, crate::error::StorageError> {
    if shared {
        let (_, stored) = h.produce_reporting(items).await?;
        Ok(Some(stored.iter().filter(|s| **s).count() as u64))
    } else {
        h.produce(items).await.map(|_| None)
    }
}

/// The partition's counts after a move stored `stored` of `sent` items. A shared store (PostgreSQL) counts its
/// rows for `counts`, a statement whose cost grows with the partition's depth, and a dead-letter queue is deep: it
/// ran for every batch of dead letters and every redrive group, so a deep enough dead-letter queue took longer
/// than a sender waits, and a source retried a move that had landed, without end. Its counts come from what the
/// store reported instead (and are re-read by the periodic refresh); a store owned by this process counts in
/// O(1), exactly.
async fn recount(
    h: &Arc<dyn Partition>,
    counts: crate::types::PartitionCounts,
    stored: Option<u64>,
    sent: u64,
) -> crate::types::PartitionCounts {
    let mut after = counts;
    match stored {
        Some(n) => after.ready += n,
        None => match h.counts().await {
            Ok(c) => after = c,
            Err(_) => after.ready += sent,
        },
    }
    after
}
