//! A queue being restored from a backup: what it refuses, and how a restore page lands exactly once.
//!
//! While [`crate::types::QueueInfo::restoring`] is set the task runs no lifecycle and refuses every request that
//! changes items, so the only writer of its partitions is the restore. That makes a partition's item count the
//! restore's resume point: a page says at which item of the partition's backup stream it starts, and the task
//! imports only the part beyond what the partition already holds. A restore killed at any point (client or server)
//! is resumed by sending the same pages again: nothing is imported twice and nothing is skipped.

use super::{Cold, Msg, QueueTask};
use crate::error::QueueError;
use crate::time::Ts;
use crate::types::Item;

impl QueueTask {
    fn restoring_error(&self) -> QueueError {
        QueueError::Restoring(self.info.name.clone())
    }

    /// Answers the hot requests of a batch with "being restored" and drops them from it.
    pub(super) fn refuse_while_restoring(&mut self, batch: &mut Vec<Msg>) {
        let err = self.restoring_error();
        let msgs: Vec<Msg> = std::mem::take(batch);
        for m in msgs {
            match m {
                Msg::Produce { reply, .. }
                | Msg::Complete { reply, .. }
                | Msg::Retry { reply, .. }
                | Msg::Extend { reply, .. }
                | Msg::DeadLetter { reply, .. }
                | Msg::Moved { reply, .. } => drop(reply.send(Err(err.clone()))),
                Msg::Lease { reply, .. } => drop(reply.send(Err(err.clone()))),
                // Nothing is served while restoring: a wake has nothing to do.
                Msg::Wake(_) | Msg::Definition => {}
                other @ (Msg::Cold(_) | Msg::Shutdown(_)) => batch.push(other),
            }
        }
    }

    /// Refuses the cold requests that change items while the queue is restoring, and a restore page while it is
    /// not. Returns the request when it may go ahead.
    pub(super) fn refuse_cold_while_restoring(&self, c: Cold) -> Option<Cold> {
        if self.info.restoring {
            match c {
                Cold::Clear(_, reply) | Cold::Delete { reply, .. } => {
                    let _ = reply.send(Err(self.restoring_error()));
                    None
                }
                Cold::Import { reply, .. } => {
                    let _ = reply.send(Err(self.restoring_error()));
                    None
                }
                c => Some(c),
            }
        } else {
            match c {
                Cold::RestoreImport { reply, .. } => {
                    let _ = reply.send(Err(QueueError::Invalid(format!(
                        "queue_name is invalid; '{}' is not being restored (start with storage.restore.begin)",
                        self.info.name
                    ))));
                    None
                }
                c => Some(c),
            }
        }
    }

    /// Imports the part of a restore page the partition does not hold yet; returns how many items the partition
    /// holds afterwards (the offset of the next page).
    pub(super) async fn restore_import(
        &mut self,
        partition: u32,
        offset: u64,
        items: Vec<Item>,
        now: Ts,
    ) -> Result<u64, QueueError> {
        let h = self.target(partition)?;
        let storage = |e: crate::error::StorageError| QueueError::from_storage(&e);
        let n = items.len() as u64;
        let c = h.counts().await.map_err(storage)?;
        // Dead items are not in the counts. The restore cannot have written more of them than the page's end; an
        // empty page (asking where to resume) counts them all: a restoring queue holds only what it restored.
        let dead_limit = if n == 0 {
            usize::MAX
        } else {
            usize::try_from(offset.saturating_add(n)).unwrap_or(usize::MAX)
        };
        // Counted, not read: reading them all carried every dead payload into memory just to count it.
        let dead = h.dead_count().await.map_err(storage)?.min(dead_limit as u64);
        let have = c.ready + c.leased + c.scheduled + dead;
        if have < offset {
            return Err(QueueError::Invalid(format!(
                "offset is invalid; partition {partition} of '{}' holds {have} items, a page starting at item \
                 {offset} would leave a gap: resume from item {have}",
                self.info.name
            )));
        }
        let skip = usize::try_from(have - offset).unwrap_or(usize::MAX);
        if skip >= items.len() {
            return Ok(have);
        }
        let rest: Vec<Item> = items.into_iter().skip(skip).collect();
        let stored = h.import(rest).await.map_err(storage)?;
        self.probe(partition as usize, now).await;
        Ok(have + stored.len() as u64)
    }
}
