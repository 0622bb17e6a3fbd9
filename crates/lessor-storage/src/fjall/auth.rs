//! [`FjallAuth`]: the auth store of the fjall backend, in the queue store's database
//! (`<storage-dir>/~queue-storage-partition/`), so users and keys live next to the queue definitions.
//!
//! Two keyspaces: `auth` holds the auth model's keys and values exactly as [`AuthStore`] sees them (fjall orders
//! keys bytewise, which is the order the trait asks for), and `auth-meta` holds the generation under
//! [`GENERATION_KEY`]. A commit checks its preconditions and writes its changes plus the next generation as one
//! fjall batch, under one lock, so checks and writes see no other commit in between and the generation on disk
//! moves with the data it describes.
//!
//! Only one process can open the directory (fjall's lock file), so the generation is also kept in memory: polling
//! it costs no disk read and no blocking call.
//!
//! Auth commits are always fsynced before they are answered, whatever the store's durability mode: a revocation
//! that a power loss undoes would bring a deleted key back to life. A failed fsync poisons the engine as every
//! other write does.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use lessor_core::auth::{AuthStore, Check, CheckFailed, Commit, Write};
use lessor_core::error::{StorageError, StorageErrorKind};

use super::engine::{Engine, Unit};
use super::Durability;

/// Keyspace of the auth model's records.
pub(crate) const AUTH_KEYSPACE: &str = "auth";
/// Keyspace of the auth store's own state (the generation).
pub(crate) const AUTH_META_KEYSPACE: &str = "auth-meta";
/// Key of the generation (u64, big-endian) in [`AUTH_META_KEYSPACE`].
pub(crate) const GENERATION_KEY: &[u8] = b"generation";

/// Users, keys, roles and bindings in the queue store's fjall database.
pub struct FjallAuth {
    engine: Arc<Engine>,
    keyspace: Arc<str>,
    meta: Arc<str>,
    /// The generation last written; the lock also serialises commits (checks, then the batch).
    generation: Arc<Mutex<u64>>,
}

impl fmt::Debug for FjallAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallAuth").field("engine", &self.engine).finish()
    }
}

impl FjallAuth {
    /// Opens the auth store in `engine`'s database, creating its keyspaces on first use (a directory written
    /// before auth existed has none: its auth store starts empty). Blocking.
    pub(crate) fn open(engine: Arc<Engine>) -> Result<Self, StorageError> {
        engine.keyspace(AUTH_KEYSPACE, true)?;
        let meta = engine.keyspace(AUTH_META_KEYSPACE, true)?.ok_or_else(|| {
            StorageError::new(StorageErrorKind::Corrupt, "the auth-meta keyspace is missing")
        })?;
        let generation = match meta.get(GENERATION_KEY).map_err(|e| engine.read_error(e))? {
            None => 0,
            Some(v) => {
                let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                    StorageError::new(
                        StorageErrorKind::Corrupt,
                        format!("the auth generation is {} bytes long, not 8", v.len()),
                    )
                })?;
                u64::from_be_bytes(bytes)
            }
        };
        Ok(FjallAuth {
            engine,
            keyspace: AUTH_KEYSPACE.into(),
            meta: AUTH_META_KEYSPACE.into(),
            generation: Arc::new(Mutex::new(generation)),
        })
    }

    /// Runs `f` with the auth keyspace, off the async runtime.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine, &fjall::Keyspace) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            let ks = engine.keyspace(AUTH_KEYSPACE, false)?.ok_or_else(|| {
                StorageError::new(StorageErrorKind::Corrupt, "the auth keyspace is missing")
            })?;
            f(&engine, &ks)
        })
        .await
        .map_err(|e| StorageError::other(format!("storage task failed: {e}")))?
    }
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
            let mut out = Vec::with_capacity(limit.min(1024));
            if limit == 0 {
                return Ok(out);
            }
            for kv in ks.range(start..) {
                let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
                if !k.starts_with(&prefix) {
                    break;
                }
                out.push((Bytes::copy_from_slice(&k), Bytes::copy_from_slice(&v)));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, commit: Commit) -> Result<Result<(), CheckFailed>, StorageError> {
        let generation = self.generation.clone();
        let keyspace = self.keyspace.clone();
        let meta = self.meta.clone();
        self.with(move |engine, ks| {
            let mut current = generation.lock().unwrap_or_else(|e| e.into_inner());
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
            let silent = commit.silent;
            // A fjall batch takes each key once: keep each key's last write, as applying them in order would.
            let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for write in commit.writes {
                match write {
                    Write::Put(k, v) => last.insert(k, Some(v)),
                    Write::Delete(k) => last.insert(k, None),
                };
            }
            let mut data = Unit {
                keyspace,
                puts: Vec::new(),
                dels: Vec::new(),
                once_dels: Vec::new(),
            };
            for (k, v) in last {
                match v {
                    Some(v) => data.puts.push((k, v)),
                    None => data.dels.push(k),
                }
            }
            let next = if silent { *current } else { *current + 1 };
            let mut units = vec![data];
            if !silent {
                units.push(Unit {
                    keyspace: meta,
                    puts: vec![(GENERATION_KEY.to_vec(), next.to_be_bytes().to_vec())],
                    dels: Vec::new(),
                    once_dels: Vec::new(),
                });
            }
            let outcome = engine
                .commit_group(units)
                .into_iter()
                .find(Result::is_err)
                .unwrap_or(Ok(()));
            // After a failed write the batch may still be visible (a failed fsync): count it as a change either way,
            // so that the generation never understates what readers may have seen. It never goes backwards: the
            // next commit writes a larger number still.
            *current = next;
            outcome?;
            if engine.durability() != Durability::Sync {
                engine.sync_journal()?;
            }
            Ok(Ok(()))
        })
        .await
    }

    async fn generation(&self) -> Result<u64, StorageError> {
        Ok(*self.generation.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
