//! The backup file format: what `lessor backup` writes and `lessor restore` reads (specified in
//! `docs/backup-format.md`).
//!
//! A file is a magic number and a format version, then records, then an end marker:
//!
//! ```text
//! "LESSORBK" | version u32 LE | record* | "LSRBKEND"
//! record = kind u8 | length u32 LE | crc32 u32 LE (of the stored body) | body (zstd of one protobuf message)
//! ```
//!
//! The first record is the [`BackupHeader`] (queue definitions), then [`ItemBlock`]s (items of one partition, in
//! id order, each saying at which item of the partition's stream it starts), and last the [`BackupTrailer`] (item
//! counts per partition). A file without a valid trailer and end marker is incomplete and is never restored.
//!
//! Every record decompresses to at most [`MAX_RECORD`] bytes, which bounds what a reader allocates for one; an
//! item whose payload is larger than [`PART_BYTES`] is therefore not held in one record but split (version 2): its
//! block carries it with an empty payload and says how long the payload is, and [`PayloadPart`] records right
//! after the block carry the payload's bytes in order. So any item a server accepted can be backed up, whatever
//! `limits.max-offload-produce-body` allows. Version 1 files (no parts) are read as they always were.
//!
//! Everything streams: the server encodes one block at a time into the response, the [`Reader`] decodes one
//! record at a time from any [`std::io::Read`], so neither end holds a whole backup in memory. The server (which
//! produces the format) and the CLI (which writes, verifies and restores it) both use this module, which is why it
//! lives here beside the other wire messages.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, Item, ItemId, QueueInfo};
use prost::Message;

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"LESSORBK";
/// The bytes after the trailer record: a file that does not end with them was cut short.
pub const END_MAGIC: &[u8; 8] = b"LSRBKEND";
/// The format version this build writes (to clients that read it); it reads this one and older ones. Version 2
/// added [`RecordKind::Part`], [`ItemBlock::payload_len`] and [`BackupTrailer::parts`].
pub const FORMAT_VERSION: u32 = 2;
/// Largest stored record body accepted (compressed), and largest decompressed body: bounds what a corrupt or
/// hostile file can make a reader allocate, and what a restore page (see `decode_item_block`) makes the server
/// allocate. It is not a bound on items: larger ones are split (see [`PART_BYTES`]).
pub const MAX_RECORD: usize = 64 * 1024 * 1024;
/// Payload bytes per [`PayloadPart`] record: a version 2 backup splits the payload of an item longer than this
/// into parts of this size (the last one shorter), so every record stays far below [`MAX_RECORD`] however large
/// an item is, and the server holds one part's record at a time beside the item.
pub const PART_BYTES: usize = 16 * 1024 * 1024;
/// Largest payload a version 1 backup (which has no parts) carries: its one record must stay within
/// [`MAX_RECORD`] with the item's other fields and the block around it. A server writing version 1 (to a client
/// that reads nothing newer) fails the backup on a larger item, naming it, rather than write a file that no reader
/// takes.
pub const V1_MAX_PAYLOAD: usize = MAX_RECORD - 1024 * 1024;
/// Items per block the server writes (fewer when their payloads are large, see [`BLOCK_BYTES`]).
pub const BLOCK_ITEMS: usize = 8000;
/// Uncompressed payload bytes after which the server closes a block.
pub const BLOCK_BYTES: usize = 4 * 1024 * 1024;
/// zstd level: the fast end, which compresses queue items well and keeps the backup bound by storage reads.
const ZSTD_LEVEL: i32 = 1;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// [`BackupHeader`].
    Header = 1,
    /// [`ItemBlock`].
    Items = 2,
    /// [`BackupTrailer`].
    Trailer = 3,
    /// [`PayloadPart`] (version 2): bytes of the payload of the item of the block before it.
    Part = 4,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Header),
            2 => Some(RecordKind::Items),
            3 => Some(RecordKind::Trailer),
            4 => Some(RecordKind::Part),
            _ => None,
        }
    }
}

/// Why a backup cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The file does not start with [`MAGIC`].
    #[error("not a Lessor backup file (it does not start with the backup magic number)")]
    NotABackup,
    /// A version this build does not read.
    #[error("backup format version {0} is newer than this build reads (version {FORMAT_VERSION}); use a newer lessor")]
    FutureVersion(u32),
    /// The file ends before its trailer and end marker.
    #[error("backup file is truncated or incomplete: {0}; it was not finished (a killed or failed backup) and cannot be restored")]
    Truncated(String),
    /// A record whose checksum does not match its bytes.
    #[error("backup file is corrupt: record {record} (at byte {offset}) fails its checksum")]
    Checksum {
        /// Record number, from 0.
        record: u64,
        /// Byte offset of the record.
        offset: u64,
    },
    /// Anything else that breaks the format.
    #[error("backup file is corrupt: {0}")]
    Corrupt(String),
    /// Reading the input failed.
    #[error("reading the backup failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A queue definition as a backup keeps it (the fields of [`QueueInfo`] that describe the queue; placement is
/// not kept: a restore places partitions on the target server's stores).
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueRecord {
    /// Queue name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Creation time, microseconds since the Unix epoch.
    #[prost(int64, tag = "3")]
    pub created_at: i64,
    /// Last update, microseconds since the Unix epoch.
    #[prost(int64, tag = "4")]
    pub updated_at: i64,
    /// Dead-letter queue name.
    #[prost(string, tag = "5")]
    pub dead_queue: String,
    /// User reference.
    #[prost(string, tag = "6")]
    pub reference: String,
    /// Lease timeout, nanoseconds.
    #[prost(uint64, tag = "7")]
    pub lease_timeout_ns: u64,
    /// Expire timeout, nanoseconds.
    #[prost(uint64, tag = "8")]
    pub expire_timeout_ns: u64,
    /// Max attempts (0: unlimited).
    #[prost(uint32, tag = "9")]
    pub max_attempts: u32,
    /// Number of partitions.
    #[prost(uint32, tag = "10")]
    pub partitions: u32,
    /// Dedup window, nanoseconds.
    #[prost(uint64, tag = "11")]
    pub dedup_window_ns: u64,
    /// Retry backoff base, nanoseconds.
    #[prost(uint64, tag = "12")]
    pub backoff_base_ns: u64,
    /// Retry backoff factor.
    #[prost(double, tag = "13")]
    pub backoff_factor: f64,
    /// Retry backoff cap, nanoseconds.
    #[prost(uint64, tag = "14")]
    pub backoff_max_ns: u64,
    /// Retry backoff jitter.
    #[prost(double, tag = "15")]
    pub backoff_jitter: f64,
    /// Paused.
    #[prost(bool, tag = "16")]
    pub paused: bool,
    /// Max lease timeout, nanoseconds.
    #[prost(uint64, tag = "17")]
    pub max_lease_timeout_ns: u64,
}

/// The first record: who wrote the backup, when, and which queues it holds (in the order their blocks follow).
#[derive(Clone, PartialEq, prost::Message)]
pub struct BackupHeader {
    /// A random id of this backup.
    #[prost(string, tag = "1")]
    pub backup_id: String,
    /// When the backup started, microseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub created_at: i64,
    /// Version of the server that wrote it.
    #[prost(string, tag = "3")]
    pub server_version: String,
    /// The queues, dead-letter queues before the queues that name them.
    #[prost(message, repeated, tag = "4")]
    pub queues: Vec<QueueRecord>,
}

/// One item, with every field a partition stores.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemRecord {
    /// Id on the backed-up server (a restore assigns new ids in the same order).
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Source id (dead-letter moves, imports).
    #[prost(string, tag = "2")]
    pub source_id: String,
    /// Leased.
    #[prost(bool, tag = "3")]
    pub is_leased: bool,
    /// Lease deadline, microseconds.
    #[prost(int64, tag = "4")]
    pub lease_deadline: i64,
    /// Expire deadline, microseconds.
    #[prost(int64, tag = "5")]
    pub expire_deadline: i64,
    /// Schedule time, microseconds (0: not scheduled).
    #[prost(int64, tag = "6")]
    pub enqueue_at: i64,
    /// Creation time, microseconds.
    #[prost(int64, tag = "7")]
    pub created_at: i64,
    /// Attempts so far.
    #[prost(uint32, tag = "8")]
    pub attempts: u32,
    /// Stored max attempts.
    #[prost(uint32, tag = "9")]
    pub max_attempts: u32,
    /// Reference.
    #[prost(string, tag = "10")]
    pub reference: String,
    /// Encoding.
    #[prost(string, tag = "11")]
    pub encoding: String,
    /// Kind.
    #[prost(string, tag = "12")]
    pub kind: String,
    /// Payload.
    #[prost(bytes = "bytes", tag = "13")]
    pub payload: Bytes,
    /// Dead and waiting for transfer to the dead-letter queue.
    #[prost(bool, tag = "14")]
    pub dead: bool,
    /// Priority.
    #[prost(uint32, tag = "15")]
    pub priority: u32,
}

/// Items of one partition, consecutive in the partition's stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemBlock {
    /// Queue name.
    #[prost(string, tag = "1")]
    pub queue: String,
    /// Partition number.
    #[prost(uint32, tag = "2")]
    pub partition: u32,
    /// Index of the first item of the block in the partition's stream (the items of earlier blocks).
    #[prost(uint64, tag = "3")]
    pub first: u64,
    /// The items, in id order.
    #[prost(message, repeated, tag = "4")]
    pub items: Vec<ItemRecord>,
    /// Version 2: when not 0, the block holds one item whose payload is this many bytes, carried by the
    /// [`PayloadPart`] records that follow the block (its `payload` here is empty). See [`PART_BYTES`].
    #[prost(uint64, tag = "5")]
    pub payload_len: u64,
}

/// Bytes of a split payload (version 2): the records of kind [`RecordKind::Part`] that follow a block whose
/// [`ItemBlock::payload_len`] is set carry its item's payload, in order and without gaps, `offset` 0 first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PayloadPart {
    /// Where these bytes start in the payload.
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    /// The bytes (at most [`PART_BYTES`] as the server writes them; readers take any length within a record).
    #[prost(bytes = "bytes", tag = "2")]
    pub bytes: Bytes,
}

/// An [`ItemBlock`] read without decoding its items (each stays an encoded [`ItemRecord`]): what a quick check of
/// a backup's structure needs, at a fraction of the cost of decoding every item.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemBlockShallow {
    /// Queue name.
    #[prost(string, tag = "1")]
    pub queue: String,
    /// Partition number.
    #[prost(uint32, tag = "2")]
    pub partition: u32,
    /// Index of the first item.
    #[prost(uint64, tag = "3")]
    pub first: u64,
    /// The encoded items.
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub items: Vec<Bytes>,
    /// See [`ItemBlock::payload_len`].
    #[prost(uint64, tag = "5")]
    pub payload_len: u64,
}

/// Item count of one partition.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PartitionCount {
    /// Queue name.
    #[prost(string, tag = "1")]
    pub queue: String,
    /// Partition number.
    #[prost(uint32, tag = "2")]
    pub partition: u32,
    /// Items of the partition in the backup.
    #[prost(uint64, tag = "3")]
    pub items: u64,
}

/// The last record: what the file holds, checked against what was read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BackupTrailer {
    /// Every partition of every queue, in file order.
    #[prost(message, repeated, tag = "1")]
    pub partitions: Vec<PartitionCount>,
    /// Item blocks in the file.
    #[prost(uint64, tag = "2")]
    pub blocks: u64,
    /// Items in the file.
    #[prost(uint64, tag = "3")]
    pub items: u64,
    /// Version 2: [`PayloadPart`] records in the file.
    #[prost(uint64, tag = "4")]
    pub parts: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl QueueRecord {
    /// The record of a queue definition.
    pub fn from_info(q: &QueueInfo) -> Self {
        QueueRecord {
            name: q.name.clone(),
            namespace: q.namespace.clone(),
            created_at: q.created_at.0,
            updated_at: q.updated_at.0,
            dead_queue: q.dead_queue.clone(),
            reference: q.reference.clone(),
            lease_timeout_ns: nanos(q.lease_timeout),
            expire_timeout_ns: nanos(q.expire_timeout),
            max_attempts: q.max_attempts,
            partitions: u32::try_from(q.partitions.len())
                .unwrap_or(u32::MAX)
                .max(q.requested_partitions),
            dedup_window_ns: nanos(q.dedup_window),
            backoff_base_ns: nanos(q.retry_backoff.base),
            backoff_factor: q.retry_backoff.factor,
            backoff_max_ns: nanos(q.retry_backoff.max),
            backoff_jitter: q.retry_backoff.jitter,
            paused: q.paused,
            max_lease_timeout_ns: nanos(q.max_lease_timeout),
        }
    }

    /// The queue definition (no placement: `requested_partitions` gives the count).
    pub fn to_info(&self) -> QueueInfo {
        QueueInfo {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            created_at: Ts(self.created_at),
            updated_at: Ts(self.updated_at),
            dead_queue: self.dead_queue.clone(),
            reference: self.reference.clone(),
            lease_timeout: Duration::from_nanos(self.lease_timeout_ns),
            expire_timeout: Duration::from_nanos(self.expire_timeout_ns),
            max_attempts: self.max_attempts,
            requested_partitions: self.partitions,
            partitions: Vec::new(),
            dedup_window: Duration::from_nanos(self.dedup_window_ns),
            retry_backoff: Backoff {
                base: Duration::from_nanos(self.backoff_base_ns),
                factor: self.backoff_factor,
                max: Duration::from_nanos(self.backoff_max_ns),
                jitter: self.backoff_jitter,
            },
            paused: self.paused,
            max_lease_timeout: Duration::from_nanos(self.max_lease_timeout_ns),
            restoring: false,
        }
    }
}

impl ItemRecord {
    /// The record of a stored item.
    pub fn from_item(it: &Item) -> Self {
        ItemRecord {
            id: it.id.0,
            source_id: it.source_id.clone(),
            is_leased: it.is_leased,
            lease_deadline: it.lease_deadline.0,
            expire_deadline: it.expire_deadline.0,
            enqueue_at: it.enqueue_at.0,
            created_at: it.created_at.0,
            attempts: it.attempts,
            max_attempts: it.max_attempts,
            reference: it.reference.clone(),
            encoding: it.encoding.clone(),
            kind: it.kind.clone(),
            payload: it.payload.clone(),
            dead: it.dead,
            priority: u32::from(it.priority),
        }
    }

    /// The record of a stored item, taking its strings rather than copying them.
    pub fn from_owned(it: Item) -> Self {
        ItemRecord {
            id: it.id.0,
            source_id: it.source_id,
            is_leased: it.is_leased,
            lease_deadline: it.lease_deadline.0,
            expire_deadline: it.expire_deadline.0,
            enqueue_at: it.enqueue_at.0,
            created_at: it.created_at.0,
            attempts: it.attempts,
            max_attempts: it.max_attempts,
            reference: it.reference,
            encoding: it.encoding,
            kind: it.kind,
            payload: it.payload,
            dead: it.dead,
            priority: u32::from(it.priority),
        }
    }

    /// The item (with its backed-up id; an import gives it a new one).
    pub fn into_item(self) -> Item {
        Item {
            id: ItemId(self.id),
            source_id: self.source_id,
            is_leased: self.is_leased,
            lease_deadline: Ts(self.lease_deadline),
            expire_deadline: Ts(self.expire_deadline),
            enqueue_at: Ts(self.enqueue_at),
            created_at: Ts(self.created_at),
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            reference: self.reference,
            encoding: self.encoding,
            kind: self.kind,
            payload: self.payload,
            dead: self.dead,
            priority: u8::try_from(self.priority).unwrap_or(u8::MAX),
        }
    }
}

/// The start of a file of this build's version: magic and version.
pub fn encode_start() -> Vec<u8> {
    encode_start_as(FORMAT_VERSION)
}

/// The start of a file of format `version` (1 to [`FORMAT_VERSION`]), for a client that reads no newer one.
pub fn encode_start_as(version: u32) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out
}

/// Splits the one item of `block` (the server gives an item longer than [`PART_BYTES`] a block of its own): returns
/// the block to write, its item's payload emptied and [`ItemBlock::payload_len`] set, and the payload, which the
/// caller writes after it as [`PayloadPart`]s of `payload.slice(..)` of at most [`PART_BYTES`], one record at a
/// time, so the item is held once and one part's record beside it.
pub fn split_item(mut block: ItemBlock) -> (ItemBlock, Bytes) {
    let payload = block
        .items
        .first_mut()
        .map(|it| std::mem::take(&mut it.payload))
        .unwrap_or_default();
    block.payload_len = payload.len() as u64;
    (block, payload)
}

/// Puts a split item back together: `parts` (decoded [`PayloadPart`]s, in file order) become the payload of the
/// one item of `block`, which must have [`ItemBlock::payload_len`] set; the result is an ordinary block (no
/// `payload_len`), as a restore page carries it.
///
/// # Errors
/// [`BackupError::Corrupt`] when the block does not hold exactly one item with an empty payload, or when the
/// parts leave a gap, overlap, or do not add up to `payload_len`.
pub fn join_parts(
    mut block: ItemBlock,
    parts: impl IntoIterator<Item = PayloadPart>,
) -> Result<ItemBlock, BackupError> {
    let len = usize::try_from(block.payload_len)
        .map_err(|_| BackupError::Corrupt(format!("a split payload of {} bytes", block.payload_len)))?;
    let [item] = block.items.as_mut_slice() else {
        return Err(BackupError::Corrupt(format!(
            "a block with a split payload holds {} items, not one",
            block.items.len()
        )));
    };
    if !item.payload.is_empty() {
        return Err(BackupError::Corrupt(
            "a block with a split payload holds payload bytes of its own".into(),
        ));
    }
    // Reserved only as the parts arrive: `payload_len` is whatever the file says.
    let mut payload = Vec::new();
    for p in parts {
        if p.offset != payload.len() as u64 || payload.len() + p.bytes.len() > len {
            return Err(BackupError::Corrupt(format!(
                "a payload part of {} bytes at offset {} of a {len}-byte payload, after {} bytes",
                p.bytes.len(),
                p.offset,
                payload.len()
            )));
        }
        payload.extend_from_slice(&p.bytes);
    }
    if payload.len() != len {
        return Err(BackupError::Corrupt(format!(
            "the parts of a {len}-byte payload hold {} bytes",
            payload.len()
        )));
    }
    item.payload = Bytes::from(payload);
    block.payload_len = 0;
    Ok(block)
}

/// The end marker, after the trailer record.
pub fn encode_end() -> Vec<u8> {
    END_MAGIC.to_vec()
}

/// Compresses an encoded message into a record body.
pub fn compress(msg: &impl Message) -> Vec<u8> {
    let raw = msg.encode_to_vec();
    // Compressing from memory into memory cannot fail but for a bad level; fall back to storing it raw would
    // break the format, so the level is a constant that zstd accepts.
    zstd::bulk::compress(&raw, ZSTD_LEVEL).unwrap_or_default()
}

/// One record: kind, length, checksum and the compressed body.
pub fn encode_record(kind: RecordKind, msg: &impl Message) -> Vec<u8> {
    frame(kind, &compress(msg))
}

/// Frames an already compressed body as a record.
pub fn frame(kind: RecordKind, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + body.len());
    out.push(kind as u8);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Decompresses and decodes a record body.
pub fn decode_body<M: Message + Default>(body: &[u8]) -> Result<M, BackupError> {
    let raw = decompress(body)?;
    // From `Bytes`, so `bytes` fields are slices of this buffer rather than copies.
    M::decode(Bytes::from(raw)).map_err(|e| BackupError::Corrupt(format!("a record does not decode: {e}")))
}

/// A record body decompressed, at most [`MAX_RECORD`] bytes. Read as a stream into a buffer that grows with what
/// comes out: a bulk decompression takes a buffer of the limit up front, 64 MiB for every record whatever its size
/// (a restore page of a few hundred bytes allocated that much on the server).
fn decompress(body: &[u8]) -> Result<Vec<u8>, BackupError> {
    let fail = |e: std::io::Error| BackupError::Corrupt(format!("a record does not decompress: {e}"));
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(body)
        .map_err(fail)?
        .take(MAX_RECORD as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(fail)?;
    if raw.len() > MAX_RECORD {
        return Err(BackupError::Corrupt(format!(
            "a record decompresses to more than {MAX_RECORD} bytes"
        )));
    }
    Ok(raw)
}

/// [`decode_body`] for an [`ItemBlock`] that holds at most `max_items` items, counted on the wire before anything
/// is decoded. An item decodes to a record of about 180 bytes whatever its encoded size, and an empty one is 2
/// bytes: a block of 64 MiB (the most a record decompresses to) of empty items is a zstd frame of a few KB that
/// decoded to 33 million records, over 6 GB, before the count was checked. Refused, it allocates nothing but the
/// decompressed bytes.
pub fn decode_item_block(body: &[u8], max_items: usize) -> Result<ItemBlock, BackupError> {
    decode_item_block_raw(Bytes::from(decompress(body)?), max_items)
}

/// [`decode_item_block`] for a block that is not compressed (a restore page holding an item larger than a
/// compressed page may decompress to): what it allocates is bounded by its own size, which the caller already
/// holds (the request's body, within its limit), and by the item count checked first.
pub fn decode_item_block_raw(raw: Bytes, max_items: usize) -> Result<ItemBlock, BackupError> {
    let corrupt = |e: prost::DecodeError| BackupError::Corrupt(format!("a record does not decode: {e}"));
    let mut buf = &raw[..];
    let mut items = 0usize;
    while !buf.is_empty() {
        let (tag, wire_type) = prost::encoding::decode_key(&mut buf).map_err(corrupt)?;
        // Field 4 of `ItemBlock`: `items`, one entry per item.
        if tag == 4 {
            items += 1;
            if items > max_items {
                return Err(BackupError::Corrupt(format!(
                    "a block holds more than {max_items} items, the most one restore page takes"
                )));
            }
        }
        prost::encoding::skip_field(wire_type, tag, &mut buf, Default::default()).map_err(corrupt)?;
    }
    let block = ItemBlock::decode(raw).map_err(corrupt)?;
    if block.payload_len != 0 {
        return Err(BackupError::Corrupt(
            "a block whose payload is split into parts; a restore page carries whole items (join the parts first)"
                .into(),
        ));
    }
    Ok(block)
}

/// A record as read from a file: its kind and its stored (compressed, checksum-verified) body.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// What it holds.
    pub kind: RecordKind,
    /// The compressed body.
    pub body: Vec<u8>,
}

/// Reads records from a backup stream, checking the magic, the version, every checksum and the end marker.
#[derive(Debug)]
pub struct Reader<R> {
    input: R,
    /// Bytes read so far, for error messages.
    offset: u64,
    records: u64,
    version: u32,
    done: bool,
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), BackupError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            BackupError::Truncated(format!("the file ends inside {what}"))
        } else {
            BackupError::Io(e)
        }
    })
}

impl<R: Read> Reader<R> {
    /// Starts reading: checks the magic number and the version.
    pub fn new(mut input: R) -> Result<Self, BackupError> {
        let mut head = [0u8; 12];
        let mut got = 0;
        while got < head.len() {
            match input.read(&mut head[got..])? {
                0 => break,
                n => got += n,
            }
        }
        if got < 8 || &head[..8] != MAGIC {
            return Err(if got < 8 && MAGIC.starts_with(&head[..got]) && got > 0 {
                BackupError::Truncated("the file ends inside its header".into())
            } else {
                BackupError::NotABackup
            });
        }
        if got < 12 {
            return Err(BackupError::Truncated("the file ends inside its header".into()));
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version == 0 || version > FORMAT_VERSION {
            return Err(BackupError::FutureVersion(version));
        }
        Ok(Reader {
            input,
            offset: 12,
            records: 0,
            version,
            done: false,
        })
    }

    /// The file's format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The next record, `None` after the trailer once the end marker and the end of input were checked.
    pub fn next_raw(&mut self) -> Result<Option<RawRecord>, BackupError> {
        if self.done {
            return Ok(None);
        }
        let at = self.offset;
        let mut head = [0u8; 9];
        read_exact_or(
            &mut self.input,
            &mut head,
            "a record header (no trailer was written)",
        )?;
        let kind = RecordKind::from_u8(head[0])
            .filter(|k| *k != RecordKind::Part || self.version >= 2)
            .ok_or_else(|| {
                BackupError::Corrupt(format!(
                    "record {} (at byte {at}) has unknown kind {} for format version {}",
                    self.records, head[0], self.version
                ))
            })?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let crc = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        if len > MAX_RECORD {
            return Err(BackupError::Corrupt(format!(
                "record {} (at byte {at}) claims {len} bytes, more than the {MAX_RECORD} a record may hold",
                self.records
            )));
        }
        let mut body = vec![0u8; len];
        read_exact_or(&mut self.input, &mut body, "a record")?;
        if crc32fast::hash(&body) != crc {
            return Err(BackupError::Checksum {
                record: self.records,
                offset: at,
            });
        }
        self.offset += 9 + len as u64;
        self.records += 1;
        if kind == RecordKind::Trailer {
            let mut end = [0u8; 8];
            read_exact_or(&mut self.input, &mut end, "its end marker")?;
            if &end != END_MAGIC {
                return Err(BackupError::Corrupt(
                    "the trailer is not followed by the end marker".into(),
                ));
            }
            let mut extra = [0u8; 1];
            if self.input.read(&mut extra)? != 0 {
                return Err(BackupError::Corrupt("bytes follow the end marker".into()));
            }
            self.done = true;
        }
        Ok(Some(RawRecord { kind, body }))
    }
}

/// What a verified backup holds.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The header.
    pub header: BackupHeader,
    /// Items per queue and partition.
    pub counts: BTreeMap<(String, u32), u64>,
    /// Item blocks.
    pub blocks: u64,
    /// Items.
    pub items: u64,
    /// Payload part records (version 2).
    pub parts: u64,
}

/// How deeply [`verify_with`] checks item blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Every item of every block is decoded (what a restore checks before it writes anything).
    Items,
    /// Blocks are decoded down to their item list; items stay encoded (checksums still cover every byte). What a
    /// backup checks as it streams in, so the check costs the backup's machine little.
    Blocks,
}

/// Checks a whole backup stream: magic, version, every checksum, every block decodes and follows the one before it
/// in its partition, and the trailer's counts match what was read. `on_block` sees each block's item count and
/// stored size (for progress). Nothing about the stream is trusted until this returns `Ok`.
pub fn verify<R: Read>(input: R, on_block: impl FnMut(u64, u64)) -> Result<Summary, BackupError> {
    verify_with(input, Depth::Items, on_block)
}

/// [`verify`] at a chosen [`Depth`].
pub fn verify_with<R: Read>(
    input: R,
    depth: Depth,
    mut on_block: impl FnMut(u64, u64),
) -> Result<Summary, BackupError> {
    let mut r = Reader::new(input)?;
    let first = r
        .next_raw()?
        .ok_or_else(|| BackupError::Truncated("no header".into()))?;
    if first.kind != RecordKind::Header {
        return Err(BackupError::Corrupt("the first record is not the header".into()));
    }
    let header: BackupHeader = decode_body(&first.body)?;
    let queues: HashMap<&str, &QueueRecord> = header.queues.iter().map(|q| (q.name.as_str(), q)).collect();
    let mut s = Summary::default();
    // The split payload whose parts are due: (its length, bytes seen so far).
    let mut split: Option<(u64, u64)> = None;
    loop {
        let Some(rec) = r.next_raw()? else {
            return Err(BackupError::Truncated("no trailer".into()));
        };
        if let (Some((len, got)), RecordKind::Header | RecordKind::Items | RecordKind::Trailer) =
            (split, rec.kind)
        {
            return Err(BackupError::Corrupt(format!(
                "a split payload of {len} bytes ends after {got} bytes, before its last part"
            )));
        }
        match rec.kind {
            RecordKind::Header => return Err(BackupError::Corrupt("a second header".into())),
            RecordKind::Part => {
                let Some((len, got)) = split else {
                    return Err(BackupError::Corrupt(
                        "a payload part that follows no block with a split payload".into(),
                    ));
                };
                let part: PayloadPart = decode_body(&rec.body)?;
                let n = part.bytes.len() as u64;
                if part.offset != got || n == 0 || got + n > len {
                    return Err(BackupError::Corrupt(format!(
                        "a payload part of {n} bytes at offset {} of a {len}-byte payload, after {got} bytes",
                        part.offset
                    )));
                }
                split = (got + n < len).then_some((len, got + n));
                s.parts += 1;
                on_block(0, rec.body.len() as u64 + 9);
            }
            RecordKind::Items => {
                let block: ItemBlockShallow = match depth {
                    Depth::Blocks => decode_body(&rec.body)?,
                    Depth::Items => {
                        let b: ItemBlock = decode_body(&rec.body)?;
                        if b.payload_len != 0 && b.items.iter().any(|it| !it.payload.is_empty()) {
                            return Err(BackupError::Corrupt(
                                "a block with a split payload holds payload bytes of its own".into(),
                            ));
                        }
                        ItemBlockShallow {
                            queue: b.queue,
                            partition: b.partition,
                            first: b.first,
                            items: vec![Bytes::new(); b.items.len()],
                            payload_len: b.payload_len,
                        }
                    }
                };
                if block.payload_len != 0 {
                    if block.items.len() != 1 {
                        return Err(BackupError::Corrupt(format!(
                            "a block with a split payload holds {} items, not one",
                            block.items.len()
                        )));
                    }
                    split = Some((block.payload_len, 0));
                }
                let Some(q) = queues.get(block.queue.as_str()) else {
                    return Err(BackupError::Corrupt(format!(
                        "a block of queue '{}', which the header does not list",
                        block.queue
                    )));
                };
                if block.partition >= q.partitions {
                    return Err(BackupError::Corrupt(format!(
                        "a block of partition {} of '{}', which has {} partitions",
                        block.partition, block.queue, q.partitions
                    )));
                }
                let n = s
                    .counts
                    .entry((block.queue.clone(), block.partition))
                    .or_default();
                if block.first != *n {
                    return Err(BackupError::Corrupt(format!(
                        "a block of partition {} of '{}' starts at item {} but {} items came before it",
                        block.partition, block.queue, block.first, n
                    )));
                }
                *n += block.items.len() as u64;
                s.items += block.items.len() as u64;
                s.blocks += 1;
                on_block(block.items.len() as u64, rec.body.len() as u64 + 9);
            }
            RecordKind::Trailer => {
                let t: BackupTrailer = decode_body(&rec.body)?;
                if t.items != s.items || t.blocks != s.blocks || t.parts != s.parts {
                    return Err(BackupError::Corrupt(format!(
                        "the trailer counts {} items in {} blocks and {} payload parts, the file holds {} in {} and {}",
                        t.items, t.blocks, t.parts, s.items, s.blocks, s.parts
                    )));
                }
                for pc in &t.partitions {
                    let have = s
                        .counts
                        .get(&(pc.queue.clone(), pc.partition))
                        .copied()
                        .unwrap_or(0);
                    if have != pc.items {
                        return Err(BackupError::Corrupt(format!(
                            "the trailer counts {} items in partition {} of '{}', the file holds {have}",
                            pc.items, pc.partition, pc.queue
                        )));
                    }
                }
                if r.next_raw()?.is_some() {
                    return Err(BackupError::Corrupt("records follow the trailer".into()));
                }
                s.header = header;
                return Ok(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header = BackupHeader {
            backup_id: "b".into(),
            created_at: 1,
            server_version: "0.1.0".into(),
            queues: vec![QueueRecord {
                name: "q".into(),
                partitions: 2,
                ..Default::default()
            }],
        };
        let mut out = encode_start();
        out.extend(encode_record(RecordKind::Header, &header));
        let item = |n: u64| ItemRecord {
            id: n,
            payload: Bytes::from(format!("p{n}")),
            ..Default::default()
        };
        for (p, first, n) in [(0u32, 0u64, 3u64), (0, 3, 2), (1, 0, 1)] {
            let block = ItemBlock {
                queue: "q".into(),
                partition: p,
                first,
                items: (first..first + n).map(item).collect(),
                payload_len: 0,
            };
            out.extend(encode_record(RecordKind::Items, &block));
        }
        // A split item (as the server writes one above PART_BYTES; readers take parts of any length).
        out.extend(split_records(1, 1, b"0123456789", &[4, 6]));
        let trailer = BackupTrailer {
            partitions: vec![
                PartitionCount {
                    queue: "q".into(),
                    partition: 0,
                    items: 5,
                },
                PartitionCount {
                    queue: "q".into(),
                    partition: 1,
                    items: 2,
                },
            ],
            blocks: 4,
            items: 7,
            parts: 2,
        };
        out.extend(encode_record(RecordKind::Trailer, &trailer));
        out.extend(encode_end());
        out
    }

    /// The records of one item of partition `partition`, item `first`, whose payload is split into parts of
    /// `sizes` bytes.
    fn split_records(partition: u32, first: u64, payload: &[u8], sizes: &[usize]) -> Vec<u8> {
        let block = ItemBlock {
            queue: "q".into(),
            partition,
            first,
            items: vec![ItemRecord {
                id: 100,
                payload: Bytes::copy_from_slice(payload),
                ..Default::default()
            }],
            payload_len: 0,
        };
        let (block, payload) = split_item(block);
        let mut out = encode_record(RecordKind::Items, &block);
        let mut at = 0;
        for n in sizes {
            let part = PayloadPart {
                offset: at as u64,
                bytes: payload.slice(at..at + n),
            };
            out.extend(encode_record(RecordKind::Part, &part));
            at += n;
        }
        out
    }

    #[test]
    fn a_complete_file_verifies() {
        for depth in [Depth::Items, Depth::Blocks] {
            let s = verify_with(sample().as_slice(), depth, |_, _| {}).unwrap();
            assert_eq!(s.items, 7);
            assert_eq!(s.blocks, 4);
            assert_eq!(s.parts, 2);
            assert_eq!(s.counts[&("q".to_string(), 0)], 5);
            assert_eq!(s.counts[&("q".to_string(), 1)], 2);
        }
    }

    /// An item larger than a record may hold is carried in parts: the server's split and the reader's join give
    /// back the payload byte for byte, and every record of it stays within MAX_RECORD.
    #[test]
    fn a_split_payload_joins_back_byte_for_byte() {
        let payload: Vec<u8> = (0..PART_BYTES * 2 + 12345).map(|i| (i * 7 % 251) as u8).collect();
        let sizes = [PART_BYTES, PART_BYTES, 12345];
        let records = split_records(0, 0, &payload, &sizes);
        let file = [encode_start(), records].concat();
        let mut r = Reader::new(file.as_slice()).unwrap();
        let block = r.next_raw().unwrap().unwrap();
        assert_eq!(block.kind, RecordKind::Items);
        let block: ItemBlock = decode_body(&block.body).unwrap();
        assert_eq!(block.payload_len, payload.len() as u64);
        assert!(block.items[0].payload.is_empty());
        let mut parts = Vec::new();
        for _ in sizes {
            let rec = r.next_raw().unwrap().unwrap();
            assert_eq!(rec.kind, RecordKind::Part);
            assert!(rec.body.len() <= MAX_RECORD);
            parts.push(decode_body::<PayloadPart>(&rec.body).unwrap());
        }
        let whole = join_parts(block.clone(), parts.clone()).unwrap();
        assert_eq!(whole.payload_len, 0);
        assert_eq!(
            whole.items[0].payload, payload,
            "the payload comes back byte for byte"
        );
        // A part missing, or out of order: refused.
        assert!(join_parts(block.clone(), parts[..2].to_vec()).is_err());
        parts.swap(0, 1);
        assert!(join_parts(block, parts).is_err());
    }

    /// Parts where none are due, or missing where they are, are refused; so is a part in a version 1 file.
    #[test]
    fn misplaced_or_missing_parts_are_refused() {
        let head = || {
            let header = BackupHeader {
                queues: vec![QueueRecord {
                    name: "q".into(),
                    partitions: 1,
                    ..Default::default()
                }],
                ..Default::default()
            };
            [encode_start(), encode_record(RecordKind::Header, &header)].concat()
        };
        let tail = |items: u64, parts: u64| {
            let t = BackupTrailer {
                partitions: vec![PartitionCount {
                    queue: "q".into(),
                    partition: 0,
                    items,
                }],
                blocks: items,
                items,
                parts,
            };
            [encode_record(RecordKind::Trailer, &t), encode_end()].concat()
        };
        let ok = [head(), split_records(0, 0, b"abcdef", &[3, 3]), tail(1, 2)].concat();
        verify(ok.as_slice(), |_, _| {}).unwrap();
        let cases = [
            (
                "a missing last part",
                [head(), split_records(0, 0, b"abcdef", &[3]), tail(1, 1)].concat(),
            ),
            ("a part too many", {
                let mut extra = split_records(0, 0, b"abcdef", &[3, 3]);
                extra.extend(encode_record(
                    RecordKind::Part,
                    &PayloadPart {
                        offset: 6,
                        bytes: Bytes::from_static(b"x"),
                    },
                ));
                [head(), extra, tail(1, 3)].concat()
            }),
            (
                "the parts' count",
                [head(), split_records(0, 0, b"abcdef", &[3, 3]), tail(1, 1)].concat(),
            ),
        ];
        for (what, file) in cases {
            assert!(
                matches!(verify(file.as_slice(), |_, _| {}), Err(BackupError::Corrupt(_))),
                "{what} went unnoticed"
            );
        }
        let mut v1 = ok.clone();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = verify(v1.as_slice(), |_, _| {}).unwrap_err();
        assert!(
            e.to_string().contains("unknown kind 4 for format version 1"),
            "{e}"
        );
    }

    /// A file this build writes as version 1 (to an older client) is read as it always was.
    #[test]
    fn a_version_1_file_still_verifies() {
        let mut out = encode_start_as(1);
        out.extend(encode_record(
            RecordKind::Header,
            &BackupHeader {
                queues: vec![QueueRecord {
                    name: "q".into(),
                    partitions: 1,
                    ..Default::default()
                }],
                ..Default::default()
            },
        ));
        out.extend(encode_record(
            RecordKind::Items,
            &ItemBlock {
                queue: "q".into(),
                items: vec![ItemRecord::default(); 3],
                ..Default::default()
            },
        ));
        out.extend(encode_record(
            RecordKind::Trailer,
            &BackupTrailer {
                partitions: vec![PartitionCount {
                    queue: "q".into(),
                    partition: 0,
                    items: 3,
                }],
                blocks: 1,
                items: 3,
                parts: 0,
            },
        ));
        out.extend(encode_end());
        let s = verify(out.as_slice(), |_, _| {}).unwrap();
        assert_eq!((s.items, s.blocks, s.parts), (3, 1, 0));
        assert_eq!(Reader::new(out.as_slice()).unwrap().version(), 1);
    }

    /// A restore page sent uncompressed is counted before it is decoded as a compressed one is, and a page must
    /// carry whole items.
    #[test]
    fn an_uncompressed_page_is_counted_and_holds_whole_items() {
        let shallow = ItemBlockShallow {
            queue: "q".into(),
            items: vec![Bytes::new(); 11],
            ..Default::default()
        };
        let e = decode_item_block_raw(Bytes::from(shallow.encode_to_vec()), 10).unwrap_err();
        assert!(e.to_string().contains("more than 10 items"), "{e}");
        let split = ItemBlock {
            items: vec![ItemRecord::default()],
            payload_len: 5,
            ..Default::default()
        };
        let e = decode_item_block_raw(Bytes::from(split.encode_to_vec()), 10).unwrap_err();
        assert!(e.to_string().contains("whole items"), "{e}");
        let whole = ItemBlock {
            items: vec![ItemRecord::default(); 10],
            ..Default::default()
        };
        assert_eq!(
            decode_item_block_raw(Bytes::from(whole.encode_to_vec()), 10)
                .unwrap()
                .items
                .len(),
            10
        );
    }

    #[test]
    fn every_cut_is_refused() {
        let full = sample();
        for cut in 0..full.len() {
            let e = verify(&full[..cut], |_, _| {}).unwrap_err();
            assert!(
                matches!(e, BackupError::Truncated(_) | BackupError::NotABackup),
                "cut at {cut}: {e}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let full = sample();
        for at in 12..full.len() - 8 {
            let mut bad = full.clone();
            bad[at] ^= 0x40;
            assert!(
                verify(bad.as_slice(), |_, _| {}).is_err(),
                "flip at {at} went unnoticed"
            );
        }
    }

    #[test]
    fn a_future_version_is_refused_by_name() {
        let mut f = sample();
        f[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = verify(f.as_slice(), |_, _| {}).unwrap_err();
        assert!(matches!(e, BackupError::FutureVersion(v) if v == FORMAT_VERSION + 1));
        assert!(e.to_string().contains("newer than this build"), "{e}");
    }
}
