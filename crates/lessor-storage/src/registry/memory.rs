//! The registry entry of the memory driver: no settings; every open gives a new, empty store.

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

/// Settings of the memory driver: there are none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryConfig;

fn parse(_: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    Ok(Arc::new(MemoryConfig))
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
        Ok(Arc::new(MemoryStore::new()))
    }
}
