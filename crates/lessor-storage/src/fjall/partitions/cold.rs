//! Cold backlog segments of a fjall partition (`cold-segments`): paged records far from the head of their
//! priority move, a contiguous id range at a time, into one object each (`crate::offload::segment`), and come back
//! as paged records before the head reaches them.
//!
//! A segment is recorded by a *manifest entry* under the partition's paged prefix:
//! ```text
//! (pid | 1 << 63) (u64 BE) + "seg" + prio (u8) + first id (u64 BE)  -> ManifestEntry
//! ```
//! ("seg" sorts after every priority byte, so the per-priority record ranges never see it). Segment items stay
//! counted in the partition's [`crate::state::Paged`] counters: for the state a segment item is a paged item like
//! any other, and nothing in the state changes when items go cold or come back.
//!
//! Crash safety comes from the order of writes. A spill writes the object first, then one batch deleting the
//! records and adding the manifest entry; a load writes one batch putting the records back and deleting the entry,
//! then deletes the object. A crash between leaves an object no entry names (an orphan, never a lost or doubled
//! item), which [`FjallPartition::sweep_segments`] deletes once older than the grace. A destroyed partition's
//! segments are deleted by the destroy itself, under the partition's gate and after the destroy is durable, and a
//! failure fails the destroy (retryable): no sweep looks at a partition that no longer exists.
//!
//! Order is kept by one rule: before any read of paged records of a priority (a page-in, its read-ahead, a
//! delete by id, an expiry sweep, a snapshot), the segments that read could reach are loaded first, on the
//! caller's path if the background prefetch has not done it yet. A read therefore never passes over a segment. A
//! list (browsing) is the exception that changes nothing: it reads the segments its page reaches one at a time,
//! merges their items into the page and leaves them cold ([`FjallPartition::cold_list`]).
//!
//! The background work (one spill or load at a time per partition) is started and finished by the partition's
//! lifecycle calls; the object I/O runs in a spawned task meanwhile, so the queue keeps serving. Nothing the
//! queue does waits for a spill in flight but a snapshot: a delete, an expiry or a lease that meets one goes on,
//! and the spill is abandoned at its commit (its object deleted) only if it holds a record they removed (see
//! [`Removed`]) or a page-in went past its first id; a clear abandons it at once.
//!
//! A segment that cannot be fetched (a lost or damaged object, object storage down) is not fetched again before a
//! retry pause that doubles at every failure (`segment_io::FetchPauses`): meanwhile whatever needs it gets the last
//! failure at once, without a request, exactly as if the fetch had failed.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::time::{SharedClock, Ts};
use object_store::path::Path as ObjPath;

use super::{blocking, pg, FjallPartition, Inner, Unit, ITEMS};
use crate::offload::segment::{self, ManifestEntry};
use crate::offload::segment_io::{list_segments, random, FetchPauses, SegmentObjects};
use crate::registry::ColdSettings;
use crate::state::paging::PRIORITIES;

/// Time between two steps of a partition's cold ticker (see [`start_ticker`]).
pub(crate) const TICK: Duration = Duration::from_secs(1);
/// Time between two steps while a spill or load is in flight.
const BUSY_TICK: Duration = Duration::from_millis(20);
/// After a failed spill or load, no new one starts for this long (object storage down: no busy retry loop); an
/// expiry sweep that could not read a due segment tries it again after this long too.
pub(super) const FAILURE_BACKOFF: Duration = Duration::from_secs(10);

/// Starts the task that drives partition `p`'s cold work: every [`TICK`] it commits a finished spill or load and
/// starts the next one (the queue's own calls only poll, and the storage contract's lifecycle runs only when an
/// item deadline is due). With `sweep`, the first step sweeps orphaned segments (left only by a crash or a failed
/// delete). Ends when the partition is dropped or closed.
pub(crate) fn start_ticker(p: &Arc<FjallPartition>, sweep: bool) {
    let weak = Arc::downgrade(p);
    tokio::spawn(async move {
        let mut sweep = sweep;
        let mut pause = TICK;
        loop {
            tokio::time::sleep(pause).await;
            let Some(p) = weak.upgrade() else { return };
            if p.closed.load(Ordering::Acquire) {
                return;
            }
            if std::mem::take(&mut sweep) {
                match p.sweep_segments(Duration::ZERO).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(partition = %p.name, swept = n, "orphaned cold segments deleted"),
                    Err(e) => tracing::warn!(partition = %p.name, error = %e, "cold segment sweep failed"),
                }
            }
            let step = async {
                let mut g = p.lock().await?;
                p.cold_step(&mut g).await?;
                Ok::<_, StorageError>(g.cold.job.is_some())
            };
            // While a spill or load is in flight, its end is looked for often, so the next one starts at once (a
            // deep backlog spills one segment per object write, not one per tick).
            pause = match step.await {
                Ok(true) => BUSY_TICK,
                Ok(false) => TICK,
                Err(e) => {
                    tracing::warn!(partition = %p.name, error = %e, "cold segment step failed");
                    TICK
                }
            };
        }
    });
}

/// Tag of manifest keys after the paged prefix.
const MANIFEST_TAG: &[u8] = b"seg";

/// The object store and settings of a store's cold segments.
pub(crate) struct ColdCtx {
    objects: SegmentObjects,
    settings: ColdSettings,
    /// `{object-store prefix}{store name}` (object keys start with it).
    prefix: String,
    /// What the retry pauses of segments that could not be fetched are timed by (see [`FetchPauses`]).
    clock: SharedClock,
    /// Tests: every call spills or loads what is due and waits for it (not only lifecycle calls).
    pub(crate) eager: std::sync::atomic::AtomicBool,
    /// Tests: while true, a spill waits before it writes its object, as if the upload took that long (see
    /// `FjallStore::hold_cold_spills`).
    pub(crate) hold: tokio::sync::watch::Sender<bool>,
    /// Tests: the spills that reached that wait.
    pub(crate) held: tokio::sync::watch::Sender<u64>,
}

/// What deletes an object whose deletion failed.
const LATER: &str = "the sweeper will retry";

impl ColdCtx {
    /// Builds the client for `settings`' object store; `store_name` goes into every key; `clock` times the retry
    /// pauses of segments that could not be fetched.
    pub(crate) fn new(
        settings: ColdSettings,
        store_name: &str,
        clock: SharedClock,
    ) -> Result<ColdCtx, StorageError> {
        let client = crate::offload::client(&settings.object_store)?;
        let prefix = format!("{}{}", settings.object_store.prefix, store_name);
        Ok(ColdCtx {
            objects: SegmentObjects::new(client),
            settings,
            prefix,
            clock,
            eager: std::sync::atomic::AtomicBool::new(false),
            hold: tokio::sync::watch::Sender::new(false),
            held: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Tests: waits while spills are held (see [`ColdCtx::hold`]). One borrow when they are not.
    async fn wait_if_held(&self) {
        if !*self.hold.borrow() {
            return;
        }
        self.held.send_modify(|n| *n += 1);
        // Subscribed after the check: a release in between is seen as the current value.
        let _ = self.hold.subscribe().wait_for(|h| !*h).await;
    }

    /// Deletes every segment object of partition `partition` of `queue` written under pid `pid` (a destroyed
    /// partition's).
    pub(crate) async fn delete_partition(&self, queue: &str, partition: u32, pid: u64) {
        let dir = segment::dir(&self.prefix, "", queue, partition);
        self.objects.delete_partition(&dir, pid, LATER).await;
    }

    /// Deletes every segment object of partition `partition` of `queue`, whatever pid wrote it, failing when one
    /// could not be listed or deleted (see `SegmentObjects::delete_dir`). Only while no partition of that name
    /// exists or can be opened (a destroy holding its gate).
    pub(crate) async fn delete_destroyed(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        let dir = segment::dir(&self.prefix, "", queue, partition);
        let what = format!("destroyed partition {partition} of queue '{queue}'");
        self.objects.delete_dir(&what, &dir).await
    }

    async fn delete(&self, key: &str) {
        self.objects.delete(key, LATER).await;
    }
}

/// See [`ColdState::dry`]: (paged count, paged-from id, generation, last segment's last id) of one priority.
pub(crate) type DryMark = (u64, u64, u64, Option<u64>);

/// A segment that a read of paged records would pass and that could not be loaded (see
/// [`FjallPartition::cold_guard`]).
pub(super) struct Unloaded {
    /// The paged records of the priority on disk between the read's first id and the segment: fewer than the read
    /// wanted, and a read of that many passes no segment.
    pub(super) before: usize,
    /// Why the segment could not be loaded (`Unavailable`, naming it).
    pub(super) error: StorageError,
}

/// A partition's segments and background cold work, behind its lock.
#[derive(Default)]
pub(crate) struct ColdState {
    /// Manifest entries by (priority, first id).
    pub(crate) segs: BTreeMap<(u8, u64), ManifestEntry>,
    /// Bumped by every change that removes paged records other than from the head (delete, expiry, clear, a
    /// re-read): a mark of [`Marks`] taken before it is stale. (A spill in flight is not judged by it: see
    /// [`Removed`].)
    pub(crate) gen: u64,
    /// No spill or load starts before this (set after a failure).
    pub(crate) backoff_until: Option<std::time::Instant>,
    /// The spill or load in flight. Boxed: every partition of a loaded queue holds this state inline, cold segments
    /// configured or not, and a job (with what a spill must be told was removed, `Removed`) is about 250 bytes that
    /// only a partition doing cold work needs (`loaded_memory.rs` bounds a loaded queue's bytes).
    pub(crate) job: Option<Box<Job>>,
    /// Segments whose last fetch failed, not fetched again before their pause ends.
    pub(crate) pauses: FetchPauses,
    /// What the cold work found, from its first finding on. Boxed, and only in a partition that does cold work:
    /// inline, the marks took about 800 bytes in every partition of an `s3` build, cold segments configured or not,
    /// and a queue may have 65,536 partitions (`loaded_memory.rs`).
    pub(crate) marks: Option<Box<Marks>>,
}

/// Per priority, where the cold work found nothing to do, so that it does not look again until something changed.
#[derive(Default)]
pub(crate) struct Marks {
    /// Per priority: the (paged-from id, generation, first id of the next segment) at which the last prefetch check
    /// found enough records ahead of that segment. While none of them changes, the records ahead cannot have
    /// become fewer (only page-ins, deletes, expiry and loads take them), so the check is not repeated.
    pub(crate) ahead_ok: [Option<(u64, u64, u64)>; PRIORITIES],
    /// Per priority: the (paged count, paged-from id, generation, last segment's last id) at which its last spill
    /// found less than a segment to move. While none of them changes no more can be found, so the priority is
    /// passed over (starting that spill again at every step kept every later priority from spilling).
    pub(crate) dry: [Option<DryMark>; PRIORITIES],
}

impl ColdState {
    /// The state of a partition whose manifest holds `segs`.
    pub(crate) fn with_segs(segs: BTreeMap<(u8, u64), ManifestEntry>) -> ColdState {
        let mut s = ColdState::default();
        s.segs = segs;
        s
    }

    /// Items and payload bytes in segments.
    pub(crate) fn totals(&self) -> (u64, u64) {
        self.segs
            .values()
            .fold((0, 0), |(n, b), e| (n + e.count, b + e.bytes))
    }

    /// The lowest segment of `prio` holding ids at or above `from` (one that starts below `from` included).
    fn next(&self, prio: u8, from: u64) -> Option<&ManifestEntry> {
        self.segs
            .range((prio, 0)..=(prio, u64::MAX))
            .map(|(_, e)| e)
            .find(|e| e.last >= from)
    }

    /// Ends the job in flight (waiting for its object request) and returns the key tag of the object a spill wrote,
    /// which no manifest names.
    pub(crate) async fn abandon_job(&mut self) -> Option<String> {
        let job = self.job.take()?;
        let _ = job.task.await;
        job.key
    }

    /// What the spill in flight, if any, must be told is removed (see [`Removed`]).
    pub(crate) fn spill_removed(&mut self) -> Option<&mut Removed> {
        self.job
            .as_mut()
            .filter(|j| j.load.is_none())
            .map(|j| &mut j.removed)
    }

    /// Earliest expiry deadline among the segments of `prio`.
    pub(crate) fn min_expire(&self, prio: u8) -> i64 {
        self.segs
            .range((prio, 0)..=(prio, u64::MAX))
            .map(|(_, e)| e.min_expire)
            .min()
            .unwrap_or(i64::MAX)
    }
}

/// Background cold work in flight.
pub(crate) struct Job {
    /// A spill: the paged records removed since it started, which its segment must not hold.
    removed: Removed,
    /// The tag that ends the key of the object a spill writes (the sweeper must leave it alone).
    key: Option<String>,
    /// A load: the key of the segment it fetches (its failure pauses the segment).
    load: Option<String>,
    task: tokio::task::JoinHandle<Result<Done, StorageError>>,
}

/// The paged records a delete, an expiry or a re-read removed while a spill was in flight. The spill reads its
/// records in its task, so which ones it took is known only at its commit: a spill holding one of them is abandoned
/// there and its object deleted, so that no removed item comes back from it; one holding none of them commits.
/// A delete and an expiry pass used to wait for the spill in flight and commit it first, under the partition's
/// lock: every call of the partition (produce, lease) then waited for the spill's upload, up to the object store's
/// timeout (`fjall_cold::a_delete_or_an_expiry_does_not_hold_the_partition_for_a_spill_in_flight`). Abandoning
/// every spill instead, as a generation bump did in the memory store, wasted the upload at every delete or expiry
/// of other items.
#[derive(Default)]
pub(crate) struct Removed {
    /// Anything may have gone (the partition was re-read from disk after a failed write).
    pub(crate) all: bool,
    /// Ids a delete named that may be paged records (a few per delete, only while a spill is in flight).
    ids: Vec<u64>,
    /// Per priority, the latest time an expiry pass swept at: the records due then may be gone.
    due: [Option<i64>; PRIORITIES],
}

impl Removed {
    /// Records that a delete of `ids` (those that may be paged) removes them.
    pub(crate) fn deleted(&mut self, ids: &[u64]) {
        self.ids.extend_from_slice(ids);
    }

    /// Records that an expiry pass of `prio` at `now` removes its paged records due then.
    pub(crate) fn expired(&mut self, prio: u8, now: Ts) {
        let due = &mut self.due[usize::from(prio)];
        *due = Some(due.map_or(now.0, |d| d.max(now.0)));
    }

    /// Whether the segment `entry` of `prio`, holding the records `ids` (ascending), may hold a removed record.
    fn hit(&self, prio: u8, entry: &ManifestEntry, ids: &[u64]) -> bool {
        self.all
            || self.due[usize::from(prio)].is_some_and(|now| entry.min_expire <= now)
            || self
                .ids
                .iter()
                .any(|id| (entry.first..=entry.last).contains(id) && ids.binary_search(id).is_ok())
    }
}

impl Drop for ColdState {
    fn drop(&mut self) {
        // A partition dropped with a spill in flight: stop it rather than let it write an object nobody will name
        // (one already sent is left to the sweep at the next open, or to a destroy's second pass).
        if let Some(job) = self.job.take() {
            job.task.abort();
        }
    }
}

/// What a finished job hands back to be committed under the lock.
enum Done {
    /// The object of a new segment is written: commit the manifest entry and delete the records.
    Spilled {
        prio: u8,
        entry: ManifestEntry,
        ids: Vec<u64>,
    },
    /// A spill of `prio` found less than a full segment to move (the records changed since it was planned, or
    /// fewer than a segment's worth follow its last segment): `mark` is [`ColdState::dry`]'s.
    Nothing { prio: u8, mark: DryMark },
    /// A segment is fetched and verified: put its records back and delete its entry.
    Loaded {
        prio: u8,
        entry: ManifestEntry,
        records: Vec<(u64, Vec<u8>)>,
    },
}

/// The manifest key of the segment of `prio` starting at `first` in partition `pid`.
pub(crate) fn manifest_key(pid: u64, prio: u8, first: u64) -> Vec<u8> {
    let mut k = pg::paged_prefix(pid).to_vec();
    k.extend_from_slice(MANIFEST_TAG);
    k.push(prio);
    k.extend_from_slice(&first.to_be_bytes());
    k
}

/// Reads the manifest of partition `pid` (one entry per segment, never a segment body). Blocking.
pub(crate) fn read_manifest(
    engine: &super::Engine,
    pid: u64,
    what: &str,
) -> Result<BTreeMap<(u8, u64), ManifestEntry>, StorageError> {
    let mut out = BTreeMap::new();
    let Some(ks) = engine.keyspace(ITEMS, false)? else {
        return Ok(out);
    };
    let mut prefix = pg::paged_prefix(pid).to_vec();
    prefix.extend_from_slice(MANIFEST_TAG);
    for kv in ks.prefix(&prefix) {
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        let e = ManifestEntry::decode(&v).map_err(|e| {
            StorageError::new(
                StorageErrorKind::Corrupt,
                format!("{what}: a cold segment manifest entry is damaged: {e}"),
            )
        })?;
        let prio = k.get(prefix.len()).copied().unwrap_or(0);
        out.insert((prio, e.first), e);
    }
    Ok(out)
}

/// Whether a stored payload is an offloaded object reference (such items stop a segment: the payload sweeper
/// reads references from the partition, and a segment's contents are not read by it).
fn is_object_ref(record: &[u8]) -> bool {
    pg::decode_record(0, record, "")
        .map(|it| crate::tiers::offloaded_len(&it.payload).is_some())
        .unwrap_or(true)
}

impl FjallPartition {
    fn cold_ctx(&self) -> Option<Arc<ColdCtx>> {
        self.shared.cold.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn queue_partition(&self) -> (&str, u32) {
        (&self.queue, self.part_no)
    }

    /// Paged records of `prio` on disk with ids in `from..to`, counted up to `cap`. Blocking read off the runtime.
    async fn disk_records_before(&self, prio: u8, from: u64, to: u64, cap: u64) -> Result<u64, StorageError> {
        let (engine, pid) = (self.shared.engine.clone(), self.pid);
        blocking(move || {
            let Some(ks) = engine.keyspace(ITEMS, false)? else {
                return Ok(0);
            };
            let mut n = 0;
            for kv in ks.range(pg::record_key(pid, prio, from)..pg::record_key(pid, prio, to)) {
                kv.key().map_err(|e| engine.read_error(e))?;
                n += 1;
                if n >= cap {
                    break;
                }
            }
            Ok(n)
        })
        .await
    }

    /// Makes sure a read of up to `n` paged records of `prio` from id `from` on cannot pass over a segment:
    /// loads (now, on the caller's path) each segment with fewer than `n` disk records before it. `Ok(Some(_))`:
    /// such a segment could not be fetched (reported; see [`FjallPartition::try_load_now`]); the segments before
    /// it are loaded, and a read of [`Unloaded::before`] records is all that passes none.
    pub(super) async fn cold_guard(
        &self,
        g: &mut Inner,
        prio: u8,
        from: u64,
        n: usize,
    ) -> Result<Option<Unloaded>, StorageError> {
        loop {
            let Some(e) = g.cold.next(prio, from).cloned() else {
                return Ok(None);
            };
            let before = if e.first <= from {
                0
            } else {
                self.disk_records_before(prio, from, e.first, n as u64).await?
            };
            if before >= n as u64 {
                return Ok(None);
            }
            if let Some(error) = self.try_load_now(g, prio, e).await? {
                // Counted up to `n` and below it: exact.
                let before = usize::try_from(before).unwrap_or(usize::MAX);
                return Ok(Some(Unloaded { before, error }));
            }
        }
    }

    /// Loads every segment that may hold one of `ids` (a delete by id must see them).
    pub(super) async fn cold_guard_ids(&self, g: &mut Inner, ids: &[u64]) -> Result<(), StorageError> {
        // A spill already done is committed first (its segment may hold one of the ids); one in flight is not
        // waited for, but told the ids, before anything is loaded (see `Removed`).
        self.finish_cold_job(g, false).await?;
        // Only ids that may be paged are looked for: a segment item is a paged item (not live in the state, at or
        // above its priority's paged boundary). A segment's id range holds the ids of other priorities too (ids are
        // handed out in blocks per priority), so looking for every id fetched segments for nothing, and failed the
        // delete of a leased or resident item when such a segment could not be read.
        let cold: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|&id| !g.state.contains_live(id) && g.state.paged().may_hold(id))
            .collect();
        if let Some(removed) = g.cold.spill_removed() {
            removed.deleted(&cold);
        }
        let hit: Vec<(u8, ManifestEntry)> = g
            .cold
            .segs
            .iter()
            .filter(|(_, e)| cold.iter().any(|&id| id >= e.first && id <= e.last))
            .map(|(&(p, _), e)| (p, e.clone()))
            .collect();
        for (p, e) in hit {
            self.load_now(g, p, e).await?;
        }
        Ok(())
    }

    /// Loads the segments of `prio` with an item due at `now` (an expiry sweep must see them), lowest first.
    /// `Ok(Some(first))`: the segment starting at id `first` could not be fetched (reported; see
    /// [`FjallPartition::try_load_now`]): it and the due segments after it stay cold, those before it are loaded.
    pub(super) async fn cold_guard_due(
        &self,
        g: &mut Inner,
        prio: u8,
        now: Ts,
    ) -> Result<Option<u64>, StorageError> {
        // As in `cold_guard_ids`: a spill done is committed, one in flight is told what may go.
        self.finish_cold_job(g, false).await?;
        if let Some(removed) = g.cold.spill_removed() {
            removed.expired(prio, now);
        }
        let due: Vec<ManifestEntry> = g
            .cold
            .segs
            .range((prio, 0)..=(prio, u64::MAX))
            .filter(|(_, e)| e.min_expire <= now.0)
            .map(|(_, e)| e.clone())
            .collect();
        for e in due {
            let first = e.first;
            if self.try_load_now(g, prio, e).await?.is_some() {
                return Ok(Some(first));
            }
        }
        Ok(None)
    }

    /// Loads every segment (a snapshot reads the records of the whole partition).
    pub(super) async fn cold_guard_all(&self, g: &mut Inner) -> Result<(), StorageError> {
        // A spill in flight is committed first: committed by the first load below instead, its segment would not
        // be in the list and its items would be missing from the snapshot (a backup taken during a spill).
        self.finish_cold_job(g, true).await?;
        let all: Vec<(u8, ManifestEntry)> = g.cold.segs.iter().map(|(&(p, _), e)| (p, e.clone())).collect();
        for (p, e) in all {
            self.load_now(g, p, e).await?;
        }
        Ok(())
    }

    /// Merges into a list's page `out` the items of the segments of `prio` it reaches from id `from` on: each
    /// segment starting below the page's `ceiling` (the first id `keep_page` had to leave out) is fetched and
    /// verified, its first `limit` items from `from` are decoded into the page, and the rest of it is dropped before
    /// the next one is fetched. The segments stay in object storage and in the manifest: loaded back instead, as
    /// before, a dashboard paging through a cold backlog wrote every segment it reached back to disk
    /// (`fjall_cold::a_list_paging_through_segments_keeps_them_cold`: 47 segments, 60 items on disk before, 1,000
    /// after). A list thus holds at most one segment beyond its page, and reads the segments its page reaches at
    /// every call. A segment that cannot be read fails the list as it fails a lease (`Unavailable`, naming it): a
    /// page without its items would skip them.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn cold_list(
        &self,
        g: &Inner,
        prio: u8,
        from: u64,
        limit: usize,
        max_bytes: u64,
        out: &mut Vec<lessor_core::types::Item>,
        ceiling: &mut Option<u64>,
    ) -> Result<(), StorageError> {
        let what = self.what();
        let what = what.as_str();
        let ctx = self.cold_ctx();
        list_segments(
            |at| g.cold.next(prio, at),
            |e| {
                let ctx = ctx.clone();
                async move {
                    let Some(ctx) = ctx else {
                        return Err(StorageError::unavailable(format!(
                            "{what}: cold segment '{}' holds queued items but the store has no cold-segments object \
                             store",
                            e.key
                        )));
                    };
                    self.fetch_now(g, &ctx, prio, e, "for a list").await
                }
            },
            |id, r| pg::decode_record(id, r, what),
            from,
            limit,
            max_bytes,
            out,
            ceiling,
        )
        .await
    }

    /// Fetches, verifies and commits segment `e` of `prio` now. A missing or damaged segment is an
    /// `Unavailable` error naming it (the caller's lease gets 454 and its items stay where they are).
    async fn load_now(&self, g: &mut Inner, prio: u8, e: ManifestEntry) -> Result<(), StorageError> {
        match self.try_load_now(g, prio, e).await? {
            None => Ok(()),
            Some(unread) => Err(unread),
        }
    }

    /// [`FjallPartition::load_now`] telling a segment that could not be fetched (`Ok(Some(_))`: missing, damaged,
    /// object storage down, or no object store; logged and counted, nothing changed) from a failure of the
    /// partition itself (`Err`: a disk read or write), so that a caller can serve what comes before the segment.
    pub(super) async fn try_load_now(
        &self,
        g: &mut Inner,
        prio: u8,
        e: ManifestEntry,
    ) -> Result<Option<StorageError>, StorageError> {
        let what = self.what();
        let Some(ctx) = self.cold_ctx() else {
            return Ok(Some(StorageError::unavailable(format!(
                "{what}: cold segment '{}' holds queued items but the store has no cold-segments object store",
                e.key
            ))));
        };
        // A background load of the same segment may be in flight: let it finish first. A spill in flight is not
        // waited for (its upload can take up to the object store's timeout, under the partition's lock): its
        // segment comes after every segment of its priority, so it holds none of this one's records, and what the
        // caller removes is kept out of it by `Removed`.
        if g.cold.job.as_ref().is_some_and(|j| j.load.is_some()) {
            self.finish_cold_job(g, true).await?;
        }
        if !g.cold.segs.contains_key(&(prio, e.first)) {
            return Ok(None);
        }
        let records = match self.fetch_now(g, &ctx, prio, &e, "for a read").await {
            Ok(records) => records,
            Err(err) => return Ok(Some(err)),
        };
        self.commit_load(g, &ctx, prio, e, records).await?;
        Ok(None)
    }

    /// Fetches and verifies segment `e` of `prio` for a caller that needs it now (`why`: for the log), unless the
    /// segment is in its retry pause: then the last failure is answered at once, with no request. A failed fetch is
    /// counted, logged at error level with the pause it starts, and pauses the segment.
    async fn fetch_now(
        &self,
        g: &Inner,
        ctx: &Arc<ColdCtx>,
        prio: u8,
        e: &ManifestEntry,
        why: &str,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let (queue, partition) = self.queue_partition();
        if let Some(err) = g.cold.pauses.check(&e.key, ctx.clock.now()) {
            tracing::debug!(queue, partition, segment = %e.key, "cold segment in its retry pause; not fetched {why}");
            return Err(err);
        }
        match fetch(ctx, &self.what(), prio, e).await {
            Ok(records) => {
                g.cold.pauses.succeeded(&e.key);
                Ok(records)
            }
            Err(err) => {
                self.shared.segment_failures.fetch_add(1, Ordering::Relaxed);
                crate::offload::metrics()
                    .segment_failures
                    .fetch_add(1, Ordering::Relaxed);
                let pause = self.pause(g, ctx, &e.key, &err);
                tracing::error!(queue, partition, segment = %e.key, error = %err, retry_in_s = pause.as_secs_f64(), "cold segment could not be loaded {why}; not fetched again before the pause");
                Err(err)
            }
        }
    }

    /// Starts or lengthens the retry pause of segment `key` after a failed fetch; returns it.
    fn pause(&self, g: &Inner, ctx: &ColdCtx, key: &str, err: &StorageError) -> Duration {
        g.cold.pauses.failed(key, ctx.clock.now(), err, |k| {
            g.cold.segs.values().any(|e| e.key == k)
        })
    }

    async fn commit_load(
        &self,
        g: &mut Inner,
        ctx: &Arc<ColdCtx>,
        prio: u8,
        e: ManifestEntry,
        records: Vec<(u64, Vec<u8>)>,
    ) -> Result<(), StorageError> {
        let unit = Unit {
            keyspace: self.shared.items.clone(),
            puts: records
                .into_iter()
                .map(|(id, r)| (pg::record_key(self.pid, prio, id), r))
                .collect(),
            dels: vec![manifest_key(self.pid, prio, e.first)],
            once_dels: Vec::new(),
        };
        self.shared.submit(unit).await?;
        g.cold.segs.remove(&(prio, e.first));
        self.shared.segments_loaded.fetch_add(1, Ordering::Relaxed);
        crate::offload::metrics()
            .segments_loaded
            .fetch_add(1, Ordering::Relaxed);
        // The object goes once the journal's copy is durable: `submit` waited for that only in `sync` mode.
        let ctx = ctx.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            match shared.make_durable().await {
                Ok(()) => ctx.delete(&e.key).await,
                Err(err) => {
                    tracing::warn!(segment = %e.key, error = %err, "loaded cold segment kept: its load is not durable")
                }
            }
        });
        Ok(())
    }

    /// Finishes the background job if it is done (or waits for it when `wait`).
    async fn finish_cold_job(&self, g: &mut Inner, wait: bool) -> Result<(), StorageError> {
        if !wait && g.cold.job.as_ref().is_none_or(|j| !j.task.is_finished()) {
            return Ok(());
        }
        let Some(job) = g.cold.job.take() else {
            return Ok(());
        };
        let Some(ctx) = self.cold_ctx() else {
            return Ok(());
        };
        let done = match job.task.await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                // A spill whose object could not be written, or a background load that failed: retried by a
                // later lifecycle call (a lease that needs the segment loads it itself and gets the error). The
                // segment of a failed load is paused as a failed fetch on the caller's path pauses it.
                if let Some(key) = &job.load {
                    self.pause(g, &ctx, key, &e);
                }
                tracing::warn!(partition = %self.name, error = %e, "cold segment work failed; retried later");
                g.cold.backoff_until = Some(std::time::Instant::now() + FAILURE_BACKOFF);
                return Ok(());
            }
            Err(e) => return Err(StorageError::other(format!("cold segment task failed: {e}"))),
        };
        match done {
            Done::Nothing { prio, mark } => {
                g.cold.marks.get_or_insert_default().dry[usize::from(prio)] = Some(mark);
            }
            Done::Loaded { prio, entry, records } => {
                if g.cold
                    .segs
                    .get(&(prio, entry.first))
                    .is_some_and(|x| x.key == entry.key)
                {
                    self.commit_load(g, &ctx, prio, entry, records).await?;
                }
            }
            Done::Spilled { prio, entry, ids } => {
                // Apply a read-ahead first: it may have paged in records of the range.
                self.finish_prefetch(g).await?;
                let paged = g.state.paged();
                // None of its records was removed meanwhile (see `Removed`) nor paged in (the head is not past
                // its first id).
                let intact = !job.removed.hit(prio, &entry, &ids)
                    && paged.count[usize::from(prio)] > 0
                    && paged.from[usize::from(prio)] <= entry.first;
                if !intact {
                    tokio::spawn(async move { ctx.delete(&entry.key).await });
                    return Ok(());
                }
                let unit = Unit {
                    keyspace: self.shared.items.clone(),
                    puts: vec![(manifest_key(self.pid, prio, entry.first), entry.encode())],
                    dels: ids.iter().map(|&id| pg::record_key(self.pid, prio, id)).collect(),
                    once_dels: Vec::new(),
                };
                if let Err(e) = self.shared.submit(unit).await {
                    g.stale = true;
                    return Err(e);
                }
                g.cold.segs.insert((prio, entry.first), entry);
                self.shared.segments_written.fetch_add(1, Ordering::Relaxed);
                crate::offload::metrics()
                    .segments_written
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// One step of background cold work, from a lifecycle call: finishes a job that is done, then starts a load
    /// when the head of a priority is within the prefetch distance of its next segment, else a spill when a
    /// priority has a segment's worth of records beyond the cold depth.
    pub(super) async fn cold_step(&self, g: &mut Inner) -> Result<(), StorageError> {
        let Some(ctx) = self.cold_ctx() else {
            return Ok(());
        };
        self.finish_cold_job(g, false).await?;
        if g.cold.job.is_some()
            || g.cold
                .backoff_until
                .is_some_and(|t| std::time::Instant::now() < t)
        {
            return Ok(());
        }
        self.cold_start(g, &ctx).await?;
        if ctx.eager.load(Ordering::Relaxed) {
            self.finish_cold_job(g, true).await?;
        }
        Ok(())
    }

    /// Commits the background job if it is done (cheap when it is not): called around leases too, so a spill
    /// or prefetch takes effect without waiting for the next lifecycle call.
    pub(super) async fn cold_poll(&self, g: &mut Inner) -> Result<(), StorageError> {
        if self.cold_ctx().is_some_and(|c| c.eager.load(Ordering::Relaxed)) {
            return self.cold_step(g).await;
        }
        if g.cold.job.as_ref().is_some_and(|j| j.task.is_finished()) {
            self.finish_cold_job(g, false).await?;
        }
        Ok(())
    }

    /// Starts a load or a spill (see [`FjallPartition::cold_step`]).
    async fn cold_start(&self, g: &mut Inner, ctx: &Arc<ColdCtx>) -> Result<(), StorageError> {
        if g.state.paged().is_empty() && g.cold.segs.is_empty() {
            return Ok(());
        }
        let what = self.what();
        let set = &ctx.settings;
        // Prefetch. A segment in its retry pause is passed over (a read that needs it gets the pause's error).
        let now = ctx.clock.now();
        for p in 0..PRIORITIES as u8 {
            let from = g.state.paged().from[usize::from(p)];
            let Some(e) = g.cold.next(p, 0).cloned() else {
                continue;
            };
            if g.cold.pauses.paused(&e.key, now) {
                continue;
            }
            let mark = (from, g.cold.gen, e.first);
            if g.cold.marks.as_ref().and_then(|m| m.ahead_ok[usize::from(p)]) == Some(mark) {
                continue;
            }
            let before = self
                .disk_records_before(p, from, e.first, set.prefetch_items)
                .await?;
            if before >= set.prefetch_items {
                g.cold.marks.get_or_insert_default().ahead_ok[usize::from(p)] = Some(mark);
            } else {
                let (ctx2, what2, load) = (ctx.clone(), what.clone(), Some(e.key.clone()));
                let task = tokio::spawn(async move {
                    let records = fetch(&ctx2, &what2, p, &e).await?;
                    Ok(Done::Loaded {
                        prio: p,
                        entry: e,
                        records,
                    })
                });
                g.cold.job = Some(Box::new(Job {
                    removed: Removed::default(),
                    key: None,
                    load,
                    task,
                }));
                return Ok(());
            }
        }
        // Spill. A restart rebuilds the source-id index from the paged records: partitions with imported source
        // ids keep theirs on disk.
        let paged = g.state.paged().clone();
        if paged.with_source > 0 {
            return Ok(());
        }
        for p in 0..PRIORITIES as u8 {
            let pi = usize::from(p);
            let in_segs: u64 = g
                .cold
                .segs
                .range((p, 0)..=(p, u64::MAX))
                .map(|(_, e)| e.count)
                .sum();
            let on_disk = paged.count[pi].saturating_sub(in_segs);
            let last = g
                .cold
                .segs
                .range((p, 0)..=(p, u64::MAX))
                .next_back()
                .map(|(_, e)| e.last);
            let (start, skip) = match last {
                Some(l) => (l + 1, 0),
                None => (paged.from[pi], set.after_depth),
            };
            if on_disk < skip + u64::from(set.segment_items) {
                continue;
            }
            let mark = (paged.count[pi], paged.from[pi], g.cold.gen, last);
            if g.cold.marks.as_ref().and_then(|m| m.dry[pi]) == Some(mark) {
                continue;
            }
            let (engine, pid, cap_n, cap_b) = (
                self.shared.engine.clone(),
                self.pid,
                set.segment_items as usize,
                set.segment_bytes,
            );
            let (queue, partition) = self.queue_partition();
            let (queue, ctx2, what) = (queue.to_string(), ctx.clone(), what.clone());
            // Chosen now, before the records are known, so that the sweeper leaves the object alone from the start.
            let tag = segment::key_tag(self.pid, random());
            let job_tag = tag.clone();
            // The records are read, decoded and encoded in the job, off the partition's lock: read under it, a
            // segment's worth (and the skip over the cold depth) held the queue up for as long as the read took.
            // Reading later is safe: whatever removes one of the records it read meanwhile (a delete or an expiry,
            // told to `Removed`; a page-in past the segment's first id; a clear, which aborts it) makes the commit
            // abandon the segment, and a record produced meanwhile has a higher id than the ones before it.
            let task = tokio::spawn(async move {
                let prefix = ctx2.prefix.clone();
                let read = blocking(move || {
                    let Some(ks) = engine.keyspace(ITEMS, false)? else {
                        return Ok(None);
                    };
                    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
                    let (mut skipped, mut bytes) = (0u64, 0usize);
                    let mut full = false;
                    for kv in ks.range(pg::record_key(pid, p, start)..pg::record_key(pid, p, u64::MAX)) {
                        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
                        if skipped < skip {
                            skipped += 1;
                            continue;
                        }
                        let Some(id) = pg::record_id(&k) else { continue };
                        if is_object_ref(&v) {
                            break;
                        }
                        bytes += v.len();
                        out.push((id, v.to_vec()));
                        if out.len() >= cap_n || bytes >= cap_b {
                            full = true;
                            break;
                        }
                    }
                    // Not a full segment's worth (or stopped by an offloaded payload): only a full one is spilled.
                    if !full || out.is_empty() {
                        return Ok(None);
                    }
                    let mut entry = ManifestEntry::empty();
                    for (id, r) in &out {
                        let it = pg::decode_record(*id, r, &what)?;
                        entry.add(*id, it.expire_deadline.0, it.payload.len() as u64);
                    }
                    // Normalised by `ObjPath::from` (as every manifest holds its keys); requests encode the key once more
                    // (`offload::listed`), and the sweeper compares listings with that form.
                    entry.key = ObjPath::from(segment::object_key(
                        &prefix,
                        "",
                        &queue,
                        partition,
                        p,
                        entry.first,
                        &tag,
                    ))
                    .to_string();
                    let ids: Vec<u64> = out.iter().map(|r| r.0).collect();
                    let refs: Vec<(u64, &[u8])> = out.iter().map(|(i, r)| (*i, r.as_slice())).collect();
                    let (body, crc) = segment::encode(p, &refs)
                        .map_err(|e| StorageError::other(format!("segment encoding failed: {e}")))?;
                    entry.crc = crc;
                    Ok(Some((entry, ids, body, what)))
                })
                .await?;
                let Some((entry, ids, body, what)) = read else {
                    return Ok(Done::Nothing { prio: p, mark });
                };
                ctx2.wait_if_held().await;
                ctx2.objects.put(&what, &entry.key, body).await?;
                Ok(Done::Spilled { prio: p, entry, ids })
            });
            let key = Some(job_tag);
            g.cold.job = Some(Box::new(Job {
                removed: Removed::default(),
                key,
                load: None,
                task,
            }));
            return Ok(());
        }
        Ok(())
    }

    /// Deletes the manifest entries of every segment (a clear of the queue), in one batch, and their objects after.
    pub(super) async fn cold_clear(&self, g: &mut Inner) -> Result<(), StorageError> {
        g.cold.gen += 1;
        if let Some(job) = g.cold.job.take() {
            job.task.abort();
        }
        if g.cold.segs.is_empty() {
            return Ok(());
        }
        let unit = Unit {
            keyspace: self.shared.items.clone(),
            puts: Vec::new(),
            dels: g
                .cold
                .segs
                .keys()
                .map(|&(p, f)| manifest_key(self.pid, p, f))
                .collect(),
            once_dels: Vec::new(),
        };
        self.shared.submit(unit).await?;
        let gone: Vec<ManifestEntry> = std::mem::take(&mut g.cold.segs).into_values().collect();
        if let Some(ctx) = self.cold_ctx() {
            tokio::spawn(async move {
                for e in gone {
                    ctx.delete(&e.key).await;
                }
            });
        }
        Ok(())
    }

    /// The object keys the manifest names, and the key of the spill in flight if any (tests: after a sweep the
    /// bucket must hold exactly these).
    #[doc(hidden)]
    pub async fn segment_keys(&self) -> Result<(Vec<String>, Option<String>), StorageError> {
        let g = self.lock().await?;
        let keys = g.cold.segs.values().map(|e| e.key.clone()).collect();
        Ok((keys, g.cold.job.as_ref().and_then(|j| j.key.clone())))
    }

    /// Deletes segment objects of this partition older than `grace` that no manifest entry names (left by a
    /// crash between an object write and its batch, or between a load's batch and the object's deletion).
    /// Returns how many were deleted.
    pub async fn sweep_segments(&self, grace: Duration) -> Result<u64, StorageError> {
        let Some(ctx) = self.cold_ctx() else {
            return Ok(0);
        };
        // The listing is taken before the lock, which a listing of thousands of segments would hold for seconds
        // (the first sweep runs as the partition opens, when the first leases come). What is listed is then
        // judged under the lock: an object is named by the manifest, is the spill in flight's, or is an orphan.
        // An object written after the listing is not in it; one whose spill or load was committed meanwhile is
        // in the manifest or already deleted; and an orphan cannot become named later (keys carry a random tag),
        // so the orphans are deleted after the lock is released.
        let (queue, partition) = self.queue_partition();
        let dir = segment::dir(&ctx.prefix, "", queue, partition);
        let what = self.what();
        let listed = ctx.objects.list(&what, &dir).await?;
        let cutoff = chrono_now_minus(grace);
        let orphans: Vec<ObjPath> = {
            let g = self.lock().await?;
            // In the listed form (see `offload::listed`): a manifest key names the object `ObjPath::from(key)`.
            let live: std::collections::HashSet<String> = g
                .cold
                .segs
                .values()
                .map(|e| crate::offload::listed(&e.key).to_string())
                .collect();
            // The spill in flight's object: its key is known by its tag only until the job has read its records.
            let spilling = g.cold.job.as_ref().and_then(|j| j.key.as_deref());
            listed
                .into_iter()
                .map(|m| (m.location.to_string(), m.last_modified.timestamp(), m.location))
                // Objects younger than the grace may be a spill of another server sharing the bucket prefix (or
                // a clock skew): kept.
                .filter(|(key, modified, _)| {
                    !live.contains(key.as_str())
                        && !spilling.is_some_and(|t| key.ends_with(t))
                        && *modified <= cutoff
                })
                .map(|(_, _, path)| path)
                .collect()
        };
        let n = orphans.len() as u64;
        for path in orphans {
            ctx.objects.delete_listed(&path, LATER).await;
            crate::offload::metrics()
                .segments_swept
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// Unix seconds `grace` ago.
fn chrono_now_minus(grace: Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now - grace.as_secs() as i64
}

/// Fetches and verifies segment `e` of `prio` (see `SegmentObjects::fetch`).
async fn fetch(
    ctx: &ColdCtx,
    what: &str,
    prio: u8,
    e: &ManifestEntry,
) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    // Records are decoded as they are put back (fjall keeps them as they are).
    ctx.objects.fetch(what, prio, e, |_| true).await
}
