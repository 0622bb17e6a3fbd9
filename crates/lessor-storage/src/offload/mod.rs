//! Large payloads in S3-compatible object storage (claim check) and payload compression, as a wrapper around any
//! partition store.
//!
//! The registry wraps a partition store in an [`OffloadStore`] when its settings name `payload-offload` (an entry
//! of the top-level `object-storage` list) or a `compression`. The wrapper works above the partition, so memory,
//! fjall and PostgreSQL get the same behaviour without knowing about it:
//!
//! - **produce / import**: a payload longer than the threshold is written, compressed, to an object with a fresh
//!   random key (`{prefix}{store}/{queue}/{partition}/{32 hex}`, the queue named by a digest when the key would be
//!   too long for S3: see [`keys`]) *before* the inner produce; the item keeps a small
//!   reference (see [`frame`]: key, length, CRC-32). Shorter payloads are compressed inline when that shrinks them.
//!   An object write that fails fails the whole produce with [`StorageErrorKind::Unavailable`] (454) and nothing
//!   is stored.
//! - **lease / list / dead_items / snapshot**: references are resolved back to the bytes, fetched concurrently
//!   (at most [`FETCH_CONCURRENCY`] at once) and checked against length and checksum: clients never see a
//!   reference. A leased item whose object cannot be fetched is put back (a requeue at the tail, keeping the
//!   attempt the lease counted) and reported by id in the log and the `fetch_errors` metric; when no item of the
//!   lease could be served the lease fails with `Unavailable` (454).
//! - **deletion**: an object is deleted only *after* the inner partition removed its item: complete (the keys of
//!   leased items are remembered from the lease), remove_dead, delete (keys looked up before), clear (a snapshot
//!   before and after: exactly the keys that went away), destroy (everything under the partition's prefix; objects
//!   that could not be deleted fail the destroy with `PayloadUnavailable`, to be retried, since the sweeper never
//!   judges a partition that is gone). While a snapshot is open (a backup, a migration) deletions are held until
//!   the last one closes, a destroy's too; the sweeper does not run then either.
//!   Items that die without a dead-letter queue (lifecycle, retry) leave their object to the sweeper.
//! - **sweeper**: a task per store lists the objects under the store's prefix and deletes those older than the
//!   grace period that no item of an open partition references (read from an inner snapshot) and that no produce
//!   in flight here is writing. The grace period covers produces in flight on other servers sharing a database.
//!   An operator runs one at once with `POST /v1/offload.sweep` ([`PartitionStore::sweep_objects`]).
//! - **stats**: the wrapper adds nothing: every backend counts items whose stored payload is a reference in the
//!   object tier of its [`lessor_core::types::TierStats`] (see [`crate::tiers`]), from its own running counters.
//!
//! Every object is referenced by at most one item: dead-letter moves, rebalances and imports go through the
//! resolved bytes and write new objects, so deleting an item's object never takes another item's payload.

pub mod frame;
pub mod keys;
pub mod segment;
#[cfg(feature = "s3")]
pub(crate) mod segment_io;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use lessor_core::error::{ItemError, StorageError, StorageErrorKind};
use lessor_core::storage::{
    item_bytes, LifecycleOutcome, LifecyclePolicy, Notice, Partition, PartitionSnapshot, PartitionStore,
    RetryAction, RetryOp, RetryOutcome,
};
use lessor_core::time::Ts;
use lessor_core::types::{
    ClearRequest, DedupRecord, Item, ItemId, NewItem, PartitionCounts, PartitionStats, SweepReport,
};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

pub use crate::registry::{
    Compression, ObjectStoreConfig, OffloadSettings, DEFAULT_GRACE, DEFAULT_SWEEP_INTERVAL, DEFAULT_THRESHOLD,
};
use frame::{ObjectRef, Stored};

/// Objects fetched or written at once by one call.
pub const FETCH_CONCURRENCY: usize = 8;

/// The client of an object store.
///
/// A request times out after 30 s (connecting after 3 s) and is retried once, within 10 s: the partition's calls
/// run on its queue's task, so a store that is down or slow holds that queue (not others) up for a bounded time
/// before the request is answered 454.
///
/// # Errors
/// [`StorageErrorKind::Config`] for settings the client refuses.
pub fn client(cfg: &ObjectStoreConfig) -> Result<Arc<dyn ObjectStore>, StorageError> {
    cfg.build_client()
}

impl ObjectStoreConfig {
    /// Where the partition store named `store` keeps its objects in this bucket (see [`object_root`]).
    pub fn root_of(&self, store: &str) -> String {
        object_root(&self.prefix, store)
    }

    /// See [`client`].
    fn build_client(&self) -> Result<Arc<dyn ObjectStore>, StorageError> {
        let region = if self.region.is_empty() {
            "us-east-1"
        } else {
            &self.region
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(region)
            .with_virtual_hosted_style_request(!self.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(30))
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_allow_http(self.endpoint.starts_with("http://")),
            )
            .with_retry(RetryConfig {
                max_retries: 1,
                retry_timeout: Duration::from_secs(10),
                ..Default::default()
            });
        if !self.endpoint.is_empty() {
            b = b.with_endpoint(&self.endpoint);
        }
        if let Some(k) = &self.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &self.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        let store = b.build().map_err(|e| {
            StorageError::new(
                StorageErrorKind::Config,
                format!("object-storage '{}': {e}", self.name),
            )
        })?;
        Ok(Arc::new(store))
    }
}

/// Figures of every offloading store of this process, for `/metrics`.
#[derive(Debug, Default)]
pub struct OffloadMetrics {
    /// Objects written (one per offloaded payload).
    pub objects_written: AtomicU64,
    /// Objects deleted after their item was gone.
    pub objects_deleted: AtomicU64,
    /// Objects the sweeper deleted because no item referenced them.
    pub orphans_swept: AtomicU64,
    /// Payload bytes written to object storage (before compression).
    pub bytes_offloaded: AtomicU64,
    /// Object bytes written (after compression).
    pub object_bytes_written: AtomicU64,
    /// Payloads that could not be read: object missing.
    pub fetch_missing: AtomicU64,
    /// Payloads that could not be read: checksum, length or decompression failed.
    pub fetch_corrupt: AtomicU64,
    /// Payloads that could not be read: object storage unreachable or failing.
    pub fetch_unavailable: AtomicU64,
    /// Cold backlog segments written (`cold-segments`).
    pub segments_written: AtomicU64,
    /// Cold backlog segments loaded back.
    pub segments_loaded: AtomicU64,
    /// Orphaned segment objects the segment sweeper deleted.
    pub segments_swept: AtomicU64,
    /// Segment loads that failed (missing, corrupt, object storage unavailable); the log names each.
    pub segment_failures: AtomicU64,
    /// Segment fetches not made because the segment's last fetch failed and its retry pause has not passed yet
    /// (answered with that failure instead; see `segment_io::FetchPauses`).
    pub segment_fetches_paused: AtomicU64,
    /// Object-storage request latency: counts per bucket of [`LATENCY_BUCKETS`] (cumulative on export).
    pub latency_counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of object-storage request latencies, in microseconds.
    pub latency_sum_us: AtomicU64,
}

/// Upper bounds (seconds) of the object-storage latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

impl OffloadMetrics {
    pub(crate) fn observe(&self, started: Instant) {
        let s = started.elapsed().as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_counts[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// The process-wide offload figures (the server's `/metrics` reads them).
pub fn metrics() -> &'static OffloadMetrics {
    static M: std::sync::OnceLock<OffloadMetrics> = std::sync::OnceLock::new();
    M.get_or_init(OffloadMetrics::default)
}

/// Most object deletions held back for open snapshots (see `Shared::snapshots`; 100-200 bytes each, a key): the
/// objects released beyond them are left to the sweeper, which deletes objects no item references once no snapshot
/// is open.
const MAX_HELD_DELETES: usize = 100_000;

/// Most object keys of dead items an [`OffloadPartition`] remembers (see `OffloadPartition::remember_dead`).
const MAX_DEAD_KEYS: usize = 100_000;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Objects listed under the store's prefix.
    pub listed: u64,
    /// Objects deleted because nothing referenced them.
    pub swept: u64,
    /// Unreferenced-looking objects kept because their partition is not open here.
    pub skipped: u64,
}

struct Shared {
    settings: OffloadSettings,
    objects: Option<Arc<dyn ObjectStore>>,
    /// `{object-store prefix}{store name}/`.
    root: String,
    /// Keys being written by a produce or import that has not returned yet: never swept.
    in_flight: Mutex<HashSet<String>>,
    /// The inner partitions open in this process, by key directory (`{root}{queue}/{partition}/`) in its listed
    /// form (see [`listed`]), as the sweeper finds it in a listing.
    open: Mutex<HashMap<String, Weak<dyn Partition>>>,
    /// Snapshots open in this process, and the object deletions held back while any is: a snapshot (an online
    /// backup, a migration) reads items as they were when it was taken, so the object of an item completed since
    /// must stay until it has been read. Without this, a completion during a backup failed the backup. The held
    /// objects are named by path, as listed (see [`listed`]): a destroy holds the listed objects of a directory.
    snapshots: Mutex<(usize, Vec<ObjPath>)>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("settings", &self.settings)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain sets behind, still consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The path of the object that stored key `key` names, as a listing returns it (`to_string`).
///
/// Keys are stored as they were built, and every request turns them into a path with `ObjPath::from`, which
/// percent-encodes what object_store avoids in a key (`#`, `%`, `[`, `*`, a part that is `.` or `..`, ...): a queue
/// may be named so. A listing names the objects by their encoded path, so whatever compares listed objects with
/// stored keys compares paths, and deletes a listed object by its listed path (`ObjPath::from` of an encoded path
/// encodes its `%` again, naming no object).
pub(crate) fn listed(key: &str) -> ObjPath {
    ObjPath::from(key)
}

/// The listed form of key directory `dir` (ending in `/`): the listed parent of every key built under it.
fn listed_dir(dir: &str) -> String {
    format!("{}/", listed(dir))
}

fn unavailable(what: String, e: object_store::Error) -> StorageError {
    StorageError::unavailable(format!("object storage: {what}: {e}")).with_source(e)
}

impl Shared {
    /// Neither offload nor compression: payloads are stored as given (only those that look like a frame are
    /// framed), and frames written under earlier settings are still read.
    fn passthrough(&self) -> bool {
        self.objects.is_none() && self.settings.compression == Compression::None
    }

    fn objects(&self) -> Result<&Arc<dyn ObjectStore>, StorageError> {
        self.objects.as_ref().ok_or_else(|| {
            StorageError::new(
                StorageErrorKind::Corrupt,
                "an item references an object but this store has no payload-offload configured",
            )
        })
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), StorageError> {
        let objects = self.objects()?;
        let n = body.len() as u64;
        let started = Instant::now();
        // A failed write leaves the partition as it was: the produce fails (454) without taking the partition out
        // of service, so produces of small items go on.
        let r = objects
            .put(&listed(key), PutPayload::from(body))
            .await
            .map_err(|e| {
                StorageError::new(
                    StorageErrorKind::PayloadUnavailable,
                    format!("object storage: writing '{key}': {e}"),
                )
                .with_source(e)
            });
        metrics().observe(started);
        r?;
        metrics().objects_written.fetch_add(1, Ordering::Relaxed);
        metrics().object_bytes_written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes the objects of stored keys, best effort: a failure leaves an orphan for the sweeper.
    async fn delete_keys(self: &Arc<Self>, keys: Vec<String>) {
        self.delete_paths(keys.iter().map(|k| listed(k)).collect()).await;
    }

    /// Deletes objects by path (as listed), best effort: a failure leaves an orphan for the sweeper. Returns how
    /// many could not be deleted.
    async fn delete_paths(self: &Arc<Self>, paths: Vec<ObjPath>) -> usize {
        let Some(objects) = self.objects.clone() else {
            return 0;
        };
        if paths.is_empty() {
            return 0;
        }
        let failed = AtomicU64::new(0);
        stream::iter(paths)
            .for_each_concurrent(FETCH_CONCURRENCY, |path| {
                let (objects, failed) = (objects.clone(), &failed);
                async move {
                    let started = Instant::now();
                    let r = objects.delete(&path).await;
                    metrics().observe(started);
                    match r {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                            metrics().objects_deleted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(key = %path, error = %e, "object delete failed; the sweeper will retry")
                        }
                    }
                }
            })
            .await;
        failed.into_inner() as usize
    }

    /// Deletes in the background, so that a complete does not wait for object storage.
    fn delete_later(self: &Arc<Self>, keys: Vec<String>) {
        if keys.is_empty() || self.objects.is_none() {
            return;
        }
        {
            let mut s = lock(&self.snapshots);
            if s.0 > 0 {
                // A backup of a deep partition, paced, keeps its snapshot open for hours, while completions go on
                // across the store: without a bound the held keys grew with every completion meanwhile.
                let room = MAX_HELD_DELETES.saturating_sub(s.1.len());
                if keys.len() > room && room > 0 {
                    tracing::info!(
                        held = MAX_HELD_DELETES,
                        "object deletions held for an open snapshot reached their bound; later ones are left to the \
                         sweeper, which deletes unreferenced objects once no snapshot is open"
                    );
                }
                s.1.extend(keys.iter().take(room).map(|k| listed(k)));
                return;
            }
        }
        let me = self.clone();
        tokio::spawn(async move { me.delete_keys(keys).await });
    }

    /// A snapshot opens: deletions wait until every open snapshot is done.
    fn snapshot_opened(&self) {
        lock(&self.snapshots).0 += 1;
    }

    /// A snapshot is done: the last one lets the held deletions go (or the sweeper, without a runtime).
    fn snapshot_closed(self: &Arc<Self>) {
        let held = {
            let mut s = lock(&self.snapshots);
            s.0 = s.0.saturating_sub(1);
            if s.0 > 0 {
                return;
            }
            std::mem::take(&mut s.1)
        };
        if held.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            rt.spawn(async move {
                me.delete_paths(held).await;
            });
        }
    }

    /// The original payload of one stored item.
    async fn resolve(&self, id: ItemId, stored: &Bytes) -> Result<Bytes, StorageError> {
        let r = match frame::decode(stored) {
            Ok(Stored::Inline(b)) => return Ok(b),
            Ok(Stored::Object(r)) => r,
            Err(e) => {
                metrics().fetch_corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(item = %id, error = %e, "stored payload unreadable");
                return Err(StorageError::new(
                    StorageErrorKind::Corrupt,
                    format!("payload of item '{id}' is unreadable: {e}"),
                ));
            }
        };
        let objects = self.objects()?;
        let started = Instant::now();
        let got = match objects.get(&listed(&r.key)).await {
            Ok(g) => g.bytes().await,
            Err(e) => Err(e),
        };
        metrics().observe(started);
        match got {
            Ok(body) => {
                // Checksumming (and decompressing) megabytes is CPU work: off the async workers for large bodies.
                let decoded = if body.len() >= 1 << 20 {
                    let r2 = r.clone();
                    tokio::task::spawn_blocking(move || r2.decode_body(&body))
                        .await
                        .unwrap_or_else(|e| Err(format!("decoding task failed: {e}")))
                } else {
                    r.decode_body(&body)
                };
                decoded.map_err(|e| {
                    metrics().fetch_corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(item = %id, key = r.key, error = %e, "offloaded payload corrupt");
                    StorageError::new(
                        StorageErrorKind::Corrupt,
                        format!("payload of item '{id}' (object '{}') is corrupt: {e}", r.key),
                    )
                })
            }
            Err(object_store::Error::NotFound { .. }) => {
                metrics().fetch_missing.fetch_add(1, Ordering::Relaxed);
                tracing::error!(item = %id, key = r.key, "offloaded payload missing from object storage");
                Err(StorageError::new(
                    StorageErrorKind::Corrupt,
                    format!(
                        "payload of item '{id}' is missing: object '{}' does not exist",
                        r.key
                    ),
                ))
            }
            Err(e) => {
                metrics().fetch_unavailable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(item = %id, key = r.key, error = %e, "offloaded payload cannot be fetched");
                Err(unavailable(format!("reading the payload of item '{id}'"), e))
            }
        }
    }

    /// Resolves every item's payload in place; the first failure fails the whole call.
    async fn resolve_all(&self, mut items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        if !items.iter().any(|it| frame::is_framed(&it.payload)) {
            return Ok(items);
        }
        let pairs = items.iter().map(|it| (it.id, it.payload.clone())).collect();
        let payloads = self.resolve_many(pairs).await;
        for (it, p) in items.iter_mut().zip(payloads) {
            it.payload = p?;
        }
        Ok(items)
    }

    /// Resolves payloads concurrently (at most [`FETCH_CONCURRENCY`] at once), in input order.
    async fn resolve_many(&self, pairs: Vec<(ItemId, Bytes)>) -> Vec<Result<Bytes, StorageError>> {
        stream::iter(pairs)
            .map(|(id, stored)| async move { self.resolve(id, &stored).await })
            .buffered(FETCH_CONCURRENCY)
            .collect()
            .await
    }

    fn new_key(&self, dir: &str) -> String {
        let mut r = [0u8; 16];
        // With no entropy source the clock and a counter still make keys unique within this process.
        if getrandom::fill(&mut r).is_err() {
            static N: AtomicU64 = AtomicU64::new(0);
            let t = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            r[..8].copy_from_slice(&t.to_le_bytes());
            r[8..].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        }
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        format!("{dir}{hex}")
    }

    /// Stored forms of `payloads`: objects written (the keys are in flight until `done` is called), the rest
    /// compressed inline. On failure every object written is deleted again and nothing is in flight.
    async fn store_payloads(
        self: &Arc<Self>,
        dir: &str,
        payloads: Vec<Bytes>,
    ) -> Result<(Vec<Bytes>, Vec<String>), StorageError> {
        let compression = self.settings.compression;
        let mut out = Vec::with_capacity(payloads.len());
        let mut uploads = Vec::new();
        for p in payloads {
            if self.objects.is_some() && p.len() > self.settings.threshold {
                let key = self.new_key(dir);
                let r = ObjectRef {
                    codec: compression,
                    len: p.len() as u64,
                    crc: crc32fast::hash(&p),
                    key: key.clone(),
                };
                out.push(r.encode());
                uploads.push((key, p));
            } else {
                out.push(frame::encode_inline(&p, compression));
            }
        }
        if uploads.is_empty() {
            return Ok((out, Vec::new()));
        }
        let keys: Vec<String> = uploads.iter().map(|(k, _)| k.clone()).collect();
        lock(&self.in_flight).extend(keys.iter().cloned());
        let results: Vec<Result<(), StorageError>> = stream::iter(uploads)
            .map(|(key, p)| async move {
                let n = p.len() as u64;
                // Compression is CPU work: off the async workers for large bodies.
                let body = if compression == Compression::None {
                    p
                } else {
                    Bytes::from(
                        tokio::task::spawn_blocking(move || compression.compress(&p))
                            .await
                            .map_err(|e| StorageError::other(format!("compressing a payload failed: {e}")))?,
                    )
                };
                self.put(&key, body).await?;
                metrics().bytes_offloaded.fetch_add(n, Ordering::Relaxed);
                Ok(())
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            self.delete_keys(keys.clone()).await;
            self.done(&keys);
            return Err(e);
        }
        Ok((out, keys))
    }

    /// The inner store answered `r` to a write of items referencing the objects `keys`: they are no longer in
    /// flight. A refusal for want of room (`Full`) stored nothing, so they are nobody's and are deleted; any other
    /// failure may have stored the items, so it leaves them to the sweeper.
    async fn written<T>(self: &Arc<Self>, keys: Vec<String>, r: &Result<T, StorageError>) {
        self.done(&keys);
        if matches!(r, Err(e) if e.kind == StorageErrorKind::Full) {
            self.delete_keys(keys).await;
        }
    }

    fn done(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let mut f = lock(&self.in_flight);
        for k in keys {
            f.remove(k);
        }
    }

    /// One pass of the sweeper (see the module documentation).
    async fn sweep(self: &Arc<Self>) -> Result<SweepOutcome, StorageError> {
        let Some(objects) = self.objects.clone() else {
            return Ok(SweepOutcome::default());
        };
        if lock(&self.snapshots).0 > 0 {
            // The objects of items completed since an open snapshot was taken are unreferenced, yet it still reads
            // them: the next round sweeps.
            return Ok(SweepOutcome::default());
        }
        // Entries of partitions closed while another holder had them (see `OffloadPartition`'s `Drop`).
        lock(&self.open).retain(|_, w| w.strong_count() > 0);
        let mut out = SweepOutcome::default();
        let cutoff = SystemTime::now()
            .checked_sub(self.settings.grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let cutoff_ms = cutoff
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let started = Instant::now();
        let listed_objects: Vec<object_store::ObjectMeta> = objects
            .list(Some(&listed(&self.root)))
            .try_collect()
            .await
            .map_err(|e| unavailable(format!("listing '{}'", self.root), e))?;
        metrics().observe(started);
        out.listed = listed_objects.len() as u64;
        // Candidates by partition directory, all in the listed form (see [`listed`]).
        let mut by_dir: HashMap<String, Vec<(String, ObjPath)>> = HashMap::new();
        {
            let in_flight = self.in_flight_listed();
            for m in listed_objects {
                let key = m.location.to_string();
                if m.last_modified.timestamp_millis() > cutoff_ms || in_flight.contains(&key) {
                    continue;
                }
                let dir = match key.rfind('/') {
                    Some(i) => key[..=i].to_string(),
                    None => continue,
                };
                by_dir.entry(dir).or_default().push((key, m.location));
            }
        }
        for (dir, candidates) in by_dir {
            let part = lock(&self.open).get(&dir).and_then(Weak::upgrade);
            let Some(part) = part else {
                out.skipped += candidates.len() as u64;
                continue;
            };
            // Taken after the in-flight check above: a produce that was in flight then has committed its item
            // by the time it left the set, so this snapshot sees the reference.
            let referenced: HashSet<String> = referenced_keys(part.as_ref())
                .await?
                .iter()
                .map(|k| listed(k).to_string())
                .collect();
            let orphans: Vec<ObjPath> = {
                let in_flight = self.in_flight_listed();
                candidates
                    .into_iter()
                    .filter(|(k, _)| !referenced.contains(k) && !in_flight.contains(k))
                    .map(|(_, path)| path)
                    .collect()
            };
            if orphans.is_empty() {
                continue;
            }
            // Checked again after the reference snapshot: a snapshot opened since the check at the top (a backup)
            // may hold an item that was completed before that reference snapshot, so looks unreferenced here while
            // the backup still has to read its object. Checking after the reference snapshot is enough: a snapshot
            // counted after this check takes its inner snapshot later still (`snapshot` counts it first), when
            // these objects were already unreferenced, and one opened and closed meanwhile has read what it read.
            // The sweep stops; a later one judges the rest.
            if lock(&self.snapshots).0 > 0 {
                tracing::debug!(
                    root = self.root,
                    "a snapshot opened during the sweep; the rest waits for a later one"
                );
                return Ok(out);
            }
            out.swept += orphans.len() as u64;
            tracing::info!(
                dir,
                count = orphans.len(),
                "sweeping unreferenced payload objects"
            );
            metrics()
                .orphans_swept
                .fetch_add(orphans.len() as u64, Ordering::Relaxed);
            self.delete_paths(orphans).await;
        }
        Ok(out)
    }

    /// The keys in flight, in their listed form.
    fn in_flight_listed(&self) -> HashSet<String> {
        lock(&self.in_flight)
            .iter()
            .map(|k| listed(k).to_string())
            .collect()
    }

    /// Deletes the payload objects of a partition's directory (the partition was destroyed): only the keys directly
    /// in it, as `new_key` makes them. A listing is recursive, and the directory of partition N of a queue named
    /// `segments` is also the start of every cold-segment key of the queue named N, when both share an entry.
    ///
    /// While a snapshot is open the objects are held like `delete_later`'s, up to the same bound: a paced backup
    /// may still be reading a snapshot of the partition taken before a rebalance drained and destroyed it. Those
    /// beyond the bound are deleted at once (the snapshot then fails to read them, as it would without holding):
    /// unlike a completion's, they cannot be left to the sweeper, which never judges the directory of a partition
    /// that is gone, so they would stay for good.
    ///
    /// # Errors
    /// [`StorageErrorKind::PayloadUnavailable`] when the directory could not be listed or an object not deleted:
    /// nothing else ever deletes them (the sweeper judges the directories of open partitions only), so the destroy
    /// fails and is retried (the queue stays defined until a delete succeeds).
    async fn delete_dir(self: &Arc<Self>, dir: &str) -> Result<(), StorageError> {
        let Some(objects) = self.objects.clone() else {
            return Ok(());
        };
        // Compared and deleted in the listed form (see [`listed`]).
        let prefix = listed_dir(dir);
        let paths: Vec<ObjPath> = objects
            .list(Some(&listed(dir)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| {
                StorageError::new(
                    StorageErrorKind::PayloadUnavailable,
                    format!("object storage: listing the objects of destroyed partition '{dir}': {e}"),
                )
                .with_source(e)
            })?;
        let paths: Vec<ObjPath> = paths
            .into_iter()
            .filter(|p| {
                p.as_ref()
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| !rest.contains('/'))
            })
            .collect();
        // Decided under the lock `snapshot` counts under, after the inner destroy: a snapshot counted later sees
        // no item of the partition, so reads none of these.
        let paths = {
            let mut s = lock(&self.snapshots);
            if s.0 > 0 {
                let room = MAX_HELD_DELETES.saturating_sub(s.1.len());
                let mut paths = paths;
                let rest = paths.split_off(room.min(paths.len()));
                s.1.extend(paths);
                if !rest.is_empty() {
                    tracing::warn!(
                        dir,
                        count = rest.len(),
                        held = MAX_HELD_DELETES,
                        "object deletions held for an open snapshot reached their bound; objects of a destroyed \
                         partition deleted at once (a snapshot still reading them fails)"
                    );
                }
                rest
            } else {
                paths
            }
        };
        match self.delete_paths(paths).await {
            0 => Ok(()),
            n => Err(StorageError::new(
                StorageErrorKind::PayloadUnavailable,
                format!(
                    "object storage: {n} objects of destroyed partition '{dir}' not deleted; delete again"
                ),
            )),
        }
    }
}

/// Every object key the items of `part` reference, read from a snapshot of the inner partition (one that leaves
/// cold segments where they are: their items never hold a reference).
async fn referenced_keys(part: &dyn Partition) -> Result<HashSet<String>, StorageError> {
    let mut snap = part.reference_snapshot().await?;
    let mut keys = HashSet::new();
    loop {
        // Stored payloads are read here, inline ones up to 5 MB each: pages bounded as a lease is.
        let page = snap
            .next_within(1000, lessor_core::types::MAX_LEASE_BYTES)
            .await?;
        if page.is_empty() {
            return Ok(keys);
        }
        keys.extend(page.iter().filter_map(|it| frame::object_key(&it.payload)));
    }
}

/// A partition store whose payloads are offloaded and/or compressed (see the module documentation).
#[derive(Debug)]
pub struct OffloadStore {
    inner: Arc<dyn PartitionStore>,
    shared: Arc<Shared>,
    sweeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Where the partition store named `store` keeps its objects under an object-storage entry's `prefix`: every object
/// below it is the store's own (its sweeper deletes what no item references), so two stores must never share one.
pub fn object_root(prefix: &str, store: &str) -> String {
    let store_dir = if store.is_empty() { "default" } else { store };
    format!("{prefix}{store_dir}/")
}

impl OffloadStore {
    /// Wraps `inner`, the partition store named `store` in the configuration. With an object store configured, a
    /// sweeper task starts (call from within a Tokio runtime).
    ///
    /// # Errors
    /// An object-store configuration the client refuses.
    pub fn new(
        inner: Arc<dyn PartitionStore>,
        store: &str,
        settings: OffloadSettings,
    ) -> Result<Arc<OffloadStore>, StorageError> {
        let objects = settings.object_store.as_ref().map(client).transpose()?;
        let prefix = settings
            .object_store
            .as_ref()
            .map(|o| o.prefix.as_str())
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            root: object_root(prefix, store),
            settings,
            objects,
            in_flight: Mutex::new(HashSet::new()),
            open: Mutex::new(HashMap::new()),
            snapshots: Mutex::new((0, Vec::new())),
        });
        let sweeper = shared.objects.as_ref().map(|_| {
            let weak = Arc::downgrade(&shared);
            let every = shared.settings.sweep_interval;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(s) = weak.upgrade() else { return };
                    match s.sweep().await {
                        Ok(o) => tracing::debug!(?o, root = s.root, "payload sweep done"),
                        Err(e) => tracing::warn!(error = %e, root = s.root, "payload sweep failed"),
                    }
                }
            })
        });
        Ok(Arc::new(OffloadStore {
            inner,
            shared,
            sweeper: Mutex::new(sweeper),
        }))
    }

    /// Runs one sweep now (tests; operators use `offload.sweep`, through [`PartitionStore::sweep_objects`]).
    ///
    /// # Errors
    /// Object storage or a partition snapshot failed; nothing was deleted on the failing partition.
    pub async fn sweep(&self) -> Result<SweepOutcome, StorageError> {
        self.shared.sweep().await
    }

    /// The key directory of a partition. A queue whose longest key (the directory and 32 hex digits, as sent)
    /// would be too long for S3 is named by its digest (see [`keys`]): the produce, the sweeper's map of open
    /// partitions and the destroy all take the directory from here, so they agree on it.
    fn dir(&self, queue: &str, partition: u32) -> String {
        let root = &self.shared.root;
        let q = keys::queue_component(queue, |q| {
            keys::sent_once(&format!("{root}{q}/{partition}/{:032x}", 0))
        });
        format!("{root}{q}/{partition}/")
    }
}

impl OffloadStore {
    /// `inner`, partition `partition` of `queue`, behind this store.
    fn wrap(&self, queue: &str, partition: u32, inner: Arc<dyn Partition>) -> Arc<dyn Partition> {
        let dir = self.dir(queue, partition);
        lock(&self.shared.open).insert(listed_dir(&dir), Arc::downgrade(&inner));
        Arc::new(OffloadPartition {
            inner,
            shared: self.shared.clone(),
            dir,
            leased: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
        })
    }

    /// Deletes the objects of destroyed partitions (after their items: an item never references a deleted object).
    async fn delete_objects(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        let mut first_err = None;
        for &p in partitions {
            let dir = self.dir(queue, p);
            lock(&self.shared.open).remove(&listed_dir(&dir));
            if let Err(e) = self.shared.delete_dir(&dir).await {
                tracing::warn!(dir, error = %e, "objects of a destroyed partition not deleted");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl PartitionStore for OffloadStore {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }

    fn max_partitions(&self) -> u32 {
        self.inner.max_partitions()
    }

    async fn create(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.inner.create(queue, partitions).await
    }

    async fn create_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        self.inner
            .create_incarnation(queue, incarnation, partitions)
            .await
    }

    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        let inner = self.inner.open(queue, partition).await?;
        Ok(self.wrap(queue, partition, inner))
    }

    async fn open_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<Arc<dyn Partition>, StorageError> {
        let inner = self.inner.open_incarnation(queue, incarnation, partition).await?;
        Ok(self.wrap(queue, partition, inner))
    }

    /// The items first, then their objects (an item never references a deleted object). Objects that could not be
    /// deleted fail the destroy: nothing else would delete them, and destroying again (the inner destroy of a
    /// partition already gone does nothing) finishes the job.
    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        self.destroy_many(queue, &[partition]).await
    }

    async fn destroy_many(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.inner.destroy_many(queue, partitions).await?;
        self.delete_objects(queue, partitions).await
    }

    /// As [`destroy`](PartitionStore::destroy) (see `destroy_many_incarnation` for the objects).
    async fn destroy_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<(), StorageError> {
        self.destroy_many_incarnation(queue, incarnation, &[partition])
            .await
    }

    /// Objects are kept per queue name and partition, not per incarnation: a delete of an older incarnation that
    /// runs late (see [`PartitionStore::create_incarnation`]) deletes those of a queue created again under the name
    /// meanwhile too (a known limit of offloading from a shared store, see docs/operations.md).
    async fn destroy_many_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        self.inner
            .destroy_many_incarnation(queue, incarnation, partitions)
            .await?;
        self.delete_objects(queue, partitions).await
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    fn notices(&self) -> Option<tokio::sync::broadcast::Receiver<Notice>> {
        self.inner.notices()
    }

    fn memory(&self) -> Option<(u64, u64)> {
        self.inner.memory()
    }

    async fn sweep_objects(&self) -> Option<Result<SweepReport, StorageError>> {
        self.shared.objects.as_ref()?;
        Some(self.shared.sweep().await.map(|o| SweepReport {
            listed: o.listed,
            deleted: o.swept,
            skipped: o.skipped,
        }))
    }

    async fn close(&self) {
        if let Some(h) = lock(&self.sweeper).take() {
            h.abort();
        }
        self.inner.close().await;
    }
}

/// One partition behind an [`OffloadStore`].
#[derive(Debug)]
pub struct OffloadPartition {
    inner: Arc<dyn Partition>,
    shared: Arc<Shared>,
    dir: String,
    /// Object keys of items this wrapper leased out, with their lease deadline (completes delete them).
    leased: Mutex<HashMap<ItemId, (String, Ts)>>,
    /// Object keys of dead items handed to the dead-letter transfer (remove_dead deletes them).
    dead: Mutex<HashMap<ItemId, String>>,
}

impl OffloadPartition {
    /// Remembers the object keys of dead items read for the dead-letter transfer, for `remove_dead`. An entry goes
    /// when this server removes its item; an item another server sharing the partition transferred and removed
    /// (or one a byte bound cut from the answer) left its entry for as long as the partition stayed open. Past
    /// [`MAX_DEAD_KEYS`] the map starts again: a key forgotten leaves its object to the sweeper.
    fn remember_dead(&self, items: &[Item]) {
        let mut dead = lock(&self.dead);
        if dead.len() + items.len() > MAX_DEAD_KEYS {
            *dead = HashMap::new();
        }
        for it in items {
            if let Some(k) = frame::object_key(&it.payload) {
                dead.insert(it.id, k);
            }
        }
    }

    /// The object keys of `ids` as stored now (ready, leased or scheduled), read before a delete.
    ///
    /// Leased items are read from the partition too, not from the keys remembered at lease time: in a partition
    /// shared with other servers, another server's lifecycle may have put the item back under a new id with the
    /// same reference, and the delete of the old id then removes nothing, so must delete no object. (Dead items
    /// never move: their remembered key is still theirs.)
    async fn keys_of(&self, ids: &[ItemId]) -> Result<Vec<String>, StorageError> {
        let mut keys = Vec::new();
        for &id in ids {
            if let Some(k) = lock(&self.dead).get(&id) {
                keys.push(k.clone());
                continue;
            }
            for scheduled in [false, true] {
                let page = self.inner.list(Some(id), 1, scheduled).await?;
                if let Some(it) = page.into_iter().find(|it| it.id == id) {
                    keys.extend(frame::object_key(&it.payload));
                    break;
                }
            }
        }
        Ok(keys)
    }

    /// [`Partition::import`] (`moved`: [`Partition::import_moved`]): payloads stored first, as for produce.
    async fn import_as(&self, mut items: Vec<Item>, moved: bool) -> Result<Vec<Item>, StorageError> {
        let inner = |items| async move {
            match moved {
                true => self.inner.import_moved(items).await,
                false => self.inner.import(items).await,
            }
        };
        if self.shared.passthrough() && !items.iter().any(|it| frame::is_framed(&it.payload)) {
            return inner(items).await;
        }
        let payloads: Vec<Bytes> = items
            .iter_mut()
            .map(|it| std::mem::take(&mut it.payload))
            .collect();
        let (stored, keys) = self.shared.store_payloads(&self.dir, payloads.clone()).await?;
        let mut originals = HashMap::new();
        for ((it, s), p) in items.iter_mut().zip(stored).zip(payloads) {
            if let Some(k) = frame::object_key(&s) {
                originals.insert(k, p);
            }
            it.payload = s;
        }
        let r = inner(items).await;
        self.shared.written(keys, &r).await;
        self.restore_payloads(r?, &originals)
    }

    /// Stored items with their original payloads put back, for import's answer.
    fn restore_payloads(
        &self,
        items: Vec<Item>,
        originals: &HashMap<String, Bytes>,
    ) -> Result<Vec<Item>, StorageError> {
        items
            .into_iter()
            .map(|mut it| {
                it.payload = match frame::decode(&it.payload) {
                    Ok(Stored::Inline(b)) => b,
                    Ok(Stored::Object(r)) => originals.get(&r.key).cloned().ok_or_else(|| {
                        StorageError::other(format!(
                            "import returned item '{}' with an unknown object",
                            it.id
                        ))
                    })?,
                    Err(e) => {
                        return Err(StorageError::new(
                            StorageErrorKind::Corrupt,
                            format!("payload of item '{}' is unreadable: {e}", it.id),
                        ))
                    }
                };
                Ok(it)
            })
            .collect()
    }
}

impl OffloadPartition {
    /// Fetches the offloaded payloads of items the inner store just leased; items whose payload cannot be fetched
    /// are put back at once, and the call fails only when none could be.
    async fn resolve_leased(&self, items: Vec<Item>, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        if !items.iter().any(|it| frame::is_framed(&it.payload)) {
            return Ok(items);
        }
        let keys: Vec<Option<String>> = items.iter().map(|it| frame::object_key(&it.payload)).collect();
        let pairs = items.iter().map(|it| (it.id, it.payload.clone())).collect();
        let resolved = self.shared.resolve_many(pairs).await;
        let mut good = Vec::with_capacity(items.len());
        let mut failed = Vec::new();
        let mut first_err = None;
        for ((mut it, key), r) in items.into_iter().zip(keys).zip(resolved) {
            match r {
                Ok(p) => {
                    if let Some(k) = key {
                        lock(&self.leased).insert(it.id, (k, lease_deadline));
                    }
                    it.payload = p;
                    good.push(it);
                }
                Err(e) => {
                    failed.push(it.id);
                    first_err.get_or_insert(e);
                }
            }
        }
        if !failed.is_empty() {
            // Put them back at once rather than leaving them leased until their deadline: the lease reached no one,
            // so it is not counted as an attempt and cannot dead-letter the item.
            let ops = failed
                .iter()
                .map(|&id| {
                    vec![RetryOp {
                        id,
                        action: RetryAction::Release,
                    }]
                })
                .collect();
            if let Err(e) = self.inner.retry(ops, LifecyclePolicy::default()).await {
                tracing::warn!(error = %e, "items whose payload could not be fetched stay leased until their deadline");
            }
        }
        match first_err {
            Some(e) if good.is_empty() => Err(e),
            _ => Ok(good),
        }
    }
}

#[async_trait]
impl Partition for OffloadPartition {
    async fn produce(&self, items: Vec<NewItem>) -> Result<Vec<ItemId>, StorageError> {
        Ok(self.produce_reporting(items).await?.0)
    }

    async fn produce_reporting(
        &self,
        mut items: Vec<NewItem>,
    ) -> Result<(Vec<ItemId>, Vec<bool>), StorageError> {
        if self.shared.passthrough() && !items.iter().any(|it| frame::is_framed(&it.payload)) {
            return self.inner.produce_reporting(items).await;
        }
        let payloads: Vec<Bytes> = items
            .iter_mut()
            .map(|it| std::mem::take(&mut it.payload))
            .collect();
        let (stored, keys) = match self.shared.store_payloads(&self.dir, payloads.clone()).await {
            Ok(v) => v,
            Err(e) => {
                for (it, p) in items.iter_mut().zip(payloads) {
                    it.payload = p;
                }
                return Err(e);
            }
        };
        for (it, p) in items.iter_mut().zip(stored) {
            it.payload = p;
        }
        // The objects are written: only now may the items that reference them become visible.
        let r = self.inner.produce_reporting(items).await;
        self.shared.written(keys, &r).await;
        r
    }

    async fn lease(&self, n: usize, lease_deadline: Ts) -> Result<Vec<Item>, StorageError> {
        Ok(self.lease_within(n, lease_deadline, u64::MAX).await?.0)
    }

    /// The inner store bounds the lease by the bytes it holds: compressed payloads by their compressed size, and an
    /// offloaded one by its reference, so the answer of a lease of offloaded items is bounded by the lease's item
    /// count times the offload produce limit instead (docs/operations.md).
    async fn lease_within(
        &self,
        n: usize,
        lease_deadline: Ts,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let (items, capped) = self.inner.lease_within(n, lease_deadline, max_bytes).await?;
        Ok((self.resolve_leased(items, lease_deadline).await?, capped))
    }

    async fn complete(&self, requests: Vec<Vec<ItemId>>) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        if self.shared.objects.is_none() {
            return self.inner.complete(requests).await;
        }
        let ids = requests.clone();
        let results = self.inner.complete(requests).await?;
        let mut gone = Vec::new();
        {
            let mut leased = lock(&self.leased);
            for (req, r) in ids.iter().zip(&results) {
                if r.is_ok() {
                    gone.extend(req.iter().filter_map(|id| leased.remove(id).map(|(k, _)| k)));
                }
            }
        }
        self.shared.delete_later(gone);
        Ok(results)
    }

    async fn extend(
        &self,
        requests: Vec<(Vec<ItemId>, Ts)>,
    ) -> Result<Vec<Result<(), ItemError>>, StorageError> {
        if self.shared.objects.is_none() {
            return self.inner.extend(requests).await;
        }
        let copy = requests.clone();
        let results = self.inner.extend(requests).await?;
        let mut leased = lock(&self.leased);
        for ((ids, deadline), r) in copy.iter().zip(&results) {
            if r.is_ok() {
                for id in ids {
                    if let Some(e) = leased.get_mut(id) {
                        e.1 = *deadline;
                    }
                }
            }
        }
        Ok(results)
    }

    async fn retry(
        &self,
        requests: Vec<Vec<RetryOp>>,
        policy: LifecyclePolicy,
    ) -> Result<Vec<Result<RetryOutcome, ItemError>>, StorageError> {
        if self.shared.objects.is_none() {
            return self.inner.retry(requests, policy).await;
        }
        let copy = requests.clone();
        let results = self.inner.retry(requests, policy).await?;
        // The items moved (new id or schedule) with their reference, or died; either way this lease's key entry
        // is done. A death without a dead-letter queue leaves the object to the sweeper.
        let mut leased = lock(&self.leased);
        for (ops, r) in copy.iter().zip(&results) {
            if r.is_ok() {
                for op in ops {
                    leased.remove(&op.id);
                }
            }
        }
        Ok(results)
    }

    async fn lifecycle(
        &self,
        now: Ts,
        policy: LifecyclePolicy,
        limit: usize,
    ) -> Result<LifecycleOutcome, StorageError> {
        let out = self.inner.lifecycle(now, policy, limit).await?;
        if self.shared.objects.is_none() {
            return Ok(out);
        }
        // Expired leases got new ids: forget their entries (the reference moved with the item).
        lock(&self.leased).retain(|_, (_, deadline)| *deadline > now);
        Ok(out)
    }

    async fn dedup_records(&self, now: Ts) -> Result<Vec<DedupRecord>, StorageError> {
        self.inner.dedup_records(now).await
    }

    async fn import_dedup(&self, records: Vec<DedupRecord>) -> Result<(), StorageError> {
        self.inner.import_dedup(records).await
    }

    async fn dead_items(&self, limit: usize) -> Result<Vec<Item>, StorageError> {
        let items = self.inner.dead_items(limit).await?;
        self.remember_dead(&items);
        self.shared.resolve_all(items).await
    }

    /// The inner store bounds the batch by the bytes it holds (an offloaded payload by its reference); the batch is
    /// cut again at the bound once the payloads are fetched.
    async fn dead_items_within(
        &self,
        limit: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let (items, capped) = self.inner.dead_items_within(limit, max_bytes).await?;
        self.remember_dead(&items);
        let (items, cut) =
            lessor_core::storage::cut_at_bytes(self.shared.resolve_all(items).await?, max_bytes);
        Ok((items, capped || cut))
    }

    /// Counted by the inner store: no payload is fetched.
    async fn dead_count(&self) -> Result<u64, StorageError> {
        self.inner.dead_count().await
    }

    async fn remove_dead(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        if self.shared.objects.is_none() {
            return self.inner.remove_dead(ids).await;
        }
        let mut keys = Vec::new();
        {
            let dead = lock(&self.dead);
            keys.extend(ids.iter().filter_map(|id| dead.get(id).cloned()));
        }
        let copy = ids.clone();
        self.inner.remove_dead(ids).await?;
        {
            let mut dead = lock(&self.dead);
            for id in &copy {
                dead.remove(id);
            }
        }
        self.shared.delete_later(keys);
        Ok(())
    }

    async fn next_deadline(&self) -> Result<Option<Ts>, StorageError> {
        self.inner.next_deadline().await
    }

    async fn counts(&self) -> Result<PartitionCounts, StorageError> {
        self.inner.counts().await
    }

    async fn stats(&self, now: Ts) -> Result<PartitionStats, StorageError> {
        self.inner.stats(now).await
    }

    async fn list(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<Item>, StorageError> {
        let items = self.inner.list(pivot, limit, scheduled).await?;
        self.shared.resolve_all(items).await
    }

    /// The inner store bounds the page by the bytes it holds (an offloaded payload by its reference); the page is
    /// cut again at the bound once the payloads are fetched.
    async fn list_within(
        &self,
        pivot: Option<ItemId>,
        limit: usize,
        scheduled: bool,
        max_bytes: u64,
    ) -> Result<(Vec<Item>, bool), StorageError> {
        let (items, capped) = self.inner.list_within(pivot, limit, scheduled, max_bytes).await?;
        let (items, cut) =
            lessor_core::storage::cut_at_bytes(self.shared.resolve_all(items).await?, max_bytes);
        Ok((items, capped || cut))
    }

    async fn import(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.import_as(items, false).await
    }

    async fn import_moved(&self, items: Vec<Item>) -> Result<Vec<Item>, StorageError> {
        self.import_as(items, true).await
    }

    async fn snapshot(&self) -> Result<Box<dyn PartitionSnapshot>, StorageError> {
        // Counted before the inner snapshot is taken: a deletion after that instant is held.
        self.shared.snapshot_opened();
        let guard = SnapshotGuard(self.shared.clone());
        Ok(Box::new(ResolvingSnapshot {
            inner: self.inner.snapshot().await?,
            shared: self.shared.clone(),
            pending: VecDeque::new(),
            _open: guard,
        }))
    }

    async fn delete(&self, ids: Vec<ItemId>) -> Result<(), StorageError> {
        if self.shared.objects.is_none() {
            return self.inner.delete(ids).await;
        }
        let keys = if self.shared.objects.is_some() {
            self.keys_of(&ids).await?
        } else {
            Vec::new()
        };
        let copy = ids.clone();
        self.inner.delete(ids).await?;
        {
            let (mut leased, mut dead) = (lock(&self.leased), lock(&self.dead));
            for id in &copy {
                leased.remove(id);
                dead.remove(id);
            }
        }
        self.shared.delete_later(keys);
        Ok(())
    }

    async fn clear(&self, request: ClearRequest) -> Result<(), StorageError> {
        if self.shared.objects.is_none() {
            return self.inner.clear(request).await;
        }
        // Exactly the keys that went away: the queue task makes no other call on this partition meanwhile.
        let before = referenced_keys(self.inner.as_ref()).await?;
        self.inner.clear(request).await?;
        match referenced_keys(self.inner.as_ref()).await {
            Ok(after) => {
                let gone: Vec<String> = before.into_iter().filter(|k| !after.contains(k)).collect();
                let gone_set: HashSet<&String> = gone.iter().collect();
                lock(&self.leased).retain(|_, (k, _)| !gone_set.contains(k));
                self.shared.delete_later(gone);
            }
            Err(e) => tracing::warn!(error = %e, "objects of cleared items left to the sweeper"),
        }
        Ok(())
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

impl Drop for OffloadPartition {
    /// Forgets the inner partition in the sweeper's map of open ones once this wrapper, its last holder, goes (its
    /// queue unloaded or stopped). A `Weak` left there kept the closed partition's whole block (3.6 KB for a fjall
    /// partition) and the entry for every partition ever opened, until the queue was deleted: most of what an
    /// unloaded queue held. The sweeper treats a partition it cannot upgrade as not open, so nothing else changes.
    /// Another holder (a second open of the same partition, a sweep reading it) leaves the entry, which the next
    /// open replaces or the next sweep drops (`Shared::sweep`).
    fn drop(&mut self) {
        let mut open = lock(&self.shared.open);
        let key = listed_dir(&self.dir);
        let ours = open
            .get(&key)
            .is_some_and(|w| Weak::ptr_eq(w, &Arc::downgrade(&self.inner)));
        if ours && Arc::strong_count(&self.inner) == 1 {
            open.remove(&key);
            // Partitions close as their queues unload: give back the room of a map that emptied (as fjall's
            // registry of open partitions does).
            let len = open.len();
            if open.capacity() > 64 && len < open.capacity() / 4 {
                open.shrink_to(len * 2);
            }
        }
    }
}

/// A snapshot whose pages have their payloads resolved.
struct ResolvingSnapshot {
    inner: Box<dyn PartitionSnapshot>,
    shared: Arc<Shared>,
    /// Items read from the inner snapshot, payloads as stored, that the byte bound left for the next pages: an
    /// offloaded payload is a small reference as stored, so a page of them within the bound may stand for far
    /// more bytes once resolved.
    pending: VecDeque<Item>,
    /// Holds object deletions back while the snapshot lives.
    _open: SnapshotGuard,
}

/// Counts a snapshot as open for as long as it lives (see `Shared::snapshots`).
struct SnapshotGuard(Arc<Shared>);

impl Drop for SnapshotGuard {
    fn drop(&mut self) {
        self.0.snapshot_closed();
    }
}

/// [`item_bytes`] of `it` once its payload is resolved, as far as it is known before resolving: an object
/// reference records the length of the object; an inline payload (compressed or not) counts as stored.
fn resolved_bytes(it: &Item) -> u64 {
    match frame::object_len(&it.payload) {
        Some(len) => (item_bytes(it) - it.payload.len() as u64).saturating_add(len),
        None => item_bytes(it),
    }
}

impl fmt::Debug for ResolvingSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvingSnapshot").finish_non_exhaustive()
    }
}

#[async_trait]
impl PartitionSnapshot for ResolvingSnapshot {
    async fn next(&mut self, limit: usize) -> Result<Vec<Item>, StorageError> {
        self.next_within(limit, u64::MAX).await
    }

    /// Objects are fetched only for the items the bound takes by the lengths their references record; a
    /// compressed payload, larger once resolved than stored, may cut the page again. Items left out wait in
    /// `pending` as stored, and are the next page's first: nothing is skipped, nothing fetched twice but a
    /// decompression.
    async fn next_within(&mut self, limit: usize, max_bytes: u64) -> Result<Vec<Item>, StorageError> {
        let limit = limit.max(1);
        if self.pending.is_empty() {
            self.pending = self.inner.next_within(limit, max_bytes).await?.into();
        }
        let mut take = 0;
        let mut total = 0u64;
        for it in self.pending.iter().take(limit) {
            total = total.saturating_add(resolved_bytes(it));
            if take > 0 && total > max_bytes {
                break;
            }
            take += 1;
        }
        let stored: Vec<Item> = self.pending.drain(..take).collect();
        let mut page = match self.shared.resolve_all(stored.clone()).await {
            Ok(page) => page,
            Err(e) => {
                // Kept for a retry of this call: an error must not skip items.
                for it in stored.into_iter().rev() {
                    self.pending.push_front(it);
                }
                return Err(e);
            }
        };
        let mut total = 0u64;
        let keep = page
            .iter()
            .position(|it| {
                total = total.saturating_add(item_bytes(it));
                total > max_bytes
            })
            .map_or(page.len(), |i| i.max(1));
        page.truncate(keep);
        for it in stored.into_iter().skip(keep).rev() {
            self.pending.push_front(it);
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryStore;

    fn item(p: &[u8]) -> NewItem {
        NewItem {
            expire_deadline: Ts(i64::MAX / 2),
            payload: Bytes::copy_from_slice(p),
            ..Default::default()
        }
    }

    /// Deletions held for an open snapshot stop at their bound (the rest are the sweeper's), and go when it closes.
    #[tokio::test]
    async fn deletions_held_for_a_snapshot_are_bounded() {
        let objects: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let shared = Arc::new(Shared {
            root: "p/s/".into(),
            settings: OffloadSettings::default(),
            objects: Some(objects),
            in_flight: Mutex::new(HashSet::new()),
            open: Mutex::new(HashMap::new()),
            snapshots: Mutex::new((0, Vec::new())),
        });
        shared.snapshot_opened();
        for batch in 0..(MAX_HELD_DELETES / 1000 + 50) {
            shared.delete_later((0..1000).map(|i| format!("q/0/{batch}-{i}")).collect());
        }
        assert_eq!(lock(&shared.snapshots).1.len(), MAX_HELD_DELETES);
        assert_eq!(
            lock(&shared.snapshots).1[0].as_ref(),
            "q/0/0-0",
            "the first held are kept"
        );
        shared.snapshot_closed();
        assert!(lock(&shared.snapshots).1.is_empty());
    }

    /// The keys of dead items read but removed elsewhere do not pile up: past the bound the map starts again.
    #[tokio::test]
    async fn dead_item_keys_are_bounded() {
        let store =
            OffloadStore::new(Arc::new(MemoryStore::new()), "s", OffloadSettings::default()).expect("wrap");
        let p = OffloadPartition {
            inner: store.inner.open("q", 0).await.expect("open"),
            shared: store.shared.clone(),
            dir: "q/0/".into(),
            leased: Mutex::new(HashMap::new()),
            dead: Mutex::new(HashMap::new()),
        };
        let dead = |from: u64| -> Vec<Item> {
            (from..from + 1000)
                .map(|id| Item {
                    id: ItemId(id),
                    payload: frame::ObjectRef {
                        codec: Compression::None,
                        len: 3,
                        crc: 0,
                        key: format!("k{id}"),
                    }
                    .encode(),
                    ..Default::default()
                })
                .collect()
        };
        for batch in 0..(MAX_DEAD_KEYS as u64 / 1000 + 30) {
            p.remember_dead(&dead(batch * 1000));
            assert!(lock(&p.dead).len() <= MAX_DEAD_KEYS);
        }
        let last = MAX_DEAD_KEYS as u64 + 29_000;
        assert_eq!(
            lock(&p.dead).get(&ItemId(last)),
            Some(&format!("k{last}")),
            "the last read is known"
        );
    }

    #[tokio::test]
    async fn compression_can_be_turned_on_and_off_over_the_same_data() {
        let inner: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
        let json = br#"{"order":1,"lines":[{"sku":"A","qty":1},{"sku":"A","qty":1},{"sku":"A","qty":1},{"sku":"A","qty":1},{"sku":"A","qty":1},{"sku":"A","qty":1}]}"#;
        // Written before the wrapper existed.
        let raw = inner.open("q", 0).await.expect("open");
        raw.produce(vec![item(b"old and plain"), item(json)])
            .await
            .expect("produce");
        // Compression on: new payloads are stored compressed, old ones read as they are.
        let zstd = OffloadStore::new(
            inner.clone(),
            "s",
            OffloadSettings {
                compression: Compression::Zstd,
                ..Default::default()
            },
        )
        .expect("wrap");
        let mut magic_lookalike = frame::MAGIC.to_vec();
        magic_lookalike.extend_from_slice(b"\x03 not a reference");
        let p = zstd.open("q", 0).await.expect("open");
        p.produce(vec![item(json), item(&magic_lookalike)])
            .await
            .expect("produce");
        let stored = raw.list(None, 10, false).await.expect("list");
        assert!(stored[2].payload.len() < json.len(), "stored compressed");
        assert!(frame::is_framed(&stored[2].payload));
        // Compression off again (the wrapper without settings): every payload reads back as produced.
        let off = OffloadStore::new(inner.clone(), "s", OffloadSettings::default()).expect("wrap");
        let p = off.open("q", 0).await.expect("open");
        let got = p.lease(10, Ts(i64::MAX / 4)).await.expect("lease");
        let payloads: Vec<&[u8]> = got.iter().map(|i| i.payload.as_ref()).collect();
        assert_eq!(
            payloads,
            vec![&b"old and plain"[..], &json[..], &json[..], &magic_lookalike[..]]
        );
        // A reference with no object store configured is an error naming the problem, not bytes.
        let r = frame::ObjectRef {
            codec: Compression::None,
            len: 3,
            crc: 0,
            key: "k".into(),
        };
        raw.produce(vec![item(&r.encode())]).await.expect("produce");
        let e = p.list(None, 10, false).await.expect_err("no object store");
        assert_eq!(e.kind, StorageErrorKind::Corrupt, "{e}");
    }
}
