//! Cold backlog segments of the memory backend (`cold-segments` on a memory store), so that a memory queue can
//! hold far more than RAM.
//!
//! A partition of such a store keeps its state with a window of `cold-after-depth` resident ready items (see the
//! `paging` module of the state). Ready items beyond the window are *paged*: the store keeps each as a compact
//! encoded record in a per-priority ordered map (the analogue of fjall's paged records on disk). Once a priority
//! holds more than `cold-after-depth` such records plus a segment's worth, a contiguous id range of them is
//! encoded as one segment (`crate::offload::segment`: compressed, checksummed), written to object storage by a
//! background task, and then dropped from RAM; the partition keeps a manifest entry (a few dozen bytes) in its
//! place. Segment items stay counted in the state's paging counters: for the state they are paged items like any
//! other.
//!
//! Segments come back as records before the head reaches them: in the background once fewer than
//! `cold-prefetch-items` records stand before a priority's next segment, and on the caller's path when a read
//! (page-in, snapshot) would otherwise pass over a segment. A read never passes over one, which is what keeps FIFO
//! order within a priority exact. A delete by id and an expiry sweep do not bring segments back: they take their
//! items out of each segment they reach, one at a time, and write the rest back as a new segment, so RAM never
//! holds more than one of them. A list (browsing) reads the segments its page reaches one at a time, takes the
//! page's items and drops the rest, leaving the segments where they are.
//!
//! Nothing of a memory store survives a restart, segments included: every object under the store's own prefix
//! (`{object-store prefix}{store name}/memory/`) is an orphan at the next start, and the store deletes them all
//! when it opens. Two servers must therefore never share that prefix.
//!
//! Object storage down: spills fail and are retried after a pause, the records stay in RAM (which grows; the
//! failure is logged), produce and lease go on. A lease that needs a segment that cannot be fetched, or whose
//! checksum does not match, fails as unavailable (454 on the wire) naming the segment, and its items stay queued.
//! Such a segment is not fetched again before a retry pause that doubles at every failure (see
//! `segment_io::FetchPauses`): meanwhile whatever needs it gets the last failure at once, without a request.
//!
//! A spill in flight (its object being written) survives the changes that do not touch its records: a delete or
//! an expiry of other items, produce, lease. One whose records a delete, an expiry or a clear removes is abandoned
//! and its object deleted, so that no removed item comes back from it. Only a clear, a destroy and a produce
//! outrunning object storage (`ColdPartition::throttle`) wait for it: a delete, an expiry, a lease or a snapshot
//! that needs a segment fetches it while the upload goes on (`ColdPartition::finish_load`).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::error::{ItemError, StorageError, StorageErrorKind};
use lessor_core::storage::{
    CopiedSnapshot, LifecycleOutcome, LifecyclePolicy, Partition, PartitionSnapshot, RetryOp, RetryOutcome,
};
use lessor_core::time::{SharedClock, Ts};
use lessor_core::types::{
    ClearRequest, DedupRecord, Item, ItemId, NewItem, PartitionCounts, PartitionStats, MAX_PRIORITY,
};
use object_store::path::Path as ObjPath;

use crate::offload::segment::{self, ManifestEntry};
use crate::offload::segment_io::{self, random, FetchPauses, SegmentObjects};
use crate::registry::ColdSettings;
use crate::state::paging::PRIORITIES;
use crate::state::{PageRead, PartitionState};

/// Time between two steps of a partition's cold ticker.
const TICK: Duration = Duration::from_secs(1);
/// Time between two steps while a spill or load is in flight (a deep backlog spills one segment per object write).
const BUSY_TICK: Duration = Duration::from_millis(20);
/// After a failed spill or load, no new one starts for this long (object storage down: no busy retry loop).
const FAILURE_BACKOFF: Duration = Duration::from_secs(10);
/// Segments' worth of records a priority may hold in RAM beyond `cold-after-depth` before producers wait for the
/// spills (see [`ColdPartition::throttle`]): room for the segment being written and a few more, so a producer
/// only waits when it outruns object storage, not at every segment boundary.
const THROTTLE_SEGMENTS: u64 = 4;
/// Most spills one produce waits for (it stores its items whatever happens: the wait only slows it).
const THROTTLE_STEPS: usize = 4;
/// Most paged items one expiry sweep expires per lifecycle call.
const SWEEP_LIMIT: usize = 4096;

/// The object store and settings of a memory store's cold segments, shared by its partitions.
pub(crate) struct ColdCtx {
    objects: SegmentObjects,
    settings: ColdSettings,
    /// `{object-store prefix}{store name}/`: segment keys are `{base}memory/segments/...`.
    base: String,
    /// Every object of this store is under this prefix (`{base}memory`); what is there at open is an orphan.
    root: String,
    /// What the retry pauses of segments that could not be fetched are timed by (see [`FetchPauses`]).
    clock: SharedClock,
    /// Partition numbers for segment keys: a queue deleted and created again gets a new one, so deleting the old
    /// one's segments never touches the new one's.
    next_pid: AtomicU64,
    /// Tests: every call spills or loads what is due and waits for it.
    pub(crate) eager: AtomicBool,
    /// Segments written, loaded, and failed to load by this store (tests).
    pub(crate) written: AtomicU64,
    pub(crate) loaded: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Spills whose object was written but not committed (a change removed some of their records meanwhile), so
    /// that the upload was wasted (tests).
    pub(crate) abandoned: AtomicU64,
    /// Spills a produce waited for (producers faster than object storage; see `ColdPartition::throttle`).
    pub(crate) throttled: AtomicU64,
    /// Tests: how many of the next segment rewrites (a delete's or an expiry's write-back, see
    /// `ColdPartition::take_from_segment`) fail as an unreachable object store would fail their PUT, after their
    /// segment was fetched.
    pub(crate) fail_rewrites: AtomicU64,
    /// Tests: while true, a spill waits before it writes its object, as if the upload took that long (see
    /// `MemoryStore::hold_cold_spills`).
    pub(crate) hold: tokio::sync::watch::Sender<bool>,
    /// Tests: the spills that reached that wait.
    pub(crate) held: tokio::sync::watch::Sender<u64>,
}

impl ColdCtx {
    /// Builds the client for `settings`' object store; `store_name` goes into every key; `clock` times the retry
    /// pauses of segments that could not be fetched.
    pub(crate) fn new(
        settings: ColdSettings,
        store_name: &str,
        clock: SharedClock,
    ) -> Result<ColdCtx, StorageError> {
        let objects = SegmentObjects::new(crate::offload::client(&settings.object_store)?);
        let base = format!("{}{}/", settings.object_store.prefix, store_name);
        let root = format!("{base}memory");
        Ok(ColdCtx {
            objects,
            settings,
            base,
            root,
            clock,
            next_pid: AtomicU64::new(1),
            eager: AtomicBool::new(false),
            written: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            fail_rewrites: AtomicU64::new(0),
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

    /// Deletes every object under the store's prefix: the segments of a previous run of this store, which nothing
    /// of this run can name. Returns how many were deleted.
    pub(crate) async fn sweep_all(&self) -> Result<u64, StorageError> {
        let listed = self
            .objects
            .list("cold segments of a previous run", &self.root)
            .await?;
        let mut n = 0;
        for m in listed {
            self.objects.delete_listed(&m.location, LATER).await;
            n += 1;
            crate::offload::metrics()
                .segments_swept
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(n)
    }

    /// The directory of the partition's segment keys, as `segment::object_key` builds them under `base`.
    fn dir(&self, queue: &str, partition: u32) -> String {
        segment::dir(&self.base, "memory", queue, partition)
    }

    /// Deletes the segment objects of partition number `pid` of `queue`/`partition` (a destroyed partition's).
    async fn delete_partition(&self, queue: &str, partition: u32, pid: u64) {
        self.objects
            .delete_partition(&self.dir(queue, partition), pid, LATER)
            .await;
    }

    async fn put(&self, what: &str, key: &str, body: Vec<u8>) -> Result<(), StorageError> {
        self.objects.put(what, key, body).await
    }

    async fn delete(&self, key: &str) {
        self.objects.delete(key, LATER).await;
    }
}

/// What deletes an object whose deletion failed.
const LATER: &str = "the next start deletes it";

/// One partition of a memory store with cold segments.
pub struct ColdPartition {
    ctx: Arc<ColdCtx>,
    queue: String,
    part_no: u32,
    /// This partition's number in segment keys.
    pid: u64,
    /// Set by a destroy: the ticker stops and no spill starts.
    gone: AtomicBool,
    /// Segments whose last fetch failed, not fetched again before their pause ends.
    pauses: FetchPauses,
    /// An async lock: a lease that needs a segment holds it while the segment is fetched (the queue task is the
    /// only caller, so nothing else waits behind it but the ticker).
    inner: tokio::sync::Mutex<Inner>,
}

impl std::fmt::Debug for ColdPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdPartition")
            .field("queue", &self.queue)
            .field("partition", &self.part_no)
            .finish_non_exhaustive()
    }
}

/// What the lock of a [`ColdPartition`] guards.
struct Inner {
    state: PartitionState,
    /// Paged items held in RAM, per priority, by id: encoded records ([`encode_record`]).
    recs: [BTreeMap<u64, Box<[u8]>>; PRIORITIES],
    /// Manifest entries by (priority, first id).
    segs: BTreeMap<(u8, u64), ManifestEntry>,
    /// Bumped by every change that removes records other than from the head (delete, expiry, clear): a prefetch
    /// check's mark (`ahead_ok`) taken before it is stale. (A spill in flight is not judged by it: see
    /// [`Job::doomed`].)
    gen: u64,
    /// No spill or load starts before this (set after a failure).
    backoff_until: Option<Instant>,
    /// The spill or load in flight.
    job: Option<Job>,
    /// Per priority: the (paged-from id, generation, next segment's first id) at which the last prefetch check found
    /// enough records ahead of that segment; while none changes, the check is not repeated.
    ahead_ok: [Option<(u64, u64, u64)>; PRIORITIES],
}

impl Inner {
    /// The lowest segment of `prio` holding ids at or above `from`.
    fn next_seg(&self, prio: u8, from: u64) -> Option<&ManifestEntry> {
        self.segs
            .range((prio, 0)..=(prio, u64::MAX))
            .map(|(_, e)| e)
            .find(|e| e.last >= from)
    }

    /// Items and payload bytes in segments.
    fn seg_totals(&self) -> (u64, u64) {
        self.segs
            .values()
            .fold((0, 0), |(n, b), e| (n + e.count, b + e.bytes))
    }

    /// Records of `prio` with ids in `lo..hi`, counted up to `cap`.
    fn count_between(&self, prio: u8, lo: u64, hi: u64, cap: usize) -> usize {
        if lo >= hi {
            return 0;
        }
        self.recs[usize::from(prio)].range(lo..hi).take(cap).count()
    }

    /// Moves the items the state spilled since the last call into the records.
    fn absorb(&mut self) {
        for it in self.state.take_spilled() {
            self.recs[usize::from(it.priority.min(MAX_PRIORITY))]
                .insert(it.id.0, encode_record(&it).into_boxed_slice());
        }
    }

    /// Takes the records of `prio` with `ids` out and decodes them.
    fn take_records(&mut self, prio: u8, ids: &[u64], what: &str) -> Result<Vec<Item>, StorageError> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(r) = self.recs[usize::from(prio)].remove(&id) {
                out.push(decode_record(id, &r, what)?);
            }
        }
        Ok(out)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A partition dropped with a spill in flight: stop it rather than let it write an object nobody names
        // (one already sent is deleted by the destroy's listing or at the next start).
        if let Some(job) = self.job.take() {
            job.task.abort();
        }
    }
}

/// Background cold work in flight.
struct Job {
    /// A load: the key of the segment it fetches (its failure counts as a failed segment load and pauses it).
    load: Option<String>,
    /// A spill: what its segment holds.
    spill: Option<SpillOf>,
    /// Set by a change that removes records this spill holds (a delete of one of them, an expiry of its priority
    /// reaching its deadlines, a clear): it is abandoned when it ends and its object deleted, so no removed item
    /// comes back from it. Only such a change: every delete and expiry used to abandon the spill in flight (a
    /// generation bump), whatever it removed, so under steady expiries or deletes of other items a spill's upload
    /// was wasted and redone, and might never land (`memory_cold::a_spill_in_flight_survives_a_delete_and_an_expiry_of_other_items`).
    doomed: bool,
    task: tokio::task::JoinHandle<Result<Done, StorageError>>,
}

/// The records a spill in flight took: every record of `prio` in RAM with an id in `first..=last` when it started
/// (a spill takes consecutive records, and records that arrive later have higher ids).
#[derive(Clone, Copy)]
struct SpillOf {
    prio: u8,
    first: u64,
    last: u64,
    /// Their earliest expiry deadline.
    min_expire: i64,
}

impl Inner {
    /// Marks the spill in flight doomed when `hit` says it holds a record this change removes (see [`Job::doomed`]).
    fn doom_spill_if(&mut self, hit: impl FnOnce(&SpillOf, &BTreeMap<u64, Box<[u8]>>) -> bool) {
        if let Some(job) = self.job.as_mut() {
            if let Some(s) = &job.spill {
                if hit(s, &self.recs[usize::from(s.prio)]) {
                    job.doomed = true;
                }
            }
        }
    }
}

/// What a finished job hands back to be committed under the lock.
enum Done {
    /// The object of a new segment is written: keep its entry, drop the records.
    Spilled {
        prio: u8,
        entry: ManifestEntry,
        ids: Vec<u64>,
    },
    /// A segment is fetched and verified: put its records back, drop its entry.
    Loaded {
        prio: u8,
        entry: ManifestEntry,
        records: Vec<(u64, Vec<u8>)>,
    },
}

impl ColdPartition {
    /// A new, empty partition of `queue`; starts its ticker.
    pub(crate) fn create(ctx: Arc<ColdCtx>, queue: &str, part_no: u32) -> Arc<ColdPartition> {
        let window = usize::try_from(ctx.settings.after_depth).unwrap_or(usize::MAX);
        let floor = ItemId::floor_for(part_no).0;
        let pid = ctx.next_pid.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(ColdPartition {
            ctx,
            queue: queue.to_string(),
            part_no,
            pid,
            gone: AtomicBool::new(false),
            pauses: FetchPauses::default(),
            inner: tokio::sync::Mutex::new(Inner {
                // Nothing to persist: only the spilled items are handed over, to be kept as records.
                state: PartitionState::new(floor)
                    .without_changes()
                    .handing_off_spills()
                    .with_window(window),
                recs: std::array::from_fn(|_| BTreeMap::new()),
                segs: BTreeMap::new(),
                gen: 0,
                backoff_until: None,
                job: None,
                ahead_ok: [None; PRIORITIES],
            }),
        });
        start_ticker(&p);
        p
    }

    fn what(&self) -> String {
        format!("partition {} of queue '{}' (memory)", self.part_no, self.queue)
    }

    fn eager(&self) -> bool {
        self.ctx.eager.load(Ordering::Relaxed)
    }

    /// Ends the partition's cold work and deletes its segments (a destroy).
    pub(crate) async fn destroy(&self) {
        self.gone.store(true, Ordering::Release);
        let mut g = self.inner.lock().await;
        if let Some(job) = g.job.take() {
            // A load writes nothing and is stopped. A spill is waited for, not aborted: its PUT may already be on
            // the wire, and an aborted request the server still completes would land after the listing below and
            // stay in the bucket until the next start (it is bounded by the client's request and retry timeouts).
            if job.load.is_some() {
                job.task.abort();
            }
            let _ = job.task.await;
        }
        g.segs.clear();
        drop(g);
        self.ctx
            .delete_partition(&self.queue, self.part_no, self.pid)
            .await;
    }

    /// The object keys of this partition's segments (tests).
    #[doc(hidden)]
    pub async fn segment_keys(&self) -> Vec<String> {
        self.inner
            .lock()
            .await
            .segs
            .values()
            .map(|e| e.key.clone())
            .collect()
    }

    /// Paged items held as records in RAM, and ready items resident (tests: RAM stays bounded).
    #[doc(hidden)]
    pub async fn ram_counts(&self) -> (u64, u64) {
        let g = self.inner.lock().await;
        let recs = g.recs.iter().map(|r| r.len() as u64).sum();
        (recs, g.state.resident_ready())
    }

    /// Whether a spill is in flight, its task not finished yet (tests: what happens meanwhile happens across it).
    #[doc(hidden)]
    pub async fn spill_in_flight(&self) -> bool {
        self.inner
            .lock()
            .await
            .job
            .as_ref()
            .is_some_and(|j| j.spill.is_some() && !j.task.is_finished())
    }

    /// Keeps RAM bounded when producers outrun object storage: while a priority holds more than
    /// `cold-after-depth` plus [`THROTTLE_SEGMENTS`] segments' worth of records in RAM, the produce that got it
    /// there waits for the spill in flight and starts the next one, so producers are slowed to the pace of the
    /// spills (one segment at a time per partition). Not while spills are failing (object storage down, the
    /// backoff): then the queue keeps taking items and RAM grows, as documented. A priority that cannot spill (an
    /// offloaded payload or an item with a source id at its boundary) does not hold producers up: no spill starts.
    async fn throttle(&self, g: &mut Inner) -> Result<(), StorageError> {
        let set = &self.ctx.settings;
        let limit = set.after_depth + THROTTLE_SEGMENTS * u64::from(set.segment_items);
        for _ in 0..THROTTLE_STEPS {
            let over = g.recs.iter().any(|r| r.len() as u64 > limit);
            if !over
                || self.gone.load(Ordering::Acquire)
                || g.backoff_until.is_some_and(|t| Instant::now() < t)
            {
                return Ok(());
            }
            if g.job.is_none() {
                self.start(g);
                if g.job.is_none() {
                    return Ok(());
                }
            }
            self.ctx.throttled.fetch_add(1, Ordering::Relaxed);
            self.finish_job(g, true).await?;
        }
        Ok(())
    }

    /// Before an operation: commits a finished job (in eager mode, does all the cold work due).
    async fn pre(&self, g: &mut Inner) -> Result<(), StorageError> {
        if self.eager() {
            return self.step(g).await;
        }
        if g.job.as_ref().is_some_and(|j| j.task.is_finished()) {
            self.finish_job(g, false).await?;
        }
        Ok(())
    }

    /// After an operation: keeps what it spilled as records (in eager mode, spills them at once).
    async fn post(&self, g: &mut Inner) -> Result<(), StorageError> {
        g.absorb();
        if self.eager() {
            self.step(g).await?;
        }
        Ok(())
    }

    /// One step of background cold work: commits a finished job, then starts a load when a priority's head is
    /// within the prefetch distance of its next segment, else a spill when a priority has a segment's worth of
    /// records beyond the cold depth.
    async fn step(&self, g: &mut Inner) -> Result<(), StorageError> {
        self.finish_job(g, false).await?;
        if g.job.is_some()
            || self.gone.load(Ordering::Acquire)
            || g.backoff_until.is_some_and(|t| Instant::now() < t)
        {
            return Ok(());
        }
        self.start(g);
        if self.eager() {
            self.finish_job(g, true).await?;
        }
        Ok(())
    }

    /// Commits the job in flight if it is done (or waits for it when `wait`).
    async fn finish_job(&self, g: &mut Inner, wait: bool) -> Result<(), StorageError> {
        if !wait && g.job.as_ref().is_none_or(|j| !j.task.is_finished()) {
            return Ok(());
        }
        let Some(job) = g.job.take() else {
            return Ok(());
        };
        let (doomed, load) = (job.doomed, job.load);
        let done = match job.task.await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                // A spill whose object could not be written keeps its records in RAM; a failed background load is
                // retried later, or by the lease that needs it, which gets the error. The segment is paused as a
                // failed fetch on the caller's path pauses it.
                if let Some(key) = load {
                    self.count_failure();
                    self.pause(g, &key, &e);
                }
                tracing::warn!(queue = %self.queue, partition = self.part_no, error = %e, "cold segment work failed; retried later");
                g.backoff_until = Some(Instant::now() + FAILURE_BACKOFF);
                return Ok(());
            }
            Err(e) if e.is_cancelled() => return Ok(()),
            Err(e) => return Err(StorageError::other(format!("cold segment task failed: {e}"))),
        };
        match done {
            Done::Loaded { prio, entry, records } => {
                if g.segs
                    .get(&(prio, entry.first))
                    .is_some_and(|x| x.key == entry.key)
                {
                    self.commit_load(g, prio, entry, records);
                }
            }
            Done::Spilled { prio, entry, ids } => {
                let pi = usize::from(prio);
                let paged = g.state.paged();
                // Its records are all still there and none of them was paged in: nothing removed is in the segment.
                // The `ids` test alone misses a change that commits the spill before it takes the records (a clear
                // waits for it), which `doomed` covers.
                let intact = !doomed
                    && paged.count[pi] > 0
                    && paged.from[pi] <= entry.first
                    && ids.iter().all(|id| g.recs[pi].contains_key(id));
                if !intact {
                    self.ctx.abandoned.fetch_add(1, Ordering::Relaxed);
                    let ctx = self.ctx.clone();
                    tokio::spawn(async move { ctx.delete(&entry.key).await });
                    return Ok(());
                }
                // Inline, not in `heavy`: freeing the records on a worker that then leaves the runtime for
                // `block_in_place` left their memory unreclaimed (RSS 330-370 MB instead of 76 MB at 5M items).
                for id in &ids {
                    g.recs[pi].remove(id);
                }
                g.segs.insert((prio, entry.first), entry);
                self.ctx.written.fetch_add(1, Ordering::Relaxed);
                crate::offload::metrics()
                    .segments_written
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn count_failure(&self) {
        self.ctx.failed.fetch_add(1, Ordering::Relaxed);
        crate::offload::metrics()
            .segment_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Starts or lengthens the retry pause of segment `key` after a failed fetch; returns it.
    fn pause(&self, g: &Inner, key: &str, err: &StorageError) -> Duration {
        self.pauses.failed(key, self.ctx.clock.now(), err, |k| {
            g.segs.values().any(|e| e.key == k)
        })
    }

    /// Fetches and verifies segment `e` of `prio` for a caller that needs it now (`why`: for the log), unless the
    /// segment is in its retry pause: then the last failure is answered at once, with no request. A failed fetch is
    /// counted, logged at error level with the pause it starts, and pauses the segment.
    async fn fetch_now(
        &self,
        g: &Inner,
        prio: u8,
        e: &ManifestEntry,
        why: &str,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        if let Some(err) = self.pauses.check(&e.key, self.ctx.clock.now()) {
            tracing::debug!(queue = %self.queue, partition = self.part_no, segment = %e.key, "cold segment in its retry pause; not fetched {why}");
            return Err(err);
        }
        match fetch(&self.ctx, &self.what(), prio, e).await {
            Ok(records) => {
                self.pauses.succeeded(&e.key);
                Ok(records)
            }
            Err(err) => {
                self.count_failure();
                let pause = self.pause(g, &e.key, &err);
                tracing::error!(queue = %self.queue, partition = self.part_no, segment = %e.key, error = %err, retry_in_s = pause.as_secs_f64(), "cold segment could not be loaded {why}; not fetched again before the pause");
                Err(err)
            }
        }
    }

    fn commit_load(&self, g: &mut Inner, prio: u8, e: ManifestEntry, records: Vec<(u64, Vec<u8>)>) {
        let map = &mut g.recs[usize::from(prio)];
        heavy(|| {
            for (id, r) in records {
                map.insert(id, r.into_boxed_slice());
            }
        });
        g.segs.remove(&(prio, e.first));
        self.ctx.loaded.fetch_add(1, Ordering::Relaxed);
        crate::offload::metrics()
            .segments_loaded
            .fetch_add(1, Ordering::Relaxed);
        let ctx = self.ctx.clone();
        tokio::spawn(async move { ctx.delete(&e.key).await });
    }

    /// Starts a load or a spill (see [`ColdPartition::step`]).
    fn start(&self, g: &mut Inner) {
        let set = &self.ctx.settings;
        // Prefetch. A segment in its retry pause is passed over (a lease that needs it gets the pause's error).
        let now = self.ctx.clock.now();
        for p in 0..PRIORITIES as u8 {
            let Some(e) = g.next_seg(p, 0).cloned() else {
                continue;
            };
            if self.pauses.paused(&e.key, now) {
                continue;
            }
            let from = g.state.paged().from[usize::from(p)];
            let mark = (from, g.gen, e.first);
            if g.ahead_ok[usize::from(p)] == Some(mark) {
                continue;
            }
            let cap = usize::try_from(set.prefetch_items).unwrap_or(usize::MAX);
            if g.count_between(p, from, e.first, cap) >= cap {
                g.ahead_ok[usize::from(p)] = Some(mark);
                continue;
            }
            let (ctx, what, key) = (self.ctx.clone(), self.what(), e.key.clone());
            let task = tokio::spawn(async move {
                let records = fetch(&ctx, &what, p, &e).await?;
                Ok(Done::Loaded {
                    prio: p,
                    entry: e,
                    records,
                })
            });
            g.job = Some(Job {
                load: Some(key),
                spill: None,
                doomed: false,
                task,
            });
            return;
        }
        // Spill. Paged items with a source id keep their entry in the resident source-id index, which a clear must
        // be able to remove: while any is paged, records stay in RAM (as fjall keeps them on disk).
        if g.state.paged().with_source > 0 {
            return;
        }
        for p in 0..PRIORITIES as u8 {
            let pi = usize::from(p);
            let last = g
                .segs
                .range((p, 0)..=(p, u64::MAX))
                .next_back()
                .map(|(_, e)| e.last);
            let (start, skip) = match last {
                // Later segments continue right after the last one.
                Some(l) => (l + 1, 0),
                None => (g.state.paged().from[pi], set.after_depth),
            };
            // Cheap test first: the map's length bounds what the walk below can find.
            if (g.recs[pi].len() as u64) < skip + u64::from(set.segment_items) {
                continue;
            }
            let (cap_n, cap_b) = (set.segment_items as usize, set.segment_bytes);
            let mut records: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut bytes = 0usize;
            let mut entry = ManifestEntry::empty();
            let map = &g.recs[pi];
            heavy(|| {
                for (&id, r) in map
                    .range(start..)
                    .skip(usize::try_from(skip).unwrap_or(usize::MAX))
                {
                    let Some((expire, payload)) = peek(r) else { break };
                    // An offloaded payload's reference stays in the partition, where the payload sweeper reads it.
                    if crate::tiers::offloaded_len(payload).is_some() {
                        break;
                    }
                    bytes += r.len();
                    entry.add(id, expire, payload.len() as u64);
                    records.push((id, r.to_vec()));
                    if records.len() >= cap_n || bytes >= cap_b {
                        break;
                    }
                }
            });
            // Only a full segment is spilled.
            if records.len() < cap_n && bytes < cap_b {
                continue;
            }
            // Normalised by `ObjPath::from` (as every manifest holds its keys); requests encode the key once more
            // (`offload::listed`), and the sweeper compares listings with that form.
            entry.key = ObjPath::from(segment::object_key(
                &self.ctx.base,
                "memory",
                &self.queue,
                self.part_no,
                p,
                entry.first,
                &segment::key_tag(self.pid, random()),
            ))
            .to_string();
            let spill = SpillOf {
                prio: p,
                first: entry.first,
                last: entry.last,
                min_expire: entry.min_expire,
            };
            let (ctx, what) = (self.ctx.clone(), self.what());
            let task = tokio::spawn(async move {
                let ids: Vec<u64> = records.iter().map(|r| r.0).collect();
                let (body, crc) = tokio::task::spawn_blocking(move || {
                    let refs: Vec<(u64, &[u8])> = records.iter().map(|(i, r)| (*i, r.as_slice())).collect();
                    segment::encode(p, &refs)
                })
                .await
                .map_err(|e| StorageError::other(format!("segment encoding failed: {e}")))?
                .map_err(|e| StorageError::other(format!("segment encoding failed: {e}")))?;
                entry.crc = crc;
                ctx.wait_if_held().await;
                ctx.put(&what, &entry.key, body).await?;
                Ok(Done::Spilled { prio: p, entry, ids })
            });
            g.job = Some(Job {
                load: None,
                spill: Some(spill),
                doomed: false,
                task,
            });
            return;
        }
    }

    /// Before a segment is fetched on the caller's path: waits for a background load in flight and commits it (it
    /// may be fetching the same segment). A spill in flight is not waited for: its upload can take up to the object
    /// store's timeout, and the caller holds the partition's lock, so every produce and lease of the partition, and
    /// the queue's task that makes these calls one after the other, waited that long
    /// (`memory_cold::a_delete_a_lease_or_a_snapshot_reaching_a_segment_does_not_wait_for_the_spill_in_flight`).
    /// Nothing needs it: a spill's segment comes after every segment of its priority (`start` begins it right after
    /// the priority's last segment, or with none there; only a spill adds a segment, and a delete's or an expiry's
    /// rewrite keeps a segment within its old range), so the segment fetched holds none of the spill's records and
    /// putting its records back or rewriting it touches none of them; the spill's records stay in RAM until its
    /// commit, which still abandons it if any of them was removed meanwhile ([`Job::doomed`], the `intact` test of
    /// [`ColdPartition::finish_job`]).
    async fn finish_load(&self, g: &mut Inner) -> Result<(), StorageError> {
        if g.job.as_ref().is_some_and(|j| j.load.is_some()) {
            self.finish_job(g, true).await?;
        }
        Ok(())
    }

    /// Fetches, verifies and commits segment `e` of `prio` now, on the caller's path. A missing or damaged segment
    /// is an `Unavailable` error naming it.
    async fn load_now(&self, g: &mut Inner, prio: u8, e: ManifestEntry) -> Result<(), StorageError> {
        self.finish_load(g).await?;
        if g.segs.get(&(prio, e.first)).is_none_or(|x| x.key != e.key) {
            return Ok(());
        }
        let records = self.fetch_now(g, prio, &e, "for a read").await?;
        self.commit_load(g, prio, e, records);
        Ok(())
    }

    /// Takes the records `take` picks (at most `limit`) out of segment `e` of `prio`, on the caller's path, and
    /// returns them decoded; the records that stay go back to object storage as a new segment in its place (the
    /// old object deleted, none left when nothing stays). A delete by id or an expiry sweep thus holds one segment
    /// in RAM at a time, however many segments it reaches: loaded back instead, every segment it touched stayed in
    /// RAM until spilled again, and those below a segment left in place never were (a spill continues after the
    /// last segment). When the new object cannot be written the segment is loaded into the records as before and
    /// nothing is returned: the caller finds the records there, and the operation goes on at the cost of RAM
    /// (`memory_cold::a_delete_whose_segment_rewrite_fails_loses_and_doubles_nothing` and its expiry twin).
    async fn take_from_segment(
        &self,
        g: &mut Inner,
        prio: u8,
        e: ManifestEntry,
        limit: usize,
        mut take: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<Vec<Item>, StorageError> {
        self.finish_load(g).await?;
        if g.segs.get(&(prio, e.first)).is_none_or(|x| x.key != e.key) {
            return Ok(Vec::new());
        }
        let what = self.what();
        let records = self.fetch_now(g, prio, &e, "for a delete or an expiry").await?;
        let (mut taken, mut kept) = (Vec::new(), Vec::new());
        for (id, r) in records {
            if taken.len() < limit && take(id, &r) {
                taken.push((id, r));
            } else {
                kept.push((id, r));
            }
        }
        // A delete's id may fall in the segment's range without being in it (another priority's item).
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        // Decoded before anything changes: a damaged record fails the call with the segment as it was.
        let items = taken
            .iter()
            .map(|(id, r)| decode_record(*id, r, &what))
            .collect::<Result<Vec<_>, _>>()?;
        if kept.is_empty() {
            g.segs.remove(&(prio, e.first));
            let ctx = self.ctx.clone();
            tokio::spawn(async move { ctx.delete(&e.key).await });
            return Ok(items);
        }
        let mut entry = ManifestEntry::empty();
        for (id, r) in &kept {
            // `fetch` verified that every record splits.
            let (expire, payload) = peek(r).unwrap_or((i64::MIN, &[]));
            entry.add(*id, expire, payload.len() as u64);
        }
        // A new key (a new tag): an object is never overwritten, so a failed write leaves the old one intact.
        entry.key = ObjPath::from(segment::object_key(
            &self.ctx.base,
            "memory",
            &self.queue,
            self.part_no,
            prio,
            entry.first,
            &segment::key_tag(self.pid, random()),
        ))
        .to_string();
        let encoded = heavy(|| {
            let refs: Vec<(u64, &[u8])> = kept.iter().map(|(i, r)| (*i, r.as_slice())).collect();
            segment::encode(prio, &refs)
        });
        let injected = self
            .ctx
            .fail_rewrites
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        let written = match encoded {
            Ok(_) if injected => Err(StorageError::unavailable(format!(
                "{what}: cold segment '{}': injected write failure",
                entry.key
            ))),
            Ok((body, crc)) => {
                entry.crc = crc;
                self.ctx.put(&what, &entry.key, body).await
            }
            Err(err) => Err(StorageError::other(format!("segment encoding failed: {err}"))),
        };
        if let Err(err) = written {
            tracing::warn!(queue = %self.queue, partition = self.part_no, segment = %e.key, error = %err, "cold segment could not be rewritten; its records are kept in RAM");
            kept.append(&mut taken);
            kept.sort_unstable_by_key(|r| r.0);
            self.commit_load(g, prio, e, kept);
            return Ok(Vec::new());
        }
        g.segs.remove(&(prio, e.first));
        g.segs.insert((prio, entry.first), entry);
        let ctx = self.ctx.clone();
        tokio::spawn(async move { ctx.delete(&e.key).await });
        Ok(items)
    }

    /// Makes sure a read of up to `n` records of `prio` from id `from` on cannot pass over a segment: loads each
    /// segment with fewer than `n` records before it.
    async fn guard(&self, g: &mut Inner, prio: u8, from: u64, n: usize) -> Result<(), StorageError> {
        loop {
            let Some(e) = g.next_seg(prio, from).cloned() else {
                return Ok(());
            };
            if g.count_between(prio, from, e.first, n) >= n {
                return Ok(());
            }
            self.load_now(g, prio, e).await?;
        }
    }

    /// Merges into a list's page `out` the items of the segments of `prio` it reaches from id `from` on: each
    /// segment starting below the page's `ceiling` is fetched and verified, its first `limit` items from `from` are
    /// decoded into the page, and the rest of it is dropped before the next one is fetched. The segments stay in
    /// object storage and in the manifest: loaded back instead, as before, a dashboard paging through a backlog of
    /// 97 segments took the partition from 50 records in RAM to 1,990, which stayed there until leased
    /// (`memory_cold::a_list_paging_through_segments_keeps_them_cold`). A list therefore holds at most one segment
    /// beyond its page, and reads each segment its page reaches at every call. A segment that cannot be read fails
    /// the list as a lease fails (`Unavailable`, naming it): a page without its items would skip them.
    #[allow(clippy::too_many_arguments)]
    async fn list_segments(
        &self,
        g: &Inner,
        prio: u8,
        from: u64,
        limit: usize,
        max_bytes: u64,
        out: &mut Vec<Item>,
        ceiling: &mut Option<u64>,
    ) -> Result<(), StorageError> {
        let what = self.what();
        let what = what.as_str();
        segment_io::list_segments(
            |at| g.next_seg(prio, at),
            |e| self.fetch_now(g, prio, e, "for a list"),
            |id, r| decode_record(id, r, what),
            from,
            limit,
            max_bytes,
            out,
            ceiling,
        )
        .await
    }

    /// Loads every segment (a snapshot copies every item). A spill in flight is neither waited for nor committed
    /// (see [`ColdPartition::finish_load`]): its records are still in RAM, where the copy finds them, and its
    /// segment, once committed, is not in the copy's way. Committing it first, as before, waited for its upload under
    /// the partition's lock and then fetched back the segment just written.
    async fn guard_all(&self, g: &mut Inner) -> Result<(), StorageError> {
        while let Some((&(p, _), e)) = g.segs.iter().next() {
            let e = e.clone();
            self.load_now(g, p, e).await?;
        }
        Ok(())
    }

    /// Pages items in around an operation that leases up to `want` items: what the lease cannot do without, then
    /// the read-ahead of every priority whose resident head ran low. Both read RAM records; only a segment in the
    /// way of what the lease needs is loaded here, on the caller's path.
    async fn page_in(&self, g: &mut Inner, want: usize) -> Result<(), StorageError> {
        if g.state.paged().is_empty() {
            return Ok(());
        }
        for r in g.state.page_plan(want, true) {
            self.read_in(g, r, true).await?;
        }
        for r in g.state.page_plan(0, false) {
            self.read_in(g, r, false).await?;
        }
        Ok(())
    }

    /// Gives the state the records `r` asks for. `urgent`: a segment in the way is loaded first; otherwise the read
    /// stops before it (the background prefetch brings it).
    async fn read_in(&self, g: &mut Inner, r: PageRead, urgent: bool) -> Result<(), StorageError> {
        if urgent {
            self.guard(g, r.prio, r.from, r.n).await?;
        }
        let seg = g.next_seg(r.prio, r.from).map(|e| e.first);
        let hi = seg.unwrap_or(u64::MAX);
        let ids: Vec<u64> = if r.from >= hi {
            Vec::new()
        } else {
            g.recs[usize::from(r.prio)]
                .range(r.from..hi)
                .take(r.n)
                .map(|(&id, _)| id)
                .collect()
        };
        if ids.is_empty() && seg.is_some() {
            return Ok(());
        }
        let exhausted = ids.len() < r.n && seg.is_none();
        let items = g.take_records(r.prio, &ids, &self.what())?;
        g.state.page_in(r, items, exhausted);
        Ok(())
    }

    /// The paged items among `ids` that are held as records (taken out when `take`), skipping resident ones.
    fn find_records(
        g: &mut Inner,
        ids: &[ItemId],
        take: bool,
        what: &str,
    ) -> Result<Vec<Item>, StorageError> {
        let mut out = Vec::new();
        if g.state.paged().is_empty() {
            return Ok(out);
        }
        for id in ids {
            if g.state.contains_live(id.0) {
                continue;
            }
            for p in 0..PRIORITIES {
                let paged = g.state.paged();
                if paged.count[p] == 0 || id.0 < paged.from[p] {
                    continue;
                }
                let found = if take {
                    g.recs[p].remove(&id.0)
                } else {
                    g.recs[p].get(&id.0).cloned()
                };
                if let Some(r) = found {
                    out.push(decode_record(id.0, &r, what)?);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Runs an operation on leased items named by `ids`: paged ones are looked up first, so the operation refuses
    /// them as not leased (not as missing).
    async fn probed<T>(
        &self,
        ids: Vec<ItemId>,
        op: impl FnOnce(&mut PartitionState) -> T,
    ) -> Result<T, StorageError> {
        let mut g = self.inner.lock().await;
        self.pre(&mut g).await?;
        let found: HashSet<u64> = Self::find_records(&mut g, &ids, false, &self.what())?
            .iter()
            .map(|it| it.id.0)
            .collect();
        let probed = !found.is_empty();
        if probed {
            g.state.set_probe(found);
        }
        let out = op(&mut g.state);
        if probed {
            g.state.set_probe(HashSet::new());
        }
        self.post(&mut g).await?;
        Ok(out)
    }

    /// Runs an operation that only adds or reads items.
    async fn simple<T>(&self, op: impl FnOnce(&mut PartitionState) -> T) -> Result<T, StorageError> {
        let mut g = self.inner.lock().await;
        self.pre(&mut g).await?;
        let out = op(&mut g.state);
        self.post(&mut g).await?;
        Ok(out)
    }

    /// Expires paged items whose deadline passed (records and the segments holding due items); returns how many
    /// died and whether more are due.
    async fn sweep_paged(
        &self,
        g: &mut Inner,
        now: Ts,
        policy: LifecyclePolicy,
    ) -> Result<(u64, bool), StorageError> {
        let (mut dead, mut more) = (0, false);
        let what = self.what();
        for p in g.state.paged_expiry_due(now) {
            g.gen += 1;
            // A spill in flight holding records due now is abandoned when it ends (marked before any segment is
            // fetched, as in `delete`); one of another priority, or holding none due, goes on. Neither is waited for.
            g.doom_spill_if(|s, _| s.prio == p && s.min_expire <= now.0);
            let due_segs: Vec<ManifestEntry> = g
                .segs
                .range((p, 0)..=(p, u64::MAX))
                .filter(|(_, e)| e.min_expire <= now.0)
                .map(|(_, e)| e.clone())
                .collect();
            // Segments first, one at a time (see `take_from_segment`): one whose rest could not be written back
            // is loaded into the records instead, which the walk below then reads. One that cannot be read (logged
            // and counted there) postpones the expiry of the segments from it on to `retry`, and only that: failing
            // the call instead stopped the whole lifecycle (expired leases held, schedules not run) for as long as
            // the segment stayed unreadable, while its deadline, passed, had the engine call again at once.
            let mut budget = SWEEP_LIMIT;
            let mut retry = None;
            for e in due_segs {
                if budget == 0 {
                    break;
                }
                let items = match self
                    .take_from_segment(g, p, e, budget, |_, r| peek(r).map_or(i64::MIN, |x| x.0) <= now.0)
                    .await
                {
                    Ok(items) => items,
                    Err(_) => {
                        retry = Some(now.add(FAILURE_BACKOFF).0);
                        break;
                    }
                };
                budget -= items.len();
                dead += g.state.drop_paged(items, Some(policy)).0;
            }
            // Used up by the segments: more may be due in them or in the records.
            let mut complete = budget > 0;
            let ordered = g.state.paged().ordered[usize::from(p)];
            let mut due = Vec::new();
            let mut rest_min = i64::MAX;
            for (&id, r) in &g.recs[usize::from(p)] {
                let exp = peek(r).map_or(i64::MIN, |x| x.0);
                if exp > now.0 {
                    rest_min = rest_min.min(exp);
                    if ordered {
                        break;
                    }
                } else if due.len() < budget {
                    due.push(id);
                } else {
                    complete = false;
                    break;
                }
            }
            let items = g.take_records(p, &due, &what)?;
            dead += g.state.drop_paged(items, Some(policy)).0;
            if complete {
                // Segments left hold items that are not due yet: their bound counts too.
                let seg_min = g
                    .segs
                    .range((p, 0)..=(p, u64::MAX))
                    .map(|(_, e)| e.min_expire)
                    .min()
                    .unwrap_or(i64::MAX);
                // Due segments left unread come due again at the retry (their items expire that much late).
                let seg_min = retry.map_or(seg_min, |r| seg_min.max(r));
                g.state.set_paged_min_expire(p, rest_min.min(seg_min));
            } else {
                more = true;
            }
        }
        Ok((dead, more))
    }
}

/// Starts the task that drives partition `p`'s cold work: every [`TICK`] (every [`BUSY_TICK`] while a job is in
/// flight) it commits a finished spill or load and starts the next one. The queue's own calls only poll, and a
/// producer-only queue makes no lifecycle calls. Ends when the partition is destroyed or dropped.
fn start_ticker(p: &Arc<ColdPartition>) {
    let weak: Weak<ColdPartition> = Arc::downgrade(p);
    tokio::spawn(async move {
        let mut pause = TICK;
        loop {
            tokio::time::sleep(pause).await;
            let Some(p) = weak.upgrade() else { return };
            if p.gone.load(Ordering::Acquire) {
                return;
            }
            let mut g = p.inner.lock().await;
            pause = match p.step(&mut g).await {
                Ok(()) if g.job.is_some() => BUSY_TICK,
                Ok(()) => TICK,
                Err(e) => {
                    tracing::warn!(queue = %p.queue, partition = p.part_no, error = %e, "cold segment step failed");
                    TICK
                }
            };
        }
    });
}

/// Runs CPU-bound work of some milliseconds under the partition's lock (copying a segment's records out of the
/// map, or putting loaded ones in: 10-20 ms per 100,000 records on the 2-core test machine) without stalling the other tasks of the
/// worker: on a multi-thread runtime (the server's) the worker hands them to the others first. A current-thread
/// runtime (tests) has nowhere to hand them, and runs it inline.
fn heavy<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Fetches and verifies segment `e` of `prio`, and that every record decodes.
async fn fetch(
    ctx: &ColdCtx,
    what: &str,
    prio: u8,
    e: &ManifestEntry,
) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    ctx.objects.fetch(what, prio, e, |r| peek(r).is_some()).await
}

/// Version byte of a record.
const REC_V1: u8 = 1;
const F_LEASED: u8 = 1;
const F_DEAD: u8 = 2;
/// Fixed part of a record: version, flags, priority, four timestamps, two counters.
const REC_FIXED: usize = 3 + 4 * 8 + 2 * 4;

/// Encodes a paged item as a record: fixed fields, four length-prefixed strings, then the payload. Integers are
/// little-endian. Records live in RAM and in segments of this run only, so the format need not outlive a release.
fn encode_record(it: &Item) -> Vec<u8> {
    let strings = [&it.source_id, &it.reference, &it.encoding, &it.kind];
    let mut v =
        Vec::with_capacity(REC_FIXED + strings.iter().map(|s| 4 + s.len()).sum::<usize>() + it.payload.len());
    v.push(REC_V1);
    v.push((u8::from(it.is_leased) * F_LEASED) | (u8::from(it.dead) * F_DEAD));
    v.push(it.priority);
    for t in [
        it.expire_deadline,
        it.lease_deadline,
        it.enqueue_at,
        it.created_at,
    ] {
        v.extend_from_slice(&t.0.to_le_bytes());
    }
    v.extend_from_slice(&it.attempts.to_le_bytes());
    v.extend_from_slice(&it.max_attempts.to_le_bytes());
    for s in strings {
        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
        v.extend_from_slice(s.as_bytes());
    }
    v.extend_from_slice(&it.payload);
    v
}

/// A record's fields, borrowed: the fixed part, the four strings, the payload.
type Fields<'a> = (&'a [u8], [&'a [u8]; 4], &'a [u8]);

/// Splits a record into its fields without copying.
fn split(r: &[u8]) -> Option<Fields<'_>> {
    if r.len() < REC_FIXED || r[0] != REC_V1 {
        return None;
    }
    let (fixed, mut rest) = r.split_at(REC_FIXED);
    let mut strings: [&[u8]; 4] = [&[]; 4];
    for s in &mut strings {
        let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        *s = rest.get(4..4 + n)?;
        rest = &rest[4 + n..];
    }
    Some((fixed, strings, rest))
}

/// The expiry deadline and payload of a record (`None`: damaged).
fn peek(r: &[u8]) -> Option<(i64, &[u8])> {
    let (fixed, _, payload) = split(r)?;
    Some((i64::from_le_bytes(fixed[3..11].try_into().ok()?), payload))
}

/// Decodes the record of item `id`.
fn decode_record(id: u64, r: &[u8], what: &str) -> Result<Item, StorageError> {
    let damaged = || {
        StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "{what}: the paged record of item {id} is damaged ({} bytes)",
                r.len()
            ),
        )
    };
    let (f, s, payload) = split(r).ok_or_else(damaged)?;
    let i64_at = |at: usize| i64::from_le_bytes(f[at..at + 8].try_into().unwrap_or_default());
    let u32_at = |at: usize| u32::from_le_bytes(f[at..at + 4].try_into().unwrap_or_default());
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| damaged());
    Ok(Item {
        id: ItemId(id),
        is_leased: f[1] & F_LEASED != 0,
        dead: f[1] & F_DEAD != 0,
        priority: f[2],
        expire_deadline: Ts(i64_at(3)),
        lease_deadline: Ts(i64_at(11)),
        enqueue_at: Ts(i64_at(19)),
        created_at: Ts(i64_at(27)),
        attempts: u32_at(35),
        max_attempts: u32_at(39),
        source_id: text(s[0])?,
        reference: text(s[1])?,
        encoding: text(s[2])?,
        kind: text(s[3])?,
        payload: Bytes::copy_from_slice(payload),
    })
}

#[async_trait]
impl Partition for ColdPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        let mut g = self.inner.lock().await;
        self.pre(&mut g).await?;
        let out = g.state.produce(items).0;
        self.post(&mut g).await?;
        self.throttle(&mut g).await?;
        Ok(out)
    }

    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        Ok(self.lease_within(n, lease_deadline, u64::MAX).await?.0)
    }

    async fn lease_within(
        &self,
        n: usize,
        lease_deadline: Ts,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let mut g = self.inner.lock().await;
        self.pre(&mut g).await?;
        // A segment that cannot be loaded stops the page-in at its priority (the reads are planned highest priority
        // first), and the state's lease stops there too: what comes before it in serving order (higher priorities,
        // the priority's resident head) is served, and the lease fails only when nothing is. Failing whenever a
        // lease asked for more than that took the partition out of service, higher priorities included, for as
        // long as a low priority's segment was unreadable.
        let unloaded = self.page_in(&mut g, n).await.err();
        let (out, _, mut capped) = g.state.lease_within(n, lease_deadline, max_bytes);
        if let Some(e) = unloaded {
            if out.is_empty() {
                return Err(e);
            }
            // Nothing more can be served until the segment loads: not "ask again in this pass".
            capped = false;
        }
        // Read ahead for the next lease (RAM records only; segments come back in the background).
        self.page_in(&mut g, 0).await?;
        self.post(&mut g).await?;
        Ok((out, capped))
    }

    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        let ids = requests.iter().flatten().copied().collect();
        self.probed(ids, |s| s.complete(requests).0).await
    }

    async fn extend(
        &self,
        requests: Vec<(Vec<ItemId>, Ts)>,
    ) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        let ids = requests.iter().flat_map(|r| r.0.iter()).copied().collect();
        self.probed(ids, |s| s.extend(requests).0).await
    }

    async fn dedup_records(&self, now: Ts) -> Result<Vec<DedupRecord>, StorageError> {
        Ok(self.inner.lock().await.state.dedup_records(now))
    }

    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        let ids = requests.iter().flatten().map(|o| o.id).collect();
        self.probed(ids, |s| s.retry(requests, policy).0).await
    }

    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        let mut g = self.inner.lock().await;
        self.step(&mut g).await?;
        self.page_in(&mut g, 0).await?;
        let (dead, more) = self.sweep_paged(&mut g, now, policy).await?;
        let (mut o, _) = g.state.lifecycle(now, policy, limit);
        o.dead += dead;
        o.more |= more;
        self.post(&mut g).await?;
        Ok(o)
    }

    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError> {
        Ok(self.inner.lock().await.state.dead_items(limit))
    }

    async fn dead_items_within(
        &self,
        limit: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        Ok(self.inner.lock().await.state.dead_items_within(limit, max_bytes))
    }

    async fn dead_count(&self) -> Result<u64, StorageError> {
        Ok(self.inner.lock().await.state.dead_count())
    }

    async fn remove_dead(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        self.inner.lock().await.state.remove_dead(ids);
        Ok(())
    }

    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        Ok(self.inner.lock().await.state.next_deadline())
    }

    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        Ok(self.inner.lock().await.state.counts())
    }

    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError> {
        let g = self.inner.lock().await;
        let mut st = g.state.stats(now);
        // The state counts its resident items in memory; paged items are records in RAM or items in segments.
        let (cold_items, cold_bytes) = g.seg_totals();
        let paged = g.state.paging_counts();
        st.tiers.memory.items += paged.paged_ready.saturating_sub(cold_items);
        st.tiers.memory.bytes += paged.paged_bytes.saturating_sub(cold_bytes);
        st.tiers.object.items += cold_items;
        st.tiers.object.bytes += cold_bytes;
        Ok(st)
    }

    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        Ok(self.list_within(pivot, limit, scheduled, u64::MAX).await?.0)
    }

    /// Resident items and paged records are in RAM already (a resident item is a slice of its buffer, not a copy):
    /// the page is merged as before and cut at the bound. The segments a page reaches are read, not loaded (see
    /// [`ColdPartition::list_segments`]).
    async fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let g = self.inner.lock().await;
        if scheduled || g.state.paged().is_empty() {
            return Ok(g.state.list_within(pivot, limit, scheduled, max_bytes));
        }
        let mut out = g.state.list(pivot, limit, scheduled);
        let mut ceiling = None;
        lessor_core::storage::keep_page(&mut out, limit, max_bytes, &mut ceiling);
        // Paged items are ready items too: merge the first `limit` of each paged priority at or after the pivot,
        // records and segment items alike. `keep_page` keeps the page's prefix in id order and sets the ceiling (the
        // first id it had to leave out), below which everything read so far is the page: what is merged after it
        // can only push items out, never bring one back, so the page is the one a single merge of all would give.
        let from = pivot.map_or(0, |p| p.0);
        let what = self.what();
        for p in 0..PRIORITIES as u8 {
            let paged = g.state.paged();
            if paged.count[usize::from(p)] == 0 {
                continue;
            }
            let start = paged.from[usize::from(p)].max(from);
            for (&id, r) in g.recs[usize::from(p)].range(start..).take(limit) {
                if ceiling.is_some_and(|c| id >= c) {
                    break;
                }
                out.push(decode_record(id, r, &what)?);
            }
            lessor_core::storage::keep_page(&mut out, limit, max_bytes, &mut ceiling);
            self.list_segments(&g, p, start, limit, max_bytes, &mut out, &mut ceiling)
                .await?;
        }
        Ok((out, ceiling.is_some()))
    }

    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.simple(|s| s.import(items).0).await
    }

    async fn import_dedup(&self, records: Vec<DedupRecord>) -> Result<(), StorageError> {
        self.simple(|s| {
            s.import_dedup(records);
        })
        .await
    }

    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        let mut g = self.inner.lock().await;
        self.pre(&mut g).await?;
        g.gen += 1;
        // Only ids that may be paged are looked for in segments: an item in RAM (ready, leased) is answered from
        // there. A segment's id range holds the ids of other priorities too (ids are handed out in blocks per
        // priority), so looking for every id fetched segments for nothing, and failed the delete of a leased item
        // when such a segment could not be read.
        let cold: Vec<u64> = ids
            .iter()
            .map(|id| id.0)
            .filter(|&id| !g.state.contains_live(id) && g.state.paged().may_hold(id))
            .collect();
        // A spill in flight holding one of them is abandoned when it ends (it is not waited for: see `finish_load`):
        // marked before any segment is fetched, as a change committing it before the records are taken would
        // otherwise keep it. One holding none of them goes on.
        g.doom_spill_if(|s, recs| {
            cold.iter()
                .any(|&id| (s.first..=s.last).contains(&id) && recs.contains_key(&id))
        });
        let hit: Vec<(u8, ManifestEntry)> = g
            .segs
            .iter()
            .filter(|(_, e)| cold.iter().any(|&id| id >= e.first && id <= e.last))
            .map(|(&(p, _), e)| (p, e.clone()))
            .collect();
        if !hit.is_empty() {
            // One segment at a time: its named items are dropped and the rest goes back to object storage before
            // the next is fetched (see `take_from_segment`).
            let named: HashSet<u64> = cold.into_iter().collect();
            for (p, e) in hit {
                let items = self
                    .take_from_segment(&mut g, p, e, usize::MAX, |id, _| named.contains(&id))
                    .await?;
                g.state.drop_paged(items, None);
            }
        }
        g.state.delete(ids.clone());
        let items = Self::find_records(&mut g, &ids, true, &self.what())?;
        g.state.drop_paged(items, None);
        self.post(&mut g).await
    }

    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError> {
        let mut g = self.inner.lock().await;
        g.state.clear(request);
        if request.queue {
            // A spill in flight is abandoned (its object deleted) and a load put back, then dropped with the rest;
            // aborting instead could leave an object written but named by nothing.
            g.gen += 1;
            g.doom_spill_if(|_, _| true);
            self.finish_job(&mut g, true).await?;
            let gone: Vec<ManifestEntry> = std::mem::take(&mut g.segs).into_values().collect();
            if !gone.is_empty() {
                let ctx = self.ctx.clone();
                tokio::spawn(async move {
                    for e in gone {
                        ctx.delete(&e.key).await;
                    }
                });
            }
            let what = self.what();
            for p in 0..PRIORITIES as u8 {
                let recs = std::mem::take(&mut g.recs[usize::from(p)]);
                let items = recs
                    .iter()
                    .map(|(&id, r)| decode_record(id, r, &what))
                    .collect::<Result<Vec<_>, _>>()?;
                g.state.drop_paged(items, None);
                // Items that were in segments are gone with them.
                g.state.clear_paged(p);
            }
        }
        self.post(&mut g).await
    }

    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        self.copy(true).await
    }

    async fn reference_snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        // A spill stops at the first record whose payload is an offloaded reference, so no segment holds one: the
        // payload sweeper reads what is in RAM and leaves the segments in object storage.
        self.copy(false).await
    }

    async fn close(&self) {}
}

impl ColdPartition {
    /// A copy of the partition's items under the lock: one instant of it; with `whole`, segments are loaded back
    /// first so that their items are in it too.
    async fn copy(&self, whole: bool) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        let mut g = self.inner.lock().await;
        if whole {
            self.guard_all(&mut g).await?;
        }
        let mut items = g.state.all_items();
        let what = self.what();
        for map in &g.recs {
            for (&id, r) in map {
                items.push(decode_record(id, r, &what)?);
            }
        }
        items.sort_unstable_by_key(|it| it.id);
        Ok(Box::new(CopiedSnapshot::new(items)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_damage() {
        let it = Item {
            id: ItemId(42),
            source_id: "src".into(),
            expire_deadline: Ts(77),
            enqueue_at: Ts(5),
            created_at: Ts(6),
            attempts: 3,
            max_attempts: 9,
            reference: "ref".into(),
            encoding: "enc".into(),
            kind: "k".into(),
            payload: Bytes::from_static(b"payload"),
            priority: 4,
            ..Default::default()
        };
        let r = encode_record(&it);
        assert_eq!(decode_record(42, &r, "p").unwrap(), it);
        assert_eq!(peek(&r), Some((77, &b"payload"[..])));
        // A string length running past the end is damage, not a short read.
        let mut bad = r.clone();
        bad[REC_FIXED] = 0xff;
        assert_eq!(
            decode_record(42, &bad, "p").unwrap_err().kind,
            StorageErrorKind::Corrupt
        );
        assert!(peek(&r[..REC_FIXED - 1]).is_none());
    }
}
