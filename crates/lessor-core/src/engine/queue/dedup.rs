//! Idempotent produce across partitions: the queue task's index of the dedup keys stored within the window.
//!
//! Partitions keep durable dedup records written atomically with their items (see
//! [`crate::storage::Partition::produce`]), but a partition only checks its own records, and produce spreads items
//! over partitions. This index is the queue-wide check for one server: a key seen within the window is answered
//! "stored" without a storage call. It is rebuilt from the partitions' records when they open, so it survives a
//! restart; shared stores (postgres) also check the whole queue themselves, which covers servers that share it.
//!
//! Memory: keys are kept as 128-bit hashes, never as strings, so an entry costs the same whatever the key's
//! length: a third of one 64-byte line of [`table::KeyTable`] (21 bytes), with the table's slack (measured in docs/benchmarks.md). Ended
//! keys' slots are reused by new keys, and those nobody reused are cleared by a sweep when three quarters of the
//! slots are held, so the index holds at most about the keys produced within three windows, in at most four slots
//! per key live at the last sweep.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

mod table;
use table::KeyTable;

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::time::Ts;

/// A key's 128-bit hash, as two `u64`s: a `u128` would align map entries and expiry-queue entries to 16 bytes and
/// pad each by 8 (32 bytes instead of 24, on every key of the window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeyHash(u64, u64);

impl KeyHash {
    /// The hash a key is indexed by: 128-bit SipHash-1-3 (one pass over the key gives all 128 bits) under a secret
    /// key drawn once per process. Per process, not per queue, so that a request handler can hash its items'
    /// keys before handing them to the queue's task: that task is the one place all of a queue's produces pass
    /// through, one at a time, and hashing there made every key cost the whole queue.
    pub(crate) fn of(key: &str) -> KeyHash {
        static SECRET: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
        // The standard library's per-process random keys, drawn out through its own hasher: no other source of
        // randomness is needed, and the index's key is as secret as a HashMap's.
        let &(k0, k1) =
            SECRET.get_or_init(|| (RandomState::new().hash_one(0u8), RandomState::new().hash_one(1u8)));
        let mut h = SipHasher13::new_with_keys(k0, k1);
        key.hash(&mut h);
        let v = h.finish128();
        KeyHash(v.h1, v.h2)
    }
}

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: its low half is as good a table hash as any.
        state.write_u64(self.0);
    }
}

/// The key sets' own hasher: their keys are already keyed hashes, uniformly spread, so hashing them again (SipHash,
/// the default) would only cost time. Takes the low 64 bits.
#[derive(Default)]
pub(super) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `KeyHash` reaches here (through write_u64); fold anything else in, in case.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A set of key hashes (they are keyed hashes already, so the set does not hash them again).
pub(super) type HashSet128 = std::collections::HashSet<KeyHash, BuildHasherDefault<PassThrough>>;

/// Queue-wide recent dedup keys.
#[derive(Debug, Default)]
pub(super) struct DedupIndex {
    /// Key hash -> end of its window. A key whose window ended stays until its slot is reused or swept; lookups
    /// ignore it.
    ///
    /// Why not drop each key when its window ends, from a queue in expiry order (the first design): the table is
    /// far larger than the CPU's caches at any real rate (a 5-minute window at 10,000 keys/s is 3M keys), so
    /// finding a key to drop it was a cache miss per key, as costly as the lookup that checks it; the queue cost
    /// 24 bytes per key more.
    live: KeyTable,
    /// When the last purge asked for by the key limit ran (see [`DedupIndex::purge_for_limit`]).
    limit_purge: Option<Ts>,
}

impl DedupIndex {
    /// Whether the key's window is still open at `now`.
    pub(super) fn contains(&self, h: KeyHash, now: Ts) -> bool {
        self.live.get(h).is_some_and(|until| until > now)
    }

    /// Records a key stored until `until` (keeps the later end when it is known already).
    pub(super) fn insert(&mut self, h: KeyHash, until: Ts, now: Ts) {
        let _ = self.live.upsert(h, until, now, true);
    }

    /// Claims a key for a request about to be stored, until `until`: when the key's window is open at `now` (a
    /// duplicate), the end of that window instead. One table access, where a lookup now and an insert after the
    /// write were two: the table is larger than the caches, so each access is a cache miss (see
    /// [`DedupIndex::warm`]). A claim whose write fails is given back with [`DedupIndex::release`].
    pub(super) fn claim(&mut self, h: KeyHash, until: Ts, now: Ts) -> Result<(), Ts> {
        self.live.upsert(h, until, now, false)
    }

    /// Touches the table where each of a request's keys lives, before they are claimed (see [`KeyTable::warm`]:
    /// with it the keyed run of `dedup_cost` went from 715,650–754,058 to 817,863–877,886 items/s).
    pub(super) fn warm(&self, hs: impl Iterator<Item = KeyHash>) {
        self.live.warm(hs);
    }

    /// Gives back a claim whose write failed, so that a retry of the item is stored.
    pub(super) fn release(&mut self, h: KeyHash) {
        self.live.remove(h);
    }

    /// Drops every key whose window ended at `now` (a sweep of the whole table).
    fn purge(&mut self, now: Ts) {
        self.live.sweep(now);
    }

    /// Called when the entries held and a request's new keys together pass the queue's key limit: purges ended keys
    /// so that [`DedupIndex::len`] counts live ones only, at most once per second (a purge walks the whole map,
    /// and a queue at its limit would otherwise pay that on every produce; within that second keys that ended
    /// may still count against the limit).
    pub(super) fn purge_for_limit(&mut self, now: Ts) {
        if self
            .limit_purge
            .is_some_and(|t| now < t.add(std::time::Duration::from_secs(1)))
        {
            return;
        }
        self.limit_purge = Some(now);
        self.purge(now);
    }

    /// Keys held: those within their window, and those whose window ended since the last purge (metrics, the key
    /// limit).
    pub(super) fn len(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Ended keys are reused or swept as inserts come, so the table holds at most about three windows' worth of keys
    /// however long it runs, and a key within its window is never dropped.
    #[test]
    fn the_table_stays_within_twice_a_window_of_keys() {
        let mut d = DedupIndex::default();
        // 1,000 keys a second, a 10-second window: 10,000 live keys at any time.
        let window = 10_000_000_000i64;
        let mut most = 0;
        for i in 0..200_000i64 {
            let now = Ts(1_000_000 * i);
            d.insert(KeyHash::of(&i.to_string()), Ts(now.0 + window), now);
            most = most.max(d.len());
            if i % 997 == 0 && i >= 10_000 {
                // The key inserted 9.9 s ago is still known; the one inserted 10 s ago has ended.
                assert!(d.contains(KeyHash::of(&(i - 9_900).to_string()), now));
                assert!(!d.contains(KeyHash::of(&(i - 10_000).to_string()), now));
            }
        }
        // Slots of ended keys are reused by new ones, and a sweep comes when three quarters of the slots are held.
        let slots = d.live.slots();
        println!("held at most {most} keys for 10,000 live, in {slots} slots");
        assert!(most <= 3 * 10_000, "held {most} keys for 10,000 live");
        assert!(slots <= 4 * 10_000, "{slots} slots for 10,000 live keys");
    }

    /// A claimed key is a duplicate until released; an ended one can be claimed again.
    #[test]
    fn claims_are_exclusive_until_released_or_ended() {
        let mut d = DedupIndex::default();
        let h = KeyHash::of("k");
        assert_eq!(d.claim(h, Ts(10), Ts(0)), Ok(()));
        assert_eq!(d.claim(h, Ts(20), Ts(5)), Err(Ts(10)), "live: a duplicate");
        d.release(h);
        assert_eq!(d.claim(h, Ts(20), Ts(5)), Ok(()), "released: claimed again");
        assert_eq!(d.claim(h, Ts(40), Ts(20)), Ok(()), "ended at 20: claimed again");
        assert!(d.contains(h, Ts(39)));
    }

    /// The limit's purge runs at most once a second, and leaves only live keys.
    #[test]
    fn the_limit_purge_is_throttled() {
        let mut d = DedupIndex::default();
        for i in 0..10 {
            d.insert(KeyHash::of(&i.to_string()), Ts(100 + i), Ts(0));
        }
        d.purge_for_limit(Ts(105));
        assert_eq!(d.len(), 4, "keys ending at 106..=109 live");
        d.purge_for_limit(Ts(108));
        assert_eq!(d.len(), 4, "throttled: less than a second since the last purge");
        d.purge_for_limit(Ts(105 + 1_000_000_000));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn keys_live_for_their_window_then_leave() {
        let mut d = DedupIndex::default();
        let t0 = Ts(1_000_000);
        let a = KeyHash::of("a");
        assert_ne!(a, KeyHash::of("b"));
        d.insert(a, t0.add(Duration::from_secs(5)), t0);
        assert!(d.contains(a, t0));
        assert!(!d.contains(KeyHash::of("b"), t0));
        d.purge_for_limit(t0.add(Duration::from_secs(4)));
        assert_eq!(d.len(), 1);
        assert!(!d.contains(a, t0.add(Duration::from_secs(5))));
        d.purge_for_limit(t0.add(Duration::from_secs(5)));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_renewed_key_survives_the_prune_of_its_first_entry() {
        let mut d = DedupIndex::default();
        let h = KeyHash::of("k");
        d.insert(h, Ts(10), Ts(0));
        d.insert(h, Ts(20), Ts(0));
        d.purge_for_limit(Ts(15));
        assert!(d.contains(h, Ts(15)));
        assert_eq!(d.len(), 1);
    }
}
