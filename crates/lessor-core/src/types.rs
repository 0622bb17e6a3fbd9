//! The values Lessor stores and moves: items, their ids, queue definitions and partition placement.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;

use crate::time::{Clock, SystemClock, Ts};

/// An item's id inside one partition.
///
/// Ids are a per-partition sequence that only grows, so id order is FIFO order. An item gets a **new id every time
/// it re-enters the ready queue** (lease expiry, immediate retry, a schedule coming due): the new id is what puts it at
/// the tail, and it is also Lessor's lease fence. An id names one lease cycle of an item, so a consumer whose lease
/// expired holds an id that no longer exists and can never complete or retry the item another consumer now holds.
///
/// On the wire an id is 16 lowercase hex digits, which sort as strings in the same order as the numbers.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ItemId(pub u64);

impl ItemId {
    /// Where a new partition's ids start: the current wall-clock time in microseconds (at least 1).
    ///
    /// The one rule every backend follows when it creates a partition: ids only grow within a partition, and
    /// starting them at the clock means a queue deleted and created again never hands out an id that a consumer of
    /// the old queue may still hold (and so could complete by mistake).
    pub fn floor_now() -> ItemId {
        ItemId(u64::try_from(SystemClock.now().0).unwrap_or(1).max(1))
    }

    /// Where partition `partition`'s ids start: [`ItemId::floor_now`] plus `partition` times
    /// [`PARTITION_ID_STRIDE`], so partitions of one queue, created in the same microsecond, never hand out the same
    /// id: a complete or retry naming the wrong partition finds no item instead of another consumer's (Querator's
    /// KSUIDs never collide between partitions either). Partition 65,535 starts below 2^63, so every id still fits
    /// PostgreSQL's `int8`.
    pub fn floor_for(partition: u32) -> ItemId {
        ItemId(
            Self::floor_now()
                .0
                .saturating_add(u64::from(partition).saturating_mul(PARTITION_ID_STRIDE)),
        )
    }
}

/// The distance between the first ids of two consecutive partitions (2^46, about 2.2 years of microseconds): one
/// partition would have to hand out that many ids, or live items of a partition would have to be that much older
/// than a restart of the one below it, for their ids to meet.
pub const PARTITION_ID_STRIDE: u64 = 1 << 46;

impl ItemId {}

impl fmt::Display for ItemId {
    /// 16 lowercase hex digits. Written digit by digit: every leased item's id is formatted for its answer, and
    /// the general `{:016x}` path cost several times as much.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 16];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = HEX[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        // Only ASCII hex digits were written.
        f.pad(std::str::from_utf8(&buf).unwrap_or_default())
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ItemId({:016x})", self.0)
    }
}

impl FromStr for ItemId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err("expected 16 lowercase hexadecimal digits".to_string());
        }
        u64::from_str_radix(s, 16).map(ItemId).map_err(|e| e.to_string())
    }
}

/// An item as stored in a partition.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Item {
    /// Position and lease fence, see [`ItemId`].
    pub id: ItemId,
    /// Set on items moved to a dead-letter queue or imported: the key that makes those moves idempotent.
    pub source_id: String,
    /// Whether a consumer holds the item.
    pub is_leased: bool,
    /// When the current lease ends (zero when not leased).
    pub lease_deadline: Ts,
    /// When the item expires whatever its state.
    pub expire_deadline: Ts,
    /// When a scheduled item becomes ready (zero when the item is not scheduled).
    pub enqueue_at: Ts,
    /// When the item was first produced.
    pub created_at: Ts,
    /// How many times the item was leased.
    pub attempts: u32,
    /// Stored for import compatibility; the queue's max_attempts is what the lifecycle applies.
    pub max_attempts: u32,
    /// User correlation string.
    pub reference: String,
    /// User encoding tag.
    pub encoding: String,
    /// User kind tag.
    pub kind: String,
    /// The payload.
    pub payload: Bytes,
    /// Dead and waiting for transfer to the dead-letter queue: hidden from leases, lists and stats. Never on the
    /// wire; persisted so a move in flight survives a restart.
    pub dead: bool,
    /// 0..=[`MAX_PRIORITY`]; a lease serves higher priorities first, FIFO (id order) within one priority.
    pub priority: u8,
}

impl Item {
    /// Whether the item waits for its schedule.
    pub fn is_scheduled(&self) -> bool {
        !self.enqueue_at.is_zero()
    }

    /// Approximate bytes this item occupies beyond its payload: used for memory accounting.
    pub fn overhead(&self) -> usize {
        std::mem::size_of::<Item>()
            + self.source_id.len()
            + self.reference.len()
            + self.encoding.len()
            + self.kind.len()
    }
}

/// What a producer sends for one item; the engine fills the deadlines before storage sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewItem {
    /// See [`Item::source_id`]; empty for ordinary produce.
    pub source_id: String,
    /// Zero for ready items, otherwise when the item becomes ready.
    pub enqueue_at: Ts,
    /// When the item expires.
    pub expire_deadline: Ts,
    /// When it was produced (kept across dead-letter moves).
    pub created_at: Ts,
    /// See [`Item::reference`].
    pub reference: String,
    /// See [`Item::encoding`].
    pub encoding: String,
    /// See [`Item::kind`].
    pub kind: String,
    /// The payload.
    pub payload: Bytes,
    /// 0..=[`MAX_PRIORITY`], see [`Item::priority`].
    pub priority: u8,
    /// Non-empty for idempotent produce: the store keeps a record of the key until `dedup_until`, and skips a later
    /// item carrying the same key while that record lives (see [`crate::storage::Partition::produce`]).
    pub dedup_id: String,
    /// When the dedup record ends; ignored when `dedup_id` is empty.
    pub dedup_until: Ts,
}

/// Highest item priority; 0 (the default) is the lowest.
pub const MAX_PRIORITY: u8 = 9;
/// Longest deduplication key, in bytes.
pub const MAX_DEDUP_ID: usize = 128;

/// Default of [`Limits::max_lease_bytes`], most payload bytes one storage call of a lease hands out (16 MiB): a lease stops before the item that would take
/// its items over this, though it always returns at least one. Leases of small items never meet it (1,000 items of
/// 16 KB fit); without it, a lease of 1,000 items of 5 MB built a 5 GB reply, several times that in memory.
pub const MAX_LEASE_BYTES: u64 = 16 << 20;

/// Default of [`Limits::max_list_partitions`]: a definition carries one entry per partition (a queue may have
/// 65,536), so a page of `queues.list` bounded only by its `limit` (up to 65,536 queues) could name billions of
/// partitions: 50 queues of 65,536 partitions made a 65 MB JSON page. 2^20 partitions make about 20 MB of JSON.
pub const MAX_LIST_PARTITIONS: usize = 1 << 20;

/// A dedup record as a store keeps it: while it lives, items carrying `dedup_id` are skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupRecord {
    /// The producer's key.
    pub dedup_id: String,
    /// The item stored under it (it may have been consumed since).
    pub id: ItemId,
    /// When the record ends.
    pub until: Ts,
}

/// Retry backoff of a queue: how long an item waits before its next attempt after a lease expiry or a retry
/// without `retry_at`. `base` zero means off (Querator's behaviour: back to the tail at once).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Backoff {
    /// Delay before the second attempt; zero turns backoff off.
    pub base: Duration,
    /// Growth per attempt (>= 1.0; 0 is read as 2.0).
    pub factor: f64,
    /// Longest delay (zero: no bound but the validation limit).
    pub max: Duration,
    /// 0.0..=1.0: fraction of the delay that is randomised (0.2 = the delay is between 80 % and 100 %).
    pub jitter: f64,
}

impl Eq for Backoff {}

impl Backoff {
    /// No backoff: retries go back to the tail at once.
    pub const OFF: Backoff = Backoff {
        base: Duration::ZERO,
        factor: 0.0,
        max: Duration::ZERO,
        jitter: 0.0,
    };

    /// Whether the policy delays retries at all.
    pub fn is_on(&self) -> bool {
        !self.base.is_zero()
    }

    /// The delay before the attempt after `attempts` leases: `min(max, base * factor^(attempts-1))`, reduced by up
    /// to `jitter` of itself. The jitter comes from a hash of `id` and `attempts`, so it differs between items (no
    /// thundering herd) but is reproducible (tests can check bounds).
    pub fn delay(&self, attempts: u32, id: ItemId) -> Duration {
        if !self.is_on() {
            return Duration::ZERO;
        }
        let factor = if self.factor <= 0.0 {
            2.0
        } else {
            self.factor.max(1.0)
        };
        let exp = attempts.saturating_sub(1).min(64) as i32;
        let mut secs = self.base.as_secs_f64() * factor.powi(exp);
        let cap = if self.max.is_zero() {
            MAX_BACKOFF
        } else {
            self.max.min(MAX_BACKOFF)
        };
        if !secs.is_finite() || secs > cap.as_secs_f64() {
            secs = cap.as_secs_f64();
        }
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter > 0.0 {
            // splitmix64 of (id, attempts): a uniform fraction in [0, 1).
            let mut z = id.0 ^ (u64::from(attempts) << 56) ^ 0x9E37_79B9_7F4A_7C15;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let r = (z >> 11) as f64 / (1u64 << 53) as f64;
            secs *= 1.0 - jitter * r;
        }
        Duration::from_secs_f64(secs.max(0.0))
    }
}

/// Longest backoff delay accepted (and the cap when `max` is zero).
pub const MAX_BACKOFF: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default deduplication window of a queue.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(5 * 60);

/// One item of a retry request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryItem {
    /// The leased item.
    pub id: ItemId,
    /// Zero (or within the immediate threshold) re-queues at the tail now; later schedules the item.
    pub retry_at: Ts,
    /// Give up on the item: dead-letter it (or delete it when the queue has no dead-letter queue).
    pub dead: bool,
}

/// Where one partition of a queue lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The partition number, 0-based.
    pub partition: u32,
    /// The `partition-storage` entry that holds it.
    pub storage_name: String,
    /// Reserved: read-only partitions take no produce (stored, not yet enforced).
    pub read_only: bool,
}

/// A queue's definition, as stored by the [`crate::storage::QueuesStore`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct QueueInfo {
    /// Unique name.
    pub name: String,
    /// Namespace (`_system` when not given).
    pub namespace: String,
    /// Creation time.
    pub created_at: Ts,
    /// Last update time.
    pub updated_at: Ts,
    /// Dead-letter queue name, empty for none.
    pub dead_queue: String,
    /// User reference string.
    pub reference: String,
    /// How long a lease lasts.
    pub lease_timeout: Duration,
    /// How long an item may live.
    pub expire_timeout: Duration,
    /// 0 = unlimited.
    pub max_attempts: u32,
    /// How many partitions the queue asked for.
    pub requested_partitions: u32,
    /// Placement of each partition, in partition order.
    pub partitions: Vec<PartitionInfo>,
    /// How long a produced item's `dedup_id` is remembered ([`DEFAULT_DEDUP_WINDOW`] unless set).
    pub dedup_window: Duration,
    /// Retry backoff (off unless `base` is set).
    pub retry_backoff: Backoff,
    /// A paused queue accepts produce but serves no lease until resumed.
    pub paused: bool,
    /// Longest lease one extension may ask for (zero: the queue's `expire_timeout`).
    pub max_lease_timeout: Duration,
    /// The queue is being filled by a restore (`storage.restore.*`): it refuses produce, lease, complete, retry,
    /// extend, clear and item edits, and runs no lifecycle, until the restore finishes. Persisted, so a server
    /// killed mid-restore keeps the queue closed and the restore can resume.
    pub restoring: bool,
}

impl QueueInfo {
    /// The deduplication window in force.
    pub fn effective_dedup_window(&self) -> Duration {
        if self.dedup_window.is_zero() {
            DEFAULT_DEDUP_WINDOW
        } else {
            self.dedup_window
        }
    }

    /// The longest lease an extension may set.
    pub fn effective_max_lease(&self) -> Duration {
        if self.max_lease_timeout.is_zero() {
            self.expire_timeout
        } else {
            self.max_lease_timeout
        }
    }
}

/// Namespace used when a request names none.
pub const DEFAULT_NAMESPACE: &str = "_system";

/// Counts a partition keeps, used for load balancing, stats and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionCounts {
    /// Items a lease can take now.
    pub ready: u64,
    /// Items held by consumers.
    pub leased: u64,
    /// Items waiting for their schedule.
    pub scheduled: u64,
}

/// A partition's statistics at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// The counts.
    pub counts: PartitionCounts,
    /// Mean age of non-scheduled items (now - created_at).
    pub average_age: Duration,
    /// Mean time left on current leases.
    pub average_leased_age: Duration,
    /// Payload bytes held (ready, leased and scheduled).
    pub payload_bytes: u64,
    /// Age (now - created_at) of the oldest of the items next in line, one per priority: how long the item a lease
    /// would reach first (at the head of its priority's FIFO) has existed. Zero without ready items. Found from the
    /// heads of the ready queue, never by a scan; an item requeued by a retry keeps its `created_at` but goes to the
    /// tail, so it counts again once it reaches the head.
    pub oldest_ready_age: Duration,
    /// Where the items are held: memory, local disk (or the database), object storage.
    pub tiers: TierStats,
}

/// Items and payload bytes held in one storage tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierFigures {
    /// Items with (part of) their record in the tier.
    pub items: u64,
    /// Payload bytes held in the tier, as stored (after compression). For the object tier: the payloads' length
    /// before compression (what an item's reference records).
    pub bytes: u64,
}

/// A partition's items by storage tier, from running counters (never a scan).
///
/// Tiers overlap: an item counts in every tier that holds part of it. A fjall partition keeps each queued item's
/// record in memory *and* on disk (a later paging build counts in `memory` only the resident ones), and an offloaded
/// item counts in the tier holding its record (with the few bytes of its reference left out of `bytes`) and in
/// `object`, which holds its payload. Ready, leased and scheduled items count; dead items waiting for their transfer
/// to the dead-letter queue do not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Held in this server's memory (memory store; fjall's resident items). PostgreSQL reports zero: its buffer
    /// cache is the database's, not Lessor's.
    pub memory: TierFigures,
    /// On local disk (fjall) or in the database (PostgreSQL).
    pub disk: TierFigures,
    /// Payloads in object storage (claim check, `payload-offload`).
    pub object: TierFigures,
}

impl TierStats {
    /// Adds another partition's figures (a queue's sum).
    pub fn add(&mut self, o: &TierStats) {
        for (a, b) in [
            (&mut self.memory, &o.memory),
            (&mut self.disk, &o.disk),
            (&mut self.object, &o.object),
        ] {
            a.items += b.items;
            a.bytes += b.bytes;
        }
    }
}

/// What one run of a store's object-storage sweeper did (orphaned payload objects of the claim check).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Objects listed under the store's prefix.
    pub listed: u64,
    /// Objects deleted: older than the grace period and referenced by no item.
    pub deleted: u64,
    /// Unreferenced-looking objects kept because their partition is not open on this server (another server's,
    /// or a queue not loaded here); every other object kept is referenced, younger than the grace, or being
    /// written.
    pub skipped: u64,
}

/// What a clear request removes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClearRequest {
    /// Remove ready items (un-leased ones only, unless destructive).
    pub queue: bool,
    /// Remove scheduled items.
    pub scheduled: bool,
    /// With `queue`, remove leased items too.
    pub destructive: bool,
}

/// Engine limits and defaults; the server fills them from configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most items in one produce request.
    pub max_produce_batch: usize,
    /// Most items one lease request may ask for.
    pub max_lease_batch: usize,
    /// Most ids in one complete or retry request.
    pub max_complete_batch: usize,
    /// Requests that may wait in one queue's inbox before callers get "overloaded".
    pub max_requests_per_queue: usize,
    /// Longest request_timeout accepted.
    pub max_request_timeout: Duration,
    /// Shortest request_timeout accepted for produce and lease (exclusive).
    pub min_request_timeout: Duration,
    /// enqueue_at / retry_at closer than this to now means "now".
    pub schedule_threshold: Duration,
    /// Storage calls per partition that one batch may not exceed before the rest waits for the next round.
    pub max_items_per_storage_call: usize,
    /// How often the counts of partitions on shared stores are re-read (other servers change them). Stores that
    /// push notices (PostgreSQL) wake consumers at once; this refresh is what remains when a notice is lost. The
    /// engine stretches it to 20 times what the last re-read took (counting a deep partition is slow).
    pub shared_refresh: Duration,
    /// Live dedup keys one queue may hold (its window's worth); a produce that would add keys beyond this gets
    /// [`crate::error::QueueError::DedupFull`] (454) until older keys leave the window. Bounds the index's memory
    /// (about 176 bytes per key) whatever the produce rate and window.
    pub max_dedup_keys: usize,
    /// Most payload bytes one lease storage call hands out ([`MAX_LEASE_BYTES`] by default; at least one item).
    pub max_lease_bytes: u64,
    /// Most partitions the queue definitions of one list page name together ([`MAX_LIST_PARTITIONS`] by default;
    /// at least one queue per page).
    pub max_list_partitions: usize,
    /// A queue that has had no request for this long, and holds nothing that needs its task (no leased or
    /// scheduled item, no waiting lease request, no rebalance...), unloads: its task stops and frees its memory,
    /// and the next request loads it again. Zero keeps every queue loaded once touched.
    pub queue_idle_unload: Duration,
    /// How long a request that carries no `request_timeout` of its own (retry, stats, browse, and every admin call
    /// that waits for a queue's task: clear, reload, the storage API, definition updates, deletes, snapshots,
    /// restore pages, rebalance hand-overs) waits for its queue before [`crate::error::QueueError::Untimed`] (454):
    /// bounds the wait on a queue whose storage call never returns, as the other requests' own timeouts do. A
    /// shutdown waits as long for each queue's task to stop.
    pub default_request_timeout: Duration,
}

/// Default [`Limits::default_request_timeout`]: what many HTTP clients wait by default, so that they get an answer
/// rather than a timeout of their own.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`Limits::queue_idle_unload`]: long enough that a queue in use stays loaded between bursts, short
/// enough that a sweep over many queues (a `queue.stats` each) gives its memory back within minutes.
pub const DEFAULT_QUEUE_IDLE_UNLOAD: Duration = Duration::from_secs(5 * 60);

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_produce_batch: 1000,
            max_lease_batch: 1000,
            max_complete_batch: 1000,
            max_requests_per_queue: 4096,
            max_request_timeout: Duration::from_secs(15 * 60),
            min_request_timeout: Duration::from_millis(10),
            schedule_threshold: Duration::from_millis(100),
            max_items_per_storage_call: 10_000,
            shared_refresh: Duration::from_millis(500),
            max_dedup_keys: 10_000_000,
            max_lease_bytes: MAX_LEASE_BYTES,
            max_list_partitions: MAX_LIST_PARTITIONS,
            queue_idle_unload: DEFAULT_QUEUE_IDLE_UNLOAD,
            default_request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_print_as_16_hex_digits_and_parse_back() {
        for v in [0u64, 1, 0xabc, 0x0123_4567_89ab_cdef, u64::MAX, 1 << 63] {
            let id = ItemId(v);
            assert_eq!(id.to_string(), format!("{v:016x}"));
            assert_eq!(id.to_string().parse::<ItemId>(), Ok(id));
        }
        assert_eq!(format!("{:>18}", ItemId(10)), "  000000000000000a");
    }

    #[test]
    fn item_id_round_trips_and_sorts_as_text() {
        let a = ItemId(0x1234);
        let b = ItemId(0xff_0000);
        assert_eq!(a.to_string().parse::<ItemId>(), Ok(a));
        assert!(a.to_string() < b.to_string());
        assert!("xyz".parse::<ItemId>().is_err());
        assert!("000000000000000G".parse::<ItemId>().is_err());
        assert!("000000000000000A".parse::<ItemId>().is_err());
    }

    #[test]
    fn ids_start_at_the_wall_clock() {
        let before = SystemClock.now().0;
        let floor = ItemId::floor_now().0;
        let after = SystemClock.now().0;
        assert!(
            (before as u64..=after as u64).contains(&floor),
            "{before} <= {floor} <= {after}"
        );
    }
}
