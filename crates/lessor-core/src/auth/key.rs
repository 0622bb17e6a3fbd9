//! API keys: Querator's `qtr-<tag>-<entropy>` format, generation from OS randomness, the format check, and the hash
//! that is all a store ever keeps.
//!
//! The entropy is 32 random bytes written in base62 and left-padded to 43 characters, so every key has the same
//! length. Keys are 256-bit random secrets, so a single SHA-256 is enough to store them: there is nothing to
//! brute-force that a slow password hash would protect.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// First segment of every key.
pub const KEY_PREFIX: &str = "qtr";
/// Length of the entropy segment.
pub const ENTROPY_LEN: usize = 43;
/// Entropy characters kept in the displayable prefix.
pub const PREFIX_ENTROPY: usize = 8;
/// Tag used when neither the request nor the namespace names one.
pub const DEFAULT_TAG: &str = "live";
/// Longest tag.
pub const MAX_TAG: usize = 16;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A freshly minted key: the secret (shown once), its displayable prefix and its stored hash.
#[derive(Clone)]
pub struct NewKey {
    /// The whole key, `qtr-<tag>-<entropy>`.
    pub secret: String,
    /// `qtr-<tag>-<first 8 entropy characters>`.
    pub prefix: String,
    /// [`hash`] of the secret.
    pub hash: String,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret, even in a debug dump.
        f.debug_struct("NewKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Whether `tag` is a valid key tag: 1–16 characters of `[a-z0-9]`.
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG
        && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Mints a key with `tag` (which must be [`valid_tag`]) from 32 bytes of OS randomness.
pub fn generate(tag: &str) -> Result<NewKey, getrandom::Error> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)?;
    let entropy = base62_padded(&raw);
    let secret = format!("{KEY_PREFIX}-{tag}-{entropy}");
    Ok(NewKey {
        prefix: format!("{KEY_PREFIX}-{tag}-{}", &entropy[..PREFIX_ENTROPY]),
        hash: hash(&secret),
        secret,
    })
}

/// An existing key (one handed out earlier) in the form [`generate`] returns, or `None` when it is not
/// [`well_formed`].
pub fn from_secret(secret: &str) -> Option<NewKey> {
    let secret = secret.trim();
    if !well_formed(secret) {
        return None;
    }
    let (head, entropy) = secret.rsplit_once('-')?;
    let prefix_len = entropy.len().min(PREFIX_ENTROPY);
    Some(NewKey {
        secret: secret.to_string(),
        prefix: format!("{head}-{}", &entropy[..prefix_len]),
        hash: hash(secret),
    })
}

/// Whether `key` has the shape of a key: three `-`-separated segments, `qtr`, a valid tag, and at least 43 base62
/// characters of entropy. Checked before any lookup, so garbage never reaches the cache or the store.
pub fn well_formed(key: &str) -> bool {
    let mut parts = key.split('-');
    let (Some(first), Some(tag), Some(entropy), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    first == KEY_PREFIX
        && valid_tag(tag)
        && entropy.len() >= ENTROPY_LEN
        && entropy.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The stored form of a key: SHA-256, lowercase hex.
pub fn hash(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether two stored hashes are equal, in time independent of where they differ.
pub fn same_hash(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// `bytes` as a big-endian number in base62, left-padded with `0` to [`ENTROPY_LEN`] characters (62^43 > 2^256, so
/// 32 bytes always fit).
fn base62_padded(bytes: &[u8; 32]) -> String {
    // Repeated division of the big number (as base-256 digits) by 62.
    let mut num = bytes.to_vec();
    let mut digits = Vec::with_capacity(ENTROPY_LEN);
    while num.iter().any(|&d| d != 0) {
        let mut rem = 0u32;
        for d in num.iter_mut() {
            let cur = (rem << 8) | u32::from(*d);
            *d = u8::try_from(cur / 62).expect("quotient of a two-digit base-256 number by 62 fits a byte");
            rem = cur % 62;
        }
        digits.push(BASE62[usize::try_from(rem).expect("remainder below 62")]);
    }
    while digits.len() < ENTROPY_LEN {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).expect("base62 digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_querators_shape() {
        let k = generate("live").unwrap();
        assert!(k.secret.starts_with("qtr-live-"));
        assert_eq!(k.secret.len(), "qtr-live-".len() + ENTROPY_LEN);
        assert!(well_formed(&k.secret), "{}", k.secret);
        assert_eq!(k.prefix, k.secret[..("qtr-live-".len() + PREFIX_ENTROPY)]);
        assert_eq!(k.hash, hash(&k.secret));
        assert_eq!(k.hash.len(), 64);
        assert!(!format!("{k:?}").contains(&k.secret));
        let other = generate("live").unwrap();
        assert_ne!(k.secret, other.secret);
    }

    #[test]
    fn an_existing_key_reads_back_as_minted() {
        let k = generate("live").unwrap();
        let back = from_secret(&format!("{}\n", k.secret)).expect("a minted key is well formed");
        assert_eq!(
            (back.secret, back.prefix, back.hash),
            (k.secret, k.prefix, k.hash)
        );
        assert!(from_secret("qtr-live-short").is_none());
        assert!(from_secret("").is_none());
    }

    #[test]
    fn base62_pads_and_encodes_extremes() {
        assert_eq!(base62_padded(&[0; 32]), "0".repeat(43));
        let max = base62_padded(&[0xff; 32]);
        assert_eq!(max.len(), 43);
        let mut one = [0u8; 32];
        one[31] = 61;
        assert!(base62_padded(&one).ends_with("0z"));
    }

    #[test]
    fn format_check_rejects_what_cannot_be_a_key() {
        let good = format!("qtr-live-{}", "a".repeat(43));
        assert!(well_formed(&good));
        for bad in [
            String::new(),
            "qtr".into(),
            format!("qtx-live-{}", "a".repeat(43)),
            format!("qtr-LIVE-{}", "a".repeat(43)),
            format!("qtr--{}", "a".repeat(43)),
            format!("qtr-live-{}", "a".repeat(42)),
            format!("qtr-live-{}-x", "a".repeat(43)),
            format!("qtr-live-{}+", "a".repeat(43)),
            format!("qtr-{}-{}", "a".repeat(17), "a".repeat(43)),
        ] {
            assert!(!well_formed(&bad), "{bad}");
        }
    }

    #[test]
    fn hash_compare() {
        assert!(same_hash(&hash("a"), &hash("a")));
        assert!(!same_hash(&hash("a"), &hash("b")));
        assert!(!same_hash("ab", "abc"));
    }
}
