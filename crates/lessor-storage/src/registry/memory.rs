//! The registry entry of the memory driver: `max-memory` (the most its partitions may hold, by estimate; default
//! a share of half the machine's or cgroup's memory, see `registry::share_memory`) and the cold-segment keys
//! (`registry::cold`); every open gives a new, empty store.

use std::sync::Arc;

use async_trait::async_trait;
use lessor_core::storage::{PartitionStore, QueuesStore};

use super::{DriverConfig, DriverEntry, OpenError, Settings, SpecError};
use crate::memory::{MemoryQueues, MemoryStore};

/// The memory driver's entry; `inmemory` is the seeds' name.
pub(super) const DRIVER: DriverEntry = DriverEntry {
    name: "memory",
    aliases: &["inmemory", ""],
    keys: &["max-memory"],
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
    /// `max-memory`: the most the partitions may hold in RAM, by estimate, before new items are refused; `None`:
    /// half of the memory the process may use, found at open ([`super::default_max_memory`]), unless
    /// [`super::share_memory`] gave it a share. Partitions with cold segments keep a bounded part of their backlog
    /// in RAM and are not counted.
    pub max_memory: Option<u64>,
}

fn parse(s: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    Ok(Arc::new(MemoryConfig {
        cold: super::cold::parse(s, DRIVER.name)?,
        store_name: s.store_name.clone(),
        max_memory: super::parse_max_memory(s)?,
    }))
}

#[async_trait]
impl DriverConfig for MemoryConfig {
    fn driver(&self) -> &'static DriverEntry {
        &DRIVER
    }

    /// A store with cold segments keeps a bounded part of each backlog in RAM and has no budget.
    fn ram_budget(&self) -> Option<Option<u64>> {
        self.cold.is_none().then_some(self.max_memory)
    }

    fn with_ram_budget(&self, max: u64) -> Option<Arc<dyn DriverConfig>> {
        self.cold.is_none().then(|| {
            Arc::new(MemoryConfig {
                max_memory: Some(max),
                ..self.clone()
            }) as Arc<dyn DriverConfig>
        })
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
        let max_memory = self.max_memory.or_else(super::default_max_memory);
        Ok(Arc::new(match max_memory {
            Some(max) => MemoryStore::with_max_memory(max),
            None => MemoryStore::new(),
        }))
    }
}
