//! Idempotent produce across partitions: the queue task's index of the dedup keys stored within the window.
//!
//! Partitions keep durable dedup records written atomically with their items (see
//! [`crate::storage::Partition::produce`]), but a partition only checks its own records, and produce spreads items
//! over partitions. This index is the queue-wide check for one server: a key seen within the window is answered
//! "stored" without a storage call. It is rebuilt from the partitions' records when they open, so it survives a
//! restart; shared stores (postgres) also check the whole queue themselves, which covers servers that share it.
//!
//! Memory: keys are kept as 128-bit hashes, never as strings, so an entry costs the same whatever the key's
//! length: 24 bytes in the map plus 24 in the expiry queue, with the hash tables' slack (measured in
//! docs/benchmarks.md). Entries leave once their window has passed, so the index holds at most the keys produced
//! within one window.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::time::Ts;

/// A key's 128-bit hash, as two `u64`s: a `u128` would align map entries and expiry-queue entries to 16 bytes and
/// pad each by 8 (32 bytes instead of 24, on every key of the window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct KeyHash(u64, u64);

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: its low half is as good a table hash as any.
        state.write_u64(self.0);
    }
}

/// The map's own hasher: its keys are already keyed hashes, uniformly spread, so hashing them again (SipHash,
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
#[derive(Debug)]
pub(super) struct DedupIndex {
    /// Key hash -> end of its window.
    live: HashMap<KeyHash, Ts, BuildHasherDefault<PassThrough>>,
    /// (end of window, key hash) in insertion order, to drop expired entries without a scan. Window changes make
    /// the order inexact; an entry popped early is kept if its map entry says it still lives.
    order: VecDeque<(Ts, KeyHash)>,
    /// The secret key of the 128-bit SipHash-1-3 the index uses: random per process, since only this process
    /// reads the index (one pass over the key gives all 128 bits).
    k0: u64,
    k1: u64,
}

impl Default for DedupIndex {
    fn default() -> Self {
        DedupIndex {
            live: HashMap::default(),
            order: VecDeque::new(),
            // The standard library's per-process random keys, drawn out through its own hasher: no other source
            // of randomness is needed, and the index's key is as secret as a HashMap's.
            k0: RandomState::new().hash_one(0u8),
            k1: RandomState::new().hash_one(1u8),
        }
    }
}

impl DedupIndex {
    /// The hash a key is indexed by.
    pub(super) fn hash(&self, key: &str) -> KeyHash {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        key.hash(&mut h);
        let v = h.finish128();
        KeyHash(v.h1, v.h2)
    }

    /// Whether the key's window is still open at `now`.
    pub(super) fn contains(&self, h: KeyHash, now: Ts) -> bool {
        self.live.get(&h).is_some_and(|until| *until > now)
    }

    /// Records a key stored until `until` (keeps the later end when it is known already).
    pub(super) fn insert(&mut self, h: KeyHash, until: Ts) {
        let e = self.live.entry(h).or_insert(until);
        if *e < until {
            *e = until;
        }
        self.order.push_back((until, h));
    }

    /// Drops entries whose window ended; bounded work per call (`budget` entries) so a produce pays little.
    pub(super) fn prune(&mut self, now: Ts, budget: usize) {
        for _ in 0..budget {
            match self.order.front() {
                Some(&(until, h)) if until <= now => {
                    self.order.pop_front();
                    if self.live.get(&h).is_some_and(|u| *u <= now) {
                        self.live.remove(&h);
                    }
                }
                _ => return,
            }
        }
    }

    /// Number of keys held (metrics, tests).
    pub(super) fn len(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keys_live_for_their_window_then_leave() {
        let mut d = DedupIndex::default();
        let t0 = Ts(1_000_000);
        let a = d.hash("a");
        assert_ne!(a, d.hash("b"));
        d.insert(a, t0.add(Duration::from_secs(5)));
        assert!(d.contains(a, t0));
        assert!(!d.contains(d.hash("b"), t0));
        d.prune(t0.add(Duration::from_secs(4)), 10);
        assert_eq!(d.len(), 1);
        assert!(!d.contains(a, t0.add(Duration::from_secs(5))));
        d.prune(t0.add(Duration::from_secs(5)), 10);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_renewed_key_survives_the_prune_of_its_first_entry() {
        let mut d = DedupIndex::default();
        let h = d.hash("k");
        d.insert(h, Ts(10));
        d.insert(h, Ts(20));
        d.prune(Ts(15), 10);
        assert!(d.contains(h, Ts(15)));
    }
}
