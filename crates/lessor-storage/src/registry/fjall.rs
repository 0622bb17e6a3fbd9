//! The registry entry of the fjall driver (embedded LSM engine): `storage-dir`, `durability`, `sync-interval` and
//! `memory-window-items` (ready items a partition keeps in memory; the rest of its backlog is paged from disk),
//! opened with the backend's own constructors. `badger` is accepted as an alias so the seeds' files keep working.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use lessor_core::storage::{PartitionStore, QueuesStore};

use super::{DriverConfig, DriverEntry, OpenError, Settings, SpecError};

/// When a write counts as done (the backend's type when fjall is compiled in).
#[cfg(feature = "fjall")]
pub use crate::fjall::Durability;

/// Stand-in for the backend's durability type in builds without fjall. It has no values, so a [`FjallConfig`]
/// cannot exist in such a build: the type system, not a runtime check, keeps the driver out.
#[cfg(not(feature = "fjall"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {}

/// The fjall driver's entry.
pub(super) const DRIVER: DriverEntry = DriverEntry {
    name: "fjall",
    aliases: &["badger"],
    keys: &[
        "storage-dir",
        "durability",
        "sync-interval",
        "memory-window-items",
        "memory-window-bytes",
    ],
    compiled: cfg!(feature = "fjall"),
    parse,
};

/// Settings of the fjall driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FjallConfig {
    /// The data directory (`storage-dir`); queue definitions and partitions live in subdirectories of it.
    pub storage_dir: PathBuf,
    /// `durability` with its `sync-interval`.
    pub durability: Durability,
    /// `memory-window-items`: ready items a partition keeps in memory before it pages the rest of its backlog
    /// (default 1,000,000; only the partition store uses it).
    pub memory_window: usize,
    /// `memory-window-bytes`: payload bytes of resident items above which a partition pages its new ready items
    /// too (default 256 MiB), so that large items cannot fill the memory before the item window does.
    pub memory_window_bytes: u64,
    /// Cold backlog segments (`cold-segments` and its keys), when asked for.
    pub cold: Option<super::ColdSettings>,
    /// The store's name in the configuration (object keys of cold segments start with it).
    pub store_name: String,
}

/// Default of `memory-window-items` (the backend's own constant, repeated for builds without it).
pub const DEFAULT_MEMORY_WINDOW: usize = 1_000_000;

/// Default of `memory-window-bytes`: 256 MiB of payloads resident per partition. A full item window of 100-byte
/// items holds about 100 MB of them, so the default changes nothing for small items; 1 MB items page beyond about
/// 256 of them instead of a million.
pub const DEFAULT_MEMORY_WINDOW_BYTES: u64 = 256 << 20;

/// Reads `durability` and `sync-interval` (shared with the log driver, which takes the same keys).
#[cfg(feature = "fjall")]
pub(super) fn parse_durability(s: &Settings) -> Result<Durability, SpecError> {
    // The mode is checked on its own first so a bad mode is reported against `durability`; the combination with
    // the interval is then the backend's rule.
    if let Some(mode) = s.text("durability").map(str::trim).filter(|m| !m.is_empty()) {
        mode.parse::<Durability>().map_err(|reason| SpecError::Invalid {
            key: "durability",
            reason,
        })?;
    }
    let interval_ms = s
        .duration("sync-interval")?
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Durability::from_config(s.text("durability"), interval_ms).map_err(|e| SpecError::Invalid {
        key: "sync-interval",
        reason: e.message,
    })
}

#[cfg(feature = "fjall")]
fn parse(s: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    let storage_dir = PathBuf::from(s.required("storage-dir", DRIVER.name)?);
    let durability = parse_durability(s)?;
    let memory_window = match s.u32("memory-window-items")? {
        None => DEFAULT_MEMORY_WINDOW,
        Some(0) => {
            return Err(SpecError::Invalid {
                key: "memory-window-items",
                reason: "must be at least 1 (ready items a partition keeps in memory)".into(),
            })
        }
        Some(n) => n as usize,
    };
    let memory_window_bytes = s
        .size_at_least(
            "memory-window-bytes",
            1 << 20,
            "1MiB",
            "payload bytes a partition keeps in memory",
        )?
        .unwrap_or(DEFAULT_MEMORY_WINDOW_BYTES);
    let cold = super::cold::parse(s, DRIVER.name)?;
    Ok(Arc::new(FjallConfig {
        storage_dir,
        durability,
        memory_window,
        memory_window_bytes,
        cold,
        store_name: s.store_name.clone(),
    }))
}

#[cfg(not(feature = "fjall"))]
fn parse(_: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    Err(SpecError::NotCompiled { driver: DRIVER.name })
}

/// Runs a store's opening, which reads the disk, off the async workers.
#[cfg(feature = "fjall")]
pub(super) async fn blocking_open<T: Send + 'static>(
    driver: &'static str,
    open: impl FnOnce() -> Result<T, lessor_core::error::StorageError> + Send + 'static,
) -> Result<T, OpenError> {
    tokio::task::spawn_blocking(open)
        .await
        .map_err(|source| OpenError::Task { driver, source })?
        .map_err(|source| OpenError::Backend { driver, source })
}

/// The fjall queue store under `dir` (the fjall driver's, and the log driver's, which keeps its queue definitions
/// there too).
#[cfg(feature = "fjall")]
pub(super) async fn open_queue_store(
    driver: &'static str,
    dir: &std::path::Path,
    durability: Durability,
) -> Result<Arc<dyn QueuesStore>, OpenError> {
    let dir = dir.to_path_buf();
    Ok(Arc::new(
        blocking_open(driver, move || crate::fjall::FjallQueues::open(dir, durability)).await?,
    ))
}

#[async_trait]
impl DriverConfig for FjallConfig {
    fn driver(&self) -> &'static DriverEntry {
        &DRIVER
    }

    #[cfg(feature = "fjall")]
    async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError> {
        open_queue_store(DRIVER.name, &self.storage_dir, self.durability).await
    }

    #[cfg(feature = "fjall")]
    async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError> {
        let (dir, durability) = (self.storage_dir.clone(), self.durability);
        let store = blocking_open(DRIVER.name, move || {
            crate::fjall::FjallStore::open(dir, durability)
        })
        .await?;
        store.set_memory_window(self.memory_window);
        store.set_memory_window_bytes(self.memory_window_bytes);
        if let Some(cold) = &self.cold {
            #[cfg(feature = "s3")]
            store
                .set_cold(cold.clone(), &self.store_name)
                .map_err(|source| OpenError::Backend {
                    driver: DRIVER.name,
                    source,
                })?;
            // `cold::parse` takes the settings only in builds with object storage.
            #[cfg(not(feature = "s3"))]
            let _ = cold;
        }
        Ok(Arc::new(store))
    }

    #[cfg(not(feature = "fjall"))]
    async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError> {
        match self.durability {}
    }

    #[cfg(not(feature = "fjall"))]
    async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError> {
        match self.durability {}
    }
}
