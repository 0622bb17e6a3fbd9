//! The registry entry of the log driver (partitions in RAM, made durable by an append-only log; see the `log`
//! module): `storage-dir`, `durability` and `sync-interval`, read as the fjall driver reads them, and
//! `checkpoint-bytes` (log bytes after which a checkpoint starts) and `max-memory` (the most its partitions may hold
//! in RAM, by estimate; default a share of half the machine's memory, or of the cgroup's limit when lower, see
//! `registry::share_memory`). Queue definitions go to a fjall queue store in the same `storage-dir`. Compiled with
//! the fjall feature, whose record encoding and durability modes it shares.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use lessor_core::storage::{PartitionStore, QueuesStore};

use super::fjall::Durability;
use super::{DriverConfig, DriverEntry, OpenError, Settings, SpecError};

/// The log driver's entry.
pub(super) const DRIVER: DriverEntry = DriverEntry {
    name: "log",
    aliases: &[],
    keys: &[
        "storage-dir",
        "durability",
        "sync-interval",
        "checkpoint-bytes",
        "max-memory",
    ],
    compiled: cfg!(feature = "fjall"),
    parse,
};

/// Settings of the log driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// The data directory (`storage-dir`); the log lives in its `~log` subdirectory.
    pub storage_dir: PathBuf,
    /// `durability` with its `sync-interval`.
    pub durability: Durability,
    /// `checkpoint-bytes`: log bytes appended after which a checkpoint starts (and twice what the last one wrote;
    /// default 256 MiB, at least 64 KiB).
    pub checkpoint_bytes: u64,
    /// `max-memory`: the most the partitions may hold in RAM, by estimate, before new items are refused (at least
    /// 1 MiB); `None`: half of the memory the process may use, found at open ([`super::default_max_memory`]), unless
    /// [`super::share_memory`] gave it a share.
    pub max_memory: Option<u64>,
}

/// Smallest `checkpoint-bytes`.
#[cfg(feature = "fjall")]
const MIN_CHECKPOINT_BYTES: u64 = 64 << 10;

#[cfg(feature = "fjall")]
fn parse(s: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    let checkpoint_bytes = s
        .size_at_least(
            "checkpoint-bytes",
            MIN_CHECKPOINT_BYTES,
            "64KiB",
            "log bytes between checkpoints",
        )?
        .unwrap_or(crate::log::CHECKPOINT_MIN_BYTES);
    let max_memory = super::parse_max_memory(s)?;
    Ok(Arc::new(LogConfig {
        storage_dir: PathBuf::from(s.required("storage-dir", DRIVER.name)?),
        durability: super::fjall::parse_durability(s)?,
        checkpoint_bytes,
        max_memory,
    }))
}

#[cfg(not(feature = "fjall"))]
fn parse(_: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    Err(SpecError::NotCompiled { driver: DRIVER.name })
}

#[async_trait]
impl DriverConfig for LogConfig {
    fn driver(&self) -> &'static DriverEntry {
        &DRIVER
    }

    #[cfg(feature = "fjall")]
    fn ram_budget(&self) -> Option<Option<u64>> {
        Some(self.max_memory)
    }

    #[cfg(feature = "fjall")]
    fn with_ram_budget(&self, max: u64) -> Option<Arc<dyn DriverConfig>> {
        Some(Arc::new(LogConfig {
            max_memory: Some(max),
            ..self.clone()
        }))
    }

    #[cfg(feature = "fjall")]
    async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError> {
        super::fjall::open_queue_store(DRIVER.name, &self.storage_dir, self.durability).await
    }

    #[cfg(feature = "fjall")]
    async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError> {
        let (dir, durability) = (self.storage_dir.clone(), self.durability);
        let max_memory = self.max_memory.or_else(super::default_max_memory);
        let store = super::fjall::blocking_open(DRIVER.name, move || {
            crate::log::LogStore::open_with(dir, durability, max_memory)
        })
        .await?;
        store.set_checkpoint_min(self.checkpoint_bytes);
        match store.memory() {
            Some((used, max)) => tracing::info!(
                max_memory = max,
                held = used,
                "log store memory budget (new items are refused beyond it)"
            ),
            None => tracing::warn!(
                "log store without a memory budget: set max-memory (the memory this process may use is unknown)"
            ),
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
