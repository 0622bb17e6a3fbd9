//! The on-disk side of paging (see `crate::state::paging`): where a partition's paged items and paging counters
//! live, and the reads that page items in, look paged items up, list them and sweep them for expiry.
//!
//! A paged item is not stored as an item at all: it is one *paged record* under the partition's paged prefix, the
//! pid with its top bit set, so it sorts after every real pid and the partition's own prefix (what an open scans)
//! holds only resident items:
//! ```text
//! (pid | 1 << 63) (u64 BE) + prio (u8) + id (u64 BE)  -> meta length (u32 BE) + item metadata + payload
//! (pid | 1 << 63) (u64 BE) + "pgc"                     -> the encoded [`Paged`] counters
//! (pid | 1 << 63) (u64 BE) + 'D' + due (i64, ordered) + id (u64 BE) -> a paged scheduled item: the same record
//! (pid | 1 << 63) (u64 BE) + 'R' + id (u64 BE)         -> its due time (i64 BE)
//! (pid | 1 << 63) (u64 BE) + "pgs"                     -> the encoded [`PagedSched`] counters
//! ```
//! The paged schedule (see "Paging the schedule" in the state's module docs) keeps each record in due order, which
//! a page-in (every paged scheduled item passes through one) reads as one range, and an index by id to the due
//! time, which a delete by id, a list in id order and a snapshot follow with a point read: the due time of an item
//! named by id alone is not known otherwise. (Records by id and empty keys in due order made a page-in one point
//! read per item, 4 times slower to come due.) The tags sort after every priority byte and differ from the
//! counters' and cold segments' tags (`"seg"`).
//! A new ready item beyond the window is written as a paged record instead of an item (the same bytes, once); a
//! page-in moves records back to items, and the counters change, in one atomic batch. A partition that never
//! spilled has no paged prefix at all, so it writes and reads exactly what it did before paging existed (one
//! point read of the counters at open). An open reads the counters and the partition's own prefix: the window,
//! the items in flight, the schedule and the dead letters, never the backlog. Page-ins read from the lowest paged
//! id of a priority on, so they do not walk the deleted records of what was paged in before.

use bytes::Bytes;
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::types::{Item, ItemId};

use super::codec::{decode_meta, encode_meta};
use super::engine::Engine;
use crate::state::paging::PRIORITIES;
use crate::state::{PageRead, Paged, PagedSched, SchedKey, SchedRead};

/// Bit set in a pid to make its paged prefix.
const PAGED_BIT: u64 = 1 << 63;
/// Key of the paging counters after the paged prefix.
const COUNTERS_TAG: &[u8] = b"pgc";
/// Version byte of the stored counters.
const COUNTERS_V1: u8 = 1;
/// Length of a paged record key.
const RECORD_KEY_LEN: usize = 17;
/// Tag of a paged scheduled item's entry in the id index (its due time), after the paged prefix.
const SCHED_RECORD_TAG: u8 = b'R';
/// Tag of a paged scheduled item's record, in due order, after the paged prefix.
const SCHED_DUE_TAG: u8 = b'D';
/// Key of the paged schedule's counters after the paged prefix.
const SCHED_COUNTERS_TAG: &[u8] = b"pgs";
/// Version byte of the stored schedule counters.
const SCHED_COUNTERS_V1: u8 = 1;
/// Length of the stored schedule counters.
const SCHED_COUNTERS_LEN: usize = 1 + 5 * 8;
/// Length of a due-order key.
const SCHED_DUE_KEY_LEN: usize = 8 + 1 + 16;

/// The paged prefix of partition `pid`.
pub(crate) fn paged_prefix(pid: u64) -> [u8; 8] {
    (pid | PAGED_BIT).to_be_bytes()
}

/// The key of the paged record of item `id` of priority `prio` in partition `pid`.
pub(crate) fn record_key(pid: u64, prio: u8, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(RECORD_KEY_LEN);
    k.extend_from_slice(&paged_prefix(pid));
    k.push(prio);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The key of the paging counters of partition `pid`.
pub(crate) fn counters_key(pid: u64) -> Vec<u8> {
    let mut k = paged_prefix(pid).to_vec();
    k.extend_from_slice(COUNTERS_TAG);
    k
}

/// The id in a paged record key.
pub(crate) fn record_id(k: &[u8]) -> Option<u64> {
    (k.len() == RECORD_KEY_LEN)
        .then(|| k[9..17].try_into().ok().map(u64::from_be_bytes))
        .flatten()
}

/// The key of paged scheduled item `id`'s entry in the id index of partition `pid`.
pub(crate) fn sched_record_key(pid: u64, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(RECORD_KEY_LEN);
    k.extend_from_slice(&paged_prefix(pid));
    k.push(SCHED_RECORD_TAG);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The key of the record of paged scheduled item `(due, id)` in partition `pid`, in due order (due times sort as
/// signed).
pub(crate) fn sched_due_key(pid: u64, (due, id): SchedKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(SCHED_DUE_KEY_LEN);
    k.extend_from_slice(&paged_prefix(pid));
    k.push(SCHED_DUE_TAG);
    k.extend_from_slice(&((due as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The `(due, id)` in a due-order key.
fn sched_due_of(k: &[u8]) -> Option<SchedKey> {
    if k.len() != SCHED_DUE_KEY_LEN || k[8] != SCHED_DUE_TAG {
        return None;
    }
    let due = u64::from_be_bytes(k[9..17].try_into().ok()?) ^ (1 << 63);
    let id = u64::from_be_bytes(k[17..25].try_into().ok()?);
    Some((due as i64, id))
}

/// The first key after every due-order key of partition `pid`.
fn sched_due_end(pid: u64) -> Vec<u8> {
    let mut k = paged_prefix(pid).to_vec();
    k.push(SCHED_DUE_TAG + 1);
    k
}

/// The key of the paged schedule's counters of partition `pid`.
pub(crate) fn sched_counters_key(pid: u64) -> Vec<u8> {
    let mut k = paged_prefix(pid).to_vec();
    k.extend_from_slice(SCHED_COUNTERS_TAG);
    k
}

/// Encodes the paged schedule's counters.
pub(crate) fn encode_sched_counters(p: &PagedSched) -> Vec<u8> {
    let mut v = Vec::with_capacity(SCHED_COUNTERS_LEN);
    v.push(SCHED_COUNTERS_V1);
    v.extend_from_slice(&p.from.0.to_be_bytes());
    v.extend_from_slice(&p.from.1.to_be_bytes());
    v.extend_from_slice(&p.count.to_be_bytes());
    v.extend_from_slice(&p.bytes.to_be_bytes());
    v.extend_from_slice(&p.with_source.to_be_bytes());
    v
}

/// Decodes the paged schedule's counters; `what` names the partition in the error.
pub(crate) fn decode_sched_counters(v: &[u8], what: &str) -> Result<PagedSched, StorageError> {
    if v.first() != Some(&SCHED_COUNTERS_V1) || v.len() != SCHED_COUNTERS_LEN {
        return Err(StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "{what}: the paged schedule's counters are damaged (version {:?}, {} bytes)",
                v.first(),
                v.len()
            ),
        ));
    }
    let u = |at: usize| u64::from_be_bytes(v[at..at + 8].try_into().unwrap_or_default());
    Ok(PagedSched {
        from: (u(1) as i64, u(9)),
        count: u(17),
        bytes: u(25),
        with_source: u(33),
    })
}

/// The stored counters of partition `pid`'s paged schedule, if it has one. Blocking.
pub(crate) fn read_sched_counters(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    what: &str,
) -> Result<Option<PagedSched>, StorageError> {
    match ks
        .get(sched_counters_key(pid))
        .map_err(|e| engine.read_error(e))?
    {
        Some(v) => decode_sched_counters(&v, what).map(Some),
        None => Ok(None),
    }
}

/// Paged items read back, up to `n` of them and `max_bytes` of payloads: the item that crosses `max_bytes` is the
/// last, so a read holds at least one item (a record is read whole) and at most `max_bytes` plus one item's payload.
/// The records hold the payloads even where only the items' metadata is wanted (a delete by id and a clear count
/// them out): reads of every record at once held memory in proportion to what they removed.
struct Bounded {
    items: Vec<Item>,
    bytes: u64,
    n: usize,
    max_bytes: u64,
}

impl Bounded {
    /// A read of up to `n` items, with room made for `expect` of them.
    fn new(n: usize, max_bytes: u64, expect: usize) -> Self {
        Bounded {
            items: Vec::with_capacity(expect.min(n).min(1 << 16)),
            bytes: 0,
            n,
            max_bytes,
        }
    }

    /// Whether another item may be read.
    fn room(&self) -> bool {
        self.items.len() < self.n && (self.items.is_empty() || self.bytes < self.max_bytes)
    }

    /// Takes `it`; returns whether another item may be read.
    fn push(&mut self, it: Item) -> bool {
        self.bytes = self.bytes.saturating_add(it.payload.len() as u64);
        self.items.push(it);
        self.room()
    }
}

/// Point reads of `keys` (an item's id and the key of its entry), in order, each entry found made an item by
/// `item`, until the items fill a [`Bounded`] read of `max_bytes`: the items, and how many keys were looked up (the
/// caller asks again for the rest). Blocking.
fn find_bounded(
    engine: &Engine,
    ks: &fjall::Keyspace,
    keys: impl ExactSizeIterator<Item = (u64, Vec<u8>)>,
    max_bytes: u64,
    mut item: impl FnMut(u64, &[u8]) -> Result<Item, StorageError>,
) -> Result<(Vec<Item>, usize), StorageError> {
    let n = keys.len();
    // Most keys name nothing paged (a delete by id names resident items too): no room made up front.
    let mut got = Bounded::new(n, max_bytes, 0);
    for (i, (id, key)) in keys.enumerate() {
        if let Some(v) = ks.get(key).map_err(|e| engine.read_error(e))? {
            if !got.push(item(id, &v)?) {
                return Ok((got.items, i + 1));
            }
        }
    }
    Ok((got.items, n))
}

/// The paged scheduled items `read` names, in due order, and the key of the first paged item after them (past
/// `read.to` or the read's bounds; `None`: there is none): one range read of the records from `read.from` on.
/// Blocking.
pub(crate) fn read_sched(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    read: SchedRead,
    what: &str,
) -> Result<(Vec<Item>, Option<SchedKey>), StorageError> {
    let mut got = Bounded::new(read.n, read.max_bytes, read.n);
    for kv in ks.range(sched_due_key(pid, read.from)..sched_due_end(pid)) {
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        let Some(key) = sched_due_of(&k) else { continue };
        if !got.room() || read.to.is_some_and(|to| key >= to) {
            return Ok((got.items, Some(key)));
        }
        got.push(decode_record(key.1, &v, what)?);
    }
    Ok((got.items, None))
}

/// The due time stored in the id index of paged scheduled item `id`.
pub(crate) fn decode_due(id: u64, v: &[u8], what: &str) -> Result<i64, StorageError> {
    <[u8; 8]>::try_from(v).map(i64::from_be_bytes).map_err(|_| {
        StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "{what}: the due time of paged scheduled item {id} is damaged ({} bytes)",
                v.len()
            ),
        )
    })
}

/// The record of paged scheduled item `id` due at `due`, which its index entry names: its absence is damage.
pub(crate) fn sched_missing(id: u64, what: &str) -> StorageError {
    StorageError::new(
        StorageErrorKind::Corrupt,
        format!("{what}: the paged scheduled item {id} has an index entry but no record"),
    )
}

/// The record of paged scheduled item `id`, whose id-index entry (its due time) is `entry`. Blocking.
fn sched_item(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    id: u64,
    entry: &[u8],
    what: &str,
) -> Result<Item, StorageError> {
    let due = decode_due(id, entry, what)?;
    let r = ks
        .get(sched_due_key(pid, (due, id)))
        .map_err(|e| engine.read_error(e))?
        .ok_or_else(|| sched_missing(id, what))?;
    decode_record(id, &r, what)
}

/// Up to `n` paged scheduled items with ids at or above `from`, in id order, with payloads up to `max_bytes` (the
/// item that crosses it is the last): the id index, then a point read of each record. Blocking.
pub(crate) fn read_sched_by_id(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    from: u64,
    n: usize,
    max_bytes: u64,
    what: &str,
) -> Result<Vec<Item>, StorageError> {
    let mut got = Bounded::new(n, max_bytes, n);
    if !got.room() {
        return Ok(got.items);
    }
    for kv in ks.range(sched_record_key(pid, from)..sched_record_key(pid, u64::MAX)) {
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        let Some(id) = record_id(&k) else { continue };
        if !got.push(sched_item(engine, ks, pid, id, &v, what)?) {
            break;
        }
    }
    Ok(got.items)
}

/// The paged scheduled items among the first ids of `ids`, by point reads (the id index, then the record), with
/// payloads up to `max_bytes` (the item that crosses it is the last), and how many of `ids` were looked up: the
/// caller asks again for the rest. Blocking.
pub(crate) fn find_sched(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    ids: &[u64],
    max_bytes: u64,
    what: &str,
) -> Result<(Vec<Item>, usize), StorageError> {
    let keys = ids.iter().map(|&id| (id, sched_record_key(pid, id)));
    find_bounded(engine, ks, keys, max_bytes, |id, v| {
        sched_item(engine, ks, pid, id, v, what)
    })
}

/// Encodes a paged record: the item's metadata as the items keyspace stores it, then its payload.
pub(crate) fn encode_record(it: &Item) -> Vec<u8> {
    let meta = encode_meta(it);
    let mut v = Vec::with_capacity(4 + meta.len() + it.payload.len());
    v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    v.extend_from_slice(&meta);
    v.extend_from_slice(&it.payload);
    v
}

/// Decodes a paged record of item `id`; `what` names the partition in the error.
pub(crate) fn decode_record(id: u64, v: &[u8], what: &str) -> Result<Item, StorageError> {
    let len = v
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .map(|n| n as usize)
        .filter(|&n| 4 + n <= v.len())
        .ok_or_else(|| {
            StorageError::new(
                StorageErrorKind::Corrupt,
                format!(
                    "{what}: the paged record of item {id} is damaged ({} bytes)",
                    v.len()
                ),
            )
        })?;
    let mut it = decode_meta(ItemId(id), &v[4..4 + len], what)?;
    it.payload = Bytes::copy_from_slice(&v[4 + len..]);
    Ok(it)
}

/// Encodes the paging counters.
pub(crate) fn encode_counters(p: &Paged) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + PRIORITIES * 33 + 40);
    v.push(COUNTERS_V1);
    for i in 0..PRIORITIES {
        v.extend_from_slice(&p.from[i].to_be_bytes());
        v.extend_from_slice(&p.count[i].to_be_bytes());
        v.extend_from_slice(&p.min_expire[i].to_be_bytes());
        v.extend_from_slice(&p.max_expire[i].to_be_bytes());
        v.push(u8::from(p.ordered[i]));
    }
    v.extend_from_slice(&p.bytes.to_be_bytes());
    v.extend_from_slice(&p.sum_created.to_be_bytes());
    v.extend_from_slice(&p.with_source.to_be_bytes());
    v
}

/// Decodes the paging counters; `what` names the partition in the error.
pub(crate) fn decode_counters(v: &[u8], what: &str) -> Result<Paged, StorageError> {
    if v.first() != Some(&COUNTERS_V1) || v.len() != 1 + PRIORITIES * 33 + 32 {
        return Err(StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "{what}: the paging counters are damaged (version {:?}, {} bytes)",
                v.first(),
                v.len()
            ),
        ));
    }
    let u = |at: usize| u64::from_be_bytes(v[at..at + 8].try_into().unwrap_or_default());
    let mut p = Paged::default();
    for i in 0..PRIORITIES {
        let at = 1 + i * 33;
        p.from[i] = u(at);
        p.count[i] = u(at + 8);
        p.min_expire[i] = u(at + 16) as i64;
        p.max_expire[i] = u(at + 24) as i64;
        p.ordered[i] = v[at + 32] != 0;
    }
    let at = 1 + PRIORITIES * 33;
    p.bytes = u(at);
    p.sum_created = i128::from_be_bytes(v[at + 8..at + 24].try_into().unwrap_or_default());
    p.with_source = u(at + 24);
    Ok(p)
}

/// The stored paging counters of partition `pid`, if it has paged items. Blocking.
pub(crate) fn read_counters(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    what: &str,
) -> Result<Option<Paged>, StorageError> {
    match ks.get(counters_key(pid)).map_err(|e| engine.read_error(e))? {
        Some(v) => decode_counters(&v, what).map(Some),
        None => Ok(None),
    }
}

/// Walks the paged records of priority `prio` from id `from` on, in id order, handing each item to `each` until it
/// returns false. Blocking.
pub(crate) fn walk(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    prio: u8,
    from: u64,
    what: &str,
    mut each: impl FnMut(Item) -> bool,
) -> Result<(), StorageError> {
    let lo = record_key(pid, prio, from);
    // u64::MAX is never an id.
    let hi = record_key(pid, prio, u64::MAX);
    for kv in ks.range(lo..hi) {
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        if let Some(id) = record_id(&k) {
            if !each(decode_record(id, &v, what)?) {
                break;
            }
        }
    }
    Ok(())
}

/// The paged items `read` names (up to `read.n` of priority `read.prio` from id `read.from` on, in id order), with
/// payloads up to `max_bytes` (the item that crosses it is the last). Blocking.
pub(crate) fn read_page(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    read: PageRead,
    max_bytes: u64,
    what: &str,
) -> Result<Vec<Item>, StorageError> {
    let mut got = Bounded::new(read.n, max_bytes, read.n);
    if got.room() {
        walk(engine, ks, pid, read.prio, read.from, what, |it| got.push(it))?;
    }
    Ok(got.items)
}

/// The paged items among the first of `wanted` (priority, id) pairs, by point reads, with payloads up to
/// `max_bytes` (the item that crosses it is the last), and how many pairs were looked up: the caller asks again for
/// the rest. Blocking.
pub(crate) fn find(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    wanted: &[(u8, u64)],
    max_bytes: u64,
    what: &str,
) -> Result<(Vec<Item>, usize), StorageError> {
    let keys = wanted.iter().map(|&(prio, id)| (id, record_key(pid, prio, id)));
    find_bounded(engine, ks, keys, max_bytes, |id, v| decode_record(id, v, what))
}

/// Source ids of partition `pid`'s paged items that carry one: an open needs them for the resident source-id index
/// (only partitions holding imported items have any; the others never come here). Blocking; reads every record.
pub(crate) fn source_ids(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    what: &str,
) -> Result<Vec<(String, u64)>, StorageError> {
    let mut out = Vec::new();
    for prio in 0..PRIORITIES as u8 {
        walk(engine, ks, pid, prio, 0, what, |it| {
            if !it.source_id.is_empty() {
                out.push((it.source_id, it.id.0));
            }
            true
        })?;
    }
    Ok(out)
}

/// Source ids of partition `pid`'s paged scheduled items that carry one (as [`source_ids`]). Blocking; reads
/// every paged scheduled record.
pub(crate) fn sched_source_ids(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    what: &str,
) -> Result<Vec<(String, u64)>, StorageError> {
    let mut out = Vec::new();
    for kv in ks.range(sched_due_key(pid, (i64::MIN, 0))..sched_due_end(pid)) {
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        if let Some((_, id)) = sched_due_of(&k) {
            let it = decode_record(id, &v, what)?;
            if !it.source_id.is_empty() {
                out.push((it.source_id, id));
            }
        }
    }
    Ok(out)
}

/// Keys under partition `pid`'s paged prefix (tests: a partition that never spilled has none). Blocking.
pub(crate) fn count_keys(engine: &Engine, ks: &fjall::Keyspace, pid: u64) -> Result<usize, StorageError> {
    let mut n = 0;
    for kv in ks.prefix(paged_prefix(pid)) {
        kv.key().map_err(|e| engine.read_error(e))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_records_round_trip_and_keys_sort_after_every_pid() {
        let mut p = Paged::default();
        p.from[3] = 77;
        p.count[3] = 5;
        p.min_expire[3] = -4;
        p.max_expire[3] = 12;
        p.ordered[3] = false;
        p.bytes = 9;
        p.sum_created = -(1 << 70);
        p.with_source = 2;
        assert_eq!(decode_counters(&encode_counters(&p), "t").expect("decodes"), p);
        assert!(decode_counters(&[1, 2, 3], "t").is_err());
        let it = Item {
            id: ItemId(42),
            priority: 3,
            payload: Bytes::from_static(b"payload"),
            source_id: "s".into(),
            ..Default::default()
        };
        let back = decode_record(42, &encode_record(&it), "t").expect("decodes");
        assert_eq!(
            (back.payload, back.source_id, back.priority),
            (it.payload, it.source_id, 3)
        );
        assert!(decode_record(42, &[0, 0, 0, 9], "t").is_err());
        let k = record_key(7, 3, 42);
        assert_eq!(record_id(&k), Some(42));
        assert!(k[0] & 0x80 != 0 && counters_key(7)[0] & 0x80 != 0);
        assert!(k.as_slice() > (u32::MAX as u64).to_be_bytes().as_slice());
    }

    #[test]
    fn schedule_keys_sort_by_due_time_then_id_and_counters_round_trip() {
        let keys: Vec<Vec<u8>> = [(-5i64, 9u64), (-5, 10), (0, 1), (3, 0), (i64::MAX, 0)]
            .iter()
            .map(|&k| sched_due_key(7, k))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sched_due_of(&keys[0]), Some((-5, 9)));
        assert!(keys.iter().all(|k| k.as_slice() < sched_due_end(7).as_slice()));
        // Neither tag meets a priority's records, the counters or a cold segment's manifest ("seg").
        let other = [record_key(7, 9, u64::MAX), counters_key(7), sched_counters_key(7)];
        for k in &other {
            assert!(sched_due_of(k).is_none());
        }
        assert_eq!(record_id(&sched_record_key(7, 42)), Some(42));
        assert!(sched_record_key(7, 0) > record_key(7, 9, u64::MAX));
        let p = PagedSched {
            from: (-3, 8),
            count: 5,
            bytes: 99,
            with_source: 1,
        };
        assert_eq!(
            decode_sched_counters(&encode_sched_counters(&p), "t").expect("decodes"),
            p
        );
        assert!(decode_sched_counters(&[1, 2], "t").is_err());
    }
}
