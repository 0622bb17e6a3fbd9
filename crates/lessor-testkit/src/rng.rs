//! A small deterministic random source (SplitMix64) for tests that make random choices.
//!
//! The seed comes from the environment when set, so a failing run can be repeated, and is printed either way: a
//! failure report then carries the seed that reproduces it. Only the choices repeat; timing against a server does
//! not.

use std::time::{SystemTime, UNIX_EPOCH};

/// The variable every seeded test reads when its own is unset.
pub const SEED_VAR: &str = "LESSOR_TEST_SEED";

/// SplitMix64: fast, tiny, and good enough to vary test inputs; never for anything that needs real randomness.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator that starts at `seed`: the same seed gives the same sequence.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator seeded by [`seed`]`(var)`, which prints the seed.
    pub fn from_env(var: &str) -> Rng {
        Rng(seed(var))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi` (`lo <= hi`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi, "empty range {lo}..={hi}");
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// An index-sized number in `lo..=hi` (`lo <= hi`).
    pub fn range_usize(&mut self, lo: usize, hi: usize) -> usize {
        // usize is at most 64 bits on every supported target, so both conversions are lossless.
        let n = self.range(lo as u64, hi as u64);
        usize::try_from(n).unwrap_or(hi)
    }

    /// True with probability `p` percent.
    pub fn percent(&mut self, p: u32) -> bool {
        self.next_u64() % 100 < u64::from(p)
    }

    /// `n` random bytes: payloads that no compression shrinks.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// An independent generator for another task, seeded from this one (so the whole tree repeats from one seed).
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}

/// The seed for a test: from `var`, else from `LESSOR_TEST_SEED`, else from the clock. Prints it with the variable
/// that repeats it.
///
/// # Panics
/// When the variable is set but is not a number (a typo must not silently run another seed).
pub fn seed(var: &str) -> u64 {
    let from_env = [var, SEED_VAR].into_iter().find_map(|v| {
        let s = std::env::var(v).ok().filter(|s| !s.trim().is_empty())?;
        let n = s
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{v}={s:?} is not a seed (a u64): {e}"));
        Some(n)
    });
    let seed = from_env.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed} ({var}={seed} repeats the choices)");
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_repeats_its_sequence_and_ranges_hold() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next_u64(), xs[0]);
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let n = r.range(3, 5);
            assert!((3..=5).contains(&n), "{n}");
        }
        assert_eq!(r.range(4, 4), 4);
    }

    #[test]
    fn forks_differ_from_their_parent() {
        let mut p = Rng::new(42);
        let mut f = p.fork();
        assert_ne!(p.next_u64(), f.next_u64());
    }
}
