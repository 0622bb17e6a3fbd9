//! Browsing a partition's items without leasing them, and the record of who holds the leases this server handed
//! out (storage keeps a lease's deadline, not its holder).
//!
//! A browse reads the partition in id order through [`crate::storage::Partition::list`] and filters by state and
//! priority. The read per request is bounded ([`SCAN_BUDGET`] items), so a filter that matches little (leased items
//! deep in a long ready queue) returns a short page with a pivot to continue from instead of reading the whole
//! partition in one request.

use std::collections::{BTreeSet, HashMap};

use super::QueueTask;
use crate::engine::{BrowsePage, BrowseRequest, BrowseState, BrowsedItem};
use crate::error::QueueError;
use crate::time::Ts;
use crate::types::{Item, ItemId};

/// Most items one browse reads from storage.
const SCAN_BUDGET: usize = 10_000;
/// Most holders remembered; beyond this new leases are not recorded (browse shows no holder for them), so a queue
/// with millions of leases in flight does not grow this record without bound.
const MAX_HOLDERS: usize = 1_000_000;

/// Who holds each lease this server handed out, until it is completed, retried or its deadline passes.
#[derive(Debug, Default)]
pub(super) struct Holders {
    by_item: HashMap<(u32, u64), (std::sync::Arc<str>, Ts)>,
    /// (deadline, partition, id), to forget expired leases without a scan; stale entries are skipped.
    by_deadline: BTreeSet<(Ts, u32, u64)>,
}

impl Holders {
    /// Records that `client` holds `items` of `partition`.
    pub(super) fn record(&mut self, partition: u32, client: &str, items: &[Item]) {
        if self.by_item.len() + items.len() > MAX_HOLDERS {
            return;
        }
        let client: std::sync::Arc<str> = client.into();
        for it in items {
            self.by_item
                .insert((partition, it.id.0), (client.clone(), it.lease_deadline));
            self.by_deadline.insert((it.lease_deadline, partition, it.id.0));
        }
    }

    /// Moves the deadlines of extended leases.
    pub(super) fn extend(&mut self, partition: u32, ids: &[ItemId], deadline: Ts) {
        for id in ids {
            if let Some(e) = self.by_item.get_mut(&(partition, id.0)) {
                e.1 = deadline;
                self.by_deadline.insert((deadline, partition, id.0));
            }
        }
    }

    /// Forgets completed or retried leases.
    pub(super) fn release(&mut self, partition: u32, ids: &[ItemId]) {
        for id in ids {
            self.by_item.remove(&(partition, id.0));
        }
    }

    /// Forgets leases whose deadline passed (bounded work per call).
    pub(super) fn prune(&mut self, now: Ts) {
        for _ in 0..10_000 {
            let Some(&(deadline, partition, id)) = self.by_deadline.first() else {
                return;
            };
            if deadline > now {
                return;
            }
            self.by_deadline.pop_first();
            if self.by_item.get(&(partition, id)).is_some_and(|e| e.1 <= now) {
                self.by_item.remove(&(partition, id));
            }
        }
    }

    /// The holder of a leased item, when known.
    fn of(&self, partition: u32, it: &Item) -> String {
        match self.by_item.get(&(partition, it.id.0)) {
            Some((client, deadline)) if *deadline == it.lease_deadline => client.to_string(),
            _ => String::new(),
        }
    }
}

impl QueueTask {
    /// Answers one browse request.
    pub(super) async fn browse(&mut self, req: BrowseRequest) -> Result<BrowsePage, QueueError> {
        let h = self.target(req.partition)?;
        let scheduled = req.state == BrowseState::Scheduled;
        let mut page = BrowsePage::default();
        let mut pivot = req.pivot;
        let mut scanned = 0usize;
        // A page is bounded in bytes as a lease is: each storage read, and the items answered.
        let max_bytes = self.config.limits.max_lease_bytes;
        let mut bytes = 0u64;
        while scanned < SCAN_BUDGET {
            let chunk = (SCAN_BUDGET - scanned).min(req.limit.max(100) * 2);
            let (items, capped) = h
                .list_within(pivot, chunk, scheduled, max_bytes)
                .await
                .map_err(|e| QueueError::from_storage(&e))?;
            scanned += items.len();
            let end = items.len() < chunk && !capped;
            let last = items.last().map(|it| it.id);
            for it in items {
                let wanted = match req.state {
                    BrowseState::Queued | BrowseState::Scheduled => true,
                    BrowseState::Ready => !it.is_leased,
                    BrowseState::Leased => it.is_leased,
                } && req.priority.is_none_or(|p| p == it.priority);
                if !wanted {
                    continue;
                }
                let size = crate::storage::item_bytes(&it);
                if page.items.len() == req.limit || (!page.items.is_empty() && bytes + size > max_bytes) {
                    page.next_pivot = Some(it.id);
                    return Ok(page);
                }
                bytes += size;
                let holder = if it.is_leased {
                    self.holders.of(req.partition, &it)
                } else {
                    String::new()
                };
                page.items.push(BrowsedItem { item: it, holder });
            }
            match last {
                Some(id) if !end => pivot = Some(ItemId(id.0.saturating_add(1))),
                _ => return Ok(page),
            }
        }
        page.next_pivot = pivot;
        Ok(page)
    }
}
