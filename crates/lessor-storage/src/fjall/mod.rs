//! The embedded persistent backend: queues and partitions in fjall, a pure-Rust LSM engine.
//!
//! Each partition keeps the head of its ready queue, its leased, scheduled and dead items and its counters in memory
//! in a [`crate::state::PartitionState`], and writes every change set as one atomic fjall batch. Ready items beyond
//! the partition's window (`memory-window-items`) are on disk only and paged in ahead of need (see the `paging`
//! module), so memory does not grow with the depth of the queue and an open reads the window, not the backlog.
//!
//! # Layout
//! One fjall database per store, not one per partition: a database costs two background threads and its own
//! journal, and one journal lets a single fsync cover the writes of every partition of the store (group commit).
//! Partitions are not keyspaces either: fjall records every keyspace it creates in its own metadata, and creating
//! thousands of them cost seconds each and disk that came back only at restart. A partition is a numeric prefix
//! (its *pid*) inside one `items` keyspace, so creating one is a catalog entry and deleting one is a background
//! range deletion.
//!
//! ```text
//! <storage-dir>/
//!   ~queue-storage-partition/   FjallQueues: one database, keyspace "queues" (name -> queue definition),
//!                                 keyspace "auth" (the auth model's keys -> values, see `auth`),
//!                                 keyspace "auth-meta" ("generation" -> u64 BE)
//!   ~partitions/                FjallStore: one database, one keyspace "items"
//!       catalog (pid 0)           0 + 'p' + "<queue>-<NNNNNN>-partition" -> pid (u64 BE)
//!                                 0 + 'd' + pid -> name   (destroyed; items still being deleted)
//!       items (pid >= 1)          pid (u64 BE) + item id (u64 BE)        -> item metadata
//!                                 pid (u64 BE) + item id (u64 BE) + 'p'  -> payload
//!                                 pid (u64 BE) + "hwm"                   -> highest id ever written
//!       paged (pid | 1 << 63)     (pid | 1 << 63) + prio + id (u64 BE)  -> paged record (metadata + payload)
//!                                 (pid | 1 << 63) + "pgc"                -> paging counters
//! ```
//!
//! Each database directory holds a `LESSOR-FORMAT` marker naming what it holds and its format version; opening
//! refuses an unknown version or kind with [`StorageErrorKind::Corrupt`]. fjall's lock file makes a second process
//! on the same directory fail fast with [`StorageErrorKind::Locked`].
//!
//! # Modules
//! - `engine`: one database: open, lock and version checks, atomic writes with the chosen [`Durability`], and what
//!   happens after a failure (reopen after a full disk, poison after a failed fsync).
//! - `codec`: the binary record format.
//! - `partitions`: [`FjallStore`] and [`FjallPartition`], with the writer thread that group-commits.
//! - `paging`: paged records, the paging counters and the reads that page items in.
//! - `queues`: [`FjallQueues`].
//! - `auth`: [`FjallAuth`], the auth store in the queue store's database.
//! - `upgrade`: rewrites a format-1 partition store (a keyspace per partition) into the format-2 layout.

mod auth;
pub(crate) mod codec;
mod engine;
mod paging;
mod partitions;
mod queues;
mod upgrade;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lessor_core::error::{StorageError, StorageErrorKind};

pub use auth::FjallAuth;
pub use engine::Fault;
pub use partitions::{FjallPartition, FjallStore};
pub use queues::FjallQueues;

/// Directory of the queue store inside `storage-dir` (the seeds' name).
pub const QUEUES_DIR: &str = "~queue-storage-partition";
/// Directory of the partition store inside `storage-dir`.
pub const PARTITIONS_DIR: &str = "~partitions";
/// Format version of the partition store this build writes. Version 1 kept one keyspace per partition; version 2
/// keeps every partition in one `items` keyspace under a numeric prefix (see [`FjallStore`]); version 3 adds paged
/// records and paging counters under a second prefix per partition (the `paging` module), which a build that does
/// not know them would not see, hence the new number; version 4 keeps small payloads inline in their item's record
/// (item records of version 3, see the codec), which an older build would refuse item by item; version 5 adds paged
/// scheduled records and their counters under the second prefix (the `paging` module), which an older build would
/// not see either. Older stores are upgraded when they open (only version 1 needs anything rewritten).
pub const PARTITIONS_FORMAT_VERSION: u32 = 5;
/// Format version of the queue store this build writes and reads. The auth keyspaces did not change it: they are
/// new keyspaces beside `queues`, created when a store opens (an older directory gets them empty), and a build
/// without auth ignores them.
pub const QUEUES_FORMAT_VERSION: u32 = 1;

/// When a write counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// A write is answered after the journal is fsynced: an acknowledged write survives a power loss. Concurrent
    /// writes share one fsync.
    #[default]
    Sync,
    /// A write is answered once the OS has it; a background thread fsyncs at this interval. A process crash loses
    /// nothing, a power loss may lose up to one interval.
    Interval(Duration),
    /// A write is answered once the OS has it; fsync happens only when the engine flushes on its own. A process
    /// crash loses nothing, a power loss may lose whatever the OS had not written back.
    None,
}

impl Durability {
    /// The fsync interval used when `interval` is chosen without `sync-interval`.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

    /// Builds the mode from the configuration keys `durability` (`sync` | `interval` | `none`, default `sync`) and
    /// `sync-interval` (milliseconds, only with `interval`).
    pub fn from_config(mode: Option<&str>, sync_interval_ms: Option<u64>) -> Result<Self, StorageError> {
        let config = |m: String| StorageError::new(StorageErrorKind::Config, m);
        let d = match mode.map(str::trim) {
            None | Some("") => Durability::Sync,
            Some(m) => m.parse().map_err(config)?,
        };
        match (d, sync_interval_ms) {
            (_, None) => Ok(d),
            (Durability::Interval(_), Some(0)) => Err(config(
                "invalid sync-interval; must be greater than 0 milliseconds".into(),
            )),
            (Durability::Interval(_), Some(ms)) => Ok(Durability::Interval(Duration::from_millis(ms))),
            (other, Some(_)) => Err(config(format!(
                "invalid sync-interval; it applies only to durability 'interval', not '{}'",
                other.name()
            ))),
        }
    }

    /// The mode's configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::Interval(_) => "interval",
            Durability::None => "none",
        }
    }
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sync" => Ok(Durability::Sync),
            "interval" => Ok(Durability::Interval(Self::DEFAULT_INTERVAL)),
            "none" => Ok(Durability::None),
            other => Err(format!(
                "invalid durability; '{other}' is not one of (sync, interval, none)"
            )),
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::Interval(d) => write!(f, "interval ({} ms)", d.as_millis()),
            other => f.write_str(other.name()),
        }
    }
}

/// Longest keyspace name fjall accepts.
const MAX_KEYSPACE_NAME: usize = 255;

/// The keyspace that holds partition `partition` of `queue`: `<queue>-<NNNNNN>-partition`, the seeds' directory
/// name. Queue names may be longer than a keyspace name may be; those are cut and made unique again with a hash of
/// the full name behind a `~`, a character queue names cannot contain.
pub fn keyspace_name(queue: &str, partition: u32) -> String {
    let full = format!("{queue}-{partition:06}-partition");
    if full.len() <= MAX_KEYSPACE_NAME {
        return full;
    }
    let mut cut = 200;
    while !queue.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}~{:016x}-{partition:06}-partition",
        &queue[..cut],
        fnv1a(queue.as_bytes())
    )
}

/// FNV-1a, 64 bits: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_parses() {
        let ok = |mode, ms| Durability::from_config(mode, ms).expect("valid");
        assert_eq!(ok(None, None), Durability::Sync);
        assert_eq!(ok(Some("NONE"), None), Durability::None);
        assert_eq!(
            ok(Some("interval"), None),
            Durability::Interval(Durability::DEFAULT_INTERVAL)
        );
        assert_eq!(
            ok(Some("interval"), Some(250)),
            Durability::Interval(Duration::from_millis(250))
        );
        for (mode, ms) in [
            (Some("fast"), None),
            (Some("sync"), Some(5)),
            (Some("interval"), Some(0)),
        ] {
            let e = Durability::from_config(mode, ms).expect_err("invalid");
            assert_eq!(e.kind, StorageErrorKind::Config, "{mode:?} {ms:?}");
        }
        assert_eq!(
            Durability::Interval(Duration::from_millis(20)).to_string(),
            "interval (20 ms)"
        );
    }

    #[test]
    fn keyspace_names_follow_the_seeds_and_fit() {
        assert_eq!(keyspace_name("orders", 3), "orders-000003-partition");
        let long = "é".repeat(300);
        let a = keyspace_name(&long, 1);
        assert!(a.len() <= MAX_KEYSPACE_NAME, "{}", a.len());
        assert!(a.ends_with("-000001-partition"));
        let other = format!("{}x", &long[..598]);
        assert_ne!(keyspace_name(&other, 1), a, "the hash keeps cut names apart");
    }
}
