//! The slots of up to [`CHUNK`] consecutive ids, dense while most of them are live and sparse once few are.
//!
//! A chunk is filled in id order and is normally emptied in id order too, so it is dense for its whole life and
//! freed at the end. Priorities break that: a chunk's priority-9 items are leased and completed while its
//! priority-0 items wait, possibly for hours. A dense chunk with one live item still holds 1,024 slots (64 KiB), so
//! a starving low priority interleaved with busy traffic cost up to 64 KiB per waiting item, and each lease touched
//! memory spread over every such chunk. Once fewer than [`SPARSE_BELOW`] of its slots are live, a chunk keeps only
//! those, sorted by offset (66 bytes each); it becomes dense again if it fills past [`DENSE_ABOVE`] (an import or
//! a page-in of old ids), so a chunk switching back and forth costs O(CHUNK) per [`DENSE_ABOVE`] - [`SPARSE_BELOW`]
//! changes, O(1) amortized.

use super::Slot;

/// Ids per chunk.
pub(super) const CHUNK: u64 = 1024;
/// A full-length dense chunk with fewer live slots than this becomes sparse.
pub(super) const SPARSE_BELOW: u32 = CHUNK as u32 / 8;
/// A sparse chunk with more live slots than this becomes dense.
pub(super) const DENSE_ABOVE: u32 = CHUNK as u32 / 4;

/// Slots of the ids `key * CHUNK ..= key * CHUNK + CHUNK - 1`.
#[derive(Debug, Default)]
pub(super) struct Chunk {
    /// Dense: indexed by offset (tombstones included), as long as the highest offset stored so far. Sparse: the
    /// live slots only, in the order of `offs`.
    slots: Vec<Slot>,
    /// Sparse only: the offsets of `slots`, increasing.
    offs: Vec<u16>,
    sparse: bool,
    /// Live slots.
    live: u32,
}

impl Chunk {
    /// An empty chunk whose first id is about to be stored. `full`: its priority is busy (it used up a whole chunk
    /// before), so the chunk gets its full size at once instead of growing by doubling (each growth copies the
    /// chunk). Otherwise, and for a chunk started elsewhere (reloads, gaps), it grows as needed: each priority has
    /// a chunk of its own, and a priority with a handful of items should not hold 64 KiB for them.
    pub(super) fn starting_at(off: usize, full: bool) -> Chunk {
        Chunk {
            slots: Vec::with_capacity(if off == 0 && full { CHUNK as usize } else { 0 }),
            ..Default::default()
        }
    }

    /// Live slots.
    pub(super) fn live(&self) -> u32 {
        self.live
    }

    /// The slot at `off` (possibly a tombstone when dense).
    pub(super) fn get(&self, off: usize) -> Option<&Slot> {
        if self.sparse {
            let i = self.find(off).ok()?;
            self.slots.get(i)
        } else {
            self.slots.get(off)
        }
    }

    /// The slot at `off`, to change in place (possibly a tombstone when dense).
    pub(super) fn get_mut(&mut self, off: usize) -> Option<&mut Slot> {
        if self.sparse {
            let i = self.find(off).ok()?;
            self.slots.get_mut(i)
        } else {
            self.slots.get_mut(off)
        }
    }

    /// Stores a live slot at `off`, replacing what was there.
    pub(super) fn put(&mut self, off: usize, slot: Slot) {
        if self.sparse {
            match self.find(off) {
                Ok(i) => self.slots[i] = slot,
                Err(i) => {
                    self.slots.insert(i, slot);
                    // An offset is below CHUNK, so it fits.
                    self.offs.insert(i, off as u16);
                    self.live += 1;
                    if self.live > DENSE_ABOVE {
                        self.densify();
                    }
                }
            }
            return;
        }
        while self.slots.len() <= off {
            self.slots.push(Slot::default());
        }
        if !self.slots[off].live() {
            self.live += 1;
        }
        self.slots[off] = slot;
    }

    /// Takes the live slot at `off` out (a dense chunk keeps a tombstone); `None` when there is none.
    pub(super) fn take(&mut self, off: usize) -> Option<Slot> {
        let slot = if self.sparse {
            let i = self.find(off).ok()?;
            self.offs.remove(i);
            let slot = self.slots.remove(i);
            // Went sparse with up to SPARSE_BELOW slots; give memory back as they leave (halving, so O(1) each).
            let n = self.slots.len();
            if self.slots.capacity() > 4 * n + 8 {
                self.slots.shrink_to(2 * n);
                self.offs.shrink_to(2 * n);
            }
            slot
        } else {
            let s = self.slots.get_mut(off).filter(|s| s.live())?;
            std::mem::take(s)
        };
        self.live -= 1;
        // Only a chunk whose every id has been handed out goes sparse: the tail chunk is still being appended to.
        if !self.sparse && self.live > 0 && self.live < SPARSE_BELOW && self.slots.len() == CHUNK as usize {
            self.sparsify();
        }
        Some(slot)
    }

    /// The first slot at an offset of `off` or more, with its offset (possibly a tombstone when dense), to change in
    /// place.
    pub(super) fn next_mut(&mut self, off: usize) -> Option<(usize, &mut Slot)> {
        if self.sparse {
            let i = self.offs.partition_point(|&o| usize::from(o) < off);
            let o = usize::from(*self.offs.get(i)?);
            self.slots.get_mut(i).map(|s| (o, s))
        } else {
            self.slots.get_mut(off).map(|s| (off, s))
        }
    }

    /// One past the highest offset a later [`Chunk::next_mut`] could find without a new id being stored: the end
    /// of the filled part of a dense chunk, or the whole chunk once sparse (all its ids were handed out).
    pub(super) fn end(&self) -> usize {
        if self.sparse {
            CHUNK as usize
        } else {
            self.slots.len()
        }
    }

    /// Every stored slot with its offset, in offset order (tombstones included when dense: check `live()`).
    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, &Slot)> + '_ {
        let sparse = self.sparse;
        self.slots.iter().enumerate().map(move |(i, s)| {
            if sparse {
                (usize::from(self.offs[i]), s)
            } else {
                (i, s)
            }
        })
    }

    /// [`Chunk::iter`] from offset `start` on, without visiting the slots before it.
    pub(super) fn iter_from(&self, start: usize) -> impl Iterator<Item = (usize, &Slot)> + '_ {
        let first = if self.sparse {
            self.offs.partition_point(|&o| usize::from(o) < start)
        } else {
            start.min(self.slots.len())
        };
        let sparse = self.sparse;
        self.slots[first..].iter().enumerate().map(move |(i, s)| {
            if sparse {
                (usize::from(self.offs[first + i]), s)
            } else {
                (first + i, s)
            }
        })
    }

    /// Slots the chunk has memory for (tests and memory accounting).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.slots.capacity()
    }

    fn find(&self, off: usize) -> Result<usize, usize> {
        // Offsets are below CHUNK: the cast keeps them.
        self.offs.binary_search(&(off as u16))
    }

    fn sparsify(&mut self) {
        let mut slots = Vec::with_capacity(self.live as usize);
        let mut offs = Vec::with_capacity(self.live as usize);
        for (off, mut s) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if s.live() {
                // Off the arena buffers the items that left shared with it (see `PartitionState::arenas`).
                s.own_data();
                slots.push(s);
                offs.push(off as u16);
            }
        }
        self.slots = slots;
        self.offs = offs;
        self.sparse = true;
    }

    fn densify(&mut self) {
        let mut slots: Vec<Slot> = Vec::with_capacity(CHUNK as usize);
        let offs = std::mem::take(&mut self.offs);
        for (s, off) in std::mem::take(&mut self.slots).into_iter().zip(offs) {
            while slots.len() < usize::from(off) {
                slots.push(Slot::default());
            }
            slots.push(s);
        }
        self.slots = slots;
        self.sparse = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_slot(attempts: u32) -> Slot {
        Slot {
            flags: super::super::LIVE,
            attempts,
            ..Default::default()
        }
    }

    #[test]
    fn a_mostly_empty_chunk_goes_sparse_and_keeps_every_live_slot() {
        let mut c = Chunk::starting_at(0, true);
        for off in 0..CHUNK as usize {
            c.put(off, live_slot(off as u32));
        }
        // Keep every 16th: 64 live, under SPARSE_BELOW.
        for off in 0..CHUNK as usize {
            if off % 16 != 0 {
                assert!(c.take(off).is_some());
            }
        }
        assert!(c.sparse);
        assert_eq!(c.live(), 64);
        assert!(c.capacity() <= 2 * 64, "capacity {}", c.capacity());
        for off in 0..CHUNK as usize {
            let got = c.get(off).filter(|s| s.live()).map(|s| s.attempts);
            assert_eq!(got, (off % 16 == 0).then_some(off as u32), "offset {off}");
        }
        let seen: Vec<usize> = c.iter().map(|(o, _)| o).collect();
        assert_eq!(seen, (0..CHUNK as usize).step_by(16).collect::<Vec<_>>());
        assert_eq!(c.next_mut(17).map(|(o, _)| o), Some(32));
        assert_eq!(c.iter_from(17).next().map(|(o, _)| o), Some(32));
        assert_eq!(c.iter_from(1009).count(), 0);
        assert_eq!(c.next_mut(1009).map(|(o, _)| o), None);
        assert_eq!(c.end(), CHUNK as usize);
        assert!(c.take(5).is_none(), "a taken offset is gone");
    }

    #[test]
    fn a_sparse_chunk_refilled_past_the_threshold_is_dense_again() {
        let mut c = Chunk::starting_at(0, true);
        for off in 0..CHUNK as usize {
            c.put(off, live_slot(1));
        }
        for off in 10..CHUNK as usize {
            c.take(off);
        }
        assert!(c.sparse);
        for off in (100..CHUNK as usize).step_by(3) {
            c.put(off, live_slot(off as u32));
        }
        assert!(!c.sparse);
        assert_eq!(c.get(103).map(|s| s.attempts), Some(103));
        assert!(c.get(104).is_none_or(|s| !s.live()));
        assert_eq!(c.get(5).map(|s| s.attempts), Some(1));
        let live = c.iter().filter(|(_, s)| s.live()).count();
        assert_eq!(live as u32, c.live());
    }

    #[test]
    fn the_tail_chunk_never_goes_sparse() {
        let mut c = Chunk::starting_at(0, true);
        for off in 0..500 {
            c.put(off, live_slot(1));
        }
        for off in 1..500 {
            c.take(off);
        }
        assert!(!c.sparse, "ids 500.. of this chunk are still to be handed out");
        assert_eq!(c.end(), 500);
    }
}
