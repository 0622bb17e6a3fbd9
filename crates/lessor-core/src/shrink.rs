//! Giving back the room of collections that have emptied: a `HashMap` or `VecDeque` never shrinks on its own, so
//! one that grew for a burst (queues loaded at a peak, a backlog drained, a flood of leases completed) keeps its
//! room for as long as it lives. Each check is O(1); a shrink to twice the entries left copies them and comes again
//! only once the collection has halved twice more, so its cost is O(1) per removal over time.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Shrinks `map` to twice its length once it holds less than a quarter of its room, when that room is above `min`
/// slots (smaller ones would only churn the allocator).
pub fn map<K: Hash + Eq, V, S: BuildHasher>(map: &mut HashMap<K, V, S>, min: usize) {
    if map.capacity() > min && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// [`map`] for a queue.
pub fn deque<T>(d: &mut VecDeque<T>, min: usize) {
    if d.capacity() > min && d.len() < d.capacity() / 4 {
        d.shrink_to(d.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinks_only_when_sparse_and_large() {
        let mut m: HashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        m.retain(|&k, _| k < 5_000);
        let before = m.capacity();
        map(&mut m, 1024);
        assert_eq!(m.capacity(), before, "a third full or more: kept");
        m.retain(|&k, _| k < 100);
        map(&mut m, 1024);
        assert!(m.capacity() < 1024, "{}", m.capacity());
        let mut d: VecDeque<u32> = (0..10_000).collect();
        d.drain(..9_900);
        deque(&mut d, 1024);
        assert!(d.capacity() < 1024 && d.len() == 100);
        let mut small: VecDeque<u32> = (0..1000).collect();
        small.drain(..999);
        deque(&mut small, 1024);
        assert!(small.capacity() >= 1000, "below the minimum: kept");
    }
}
