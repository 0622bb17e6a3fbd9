//! Which storage tier a stored payload lives in, for the per-tier figures of
//! [`lessor_core::types::TierStats`].
//!
//! Every backend keeps running counters of the items it holds; an item whose stored payload is an object reference
//! (the claim check of the `offload` wrapper) has its payload in object storage. The backend recognises such a
//! reference here, in every build: the frame format itself lives in `offload::frame` (feature `s3`), but a build
//! without `s3` opening data an `s3` build wrote must still count its offloaded items right. Only the few header
//! bytes are read, so counting costs nothing measurable on the write path.

/// The first bytes of a framed payload (see `offload::frame`).
pub const FRAME_MAGIC: [u8; 4] = [0xF7, b'L', b'O', b'F'];
/// The frame kind byte of an object reference.
pub const KIND_OBJECT: u8 = 3;
/// Bytes of an object reference before its key: magic, kind, codec, length (u64 LE), CRC-32, key length.
pub const OBJECT_HEADER: usize = 4 + 1 + 1 + 8 + 4 + 2;

/// The original payload length an object reference records, or `None` when `stored` holds the payload itself
/// (plain or compressed inline).
pub fn offloaded_len(stored: &[u8]) -> Option<u64> {
    if stored.len() < OBJECT_HEADER || stored[..4] != FRAME_MAGIC || stored[4] != KIND_OBJECT {
        return None;
    }
    let len: [u8; 8] = stored[6..14].try_into().ok()?;
    Some(u64::from_le_bytes(len))
}

/// Running per-tier counters of one partition's stored items (ready, leased and scheduled; not dead ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounters {
    /// Items held.
    pub items: u64,
    /// Stored payload bytes of items whose payload is held here (not offloaded).
    pub inline_bytes: u64,
    /// Items whose payload is in object storage.
    pub object_items: u64,
    /// Their payloads' original length.
    pub object_bytes: u64,
}

impl TierCounters {
    /// Counts an item with stored payload `stored` in.
    pub fn add(&mut self, stored: &[u8]) {
        self.items += 1;
        match offloaded_len(stored) {
            Some(n) => {
                self.object_items += 1;
                self.object_bytes += n;
            }
            None => self.inline_bytes += stored.len() as u64,
        }
    }

    /// Counts an item with stored payload `stored` out (the inverse of [`TierCounters::add`]).
    pub fn remove(&mut self, stored: &[u8]) {
        self.items = self.items.saturating_sub(1);
        match offloaded_len(stored) {
            Some(n) => {
                self.object_items = self.object_items.saturating_sub(1);
                self.object_bytes = self.object_bytes.saturating_sub(n);
            }
            None => self.inline_bytes = self.inline_bytes.saturating_sub(stored.len() as u64),
        }
    }

    /// Counts an item in whose stored payload of `len` bytes is known not to be an object reference (a payload
    /// kept on disk only, see the state's "Payloads on disk").
    pub fn add_plain(&mut self, len: u64) {
        self.items += 1;
        self.inline_bytes += len;
    }

    /// The inverse of [`TierCounters::add_plain`].
    pub fn remove_plain(&mut self, len: u64) {
        self.items = self.items.saturating_sub(1);
        self.inline_bytes = self.inline_bytes.saturating_sub(len);
    }

    /// The figures of a backend holding every item in one tier (`memory` or `disk`), payloads not offloaded
    /// included.
    pub fn held(&self) -> lessor_core::types::TierFigures {
        lessor_core::types::TierFigures {
            items: self.items,
            bytes: self.inline_bytes,
        }
    }

    /// The object tier's figures.
    pub fn object(&self) -> lessor_core::types::TierFigures {
        lessor_core::types::TierFigures {
            items: self.object_items,
            bytes: self.object_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_told_from_payloads() {
        let mut r = FRAME_MAGIC.to_vec();
        r.extend_from_slice(&[KIND_OBJECT, 0]);
        r.extend_from_slice(&(1u64 << 20).to_le_bytes());
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&2u16.to_le_bytes());
        r.extend_from_slice(b"k1");
        assert_eq!(offloaded_len(&r), Some(1 << 20));
        // Too short, another frame kind, or plain bytes: held inline.
        assert_eq!(offloaded_len(&r[..10]), None);
        let mut zstd = r.clone();
        zstd[4] = 2;
        assert_eq!(offloaded_len(&zstd), None);
        assert_eq!(offloaded_len(b"hello, world, a plain payload"), None);
        let mut c = TierCounters::default();
        c.add(&r);
        c.add(b"hello");
        assert_eq!(
            (c.items, c.inline_bytes, c.object_items, c.object_bytes),
            (2, 5, 1, 1 << 20)
        );
        c.remove(&r);
        c.remove(b"hello");
        assert_eq!(c, TierCounters::default());
    }
}
