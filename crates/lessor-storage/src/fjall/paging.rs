//! The on-disk side of paging (see `crate::state::paging`): the ready index, the index of items that are not
//! ready, the stored paging counters, and the reads that page items in, restore the resident part of a partition
//! at open, and sweep paged items for expiry.
//!
//! Keys, after the partition's pid (10 bytes each, a length no item or dedup key has, so older readers and the
//! partition scan skip them as bookkeeping):
//! ```text
//! 'r' + priority + id (u64 BE)   -> expire deadline (i64 BE)   every ready item, resident or paged
//! 'n' + 0xff + id (u64 BE)       -> (empty)                    every leased, scheduled or dead item
//! ```
//! and `"pgc"` -> the encoded [`Paged`] counters. Every change set writes the index entries of the items it puts
//! and removes in the same atomic batch, and the counters whenever they changed, so index and counters always
//! describe the items on disk. A partition opens by reading the counters, the `'n'` range and, per priority, the
//! `'r'` entries below the paged boundary: what it reads is bounded by the window and the items in flight, not
//! by the depth of the queue. A partition without counters (written by a build before paging) is read whole once
//! and gets its index then.

use bytes::Bytes;
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::types::{Item, ItemId};

use super::codec::decode_meta;
use super::engine::Engine;
use super::partitions::item_key;
use crate::state::paging::PRIORITIES;
use crate::state::Paged;

/// First byte of a ready-index key.
const READY_TAG: u8 = b'r';
/// First two bytes of a not-ready-index key.
const NOT_READY_TAG: [u8; 2] = [b'n', 0xff];
/// Key of the paging counters.
pub(crate) const COUNTERS_KEY: &[u8] = b"pgc";
/// Version byte of stored counters without heads.
const COUNTERS_V1: u8 = 1;
/// Version byte of the stored counters this build writes: the heads follow.
const COUNTERS_V2: u8 = 2;

/// The ready-index key of item `id` of priority `prio` in partition `pid`.
pub(crate) fn ready_key(pid: u64, prio: u8, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&pid.to_be_bytes());
    k.push(READY_TAG);
    k.push(prio);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The not-ready-index key of item `id` in partition `pid`.
pub(crate) fn not_ready_key(pid: u64, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&pid.to_be_bytes());
    k.extend_from_slice(&NOT_READY_TAG);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Whether an item is ready (goes in the ready index) rather than leased, scheduled or dead.
pub(crate) fn is_ready(it: &Item) -> bool {
    !it.dead && !it.is_leased && !it.is_scheduled()
}

/// The id at the end of an index key.
fn key_id(k: &[u8]) -> Option<u64> {
    (k.len() == 18).then(|| k[10..18].try_into().ok().map(u64::from_be_bytes))?
}

/// Encodes the paging counters.
pub(crate) fn encode_counters(p: &Paged) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + PRIORITIES * 32 + 40);
    v.push(COUNTERS_V2);
    for i in 0..PRIORITIES {
        v.extend_from_slice(&p.from[i].to_be_bytes());
        v.extend_from_slice(&p.count[i].to_be_bytes());
        v.extend_from_slice(&p.min_expire[i].to_be_bytes());
    }
    v.extend_from_slice(&p.bytes.to_be_bytes());
    v.extend_from_slice(&p.sum_created.to_be_bytes());
    v.extend_from_slice(&p.with_source.to_be_bytes());
    for h in p.head {
        v.extend_from_slice(&h.to_be_bytes());
    }
    v
}

/// Decodes the paging counters; `what` names the partition in the error.
pub(crate) fn decode_counters(v: &[u8], what: &str) -> Result<Paged, StorageError> {
    let bad = || {
        StorageError::new(
            StorageErrorKind::Corrupt,
            format!(
                "{what}: the paging counters are damaged (version {:?}, {} bytes)",
                v.first(),
                v.len()
            ),
        )
    };
    let base = 1 + PRIORITIES * 24 + 32;
    let ok = match v.first() {
        Some(&COUNTERS_V1) => v.len() == base,
        Some(&COUNTERS_V2) => v.len() == base + PRIORITIES * 8,
        _ => false,
    };
    if !ok {
        return Err(bad());
    }
    let u = |at: usize| u64::from_be_bytes(v[at..at + 8].try_into().unwrap_or_default());
    let mut p = Paged::default();
    for i in 0..PRIORITIES {
        let at = 1 + i * 24;
        p.from[i] = u(at);
        p.count[i] = u(at + 8);
        p.min_expire[i] = u(at + 16) as i64;
    }
    let at = 1 + PRIORITIES * 24;
    p.bytes = u(at);
    p.sum_created = i128::from_be_bytes(v[at + 8..at + 24].try_into().unwrap_or_default());
    p.with_source = u(at + 24);
    if v.len() > base {
        for i in 0..PRIORITIES {
            p.head[i] = u(base + i * 8);
        }
    }
    Ok(p)
}

/// Reads items by id (returned in id order; metadata and payload), skipping ids that are gone. Ids close together (a page of
/// one priority's FIFO, with at most a few other items between them) are read in one range scan, far cheaper per
/// item than point reads; scattered ones one by one. Blocking.
pub(crate) fn read_items(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    ids: &[u64],
    what: &str,
) -> Result<Vec<Item>, StorageError> {
    let mut sorted;
    let ids = if ids.is_sorted() {
        ids
    } else {
        sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        &sorted[..]
    };
    let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
        return Ok(Vec::new());
    };
    let dense = ids.len() >= 8 && last >= first && last - first < 4 * ids.len() as u64;
    if !dense {
        return read_items_by_point(engine, ks, pid, ids, what);
    }
    let lo = item_key(pid, &first.to_be_bytes());
    let hi = item_key(pid, &(last + 1).to_be_bytes());
    let mut out: Vec<Item> = Vec::with_capacity(ids.len());
    let mut want = ids.iter().copied().peekable();
    for kv in ks.range(lo..hi) {
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        match super::codec::parse_key(&k[8..]) {
            super::codec::Key::Meta(id) => {
                while want.next_if(|&w| w < id.0).is_some() {}
                if want.next_if_eq(&id.0).is_some() {
                    out.push(decode_meta(id, &v, what)?);
                }
            }
            super::codec::Key::Payload(id) => {
                if let Some(it) = out.last_mut().filter(|it| it.id == id) {
                    it.payload = Bytes::copy_from_slice(&v);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// [`read_items`] one point read per record.
fn read_items_by_point(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    ids: &[u64],
    what: &str,
) -> Result<Vec<Item>, StorageError> {
    let mut out = Vec::with_capacity(ids.len());
    let mut key = Vec::with_capacity(17);
    for &id in ids {
        key.clear();
        key.extend_from_slice(&pid.to_be_bytes());
        key.extend_from_slice(&id.to_be_bytes());
        let Some(meta) = ks.get(&key).map_err(|e| engine.read_error(e))? else {
            continue;
        };
        let mut it = decode_meta(ItemId(id), &meta, what)?;
        key.push(super::codec::PAYLOAD_TAG);
        if let Some(p) = ks.get(&key).map_err(|e| engine.read_error(e))? {
            it.payload = Bytes::copy_from_slice(&p);
        }
        out.push(it);
    }
    Ok(out)
}

/// Ids (and stored expire deadlines) of ready items of priority `prio` in `[from, to)`, at most `limit`. Blocking.
pub(crate) fn ready_ids(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    prio: u8,
    from: u64,
    to: u64,
    limit: usize,
) -> Result<Vec<(u64, i64)>, StorageError> {
    let lo = ready_key(pid, prio, from);
    let hi = if to == u64::MAX {
        // Up to the end of the priority (u64::MAX itself is never an id).
        ready_key(pid, prio, u64::MAX)
    } else {
        ready_key(pid, prio, to)
    };
    let mut out = Vec::new();
    for kv in ks.range(lo..hi) {
        if out.len() >= limit {
            break;
        }
        let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
        if let Some(id) = key_id(&k) {
            let exp = v
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(i64::MAX, i64::from_be_bytes);
            out.push((id, exp));
        }
    }
    Ok(out)
}

/// Ids of the partition's leased, scheduled and dead items. Blocking.
pub(crate) fn not_ready_ids(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
) -> Result<Vec<u64>, StorageError> {
    let mut prefix = pid.to_be_bytes().to_vec();
    prefix.extend_from_slice(&NOT_READY_TAG);
    let mut out = Vec::new();
    for kv in ks.prefix(prefix) {
        let k = kv.key().map_err(|e| engine.read_error(e))?;
        if let Some(id) = key_id(&k) {
            out.push(id);
        }
    }
    Ok(out)
}

/// The stored paging counters of partition `pid`, if it has any (a partition written before paging has none).
pub(crate) fn read_counters(
    engine: &Engine,
    ks: &fjall::Keyspace,
    pid: u64,
    what: &str,
) -> Result<Option<Paged>, StorageError> {
    match ks
        .get(item_key(pid, COUNTERS_KEY))
        .map_err(|e| engine.read_error(e))?
    {
        Some(v) => decode_counters(&v, what).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Diagnostic: compares the stored counters of partition pid 1 of the store at `$LESSOR_PAGING_CHECK_DIR` with
    /// its ready index.
    #[test]
    #[ignore]
    fn check_counters_of_a_store() {
        let Some(dir) = std::env::var_os("LESSOR_PAGING_CHECK_DIR") else {
            return;
        };
        let (engine, _) = Engine::open(
            std::path::Path::new(&dir),
            super::super::PARTITIONS_DIR,
            "partitions",
            "partition store",
            super::super::Durability::None,
            super::super::partitions::keyspace_options,
            super::super::engine::Formats {
                current: super::super::PARTITIONS_FORMAT_VERSION,
                upgradable: &[],
            },
        )
        .expect("open");
        let ks = engine.keyspace("items", false).expect("ks").expect("items");
        let c = read_counters(&engine, &ks, 1, "t")
            .expect("read")
            .expect("counters");
        println!(
            "counters: from {:?} count {:?} min_expire {:?} with_source {}",
            c.from, c.count, c.min_expire, c.with_source
        );
        for p in 0..PRIORITIES {
            let below = ready_ids(&engine, &ks, 1, p as u8, 0, c.from[p], usize::MAX)
                .expect("r")
                .len();
            let above = if c.from[p] == u64::MAX {
                0
            } else {
                ready_ids(&engine, &ks, 1, p as u8, c.from[p], u64::MAX, usize::MAX)
                    .expect("r")
                    .len()
            };
            if below + above > 0 {
                println!(
                    "prio {p}: {below} entries below from, {above} at or above (counted {})",
                    c.count[p]
                );
            }
        }
        let t = std::time::Instant::now();
        println!(
            "not ready: {} ({:?})",
            not_ready_ids(&engine, &ks, 1).expect("n").len(),
            t.elapsed()
        );
        let t = std::time::Instant::now();
        let page = ready_ids(&engine, &ks, 1, 0, c.from[0], u64::MAX, 8192).expect("page");
        let ids: Vec<u64> = page.iter().map(|x| x.0).collect();
        println!(
            "page: {} ids, span {} ({:?})",
            ids.len(),
            ids.last().unwrap_or(&0) - ids.first().unwrap_or(&0),
            t.elapsed()
        );
        let t = std::time::Instant::now();
        let items = read_items(&engine, &ks, 1, &ids, "t").expect("items");
        println!("read {} items ({:?})", items.len(), t.elapsed());
        let t = std::time::Instant::now();
        let below = ready_ids(&engine, &ks, 1, 0, 0, c.from[0], usize::MAX)
            .expect("r")
            .len();
        println!("resident range {} ({:?})", below, t.elapsed());
    }

    #[test]
    fn counters_round_trip_and_keys_have_their_own_length() {
        let mut p = Paged::default();
        p.from[3] = 77;
        p.count[3] = 5;
        p.min_expire[3] = -4;
        p.bytes = 9;
        p.sum_created = -(1 << 70);
        p.with_source = 2;
        p.head[3] = 70;
        assert_eq!(decode_counters(&encode_counters(&p), "t").expect("decodes"), p);
        assert!(decode_counters(&[1, 2, 3], "t").is_err());
        assert_eq!(ready_key(1, 2, 3).len(), 18);
        assert_eq!(not_ready_key(1, 3).len(), 18);
        assert_eq!(key_id(&ready_key(1, 2, 3)), Some(3));
        assert_eq!(key_id(&not_ready_key(1, 4)), Some(4));
    }
}
