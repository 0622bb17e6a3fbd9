//! The dedup index's table: key hash -> end of its window, laid out so that a claim of a new key reads one cache
//! line, and so that keys whose window ended cost nothing to get rid of.
//!
//! # Why not a `HashMap`
//! The index is far larger than the CPU's caches at any real rate, so each access to it is a cache miss. A
//! `HashMap` (hashbrown) reads a line of control bytes and then writes the entry's line: two misses per new key,
//! at addresses only the map knows, so nothing can fetch them ahead. Ended keys had to be purged by a scan
//! (`retain`), which leaves tombstones that a later insert pays for with a rehash of the whole table in place.
//!
//! Here a key's first access is its home bucket, one line whose address is the hash's low bits: the queue task
//! loads the home buckets of a whole request's keys first ([`KeyTable::warm`]), so their misses overlap, and the
//! claims that follow find their lines in the cache. (Without that pass this table was slower than the map: each
//! claim then waits for its own miss. docs/benchmarks.md has both measurements.)
//!
//! A bucket is one cache line with three entries (96 bits of the key's 128-bit hash, see [`kept`], and the end of
//! the window):
//! - A key lives in its home bucket (from the hash) or, when that is full, in the first bucket after it with room
//!   (linear probing by bucket). Each bucket counts the entries that are stored after it but whose home is at or
//!   before it (`passing`); a lookup stops at the first bucket that no entry passes, so a new key usually costs its
//!   home bucket's line alone, and no probe sequence depends on empty slots.
//! - An entry whose window ended is a free slot: a claim that passes one on its chain takes it, so in steady state
//!   new keys reuse the slots of ended ones and nothing is purged. Ended entries nobody reused are cleared by a
//!   sequential sweep when the table fills (see [`KeyTable::sweep`]), which is also when it grows or shrinks.

use super::KeyHash;
use crate::time::Ts;

/// Entries per bucket: three 12-byte hashes and three 8-byte ends, with the bucket's counter, fill one 64-byte line.
const WAYS: usize = 3;

/// The end of an empty slot: before every real time, so `until <= now` also says "free".
const EMPTY: i64 = i64::MIN;

/// The fewest buckets a table that holds anything has (4 KiB).
const MIN_BUCKETS: usize = 64;

/// The part of a key's hash the table keeps: 96 of its 128 bits (the whole first half, whose low bits also pick
/// the home bucket, and the low 32 bits of the second). A new key is compared with the few entries on its chain,
/// all of which share its home bucket's bits, so each comparison can only go wrong with odds of 2^-72 or less
/// (a table of up to 2^24 buckets): at a million new keys a second, under one chance in 2^26 of a false duplicate
/// in a year. Keeping 96 bits puts three entries in a line instead of two (21 bytes a slot instead of 32).
fn kept(h: KeyHash) -> KeyHash {
    KeyHash(h.0, h.1 & 0xffff_ffff)
}

/// One cache line of the table.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Bucket {
    /// First halves of the entries' hashes.
    lo: [u64; WAYS],
    /// Ends of the entries' windows ([`EMPTY`]: the slot is free).
    until: [i64; WAYS],
    /// Low 32 bits of the entries' second halves.
    hi: [u32; WAYS],
    /// Entries stored after this bucket whose home bucket is this one or one before it: while non-zero, a lookup
    /// must go on to the next bucket.
    passing: u32,
}

const _: () = assert!(std::mem::size_of::<Bucket>() == 64);

impl Bucket {
    /// The kept hash of slot `s`.
    fn key(&self, s: usize) -> KeyHash {
        KeyHash(self.lo[s], u64::from(self.hi[s]))
    }

    fn set_key(&mut self, s: usize, h: KeyHash) {
        self.lo[s] = h.0;
        self.hi[s] = h.1 as u32;
    }
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            lo: [0; WAYS],
            until: [EMPTY; WAYS],
            hi: [0; WAYS],
            passing: 0,
        }
    }
}

/// Key hash -> end of its window.
#[derive(Debug, Default)]
pub(super) struct KeyTable {
    buckets: Vec<Bucket>,
    /// Slots holding an entry, live or ended (not yet swept or reused).
    held: usize,
    /// A sweep runs before an insert that would take `held` past this (three quarters of the slots).
    sweep_at: usize,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("until", &self.until)
            .field("passing", &self.passing)
            .finish_non_exhaustive()
    }
}

impl KeyTable {
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    fn home(&self, h: KeyHash) -> usize {
        // The low bits of the first half: a keyed hash already, uniformly spread.
        h.0 as usize & self.mask()
    }

    /// Where `h` is stored, if it is.
    fn find(&self, h: KeyHash) -> Option<(usize, usize)> {
        let h = kept(h);
        if self.buckets.is_empty() {
            return None;
        }
        let mut b = self.home(h);
        for _ in 0..self.buckets.len() {
            let bk = &self.buckets[b];
            for s in 0..WAYS {
                if bk.until[s] != EMPTY && bk.key(s) == h {
                    return Some((b, s));
                }
            }
            if bk.passing == 0 {
                return None;
            }
            b = (b + 1) & self.mask();
        }
        None
    }

    /// The end of `h`'s window, if it is held (ended or not).
    pub(super) fn get(&self, h: KeyHash) -> Option<Ts> {
        self.find(h).map(|(b, s)| Ts(self.buckets[b].until[s]))
    }

    /// Stores `h` until `until` unless it is live at `now`: returns the end of its window (and changes nothing) when
    /// it is. With `keep_later`, a live key's end becomes the later of the two instead, and the call returns `Ok`.
    pub(super) fn upsert(&mut self, h: KeyHash, until: Ts, now: Ts, keep_later: bool) -> Result<(), Ts> {
        if self.held >= self.sweep_at {
            self.sweep(now);
        }
        let h = kept(h);
        let mask = self.mask();
        let home = self.home(h);
        let mut b = home;
        // The first free slot (empty, or its window ended) on the key's chain.
        let mut free = None;
        loop {
            let bk = &mut self.buckets[b];
            for s in 0..WAYS {
                let u = bk.until[s];
                if u != EMPTY && bk.key(s) == h {
                    if u > now.0 {
                        if !keep_later {
                            return Err(Ts(u));
                        }
                        if until.0 > u {
                            bk.until[s] = until.0;
                        }
                        return Ok(());
                    }
                    bk.until[s] = until.0;
                    return Ok(());
                }
                if free.is_none() && u <= now.0 {
                    free = Some((b, s));
                }
            }
            if bk.passing == 0 {
                break;
            }
            b = (b + 1) & mask;
            if b == home {
                break;
            }
        }
        let (b, s) = match free {
            Some(at) => at,
            None => self.free_after(b, now),
        };
        self.put(home, b, s, h, until);
        Ok(())
    }

    /// The first free slot in the buckets after `b` (the table always has one: it is swept before it fills).
    fn free_after(&self, mut b: usize, now: Ts) -> (usize, usize) {
        for _ in 0..self.buckets.len() {
            b = (b + 1) & self.mask();
            if let Some(s) = self.buckets[b].until.iter().position(|u| *u <= now.0) {
                return (b, s);
            }
        }
        unreachable!("the dedup table is swept and grown before it fills")
    }

    /// Writes `h` into slot `(b, s)`, a free slot on the chain from `home`, replacing the ended entry it may hold.
    fn put(&mut self, home: usize, b: usize, s: usize, h: KeyHash, until: Ts) {
        if self.buckets[b].until[s] == EMPTY {
            self.held += 1;
        } else {
            let old = self.home(self.buckets[b].key(s));
            self.count_passing(old, b, false);
        }
        self.count_passing(home, b, true);
        let bk = &mut self.buckets[b];
        bk.set_key(s, h);
        bk.until[s] = until.0;
    }

    /// Counts (or uncounts) an entry stored in bucket `at` whose home is `home` in the buckets it passes.
    fn count_passing(&mut self, home: usize, at: usize, add: bool) {
        let mask = self.mask();
        let mut b = home;
        while b != at {
            let p = &mut self.buckets[b].passing;
            *p = if add { *p + 1 } else { *p - 1 };
            b = (b + 1) & mask;
        }
    }

    /// Forgets `h`.
    pub(super) fn remove(&mut self, h: KeyHash) {
        if let Some((b, s)) = self.find(h) {
            self.clear(b, s);
        }
    }

    fn clear(&mut self, b: usize, s: usize) {
        let home = self.home(self.buckets[b].key(s));
        self.count_passing(home, b, false);
        self.buckets[b].until[s] = EMPTY;
        self.held -= 1;
    }

    /// Clears every entry whose window ended at `now` (one pass in memory order), then resizes the table when the
    /// live keys fill more than half of it or less than an eighth (a burst's memory is given back), to between a
    /// quarter and a half. The next sweep comes when three quarters of the slots are held: at least as many
    /// inserts later as a quarter of the slots, so its pass costs O(1) per insert.
    pub(super) fn sweep(&mut self, now: Ts) {
        for b in 0..self.buckets.len() {
            for s in 0..WAYS {
                let u = self.buckets[b].until[s];
                if u != EMPTY && u <= now.0 {
                    self.clear(b, s);
                }
            }
        }
        let slots = self.buckets.len() * WAYS;
        if self.held * 2 > slots || self.held * 8 < slots || slots == 0 {
            // Half the slots held: between a quarter and a half after the power-of-two rounding.
            let want = (2 * self.held)
                .div_ceil(WAYS)
                .max(1)
                .next_power_of_two()
                .max(MIN_BUCKETS);
            if want != self.buckets.len() {
                self.resize(want);
            }
        }
        self.sweep_at = self.buckets.len() * WAYS * 3 / 4;
    }

    /// Moves every entry into a table of `n` buckets (a power of two).
    fn resize(&mut self, n: usize) {
        let old = std::mem::replace(&mut self.buckets, vec![Bucket::default(); n]);
        self.held = 0;
        for bk in &old {
            for s in 0..WAYS {
                let (h, until) = (bk.key(s), bk.until[s]);
                if until != EMPTY {
                    let home = self.home(h);
                    let at = match self.buckets[home].until.iter().position(|u| *u == EMPTY) {
                        Some(slot) => (home, slot),
                        None => self.free_after(home, Ts(EMPTY)),
                    };
                    self.put(home, at.0, at.1, h, Ts(until));
                }
            }
        }
    }

    /// Loads the home bucket of every key in `hs`: the loads are independent, so the CPU has many of their cache
    /// misses in flight at once, where the claims that follow (each a chain of dependent steps) would take them one
    /// after another.
    pub(super) fn warm(&self, hs: impl Iterator<Item = KeyHash>) {
        if self.buckets.is_empty() {
            return;
        }
        let mut acc = 0u32;
        for h in hs {
            acc ^= self.buckets[self.home(h)].passing;
        }
        std::hint::black_box(acc);
    }

    /// Entries held: live ones, and ended ones not yet swept or reused.
    pub(super) fn len(&self) -> usize {
        self.held
    }

    /// Slots in the table (tests: its memory is 64 bytes per three slots).
    #[cfg(test)]
    pub(super) fn slots(&self) -> usize {
        self.buckets.len() * WAYS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> KeyHash {
        KeyHash::of(&i.to_string())
    }

    /// Keys that share a home bucket chain past it, and each is still found after others on its chain were
    /// removed, ended and reused.
    #[test]
    fn chains_survive_removal_and_reuse() {
        let mut t = KeyTable::default();
        // Same home bucket (low bits equal), different keys.
        let hs: Vec<KeyHash> = (0..7).map(|i| KeyHash(i << 40, i)).collect();
        for (i, h) in hs.iter().enumerate() {
            assert!(t.upsert(*h, Ts(100 + i as i64), Ts(0), false).is_ok());
        }
        for h in &hs {
            assert!(t.get(*h).is_some(), "{h:?} found along its chain");
        }
        t.remove(hs[0]);
        t.remove(hs[3]);
        assert_eq!(t.get(hs[0]), None);
        for h in [1, 2, 4, 5, 6] {
            assert!(t.get(hs[h]).is_some());
        }
        // hs[1] ended at 101: a new key with the same home takes a free slot; everything else is still found.
        let n = KeyHash(99 << 40, 99);
        assert!(t.upsert(n, Ts(500), Ts(102), false).is_ok());
        for h in [2, 4, 5, 6] {
            assert!(t.get(hs[h]).is_some());
        }
        assert_eq!(t.get(n), Some(Ts(500)));
        assert_eq!(
            t.upsert(n, Ts(600), Ts(103), false),
            Err(Ts(500)),
            "live: refused, with its end"
        );
        assert!(
            t.upsert(n, Ts(600), Ts(103), true).is_ok(),
            "keep_later: the later end is kept"
        );
        assert_eq!(t.get(n), Some(Ts(600)));
        // Every bucket's count matches the entries that pass it.
        check_counts(&t);
    }

    /// Recounts `passing` from the entries and compares.
    fn check_counts(t: &KeyTable) {
        let n = t.buckets.len();
        let mut want = vec![0u32; n];
        let mut held = 0;
        for (b, bk) in t.buckets.iter().enumerate() {
            for s in 0..WAYS {
                if bk.until[s] != EMPTY {
                    held += 1;
                    let mut x = t.home(bk.key(s));
                    while x != b {
                        want[x] += 1;
                        x = (x + 1) % n;
                    }
                }
            }
        }
        let got: Vec<u32> = t.buckets.iter().map(|b| b.passing).collect();
        assert_eq!(got, want);
        assert_eq!(t.held, held);
    }

    /// Random claims, renewals, removals and time against a model map: the same answers, consistent counters,
    /// and a table that stays within a fixed multiple of the live keys.
    #[test]
    fn matches_a_model_under_churn() {
        let mut t = KeyTable::default();
        let mut model = std::collections::HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut now = 0i64;
        for step in 0..200_000u64 {
            now += (rnd() % 3) as i64;
            let k = key(rnd() % 5_000);
            let until = Ts(now + 1 + (rnd() % 2_000) as i64);
            match rnd() % 10 {
                0 => {
                    t.remove(k);
                    model.remove(&k.0);
                }
                1 => {
                    t.upsert(k, until, Ts(now), true).expect("keep_later");
                    let e = model.entry(k.0).or_insert(until.0);
                    if *e <= now || *e < until.0 {
                        *e = until.0;
                    }
                }
                _ => {
                    let live = model.get(&k.0).is_some_and(|u| *u > now);
                    assert_eq!(t.upsert(k, until, Ts(now), false).is_ok(), !live, "step {step}");
                    if !live {
                        model.insert(k.0, until.0);
                    }
                }
            }
            if step % 20_000 == 0 {
                check_counts(&t);
                for (k0, u) in &model {
                    if *u > now {
                        let h = (0..5_000).map(key).find(|h| h.0 == *k0).expect("key");
                        assert_eq!(t.get(h), Some(Ts(*u)));
                    }
                }
            }
        }
        let live = model.values().filter(|u| **u > now).count();
        assert!(
            t.slots() <= 4 * 5_000,
            "{} slots for at most 5,000 keys ({live} live)",
            t.slots()
        );
    }
}
