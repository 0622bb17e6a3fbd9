//! Object-storage requests for cold segments, shared by the backends that move backlog to segments (fjall and
//! memory): every request is timed into the object-storage latency histogram, a failed one is reported as
//! unavailable naming the segment (454 on the wire: the caller retries), and a fetched body is checked against the
//! manifest entry that named it before any of its records is used. A segment whose fetch failed is not fetched again
//! before a pause that doubles at every failure ([`FetchPauses`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::time::Ts;
use lessor_core::types::Item;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStore, PutPayload};

use super::segment::{self, ManifestEntry};

/// The client of the object store segments go to.
pub(crate) struct SegmentObjects {
    client: Arc<dyn ObjectStore>,
}

impl SegmentObjects {
    pub(crate) fn new(client: Arc<dyn ObjectStore>) -> SegmentObjects {
        SegmentObjects { client }
    }

    fn unavailable(what: &str, key: &str, e: impl std::fmt::Display) -> StorageError {
        StorageError::unavailable(format!("{what}: cold segment '{key}': {e}"))
    }

    /// Writes segment object `key`.
    pub(crate) async fn put(&self, what: &str, key: &str, body: Vec<u8>) -> Result<(), StorageError> {
        let _t = Timed(std::time::Instant::now());
        self.client
            .put(&ObjPath::from(key), PutPayload::from(Bytes::from(body)))
            .await
            .map(|_| ())
            .map_err(|e| Self::unavailable(what, key, e))
    }

    /// Reads segment object `key` whole.
    pub(crate) async fn get(&self, what: &str, key: &str) -> Result<Bytes, StorageError> {
        let _t = Timed(std::time::Instant::now());
        let r = self
            .client
            .get(&ObjPath::from(key))
            .await
            .map_err(|e| Self::unavailable(what, key, e))?;
        r.bytes().await.map_err(|e| Self::unavailable(what, key, e))
    }

    /// Fetches segment `e` of priority `prio` and checks it (see [`verify`]) off the async workers. `record_ok`
    /// checks each record too (the backend's record format): one that fails makes the whole segment corrupt, naming
    /// its item, so that a segment is never half served.
    pub(crate) async fn fetch(
        &self,
        what: &str,
        prio: u8,
        e: &ManifestEntry,
        record_ok: fn(&[u8]) -> bool,
    ) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let body = self.get(what, &e.key).await?;
        let (e, what) = (e.clone(), what.to_string());
        tokio::task::spawn_blocking(move || {
            let records = verify(&body, &what, prio, &e)?;
            if let Some((id, _)) = records.iter().find(|(_, r)| !record_ok(r)) {
                return Err(StorageError::unavailable(format!(
                    "{what}: cold segment '{}' is corrupt: record of item {id} is damaged",
                    e.key
                )));
            }
            Ok(records)
        })
        .await
        .map_err(|e| StorageError::other(format!("segment decoding failed: {e}")))?
    }

    /// Deletes segment object `key` (as a manifest holds it); a failure is logged, saying what deletes it `later`
    /// (it is an orphan now).
    pub(crate) async fn delete(&self, key: &str, later: &str) {
        self.delete_listed(&ObjPath::from(key), later).await;
    }

    /// Deletes the object a listing named `path`. Not by its name as a string: `ObjPath::from` percent-encodes the
    /// `%` of an encoded name again (see [`super::listed`]), naming no object, and the segment would stay for good.
    pub(crate) async fn delete_listed(&self, path: &ObjPath, later: &str) {
        if let Err(e) = self.client.delete(path).await {
            tracing::warn!(segment = %path, error = %e, "cold segment object not deleted; {later}");
        }
    }

    /// Every object under `dir`, a directory of segment keys as built (not normalised yet).
    ///
    /// A manifest holds a segment's key normalised by `ObjPath::from`, and every request turns that key into a path
    /// with `ObjPath::from` again, which percent-encodes the `%` the first pass wrote for a character object_store
    /// avoids (`#`, `[`, `*`, a part that is `.` or `..`, ...; a queue may be named so). The directory goes through
    /// the same two steps, or its listing names no segment of such a queue.
    pub(crate) async fn list(&self, what: &str, dir: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let normalised = ObjPath::from(dir).to_string();
        self.client
            .list(Some(&ObjPath::from(normalised.as_str())))
            .try_collect()
            .await
            .map_err(|e| Self::unavailable(what, dir, e))
    }

    /// Deletes every segment object under `dir`, a directory of segment keys as built, and fails with
    /// `PayloadUnavailable` (retryable, and the engine does not count it against a partition) when the listing or any
    /// deletion fails. For a destroy: the caller holds the directory's partition closed (no partition of the name
    /// exists, none may be opened), so every object there is a destroyed partition's, this destroy's or that of an
    /// earlier one that failed here; nothing else lists the directory again, so the destroy must fail and be retried
    /// rather than leave them for good. Only fjall's destroy needs it (the memory store's keeps no directory
    /// closed).
    #[cfg_attr(not(feature = "fjall"), allow(dead_code))]
    pub(crate) async fn delete_dir(&self, what: &str, dir: &str) -> Result<(), StorageError> {
        let payload = |e: StorageError| StorageError::new(StorageErrorKind::PayloadUnavailable, e.message);
        let objects = self.list(what, dir).await.map_err(payload)?;
        let failed: Vec<String> = futures::stream::iter(objects)
            .map(|m| async move {
                let _t = Timed(std::time::Instant::now());
                match self.client.delete(&m.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => {
                        tracing::warn!(segment = %m.location, error = %e, "cold segment object of {what} not deleted");
                        Some(e.to_string())
                    }
                }
            })
            .buffer_unordered(super::FETCH_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        match failed.first() {
            None => Ok(()),
            Some(e) => Err(StorageError::new(
                StorageErrorKind::PayloadUnavailable,
                format!(
                    "{what}: {} cold segment objects under '{dir}' not deleted ({e}); delete again",
                    failed.len()
                ),
            )),
        }
    }

    /// Deletes the segment objects under `dir` (one partition's) whose key names partition number `pid` (a
    /// destroyed partition's: a queue created again under the name writes under another number), logging what could
    /// not be listed or deleted, and what deletes it `later`.
    pub(crate) async fn delete_partition(&self, dir: &str, pid: u64, later: &str) {
        match self.list("a destroyed partition", dir).await {
            Ok(objects) => {
                for m in objects {
                    if segment::key_pid(m.location.as_ref()) == Some(pid) {
                        self.delete_listed(&m.location, later).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(segments = %dir, error = %e, "segments of a destroyed partition not listed; {later}")
            }
        }
    }
}

/// Pause after a segment's first failed fetch; each failure after it doubles the pause, up to [`MAX_PAUSE`].
pub(crate) const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause between two fetches of a segment that keeps failing.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(300);

/// The segments of one partition whose last fetch failed, each with the time before which it is not fetched again.
///
/// Without it a segment that could not be read (a lost or damaged object, object storage down) was fetched again by
/// every lease, lifecycle pass, delete and list that reached it: a GET (and, with the store down, its timeout) per
/// call, hammering the store and slowing the partition while nothing had changed. Now the first failure pauses the
/// segment for [`FIRST_PAUSE`], each failure after the pause doubles it (up to [`MAX_PAUSE`]), and a success
/// forgets it. While paused, a caller that needs the segment gets the error at once (`Unavailable`, naming the
/// segment, the last failure and when it is tried again), exactly as if the fetch had failed: its items stay where
/// they are, nothing is dropped. Only the failed fetch is logged at error level and counted as a load error, so a
/// segment logs at most once per pause; the calls answered from the pause count in `segment_fetches_paused`.
///
/// Time is the cold context's clock (the wall clock in the server, a manual one in tests). Held outside the
/// partition's lock state (a list reads segments under a shared borrow of it), behind a mutex never held across an
/// await; boxed, so that a partition that never failed a fetch pays for an empty pointer only.
#[derive(Default)]
// Boxed on purpose: an empty `HashMap` is 48 bytes in every partition of an `s3` build, a pointer 8.
#[allow(clippy::box_collection)]
pub(crate) struct FetchPauses(Mutex<Option<Box<HashMap<String, Pause>>>>);

/// The pause of one segment (see [`FetchPauses`]).
struct Pause {
    /// Not fetched again before this.
    until: Ts,
    /// The pause that ends at `until` (the next failure doubles it).
    wait: Duration,
    /// Failed fetches in a row.
    failures: u32,
    /// The last failure's message.
    error: String,
}

impl FetchPauses {
    #[allow(clippy::box_collection)]
    fn map(&self) -> std::sync::MutexGuard<'_, Option<Box<HashMap<String, Pause>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error to answer instead of fetching segment `key` at `now`, while its pause lasts (counted in
    /// `segment_fetches_paused`); `None`: fetch it.
    pub(crate) fn check(&self, key: &str, now: Ts) -> Option<StorageError> {
        let map = self.map();
        let p = map.as_ref()?.get(key).filter(|p| now < p.until)?;
        super::metrics()
            .segment_fetches_paused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let left = p.until.since(now);
        Some(StorageError::unavailable(format!(
            "{} (failed {} times in a row; not fetched again for {:.1} s)",
            p.error,
            p.failures,
            left.as_secs_f64()
        )))
    }

    /// Whether segment `key` is in its pause at `now` (a background prefetch passes it over), uncounted.
    pub(crate) fn paused(&self, key: &str, now: Ts) -> bool {
        self.map()
            .as_ref()
            .and_then(|m| m.get(key))
            .is_some_and(|p| now < p.until)
    }

    /// Records a failed fetch of segment `key` at `now` and returns the pause it starts. `live` says whether a key
    /// still names a segment of the partition: the pauses of segments gone since (loaded, rewritten, cleared) are
    /// dropped here, so the map holds at most the partition's segments.
    pub(crate) fn failed(
        &self,
        key: &str,
        now: Ts,
        err: &StorageError,
        live: impl Fn(&str) -> bool,
    ) -> Duration {
        let mut map = self.map();
        let m = map.get_or_insert_default();
        m.retain(|k, _| k == key || live(k));
        let p = m.entry(key.to_string()).or_insert(Pause {
            until: now,
            wait: Duration::ZERO,
            failures: 0,
            error: String::new(),
        });
        p.wait = if p.failures == 0 {
            FIRST_PAUSE
        } else {
            (p.wait * 2).min(MAX_PAUSE)
        };
        p.failures = p.failures.saturating_add(1);
        p.until = now.add(p.wait);
        p.error = err.message.clone();
        p.wait
    }

    /// Forgets the pause of segment `key` after a fetch of it succeeded.
    pub(crate) fn succeeded(&self, key: &str) {
        let mut map = self.map();
        if let Some(m) = map.as_mut() {
            m.remove(key);
            if m.is_empty() {
                *map = None;
            }
        }
    }
}

/// Adds an object-storage request's duration to the shared latency histogram when dropped.
struct Timed(std::time::Instant);

impl Drop for Timed {
    fn drop(&mut self) {
        super::metrics().observe(self.0);
    }
}

/// A random 64-bit value for object keys.
pub(crate) fn random() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b)
}

/// A list's walk over the cold segments of one priority, for both stores' `list` (browsing), which reads segments
/// and leaves them in object storage rather than loading them back: from id `from` on, each segment `next` names
/// that starts below the page's `ceiling` is fetched with `fetch`, its first `limit` items at or after `from` and
/// below the ceiling are decoded into `out` with `decode`, and the page is cut to its bounds (`keep_page`, which
/// may set or lower the ceiling) before the next segment is fetched. A list therefore holds at most one segment
/// beyond its page. A page of no items reads none: no ceiling would ever stop the walk.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn list_segments<'e, Fut>(
    next: impl Fn(u64) -> Option<&'e ManifestEntry>,
    fetch: impl Fn(&'e ManifestEntry) -> Fut,
    decode: impl Fn(u64, &[u8]) -> Result<Item, StorageError>,
    from: u64,
    limit: usize,
    max_bytes: u64,
    out: &mut Vec<Item>,
    ceiling: &mut Option<u64>,
) -> Result<(), StorageError>
where
    Fut: std::future::Future<Output = Result<Vec<(u64, Vec<u8>)>, StorageError>>,
{
    if limit == 0 {
        return Ok(());
    }
    let mut at = from;
    while let Some(e) = next(at) {
        if ceiling.is_some_and(|c| e.first >= c) {
            return Ok(());
        }
        let records = fetch(e).await?;
        // A segment's records are in id order (`segment::decode` checks it).
        for (id, r) in records.iter().filter(|(id, _)| *id >= from).take(limit) {
            if ceiling.is_some_and(|c| *id >= c) {
                break;
            }
            out.push(decode(*id, r)?);
        }
        drop(records);
        lessor_core::storage::keep_page(out, limit, max_bytes, ceiling);
        let Some(next) = e.last.checked_add(1) else {
            return Ok(());
        };
        at = next;
    }
    Ok(())
}

/// Checks a fetched segment body against manifest entry `e` of priority `prio` (the body's checksum, the body
/// itself, its header against the entry) and returns its records. A damaged segment is an `Unavailable` error
/// saying "corrupt" and naming it: never served, and the lease that needed it gets 454 with its items still queued.
/// CPU-bound: call it off the async workers.
pub(crate) fn verify(
    body: &[u8],
    what: &str,
    prio: u8,
    e: &ManifestEntry,
) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
    let bad = |why: String| {
        StorageError::unavailable(format!("{what}: cold segment '{}' is corrupt: {why}", e.key))
    };
    if crc32fast::hash(body) != e.crc {
        return Err(bad("checksum does not match the manifest".into()));
    }
    let s = segment::decode(body).map_err(|err| bad(err.to_string()))?;
    if !s.matches(prio, e.first, e.last, e.count) {
        return Err(bad(format!(
            "holds priority {} ids {}..={} ({} records), the manifest says priority {prio} ids {}..={} ({})",
            s.prio,
            s.first,
            s.last,
            s.records.len(),
            e.first,
            e.last,
            e.count
        )));
    }
    Ok(s.records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_doubles_at_each_failure_up_to_the_most_and_ends_with_a_success() {
        let pauses = FetchPauses::default();
        let err = StorageError::unavailable("p: cold segment 'k': gone");
        let t0 = Ts(1_000_000_000);
        assert!(pauses.check("k", t0).is_none());
        assert_eq!(pauses.failed("k", t0, &err, |_| true), FIRST_PAUSE);
        let e = pauses.check("k", t0).expect("paused");
        assert!(
            e.message.contains("cold segment 'k': gone") && e.message.contains("not fetched again"),
            "{e}"
        );
        assert!(pauses.paused("k", t0) && !pauses.paused("other", t0));
        // Passed at its end, not before.
        assert!(pauses.paused("k", t0.add(FIRST_PAUSE - Duration::from_micros(1))));
        assert!(pauses.check("k", t0.add(FIRST_PAUSE)).is_none());
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..12 {
            now = now.add(Duration::from_secs(1000));
            waits.push(pauses.failed("k", now, &err, |_| true).as_secs());
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300, 300]);
        pauses.succeeded("k");
        assert!(pauses.check("k", now).is_none());
        assert_eq!(pauses.failed("k", now, &err, |_| true), FIRST_PAUSE);
        // The pauses of segments gone since are dropped at the next failure.
        pauses.failed("j", now, &err, |k| k != "k");
        assert!(!pauses.paused("k", now) && pauses.paused("j", now));
    }
}
