//! Object-storage requests for cold segments, shared by the backends that move backlog to segments (fjall and
//! memory): every request is timed into the object-storage latency histogram, a failed one is reported as
//! unavailable naming the segment (454 on the wire: the caller retries), and a fetched body is checked against the
//! manifest entry that named it before any of its records is used.

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use lessor_core::error::{StorageError, StorageErrorKind};
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
