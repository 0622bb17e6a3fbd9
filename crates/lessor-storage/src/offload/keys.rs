//! Object keys S3 accepts whatever the queue is named.
//!
//! S3 refuses keys longer than [`MAX_KEY`] bytes, counted in the key as object_store sends it: every character
//! object_store avoids in a key (`#`, `%`, `[`, `*`, `~`, ...) is percent-encoded to three bytes, and segment keys
//! are encoded twice (a manifest holds the key normalised, and every request normalises it again), `#` becoming
//! the five bytes `%2523`. A queue name may be 512 bytes of such characters, so keys holding it could reach about
//! 1,600 (payload objects) and 2,600 bytes (segments): every write of them would fail for good.
//!
//! A key names its queue by the name itself whenever the longest key that could be built with it fits, so keys of
//! every name that fitted before stay as they were (and so do the objects already written under them). Only a name
//! whose longest key would be too long is replaced, in every key built for it, by [`digest`]: `~` and 32 hex
//! digits of its SHA-256. No queue name contains `~`, so that component never names another queue's objects, and
//! being a hash of the full name it tells two long names apart as the name itself would.

use std::borrow::Cow;

use object_store::path::Path as ObjPath;
use sha2::{Digest, Sha256};

/// Longest object key S3 accepts, in bytes.
pub const MAX_KEY: usize = 1024;

/// The component naming queue `queue` in keys, where `longest(component)` is the length, as sent, of the longest
/// key built with that component: the name itself when that key fits, else [`digest`].
pub(crate) fn queue_component(queue: &str, longest: impl Fn(&str) -> usize) -> Cow<'_, str> {
    if longest(queue) <= MAX_KEY {
        Cow::Borrowed(queue)
    } else {
        Cow::Owned(digest(queue))
    }
}

/// The component that stands for a queue name too long for keys: `~` and the first 128 bits of the SHA-256 of the
/// name, in hex (35 bytes once percent-encoded, 37 twice).
pub fn digest(queue: &str) -> String {
    let hash = Sha256::digest(queue.as_bytes());
    let mut s = String::with_capacity(33);
    s.push('~');
    for b in &hash[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Length of `key` as a request sends it when the key is used as built (payload objects: `offload::listed`).
pub(crate) fn sent_once(key: &str) -> usize {
    ObjPath::from(key).as_ref().len()
}

/// Length of `key` as a request sends it when the key is normalised before it is kept (segment keys: a manifest
/// holds `ObjPath::from(key)`, and requests turn that into a path again).
pub(crate) fn sent_twice(key: &str) -> usize {
    ObjPath::from(ObjPath::from(key).to_string()).as_ref().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_stay_and_long_ones_become_a_fixed_digest() {
        let key = |q: &str| format!("lessor/disk-0/{q}/0/{}", "0".repeat(32));
        let longest = |q: &str| sent_once(&key(q));
        assert_eq!(queue_component("orders#eu", longest), "orders#eu");
        let long = "#".repeat(512);
        let c = queue_component(&long, longest);
        assert_eq!(c, digest(&long));
        assert_eq!(c.len(), 33);
        assert!(c.starts_with('~'));
        assert!(sent_once(&key(&c)) <= MAX_KEY);
        // Stable across builds: the digest of existing data's names must never change.
        assert_eq!(digest("q"), "~8e35c2cd3bf6641bdb0e2050b76932cb");
        // Two long names differing in their last byte get two components.
        assert_ne!(digest(&format!("{long}a")), digest(&format!("{long}b")));
        // A name exactly at the limit is kept.
        let fits = "a".repeat(MAX_KEY - key("").len());
        assert_eq!(sent_once(&key(&fits)), MAX_KEY);
        assert_eq!(queue_component(&fits, longest), fits.as_str());
        assert_eq!(queue_component(&format!("{fits}a"), longest).len(), 33);
    }
}
