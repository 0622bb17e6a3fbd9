//! [`FjallAuth`]: the auth records (users, keys, roles, bindings) in the queue store's fjall database, keyspace
//! `auth`, with the store's generation in keyspace `auth-meta`.
//!
//! A commit checks its preconditions and writes its records and the next generation in one fjall batch, under a
//! lock that every auth commit takes, so no other commit slips between the checks and the writes. The batch goes
//! through the engine's group commit, so it is as durable as the queue definitions (fsync before the answer with
//! the default durability) and a failed fsync poisons the store like any other write. Older directories simply
//! have no `auth` keyspace yet: it is created on first use, and an absent generation reads as 0.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::auth::{AuthStore, Check, CheckFailed, Commit, Write};
use lessor_core::error::{StorageError, StorageErrorKind};

use super::engine::{Engine, Unit};

const RECORDS: &str = "auth";
const META: &str = "auth-meta";
const GENERATION: &[u8] = b"generation";

/// The auth store of a fjall queue store.
pub struct FjallAuth {
    engine: Arc<Engine>,
    /// Serialises commits: checks and writes are one step.
    write: Arc<Mutex<()>>,
    /// The last committed generation (read from disk at open).
    generation: Arc<AtomicU64>,
}

impl fmt::Debug for FjallAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallAuth")
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl FjallAuth {
    /// The auth store over `engine` (the queue store's), creating its keyspaces when missing. Blocking.
    pub(crate) fn open(engine: Arc<Engine>) -> Result<Self, StorageError> {
        engine.keyspace(RECORDS, true)?;
        let meta = engine
            .keyspace(META, true)?
            .ok_or_else(|| StorageError::new(StorageErrorKind::Corrupt, "auth-meta keyspace missing"))?;
        let generation = match meta.get(GENERATION).map_err(|e| engine.read_error(e))? {
            Some(v) => decode_generation(&v)?,
            None => 0,
        };
        Ok(FjallAuth {
            engine,
            write: Arc::new(Mutex::new(())),
            generation: Arc::new(AtomicU64::new(generation)),
        })
    }

    /// Runs `f` with the records keyspace, off the async runtime.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine, &fjall::Keyspace) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            let ks = engine.keyspace(RECORDS, false)?.ok_or_else(|| {
                StorageError::new(StorageErrorKind::Corrupt, "the auth keyspace is missing")
            })?;
            f(&engine, &ks)
        })
        .await
        .map_err(|e| StorageError::other(format!("storage task failed: {e}")))?
    }
}

fn decode_generation(v: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = v
        .try_into()
        .map_err(|_| StorageError::new(StorageErrorKind::Corrupt, "auth generation is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

#[async_trait]
impl AuthStore for FjallAuth {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StorageError> {
        let key = key.to_vec();
        self.with(move |engine, ks| {
            Ok(ks
                .get(&key)
                .map_err(|e| engine.read_error(e))?
                .map(|v| Bytes::copy_from_slice(&v)))
        })
        .await
    }

    async fn scan(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>, StorageError> {
        let prefix = prefix.to_vec();
        let start = if from > prefix.as_slice() {
            from.to_vec()
        } else {
            prefix.clone()
        };
        self.with(move |engine, ks| {
            let mut out = Vec::new();
            for kv in ks.range(start..) {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
                if !k.starts_with(&prefix) {
                    break;
                }
                out.push((Bytes::copy_from_slice(&k), Bytes::copy_from_slice(&v)));
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, commit: Commit) -> Result<Result<(), CheckFailed>, StorageError> {
        let write = self.write.clone();
        let generation = self.generation.clone();
        self.with(move |engine, ks| {
            let _w = write.lock().unwrap_or_else(|e| e.into_inner());
            engine.check_writable()?;
            for (index, check) in commit.checks.iter().enumerate() {
                let exists = ks.contains_key(check.key()).map_err(|e| engine.read_error(e))?;
                let holds = match check {
                    Check::Absent(_) => !exists,
                    Check::Present(_) => exists,
                };
                if !holds {
                    return Ok(Err(CheckFailed { index }));
                }
            }
            // Later writes of a key win, whatever the batch does with a put and a delete of one key.
            let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for w in commit.writes {
                match w {
                    Write::Put(k, v) => last.insert(k, Some(v)),
                    Write::Delete(k) => last.insert(k, None),
                };
            }
            let mut records = Unit {
                keyspace: RECORDS.into(),
                puts: Vec::new(),
                dels: Vec::new(),
            };
            for (k, v) in last {
                match v {
                    Some(v) => records.puts.push((k, v)),
                    None => records.dels.push(k),
                }
            }
            let next = generation.load(Ordering::Acquire) + 1;
            let meta = Unit {
                keyspace: META.into(),
                puts: vec![(GENERATION.to_vec(), next.to_be_bytes().to_vec())],
                dels: Vec::new(),
            };
            for r in engine.commit_group(vec![records, meta]) {
                r?;
            }
            generation.store(next, Ordering::Release);
            Ok(Ok(()))
        })
        .await
    }

    async fn generation(&self) -> Result<u64, StorageError> {
        Ok(self.generation.load(Ordering::Acquire))
    }
}
