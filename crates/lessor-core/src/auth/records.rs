//! Where each record and index lives in the [`super::store::AuthStore`] key space, and how records are encoded.
//!
//! Keys are a one-byte table tag followed by segments separated by `0x00` (names cannot contain control
//! characters, so a segment never contains the separator and prefix scans cannot bleed into a neighbour):
//!
//! | key | value |
//! |---|---|
//! | `n` name | [`Namespace`] |
//! | `u` id | [`User`] |
//! | `U` username | user id (uniqueness of names) |
//! | `k` id | [`ApiKey`] |
//! | `h` hash | key id (authentication) |
//! | `K` user, id | empty (a user's keys) |
//! | `r` namespace, name | [`Role`] |
//! | `R` id | empty value; the role's namespace and name are in the key (`R` id, namespace, name) |
//! | `b` namespace, user, role id | [`RoleBinding`] |
//! | `B` user, namespace, role id | empty (a user's bindings: permission checks) |
//! | `X` role id, namespace, user | empty (a role's bindings: refusing to delete a bound role) |
//! | `m` name | markers of one-time actions (bootstrap) |

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::StorageError;

/// Separator between key segments.
pub const SEP: u8 = 0;

/// A key of table `tag` from `segments`.
pub fn key(tag: u8, segments: &[&str]) -> Vec<u8> {
    let len = 1 + segments.iter().map(|s| s.len() + 1).sum::<usize>();
    let mut k = Vec::with_capacity(len);
    k.push(tag);
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            k.push(SEP);
        }
        k.extend_from_slice(s.as_bytes());
    }
    k
}

/// The prefix of every key of table `tag` whose first segments are `segments` (ends with a separator, so `ab` does
/// not match `abc`).
pub fn prefix(tag: u8, segments: &[&str]) -> Vec<u8> {
    let mut p = key(tag, segments);
    if !segments.is_empty() {
        p.push(SEP);
    }
    p
}

/// The segments of a key after its tag.
pub fn segments(key: &[u8]) -> Vec<String> {
    key.get(1..)
        .unwrap_or_default()
        .split(|b| *b == SEP)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Table tags.
pub mod tag {
    /// Namespaces.
    pub const NAMESPACE: u8 = b'n';
    /// Users by id.
    pub const USER: u8 = b'u';
    /// User ids by name.
    pub const USERNAME: u8 = b'U';
    /// Keys by id.
    pub const KEY: u8 = b'k';
    /// Key ids by hash.
    pub const KEY_HASH: u8 = b'h';
    /// Keys by user.
    pub const USER_KEY: u8 = b'K';
    /// Roles by namespace and name.
    pub const ROLE: u8 = b'r';
    /// Roles by id.
    pub const ROLE_ID: u8 = b'R';
    /// Bindings by namespace, user and role.
    pub const BINDING: u8 = b'b';
    /// Bindings by user.
    pub const USER_BINDING: u8 = b'B';
    /// Bindings by role.
    pub const ROLE_BINDING: u8 = b'X';
    /// One-time markers.
    pub const MARKER: u8 = b'm';
}

/// A record's stored bytes.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("auth records are plain structs of strings and numbers")
}

/// A stored record, or a [`crate::error::StorageErrorKind::Corrupt`] error naming the key.
pub fn decode<T: DeserializeOwned>(key: &[u8], bytes: &Bytes) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StorageError::new(
            crate::error::StorageErrorKind::Corrupt,
            format!("auth record '{}' unreadable", String::from_utf8_lossy(key)),
        )
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_prefixes_do_not_bleed() {
        let a = key(tag::ROLE, &["ns", "admin"]);
        assert!(a.starts_with(&prefix(tag::ROLE, &["ns"])));
        assert!(!a.starts_with(&prefix(tag::ROLE, &["n"])));
        assert_eq!(segments(&a), ["ns", "admin"]);
        assert_eq!(prefix(tag::ROLE, &[]), b"r");
    }
}
