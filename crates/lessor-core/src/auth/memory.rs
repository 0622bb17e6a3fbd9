//! An [`AuthStore`] in RAM: the memory backend's, and the one unit tests run the auth service on. Nothing here
//! survives the process.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::store::{AuthStore, Check, CheckFailed, Commit, Write};
use crate::error::{StorageError, StorageErrorKind};

/// Ordered keys and values under one lock; a commit holds it for its checks and writes, which makes it atomic.
#[derive(Debug, Default)]
pub struct MemoryAuthStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<Vec<u8>, Bytes>,
    generation: u64,
}

impl MemoryAuthStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, StorageError> {
        self.state.lock().map_err(|_| {
            StorageError::new(
                StorageErrorKind::Poisoned,
                "memory auth store lock poisoned by a panic",
            )
        })
    }
}

#[async_trait]
impl AuthStore for MemoryAuthStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        Ok(self.lock()?.entries.get(key).cloned())
    }

    async fn scan(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, StorageError> {
        let start = if from > prefix { from } else { prefix };
        Ok(self
            .lock()?
            .entries
            .range(start.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (Bytes::copy_from_slice(k), v.clone()))
            .collect())
    }

    async fn commit(&self, commit: Commit) -> Result<Result<(), CheckFailed>, StorageError> {
        let mut state = self.lock()?;
        for (index, check) in commit.checks.iter().enumerate() {
            let exists = state.entries.contains_key(check.key());
            let holds = match check {
                Check::Absent(_) => !exists,
                Check::Present(_) => exists,
            };
            if !holds {
                return Ok(Err(CheckFailed { index }));
            }
        }
        let silent = commit.silent;
        for write in commit.writes {
            match write {
                Write::Put(k, v) => {
                    state.entries.insert(k, Bytes::from(v));
                }
                Write::Delete(k) => {
                    state.entries.remove(&k);
                }
            }
        }
        if !silent {
            state.generation += 1;
        }
        Ok(Ok(()))
    }

    async fn generation(&self) -> Result<u64, StorageError> {
        Ok(self.lock()?.generation)
    }
}
