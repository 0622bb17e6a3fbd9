//! The storage trait of the auth model: a small ordered key-value store with atomic, conditional commits.
//!
//! Every queue-storage backend provides one (see [`crate::storage::QueuesStore::auth`]), so users and keys live
//! next to the queue definitions and several servers over one PostgreSQL share them. The records, their indexes and
//! every rule (uniqueness, cascades) are written once in [`super::service`] on top of this trait; a backend only
//! has to store bytes in key order and apply a [`Commit`] all-or-nothing. That keeps three backends (and the next
//! one) small and makes their behaviour identical, which the conformance cases in `lessor-storage` check.

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::StorageError;

/// One precondition of a [`Commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The key must not exist.
    Absent(Vec<u8>),
    /// The key must exist.
    Present(Vec<u8>),
}

impl Check {
    /// The key checked.
    pub fn key(&self) -> &[u8] {
        match self {
            Check::Absent(k) | Check::Present(k) => k,
        }
    }
}

/// One write of a [`Commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Sets the key's value.
    Put(Vec<u8>, Vec<u8>),
    /// Removes the key (nothing happens when it does not exist).
    Delete(Vec<u8>),
}

/// An atomic change: when every check holds, every write is applied, durably, as one; otherwise nothing is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    /// Preconditions, evaluated against the state just before the writes, with no other commit in between.
    pub checks: Vec<Check>,
    /// Writes, applied in order.
    pub writes: Vec<Write>,
    /// A change that grants and revokes nothing (a key's last-use time): it does not move
    /// [`AuthStore::generation`], so it does not make every server drop its caches.
    pub silent: bool,
}

impl Commit {
    /// Adds a precondition that `key` does not exist.
    pub fn absent(&mut self, key: Vec<u8>) -> &mut Self {
        self.checks.push(Check::Absent(key));
        self
    }

    /// Adds a precondition that `key` exists.
    pub fn present(&mut self, key: Vec<u8>) -> &mut Self {
        self.checks.push(Check::Present(key));
        self
    }

    /// Adds a write of `value` at `key`.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.writes.push(Write::Put(key, value));
        self
    }

    /// Adds a removal of `key`.
    pub fn delete(&mut self, key: Vec<u8>) -> &mut Self {
        self.writes.push(Write::Delete(key));
        self
    }
}

/// A commit whose precondition did not hold: nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckFailed {
    /// Index in [`Commit::checks`] of the first check that failed.
    pub index: usize,
}

/// Ordered key-value storage for the auth model.
///
/// Contract (checked by the conformance cases):
/// - keys are compared as bytes; [`AuthStore::scan`] returns keys in ascending order;
/// - [`AuthStore::commit`] is atomic and serialisable across every server sharing the store: no other commit
///   happens between its checks and its writes, and after it returns `Ok(Ok(()))` the writes are durable (on disk
///   for persistent backends) and visible to every later read on any server;
/// - [`AuthStore::generation`] increases with every successful commit that is not [`Commit::silent`] and is shared
///   by every server on the store,
///   so a server that sees it change knows that something may have been revoked.
#[async_trait]
pub trait AuthStore: Send + Sync + std::fmt::Debug + 'static {
    /// The value at `key`.
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError>;

    /// Up to `limit` entries whose key starts with `prefix` and is `>= from` (`from` empty: from the start of the
    /// prefix), in key order.
    async fn scan(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, StorageError>;

    /// Applies `commit` atomically when its checks hold.
    async fn commit(&self, commit: Commit) -> Result<Result<(), CheckFailed>, StorageError>;

    /// A number that grows with every successful commit (silent ones excepted), on every server sharing the store.
    async fn generation(&self) -> Result<u64, StorageError>;
}
