//! The on-disk encoding of items and queue definitions: a compact binary format with a version byte in front of
//! every record.
//!
//! An item's metadata lives under its id (8 bytes, big-endian, so key order is FIFO order). A payload of at most
//! [`INLINE_PAYLOAD_MAX`] bytes lives in the same record (version 3, [`encode_item`]): one key-value entry per
//! item, where two cost fjall's writer, journal and compaction a second entry for every produce and every delete
//! (measured in docs/benchmarks.md). A larger payload is a record of its own, under the id followed by
//! [`PAYLOAD_TAG`], which sorts right after the metadata: the payload never changes once written, so the frequent
//! updates (lease, retry into the schedule, death) rewrite only the small metadata record and not kilobytes of
//! payload each time. An empty payload has no bytes anywhere. Records of earlier builds (a small payload in a
//! record of its own) still read; their next update writes the payload inline, and the old payload record goes
//! with the item.
//!
//! Dedup records live in groups, one per produce call: the group's key is [`DEDUP_TAG`] followed by its first
//! record's `until` and item id (17 bytes, so no item key can be mistaken for one), and its value lists the
//! records (version 2; version 1, one record whose value is its key string, still reads). Groups sort by expiry,
//! and deleting one needs no string. One entry per call instead of one per item keeps the key's cost at the
//! bytes it adds to the batch, not a third entry per item (measured in docs/benchmarks.md).
//!
//! The version byte lets a later build read old records (or refuse them clearly) without a whole-store migration:
//! version 2 of items adds the priority, version 2 of queues the issue-10 settings; version 1 records still read.
//! Integers are LEB128 varints (signed ones zig-zag encoded) because most fields are small or zero: an unleased,
//! unscheduled item spends one byte on each of its unset deadlines. Integrity is fjall's job (checksummed journal
//! and blocks), so records carry no checksum of their own.

use std::time::Duration;

use bytes::Bytes;
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, DedupRecord, Item, ItemId, PartitionInfo, QueueInfo};

/// Version byte of item metadata records of earlier builds (no priority).
const ITEM_V1: u8 = 1;
/// Version byte of item metadata records of a payload kept in a record of its own (or empty): a priority byte
/// follows the flags.
const ITEM_V2: u8 = 2;
/// Version byte of item records with their payload inline: version 2 followed by the payload.
const ITEM_V3: u8 = 3;
/// Largest payload kept inline in its item's record (see the module docs): an update rewrites the whole record, so
/// large payloads stay in a record of their own.
pub(crate) const INLINE_PAYLOAD_MAX: usize = 1024;
/// Version byte of queue records of earlier builds.
const QUEUE_V1: u8 = 1;
/// Version byte of queue records written by this build: the dedup window, retry backoff, pause flag and max lease
/// follow the partitions.
const QUEUE_V2: u8 = 2;
/// Version 2 plus a restoring flag (issue 11). Written only for a queue being restored, so a queue definition
/// stays readable by builds that predate restores whenever it can be.
const QUEUE_V3: u8 = 3;
/// Version byte of dedup values of earlier builds: one record, the value is its key string.
const DEDUP_V1: u8 = 1;
/// Version byte of dedup values written by this build: a group of records.
const DEDUP_V2: u8 = 2;
/// Last byte of a payload key.
pub(crate) const PAYLOAD_TAG: u8 = b'p';
/// First byte of a dedup record key.
pub(crate) const DEDUP_TAG: u8 = b'd';
/// Length of a dedup record key: tag, until, id.
const DEDUP_KEY_LEN: usize = 17;

const FLAG_LEASED: u8 = 1;
const FLAG_DEAD: u8 = 2;

/// What a key of a partition keyspace names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Key {
    /// An item's metadata.
    Meta(ItemId),
    /// An item's payload.
    Payload(ItemId),
    /// A dedup record: its `until` and item id.
    Dedup(Ts, ItemId),
    /// Bookkeeping (see the partition store).
    Other,
}

/// The key of an item's metadata within its partition (format 1 wrote exactly this; format 2 puts the pid in
/// front, in one allocation, in the partition store). Tests build keys with it.
#[cfg(test)]
pub(crate) fn meta_key(id: ItemId) -> Vec<u8> {
    id.0.to_be_bytes().to_vec()
}

/// The key of an item's payload within its partition (see [`meta_key`]).
#[cfg(test)]
pub(crate) fn payload_key(id: ItemId) -> Vec<u8> {
    let mut k = meta_key(id);
    k.push(PAYLOAD_TAG);
    k
}

/// Classifies a key of a partition keyspace.
pub(crate) fn parse_key(key: &[u8]) -> Key {
    let id = |b: &[u8]| <[u8; 8]>::try_from(b).ok().map(|b| ItemId(u64::from_be_bytes(b)));
    match key.len() {
        8 => id(key).map_or(Key::Other, Key::Meta),
        9 if key[8] == PAYLOAD_TAG => id(&key[..8]).map_or(Key::Other, Key::Payload),
        DEDUP_KEY_LEN if key[0] == DEDUP_TAG => match (id(&key[1..9]), id(&key[9..])) {
            // The sign bit is flipped so that negative times sort first (see `dedup_key`).
            (Some(until), Some(item)) => Key::Dedup(Ts((until.0 ^ (1 << 63)) as i64), item),
            _ => Key::Other,
        },
        _ => Key::Other,
    }
}

/// The key of a dedup record within its partition: [`DEDUP_TAG`], `until` (big-endian with the sign bit flipped,
/// so keys sort by time), the item id.
pub(crate) fn dedup_key(until: Ts, id: ItemId) -> [u8; DEDUP_KEY_LEN] {
    let mut k = [0u8; DEDUP_KEY_LEN];
    k[0] = DEDUP_TAG;
    k[1..9].copy_from_slice(&((until.0 as u64) ^ (1 << 63)).to_be_bytes());
    k[9..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// Encodes the value of a dedup group (see the module docs): the records in order, each as the difference of its
/// `until` and id from the first record's (which are in the key), then its key string.
pub(crate) fn encode_dedup(records: &[DedupRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dedup_len(records));
    encode_dedup_into(records, &mut out);
    out
}

/// About how many bytes [`encode_dedup`] writes for `records` (at least as many, for a buffer's capacity).
pub(crate) fn dedup_len(records: &[DedupRecord]) -> usize {
    1 + records.iter().map(|r| r.dedup_id.len() + 24).sum::<usize>()
}

/// [`encode_dedup`] appending to `out` (a log record writes the group where it is, without a buffer of its own).
pub(crate) fn encode_dedup_into(records: &[DedupRecord], out: &mut Vec<u8>) {
    let mut w = Writer(std::mem::take(out));
    w.0.push(DEDUP_V2);
    if let Some(first) = records.first() {
        for r in records {
            w.ts(Ts(r.until.0.wrapping_sub(first.until.0)));
            w.uint(r.id.0.wrapping_sub(first.id.0));
            w.bytes(r.dedup_id.as_bytes());
        }
    }
    *out = w.0;
}

/// Decodes the dedup group stored under `(until, id)`; `what` names the partition in error messages.
pub(crate) fn decode_dedup(
    until: Ts,
    id: ItemId,
    buf: &[u8],
    what: &str,
) -> Result<Vec<DedupRecord>, StorageError> {
    match buf.split_first() {
        Some((&DEDUP_V1, key)) => Ok(vec![DedupRecord {
            dedup_id: String::from_utf8(key.to_vec())
                .map_err(|_| corrupt(format!("{what}: the dedup key of item {id} is not UTF-8")))?,
            id,
            until,
        }]),
        Some((&DEDUP_V2, rest)) => {
            let what = format!("{what}: the dedup records of item {id} on");
            let mut r = Reader { buf: rest, what: &what };
            let mut out = Vec::new();
            while !r.buf.is_empty() {
                let (dt, di) = (r.ts()?.0, r.uint()?);
                if out.is_empty() && (dt, di) != (0, 0) {
                    return Err(corrupt(format!("{what}: the first record is not the one the key names")));
                }
                let t = Ts(until.0.wrapping_add(dt));
                let i = ItemId(id.0.wrapping_add(di));
                out.push(DedupRecord {
                    dedup_id: r.string()?,
                    id: i,
                    until: t,
                });
            }
            Ok(out)
        }
        Some((v, _)) => Err(corrupt(format!(
            "{what}: the dedup record of item {id} has version {v}, this build reads versions {DEDUP_V1} and {DEDUP_V2}"
        ))),
        None => Err(corrupt(format!("{what}: the dedup record of item {id} is empty"))),
    }
}

/// Encodes an item's metadata: everything but its id (the key) and its payload (a record of its own).
pub(crate) fn encode_meta(it: &Item) -> Vec<u8> {
    encode_record(it, false)
}

/// Whether an item's payload is kept inline in its record (see the module docs).
pub(crate) fn inline_payload(it: &Item) -> bool {
    !it.payload.is_empty() && it.payload.len() <= INLINE_PAYLOAD_MAX
}

/// Encodes an item's record: its metadata, and its payload too when [`inline_payload`] says so.
pub(crate) fn encode_item(it: &Item) -> Vec<u8> {
    encode_record(it, inline_payload(it))
}

/// Appends an item's record, its payload inline whatever its size, to `out`: the log store writes its records in
/// place rather than encode each item into a buffer of its own and copy it.
pub(crate) fn encode_whole_into(it: &Item, out: &mut Vec<u8>) {
    let mut w = Writer(std::mem::take(out));
    write_record(&mut w, it, true);
    *out = w.0;
}

/// Appends an item's metadata record (no payload) to `out`: the log store's record of a change that left the
/// payload as it was (a lease, an extension), which replay lays over the item's whole record with [`restate`].
pub(crate) fn encode_meta_into(it: &Item, out: &mut Vec<u8>) {
    let mut w = Writer(std::mem::take(out));
    write_record(&mut w, it, false);
    *out = w.0;
}

/// The whole record of an item (metadata and payload inline) whose whole record was `whole` and whose metadata
/// then became `meta` (a record of [`encode_meta_into`]): the metadata of `meta`, the payload of `whole`.
pub(crate) fn restate(id: ItemId, whole: &[u8], meta: &[u8], what: &str) -> Result<Vec<u8>, StorageError> {
    let mut r = Reader { buf: whole, what };
    let version = r.byte()?;
    if version != ITEM_V3 || meta.first() != Some(&ITEM_V2) {
        return Err(corrupt(format!(
            "{what}: item {id}'s metadata record (version {:?}) cannot be laid over its record of version              {version}",
            meta.first()
        )));
    }
    // Skips the metadata up to the payload field (its length and bytes), which ends the record: flags,
    // priority, four times, attempts and max attempts, four strings.
    r.byte()?;
    r.byte()?;
    for _ in 0..6 {
        r.uint()?;
    }
    for _ in 0..4 {
        let n = r.uint()?;
        r.take(n)?;
    }
    let payload = r.buf;
    let mut out = Vec::with_capacity(meta.len() + payload.len());
    out.push(ITEM_V3);
    out.extend_from_slice(&meta[1..]);
    out.extend_from_slice(payload);
    Ok(out)
}

fn encode_record(it: &Item, inline: bool) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(
        40 + it.source_id.len()
            + it.reference.len()
            + it.encoding.len()
            + it.kind.len()
            + if inline { it.payload.len() + 3 } else { 0 },
    ));
    write_record(&mut w, it, inline);
    w.0
}

fn write_record(w: &mut Writer, it: &Item, inline: bool) {
    w.0.push(if inline { ITEM_V3 } else { ITEM_V2 });
    let mut flags = 0;
    if it.is_leased {
        flags |= FLAG_LEASED;
    }
    if it.dead {
        flags |= FLAG_DEAD;
    }
    w.0.push(flags);
    w.0.push(it.priority);
    w.ts(it.lease_deadline);
    w.ts(it.expire_deadline);
    w.ts(it.enqueue_at);
    w.ts(it.created_at);
    w.uint(u64::from(it.attempts));
    w.uint(u64::from(it.max_attempts));
    w.bytes(it.source_id.as_bytes());
    w.bytes(it.reference.as_bytes());
    w.bytes(it.encoding.as_bytes());
    w.bytes(it.kind.as_bytes());
    if inline {
        w.bytes(&it.payload);
    }
}

/// Decodes the record of item `id`: its metadata, and its payload when it is inline (left empty otherwise, for
/// the payload record that follows); `what` names the record in error messages.
pub(crate) fn decode_meta(id: ItemId, buf: &[u8], what: &str) -> Result<Item, StorageError> {
    let mut r = Reader { buf, what };
    let version = r.byte()?;
    if !(ITEM_V1..=ITEM_V3).contains(&version) {
        return Err(corrupt(format!(
            "{what}: item {id} has record version {version}, this build reads versions {ITEM_V1} to {ITEM_V3}"
        )));
    }
    let flags = r.byte()?;
    let priority = if version >= ITEM_V2 { r.byte()? } else { 0 };
    let mut it = Item {
        id,
        is_leased: flags & FLAG_LEASED != 0,
        dead: flags & FLAG_DEAD != 0,
        lease_deadline: r.ts()?,
        expire_deadline: r.ts()?,
        enqueue_at: r.ts()?,
        created_at: r.ts()?,
        attempts: r.u32()?,
        max_attempts: r.u32()?,
        source_id: r.string()?,
        reference: r.string()?,
        encoding: r.string()?,
        kind: r.string()?,
        payload: Bytes::new(),
        priority,
    };
    if version == ITEM_V3 {
        let n = r.uint()?;
        it.payload = Bytes::copy_from_slice(r.take(n)?);
    }
    if !r.buf.is_empty() {
        return Err(corrupt(format!(
            "{what}: item {id} has {} unexpected trailing bytes",
            r.buf.len()
        )));
    }
    Ok(it)
}

/// Encodes a queue definition.
pub(crate) fn encode_queue(q: &QueueInfo) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 + q.name.len() + q.reference.len()));
    w.0.push(if q.restoring { QUEUE_V3 } else { QUEUE_V2 });
    w.bytes(q.name.as_bytes());
    w.bytes(q.namespace.as_bytes());
    w.ts(q.created_at);
    w.ts(q.updated_at);
    w.bytes(q.dead_queue.as_bytes());
    w.bytes(q.reference.as_bytes());
    w.duration(q.lease_timeout);
    w.duration(q.expire_timeout);
    w.uint(u64::from(q.max_attempts));
    w.uint(u64::from(q.requested_partitions));
    w.uint(q.partitions.len() as u64);
    for p in &q.partitions {
        w.uint(u64::from(p.partition));
        w.bytes(p.storage_name.as_bytes());
        w.0.push(u8::from(p.read_only));
    }
    w.duration(q.dedup_window);
    w.duration(q.retry_backoff.base);
    w.f64(q.retry_backoff.factor);
    w.duration(q.retry_backoff.max);
    w.f64(q.retry_backoff.jitter);
    w.0.push(u8::from(q.paused));
    w.duration(q.max_lease_timeout);
    if q.restoring {
        w.0.push(1);
    }
    w.0
}

/// Decodes a queue definition; `what` names the record in error messages.
pub(crate) fn decode_queue(buf: &[u8], what: &str) -> Result<QueueInfo, StorageError> {
    let mut r = Reader { buf, what };
    let version = r.byte()?;
    if !(QUEUE_V1..=QUEUE_V3).contains(&version) {
        return Err(corrupt(format!(
            "{what}: record version {version}, this build reads versions {QUEUE_V1} to {QUEUE_V3}"
        )));
    }
    let mut q = QueueInfo {
        name: r.string()?,
        namespace: r.string()?,
        created_at: r.ts()?,
        updated_at: r.ts()?,
        dead_queue: r.string()?,
        reference: r.string()?,
        lease_timeout: r.duration()?,
        expire_timeout: r.duration()?,
        max_attempts: r.u32()?,
        requested_partitions: r.u32()?,
        partitions: Vec::new(),
        // Version 1 records predate these settings: their defaults (off, the default window) apply.
        ..Default::default()
    };
    let n = r.uint()?;
    for _ in 0..n {
        q.partitions.push(PartitionInfo {
            partition: r.u32()?,
            storage_name: r.string()?,
            read_only: r.byte()? != 0,
        });
    }
    if version >= QUEUE_V2 {
        q.dedup_window = r.duration()?;
        q.retry_backoff = Backoff {
            base: r.duration()?,
            factor: r.f64()?,
            max: r.duration()?,
            jitter: r.f64()?,
        };
        q.paused = r.byte()? != 0;
        q.max_lease_timeout = r.duration()?;
    }
    if version >= QUEUE_V3 {
        q.restoring = r.byte()? != 0;
    }
    if !r.buf.is_empty() {
        return Err(corrupt(format!(
            "{what}: {} unexpected trailing bytes",
            r.buf.len()
        )));
    }
    Ok(q)
}

fn corrupt(message: String) -> StorageError {
    StorageError::new(StorageErrorKind::Corrupt, message)
}

struct Writer(Vec<u8>);

impl Writer {
    fn uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn ts(&mut self, t: Ts) {
        // Zig-zag, so small negative values stay short too.
        self.uint(((t.0 << 1) ^ (t.0 >> 63)) as u64);
    }

    fn duration(&mut self, d: Duration) {
        self.uint(d.as_secs());
        self.uint(u64::from(d.subsec_nanos()));
    }

    fn bytes(&mut self, b: &[u8]) {
        self.uint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn f64(&mut self, v: f64) {
        // Exact bits: a factor read back must equal the one written.
        self.0.extend_from_slice(&v.to_bits().to_le_bytes());
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn short(&self) -> StorageError {
        corrupt(format!("{}: record ends early", self.what))
    }

    fn byte(&mut self) -> Result<u8, StorageError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.short())?;
        self.buf = rest;
        Ok(b)
    }

    fn uint(&mut self) -> Result<u64, StorageError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt(format!("{}: varint longer than 64 bits", self.what)))
    }

    fn u32(&mut self) -> Result<u32, StorageError> {
        let v = self.uint()?;
        u32::try_from(v).map_err(|_| corrupt(format!("{}: {v} does not fit 32 bits", self.what)))
    }

    fn ts(&mut self) -> Result<Ts, StorageError> {
        let z = self.uint()?;
        Ok(Ts(((z >> 1) as i64) ^ -((z & 1) as i64)))
    }

    fn duration(&mut self) -> Result<Duration, StorageError> {
        let secs = self.uint()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(corrupt(format!(
                "{}: {nanos} nanoseconds is not below one second",
                self.what
            )));
        }
        Ok(Duration::new(secs, nanos))
    }

    fn f64(&mut self) -> Result<f64, StorageError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_bits(u64::from_le_bytes(a)))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], StorageError> {
        let n = usize::try_from(n).map_err(|_| self.short())?;
        if n > self.buf.len() {
            return Err(self.short());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, StorageError> {
        let n = self.uint()?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt(format!("{}: text field is not UTF-8", self.what)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Item {
        Item {
            id: ItemId(77),
            source_id: "src".into(),
            is_leased: true,
            lease_deadline: Ts(1_800_000_000_123_456),
            expire_deadline: Ts(1_800_000_100_000_000),
            enqueue_at: Ts::ZERO,
            created_at: Ts(-5),
            attempts: 3,
            max_attempts: u32::MAX,
            reference: "ref".into(),
            encoding: "application/json".into(),
            kind: "k".into(),
            payload: Bytes::from_static(b"{\"a\":1}"),
            dead: true,
            priority: 7,
        }
    }

    #[test]
    fn item_metadata_round_trips_without_the_payload() {
        let it = sample();
        let buf = encode_meta(&it);
        assert!(!buf.windows(it.payload.len()).any(|w| w == &it.payload[..]));
        let back = decode_meta(it.id, &buf, "test").expect("decode");
        assert_eq!(
            back,
            Item {
                payload: Bytes::new(),
                ..it
            }
        );
        let empty = Item::default();
        assert_eq!(
            decode_meta(ItemId(0), &encode_meta(&empty), "test").expect("decode"),
            empty
        );
    }

    /// A small payload rides in the record (version 3) and comes back with it; a larger one, or none, leaves the
    /// record as version 2, without it.
    #[test]
    fn small_payloads_are_inline_and_large_ones_are_not() {
        let small = Item {
            payload: Bytes::from(vec![7u8; INLINE_PAYLOAD_MAX]),
            ..sample()
        };
        let buf = encode_item(&small);
        assert_eq!(buf[0], ITEM_V3);
        assert_eq!(decode_meta(small.id, &buf, "test").expect("decode"), small);
        let large = Item {
            payload: Bytes::from(vec![7u8; INLINE_PAYLOAD_MAX + 1]),
            ..sample()
        };
        let buf = encode_item(&large);
        assert_eq!(buf[0], ITEM_V2);
        assert!(!inline_payload(&large));
        let back = decode_meta(large.id, &buf, "test").expect("decode");
        assert_eq!(
            back,
            Item {
                payload: Bytes::new(),
                ..large
            }
        );
        let empty = Item {
            payload: Bytes::new(),
            ..sample()
        };
        assert_eq!(encode_item(&empty), encode_meta(&empty));
        // A truncated inline payload is corrupt, never a shorter payload.
        let buf = encode_item(&small);
        let e = decode_meta(small.id, &buf[..buf.len() - 1], "test").expect_err("short");
        assert_eq!(e.kind, StorageErrorKind::Corrupt);
    }

    /// A metadata record laid over a whole one gives the whole record of the item with the new metadata and the
    /// old payload, byte for byte what encoding that item whole gives; anything else is refused as corrupt.
    #[test]
    fn a_metadata_record_laid_over_a_whole_one_keeps_the_payload() {
        for payload in [
            Bytes::new(),
            Bytes::from_static(b"x"),
            Bytes::from(vec![9u8; 5000]),
        ] {
            let before = Item {
                payload: payload.clone(),
                is_leased: false,
                lease_deadline: Ts::ZERO,
                attempts: 0,
                ..sample()
            };
            let mut whole = Vec::new();
            encode_whole_into(&before, &mut whole);
            let after = Item {
                is_leased: true,
                lease_deadline: Ts(1_900_000_000_000_000),
                attempts: 1,
                reference: "a longer reference than before".into(),
                ..before.clone()
            };
            let mut meta = Vec::new();
            encode_meta_into(&after, &mut meta);
            assert!(
                meta.len() < whole.len() - payload.len() + 40,
                "no payload in the metadata record"
            );
            let merged = restate(after.id, &whole, &meta, "test").expect("restate");
            let mut expected = Vec::new();
            encode_whole_into(&after, &mut expected);
            assert_eq!(merged, expected);
            assert_eq!(decode_meta(after.id, &merged, "test").expect("decode"), after);
            // The other way round, or a damaged whole record, is corrupt.
            let e = restate(after.id, &meta, &whole, "test").expect_err("swapped");
            assert_eq!(e.kind, StorageErrorKind::Corrupt);
            let e = restate(after.id, &whole[..12], &meta, "test").expect_err("short");
            assert_eq!(e.kind, StorageErrorKind::Corrupt);
        }
    }

    /// Review: `restate` skips exactly the fields `write_record` writes, whatever their varint lengths: extreme
    /// and negative times (ten-byte zig-zag varints), the largest counters, strings of 0, 127, 128 and 20,000
    /// bytes (one-, two- and three-byte lengths), payloads whose length varint is one to three bytes, on both the
    /// whole record and the metadata laid over it.
    #[test]
    fn review_restate_skips_every_field_whatever_its_length() {
        let strings = [0usize, 1, 127, 128, 20_000];
        let times = [
            Ts::ZERO,
            Ts(-1),
            Ts(i64::MIN),
            Ts(i64::MAX),
            Ts(1_800_000_000_000_000),
        ];
        let mut n = 0u32;
        for (i, &len) in strings.iter().enumerate() {
            for (j, &t) in times.iter().enumerate() {
                let s = |k: usize| "s".repeat(strings[(i + k) % strings.len()]);
                let whole_item = Item {
                    source_id: s(0),
                    reference: s(1),
                    encoding: s(2),
                    kind: s(3),
                    lease_deadline: t,
                    expire_deadline: times[(j + 1) % times.len()],
                    enqueue_at: times[(j + 2) % times.len()],
                    created_at: times[(j + 3) % times.len()],
                    attempts: if j % 2 == 0 { 0 } else { u32::MAX },
                    max_attempts: if j % 2 == 0 { u32::MAX } else { 0 },
                    priority: (n % 256) as u8,
                    dead: j % 2 == 0,
                    is_leased: j % 3 == 0,
                    payload: Bytes::from(vec![
                        0x80u8;
                        [0usize, 1, 127, 128, 16_384, 70_000][n as usize % 6]
                    ]),
                    ..sample()
                };
                let after = Item {
                    source_id: s(4),
                    reference: "r".repeat(len),
                    encoding: s(1),
                    kind: s(2),
                    lease_deadline: times[(j + 4) % times.len()],
                    expire_deadline: t,
                    enqueue_at: times[(j + 3) % times.len()],
                    created_at: times[(j + 2) % times.len()],
                    attempts: if j % 2 == 1 { 0 } else { u32::MAX },
                    max_attempts: 1,
                    priority: 255 - (n % 256) as u8,
                    dead: j % 2 == 1,
                    is_leased: j % 3 != 0,
                    ..whole_item.clone()
                };
                let mut whole = Vec::new();
                encode_whole_into(&whole_item, &mut whole);
                let mut meta = Vec::new();
                encode_meta_into(&after, &mut meta);
                let merged = restate(after.id, &whole, &meta, "test").expect("restate");
                let mut expected = Vec::new();
                encode_whole_into(&after, &mut expected);
                assert_eq!(merged, expected, "strings of {len}, time {t:?}");
                assert_eq!(decode_meta(after.id, &merged, "test").expect("decode"), after);
                n += 1;
            }
        }
    }

    #[test]
    fn item_refuses_unknown_version_and_truncation() {
        let mut buf = encode_meta(&sample());
        buf[0] = 9;
        let e = decode_meta(ItemId(1), &buf, "test").expect_err("version");
        assert_eq!(e.kind, StorageErrorKind::Corrupt);
        assert!(e.message.contains("record version 9"), "{}", e.message);
        let buf = encode_meta(&sample());
        let e = decode_meta(ItemId(1), &buf[..10], "test").expect_err("short");
        assert_eq!(e.kind, StorageErrorKind::Corrupt);
    }

    #[test]
    fn queue_round_trips() {
        let q = QueueInfo {
            name: "q".into(),
            namespace: "_system".into(),
            created_at: Ts(1),
            updated_at: Ts(2),
            dead_queue: "dlq".into(),
            reference: "r".into(),
            lease_timeout: Duration::new(60, 5),
            expire_timeout: Duration::from_secs(3600),
            max_attempts: 7,
            requested_partitions: 2,
            partitions: vec![
                PartitionInfo {
                    partition: 0,
                    storage_name: "a".into(),
                    read_only: false,
                },
                PartitionInfo {
                    partition: 1,
                    storage_name: "b".into(),
                    read_only: true,
                },
            ],
            dedup_window: Duration::new(90, 1),
            retry_backoff: Backoff {
                base: Duration::from_millis(1500),
                factor: 2.5,
                max: Duration::from_secs(120),
                jitter: 0.1,
            },
            paused: true,
            max_lease_timeout: Duration::from_secs(600),
            restoring: false,
        };
        let plain = encode_queue(&q);
        assert_eq!(
            plain[0], QUEUE_V2,
            "a queue not being restored keeps the older record version"
        );
        assert_eq!(decode_queue(&plain, "test").expect("decode"), q);
        let restoring = QueueInfo { restoring: true, ..q };
        let v3 = encode_queue(&restoring);
        assert_eq!(v3[0], QUEUE_V3);
        assert_eq!(decode_queue(&v3, "test").expect("decode"), restoring);
    }

    /// A version-1 item record (before priorities) reads with priority 0.
    #[test]
    fn item_version_1_reads() {
        let it = sample();
        let mut v1 = encode_meta(&it);
        assert_eq!(v1[0], ITEM_V2);
        v1.remove(2); // the priority byte, right after the flags
        v1[0] = ITEM_V1;
        let back = decode_meta(it.id, &v1, "test").expect("decode v1");
        assert_eq!(
            back,
            Item {
                payload: Bytes::new(),
                priority: 0,
                ..it
            }
        );
    }

    /// A version-1 queue record (before the issue-10 settings) reads with them off.
    #[test]
    fn queue_version_1_reads() {
        let q = QueueInfo {
            name: "q".into(),
            namespace: "ns".into(),
            lease_timeout: Duration::from_secs(60),
            partitions: vec![PartitionInfo {
                partition: 0,
                storage_name: "a".into(),
                read_only: false,
            }],
            ..Default::default()
        };
        let mut v1 = encode_queue(&q);
        // The v2 tail of a default queue: four zero durations (two bytes each), two f64, the pause flag.
        v1.truncate(v1.len() - (4 * 2 + 2 * 8 + 1));
        v1[0] = QUEUE_V1;
        assert_eq!(decode_queue(&v1, "test").expect("decode v1"), q);
        let mut bad = encode_queue(&q);
        bad[0] = 3;
        assert!(decode_queue(&bad, "test").is_err());
    }

    /// Dedup keys carry their time and id, sort by time (negative ones first), and never read as item keys.
    #[test]
    fn dedup_keys_round_trip_and_sort_by_time() {
        let cases = [
            (Ts(-5), ItemId(9)),
            (Ts(0), ItemId(3)),
            (Ts(1_800_000_000_000_000), ItemId(1)),
            (Ts(1_800_000_000_000_000), ItemId(2)),
            (Ts(i64::MAX), ItemId(u64::MAX)),
        ];
        let keys: Vec<_> = cases.iter().map(|&(t, id)| dedup_key(t, id)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        for (k, &(t, id)) in keys.iter().zip(&cases) {
            assert_eq!(parse_key(k), Key::Dedup(t, id));
        }
        let rec = |k: &str, id: u64, until: i64| DedupRecord {
            dedup_id: k.into(),
            id: ItemId(id),
            until: Ts(until),
        };
        let group = vec![rec("key-1", 6, 5), rec("", 9, 5), rec("k\u{e9}y-3", 12, -7)];
        let v = encode_dedup(&group);
        assert_eq!(decode_dedup(Ts(5), ItemId(6), &v, "test").expect("decode"), group);
        // A first record that is not the one the key names: refused.
        assert!(decode_dedup(Ts(5), ItemId(6), &[DEDUP_V2, 0, 1, 0], "test").is_err());
        // Truncated: refused.
        assert!(decode_dedup(Ts(5), ItemId(6), &v[..v.len() - 1], "test").is_err());
        // Version 1 (earlier builds): one record, the value is the key.
        let mut v1 = vec![DEDUP_V1];
        v1.extend_from_slice(b"key-1");
        assert_eq!(
            decode_dedup(Ts(5), ItemId(6), &v1, "test").expect("decode v1"),
            vec![rec("key-1", 6, 5)]
        );
        assert!(decode_dedup(Ts(5), ItemId(6), &[9, b'x'], "test").is_err());
    }

    #[test]
    fn keys_sort_as_ids_with_each_payload_right_after_its_metadata() {
        let mut keys = [
            meta_key(ItemId(256)),
            payload_key(ItemId(255)),
            meta_key(ItemId(255)),
            payload_key(ItemId(256)),
        ];
        keys.sort();
        assert_eq!(
            keys.iter().map(|k| parse_key(k)).collect::<Vec<_>>(),
            vec![
                Key::Meta(ItemId(255)),
                Key::Payload(ItemId(255)),
                Key::Meta(ItemId(256)),
                Key::Payload(ItemId(256))
            ]
        );
        assert_eq!(parse_key(b"hwm"), Key::Other);
        assert_eq!(parse_key(b"123456789"), Key::Other);
    }
}
