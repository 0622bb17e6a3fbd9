//! Dedup keys as `lessor_dedup_keys` stores them: a 128-bit keyed hash of (queue, key) instead of the key's text.
//!
//! The table's unique index then holds two `BIGINT`s per record instead of the queue name and the key as text, and
//! the produce statement sorts, compares and looks up integers (docs/benchmarks.md, 6 Dec 2026). Two different keys
//! with one hash would make the second look like a duplicate of the first: its item would be acknowledged with the
//! first one's id and never stored, so the hash must not collide, not even for a client that picks its keys to make
//! it. It is therefore HMAC-SHA256 (RFC 2104) truncated to 128 bits, keyed with a 32-byte secret drawn from the
//! operating system's random source when the schema was migrated to version 5 and kept in `lessor_dedup_secret`:
//! every server and restart on the database uses the same secret, and a client, which never sees a hash, could
//! only find a collision by trying about 2^64 keys. The messages are
//!
//! - `"lessor-dedup-queue" 0x00 queue` for the queue's id (the first 8 bytes, big-endian, as a signed integer),
//!   which scopes pruning and the records dropped with a queue;
//! - `"lessor-dedup-key" 0x00 len(queue) as u64 big-endian, queue, key` for a record's hash (bytes 0..8 and
//!   8..16, big-endian, as two signed integers); the length prefix keeps (queue, key) pairs apart.
//!
//! A collision of queue ids (2^-64 per pair of queues) would only let one queue's deletion drop the other's
//! records early; records are found by their hash alone, which covers the queue name.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of the database's secret.
pub(crate) const SECRET_LEN: usize = 32;

/// HMAC-SHA256 under the database's secret, keyed once (a clone per message).
#[derive(Clone)]
pub(crate) struct DedupSecret {
    mac: HmacSha256,
}

impl std::fmt::Debug for DedupSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.write_str("DedupSecret")
    }
}

/// The MAC of everything `m` absorbed.
fn finish(m: HmacSha256) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&m.finalize().into_bytes());
    out
}

impl DedupSecret {
    /// The MAC keyed with `secret`.
    pub(crate) fn new(secret: &[u8]) -> Self {
        DedupSecret {
            mac: HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length"),
        }
    }

    /// The hashing of `queue`'s keys: its id, and the MAC state with the queue's part of each message absorbed.
    pub(crate) fn queue(&self, queue: &str) -> QueueKeys {
        let mut q = self.mac.clone();
        q.update(b"lessor-dedup-queue\0");
        q.update(queue.as_bytes());
        let id = finish(q);
        let mut prefix = self.mac.clone();
        prefix.update(b"lessor-dedup-key\0");
        prefix.update(&(queue.len() as u64).to_be_bytes());
        prefix.update(queue.as_bytes());
        QueueKeys {
            id: i64::from_be_bytes(first8(&id, 0)),
            prefix,
        }
    }
}

fn first8(b: &[u8; 32], at: usize) -> [u8; 8] {
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[at..at + 8]);
    o
}

/// The dedup hashing of one queue.
#[derive(Clone)]
pub(crate) struct QueueKeys {
    /// `lessor_dedup_keys.queue_id` of the queue's records.
    pub(crate) id: i64,
    prefix: HmacSha256,
}

impl std::fmt::Debug for QueueKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The MAC state is derived from the secret: not shown.
        f.debug_struct("QueueKeys")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl QueueKeys {
    /// The stored hash `(h1, h2)` of `key`.
    pub(crate) fn key(&self, key: &str) -> (i64, i64) {
        let mut m = self.prefix.clone();
        m.update(key.as_bytes());
        let d = finish(m);
        (
            i64::from_be_bytes(first8(&d, 0)),
            i64::from_be_bytes(first8(&d, 8)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 ("Jefe"): the MAC is HMAC-SHA256.
    #[test]
    fn the_mac_is_hmac_sha256() {
        let mut m = DedupSecret::new(b"Jefe").mac;
        m.update(b"what do ya want for nothing?");
        let hex: String = finish(m).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// The stored values of one secret never change between builds: records written by one release must be found
    /// by the next (these are HMAC-SHA256 of the documented messages under 32 bytes 0..=31).
    #[test]
    fn stored_values_are_stable() {
        let secret: Vec<u8> = (0u8..32).collect();
        let q = DedupSecret::new(&secret).queue("orders");
        assert_eq!(q.id, QUEUE_ID);
        assert_eq!(q.key("k-1"), KEY_HASH);
        assert_ne!(q.key("k-2"), q.key("k-1"));
        let other = DedupSecret::new(&secret).queue("orders2");
        assert_ne!(other.id, q.id);
        assert_ne!(other.key("k-1"), q.key("k-1"));
        // The length prefix: ("ab", "c") and ("a", "bc") differ.
        let s = DedupSecret::new(&secret);
        assert_ne!(s.queue("ab").key("c"), s.queue("a").key("bc"));
        // Another secret, other values.
        assert_ne!(DedupSecret::new(&[7u8; 32]).queue("orders").key("k-1"), KEY_HASH);
    }

    // Computed apart from this code, with Python's `hmac` module.
    const QUEUE_ID: i64 = 977_115_801_309_105_732;
    const KEY_HASH: (i64, i64) = (633_049_833_466_601_262, -8_504_859_798_394_964_076);
}
