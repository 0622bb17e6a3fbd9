//! The registry entry of the PostgreSQL driver: `connection-string` and `max-conns`, opened with the backend's
//! own constructors (which build or share the connection pool; connecting happens on first use).

use std::sync::Arc;

use async_trait::async_trait;
use lessor_core::storage::{PartitionStore, QueuesStore};

use super::{DriverConfig, DriverEntry, OpenError, Settings, SpecError};

/// The backend's settings type when postgres is compiled in.
#[cfg(feature = "postgres")]
pub use crate::postgres::PgConfig;

/// Stand-in for the backend's settings type in builds without postgres. It has no values, so a
/// [`PostgresConfig`] cannot exist in such a build.
#[cfg(not(feature = "postgres"))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgConfig {}

/// The postgres driver's entry.
pub(super) const DRIVER: DriverEntry = DriverEntry {
    name: "postgres",
    aliases: &["postgresql"],
    keys: &["connection-string", "max-conns"],
    compiled: cfg!(feature = "postgres"),
    parse,
};

/// Settings of the postgres driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresConfig {
    /// The connection and pool settings.
    pub pg: PgConfig,
}

/// Highest `max-conns` accepted.
#[cfg(feature = "postgres")]
pub const MAX_CONNS: u32 = 10_000;

#[cfg(feature = "postgres")]
fn parse(s: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    let mut pg = PgConfig::new(s.required("connection-string", DRIVER.name)?);
    if let Some(n) = s.u32("max-conns")? {
        // The pool reserves room for every connection up front, and a PostgreSQL server allows 100 by default: a
        // value beyond a few thousand is a typo, never a plan.
        if n > MAX_CONNS {
            return Err(SpecError::Invalid {
                key: "max-conns",
                reason: format!("{n} is more than the {MAX_CONNS} connections a pool may open"),
            });
        }
        pg = pg.with_max_conns(n);
    }
    Ok(Arc::new(PostgresConfig { pg }))
}

#[cfg(not(feature = "postgres"))]
fn parse(_: &Settings) -> Result<Arc<dyn DriverConfig>, SpecError> {
    Err(SpecError::NotCompiled { driver: DRIVER.name })
}

#[async_trait]
impl DriverConfig for PostgresConfig {
    fn driver(&self) -> &'static DriverEntry {
        &DRIVER
    }

    #[cfg(feature = "postgres")]
    async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError> {
        let q = crate::postgres::PgQueues::new(&self.pg).map_err(|source| OpenError::Backend {
            driver: DRIVER.name,
            source,
        })?;
        Ok(Arc::new(q))
    }

    #[cfg(feature = "postgres")]
    async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError> {
        let p = crate::postgres::PgStore::new(&self.pg).map_err(|source| OpenError::Backend {
            driver: DRIVER.name,
            source,
        })?;
        Ok(Arc::new(p))
    }

    #[cfg(not(feature = "postgres"))]
    async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError> {
        match self.pg {}
    }

    #[cfg(not(feature = "postgres"))]
    async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError> {
        match self.pg {}
    }
}
