//! Affinity placement: which partition store holds which partition of a queue.
//!
//! Partitions are shared out in proportion to each store's affinity with the largest-remainder method, so the counts
//! always add up to the number requested (Querator floors each share and can drop partitions). Numbers are handed
//! out in store order.

use crate::types::PartitionInfo;

/// One candidate store: its configured name and affinity (0 = never place here).
#[derive(Clone, Debug)]
pub struct StoreWeight {
    /// The `partition-storage` name.
    pub name: String,
    /// The affinity from the configuration.
    pub affinity: f64,
}

/// How many of `n` partitions each store gets.
pub fn shares(stores: &[StoreWeight], n: u32) -> Vec<u32> {
    // Affinities are taken relative to the largest: each is finite (the configuration refuses others), but their
    // sum need not be (two of 1e308 made it infinite, every share 0, and the remainder pass then dealt partitions
    // round-robin, a store of affinity ~0 included).
    let largest = stores.iter().map(|s| s.affinity).fold(0.0, f64::max);
    if largest <= 0.0 || !largest.is_finite() {
        return vec![0; stores.len()];
    }
    let weight = |s: &StoreWeight| s.affinity.max(0.0) / largest;
    let total: f64 = stores.iter().map(weight).sum();
    let exact: Vec<f64> = stores.iter().map(|s| weight(s) / total * f64::from(n)).collect();
    let mut counts: Vec<u32> = exact.iter().map(|e| e.floor() as u32).collect();
    let placed: u32 = counts.iter().sum();
    let mut order: Vec<usize> = (0..stores.len()).filter(|&i| stores[i].affinity > 0.0).collect();
    // Largest fractional part first; ties go to the earlier store so placement is deterministic.
    order.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.partial_cmp(&fa)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take(n.saturating_sub(placed) as usize) {
        counts[i] += 1;
    }
    counts
}

/// Places partitions `first..first+n` across the stores.
pub fn place(stores: &[StoreWeight], first: u32, n: u32) -> Vec<PartitionInfo> {
    let mut out = Vec::with_capacity(n as usize);
    let mut next = first;
    for (store, count) in stores.iter().zip(shares(stores, n)) {
        for _ in 0..count {
            out.push(PartitionInfo {
                partition: next,
                storage_name: store.name.clone(),
                read_only: false,
            });
            next += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(a: &[f64]) -> Vec<StoreWeight> {
        a.iter()
            .enumerate()
            .map(|(i, &affinity)| StoreWeight {
                name: format!("s{i}"),
                affinity,
            })
            .collect()
    }

    /// Affinities each finite but whose sum is not: the shares still follow them (found by review: they were dealt
    /// round-robin, `[1, 1, 1]` here, the store of affinity 1e-300 getting a third of the partitions).
    #[test]
    fn huge_affinities_keep_their_proportions() {
        assert_eq!(shares(&w(&[1e308, 1e308, 1e-300]), 3), vec![2, 1, 0]);
        assert_eq!(shares(&w(&[f64::MAX, f64::MAX / 3.0]), 4), vec![3, 1]);
    }

    #[test]
    fn largest_remainder_never_drops_partitions() {
        // Querator floors these to 52+26+15+5 = 98.
        let s = shares(&w(&[1.0, 0.5, 0.3, 0.1]), 100);
        assert_eq!(s.iter().sum::<u32>(), 100);
        assert_eq!(s, vec![53, 26, 16, 5]);
        assert_eq!(shares(&w(&[1.0, 1.0]), 1), vec![1, 0]);
        assert_eq!(shares(&w(&[3.0, 7.0]), 10), vec![3, 7]);
        assert_eq!(shares(&w(&[0.0, 1.0]), 4), vec![0, 4]);
    }

    #[test]
    fn placement_numbers_in_store_order() {
        let p = place(&w(&[1.0, 1.0]), 0, 3);
        let names: Vec<_> = p.iter().map(|p| (p.partition, p.storage_name.as_str())).collect();
        assert_eq!(names, vec![(0, "s0"), (1, "s0"), (2, "s1")]);
    }
}
