//! The registry entry of the memory driver: no settings of its own but the cold-segment keys (`registry::cold`);
//! every open gives a new, empty store.

use std::sync::Arc;

use async_trait::async_trait;
use lessor_core::storage::{PartitionStore, QueuesStore};

use super::{DriverConfig, DriverEntry, OpenError, Settings, SpecError};
use crate::memory::{MemoryQueues, MemoryStore};

/// The memory driver's entry; `inmemory` is the seeds' name.
pub(super) const DRIVER: DriverEntry = DriverEntry {
    name: "memory",
    aliases: &["inmemory", ""],
    keys: &[],
    compiled: true,
    parse,
};

/// Settings of the memory driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Cold backlog segments (`cold-segments` and its keys), when asked for.
    pub cold: Option<super::ColdSettings>,
    /// The store's name in the configuration (object keys of cold segments start with it).
    pub store_name: String,
}

fn parse(s: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    Ok(Arc::new(MemoryConfig {
        cold: super::cold::parse(s, DRIVER.name)?,
        store_name: s.store_name.clone(),
    }))
}

#[async_trait]
impl DriverConfig for MemoryConfig {
    fn driver(&self) -> &'static DriverEntry {
        &DRIVER
    }

    async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError> {
        Ok(Arc::new(MemoryQueues::new()))
    }

    async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError> {
        #[cfg(feature = "s3")]
        if let Some(cold) = &self.cold {
            let store = MemoryStore::with_cold(cold.clone(), &self.store_name)
                .await
                .map_err(|source| OpenError::Backend {
                    driver: DRIVER.name,
                    source,
                })?;
            return Ok(Arc::new(store));
        }
        Ok(Arc::new(MemoryStore::new()))
    }
}
