//! [`FjallQueues`]: queue definitions in their own fjall database, `<storage-dir>/~queue-storage-partition/`.
//!
//! Definitions change rarely and are read by name or listed in name order, which is key order in the `queues`
//! keyspace, so every call goes straight to fjall (off the async runtime) without a cache to keep in step. The same
//! database holds the auth store ([`super::auth::FjallAuth`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fjall::KeyspaceCreateOptions;
use lessor_core::error::{StorageError, StorageErrorKind};
use lessor_core::storage::QueuesStore;
use lessor_core::types::QueueInfo;

use super::auth::FjallAuth;
use super::codec::{decode_queue, encode_queue};
use super::engine::{Engine, Formats, Unit};
use super::{Durability, QUEUES_DIR, QUEUES_FORMAT_VERSION};

const KEYSPACE: &str = "queues";

/// Queue definitions in fjall.
pub struct FjallQueues {
    engine: Arc<Engine>,
    storage_dir: PathBuf,
    keyspace: Arc<str>,
    /// Serialises writes, so `add` checks and inserts as one step.
    write: Arc<Mutex<()>>,
    /// Users, keys, roles and bindings, in the same database.
    auth: Arc<FjallAuth>,
}

impl fmt::Debug for FjallQueues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FjallQueues")
            .field("storage_dir", &self.storage_dir)
            .field("engine", &self.engine)
            .finish()
    }
}

impl FjallQueues {
    /// Opens (creating on first use) the queue store under `storage_dir`. Fails with `Locked` when another process
    /// uses the directory and with `Corrupt` when it holds an unknown format. Blocking.
    pub fn open(storage_dir: impl Into<PathBuf>, durability: Durability) -> Result<Self, StorageError> {
        let storage_dir = storage_dir.into();
        let (engine, _version) = Engine::open(
            &storage_dir,
            QUEUES_DIR,
            "queues",
            "queue store",
            durability,
            KeyspaceCreateOptions::default,
            Formats {
                current: QUEUES_FORMAT_VERSION,
                upgradable: &[],
            },
        )?;
        engine.keyspace(KEYSPACE, true)?;
        let auth = Arc::new(FjallAuth::open(engine.clone())?);
        tracing::info!(storage_dir = %storage_dir.display(), engine = "fjall", %durability, "queue storage open");
        Ok(FjallQueues {
            auth,
            engine,
            storage_dir,
            keyspace: KEYSPACE.into(),
            write: Arc::new(Mutex::new(())),
        })
    }

    /// The configured storage-dir.
    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// Runs `f` with the queues keyspace, off the async runtime.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine, &fjall::Keyspace) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            let ks = engine.keyspace(KEYSPACE, false)?.ok_or_else(|| {
                StorageError::new(StorageErrorKind::Corrupt, "the queues keyspace is missing")
            })?;
            f(&engine, &ks)
        })
        .await
        .map_err(|e| StorageError::other(format!("storage task failed: {e}")))?
    }

    /// Writes one definition (or removes it, with `None`); `must_be_new` makes it an add.
    async fn put(&self, name: String, value: Option<Vec<u8>>, must_be_new: bool) -> Result<(), StorageError> {
        let write = self.write.clone();
        let keyspace = self.keyspace.clone();
        self.with(move |engine, ks| {
            let _w = write.lock().unwrap_or_else(|e| e.into_inner());
            engine.check_writable()?;
            if must_be_new
                && ks
                    .contains_key(name.as_bytes())
                    .map_err(|e| engine.read_error(e))?
            {
                return Err(StorageError::new(
                    StorageErrorKind::AlreadyExists,
                    format!("queue '{name}' exists"),
                ));
            }
            let key = name.into_bytes();
            let unit = match value {
                Some(v) => Unit {
                    keyspace,
                    puts: vec![(key, v)],
                    dels: Vec::new(),
                    once_dels: Vec::new(),
                },
                None => Unit {
                    keyspace,
                    puts: Vec::new(),
                    dels: vec![key],
                    once_dels: Vec::new(),
                },
            };
            engine.commit_group(vec![unit]).pop().unwrap_or(Ok(()))
        })
        .await
    }
}

#[async_trait]
impl QueuesStore for FjallQueues {
    fn auth(&self) -> Arc<dyn lessor_core::auth::AuthStore> {
        self.auth.clone()
    }

    async fn get(&self, name: &str) -> Result<Option<QueueInfo>, StorageError> {
        let name = name.to_string();
        self.with(move |engine, ks| {
            ks.get(name.as_bytes())
                .map_err(|e| engine.read_error(e))?
                .map(|v| decode_queue(&v, &format!("queue definition '{name}'")))
                .transpose()
        })
        .await
    }

    async fn add(&self, info: &QueueInfo) -> Result<(), StorageError> {
        self.put(info.name.clone(), Some(encode_queue(info)), true).await
    }

    async fn update(&self, info: &QueueInfo) -> Result<(), StorageError> {
        self.put(info.name.clone(), Some(encode_queue(info)), false).await
    }

    async fn delete(&self, name: &str) -> Result<(), StorageError> {
        self.put(name.to_string(), None, false).await
    }

    async fn list(&self, pivot: &str, limit: usize) -> Result<Vec<QueueInfo>, StorageError> {
        let pivot = pivot.as_bytes().to_vec();
        self.with(move |engine, ks| {
            let mut out = Vec::with_capacity(limit.min(1024));
            for kv in ks.range(pivot..).take(limit) {
                let (k, v) = kv.into_inner().map_err(|e| engine.read_error(e))?;
                let what = format!("queue definition '{}'", String::from_utf8_lossy(&k));
                out.push(decode_queue(&v, &what)?);
            }
            Ok(out)
        })
        .await
    }

    async fn close(&self) {
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.close()).await;
    }
}
