//! The configuration file: YAML in the seeds' format, read with serde-saphyr, unknown keys rejected by name.
//!
//! ```yaml
//! address: 127.0.0.1:2319
//! logging: { handler: text, level: info }
//! queue-storage: { driver: fjall, config: { storage-dir: ./data } }
//! partition-storage:
//!   - { name: disk-0, driver: fjall, affinity: 1, config: { storage-dir: ./data } }
//! queues:
//!   - { name: jobs, lease-timeout: 1m, expire-timeout: 24h, max-attempts: 5, dead-queue: jobs-dead }
//! ```
//! With no file at all the server keeps everything under `./data` with the embedded engine when it is compiled in
//! (memory otherwise).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore};
use lessor_core::storage::{PartitionStore, QueuesStore};
use lessor_core::time::SharedClock;
use lessor_core::types::{Limits, PartitionInfo, QueueInfo};
use lessor_proto::duration::parse_go_duration;
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_storage::Driver;
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:2319";
/// Default data directory of the embedded engine.
pub const DEFAULT_DATA_DIR: &str = "./data";

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Listen address, `host:port`.
    pub address: Option<String>,
    /// Log output.
    #[serde(default)]
    pub logging: Logging,
    /// Where queue definitions live.
    pub queue_storage: Option<StoreSection>,
    /// Where items live; several stores share partitions by affinity.
    #[serde(default)]
    pub partition_storage: Vec<StoreSection>,
    /// Queues declared in the file; created at start-up when missing.
    #[serde(default)]
    pub queues: Vec<QueueSection>,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsSection,
}

/// `logging`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Logging {
    /// `text` (also `color`) or `json`.
    pub handler: Option<String>,
    /// `debug`, `info`, `warn` or `error`.
    pub level: Option<String>,
}

/// `queue-storage` or one `partition-storage` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreSection {
    /// Name, referenced by queue placement.
    pub name: Option<String>,
    /// `memory`, `fjall` (alias `badger`) or `postgres`.
    pub driver: Option<String>,
    /// Placement weight (partition stores only).
    pub affinity: Option<f64>,
    /// Driver settings.
    #[serde(default)]
    pub config: StoreConfig,
}

/// Driver settings; which keys apply depends on the driver.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// fjall: the data directory.
    pub storage_dir: Option<String>,
    /// fjall: `sync` (default), `interval` or `none`.
    pub durability: Option<String>,
    /// fjall with `interval`: how often to fsync (Go duration, default `100ms`).
    pub sync_interval: Option<String>,
    /// postgres: libpq URI.
    pub connection_string: Option<String>,
    /// postgres: pool size.
    pub max_conns: Option<u32>,
}

/// One declared queue.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QueueSection {
    /// Queue name.
    pub name: String,
    /// Dead-letter queue.
    pub dead_queue: Option<String>,
    /// Go duration.
    pub lease_timeout: Option<String>,
    /// Go duration.
    pub expire_timeout: Option<String>,
    /// 0 = unlimited.
    pub max_attempts: Option<u32>,
    /// Free text.
    pub reference: Option<String>,
    /// Partition count.
    pub requested_partitions: Option<u32>,
    /// Explicit placement.
    #[serde(default)]
    pub partitions: Vec<PartitionSection>,
}

/// Explicit placement of one partition.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PartitionSection {
    /// Partition number.
    pub partition: u32,
    /// Reserved.
    #[serde(default)]
    pub read_only: bool,
    /// The partition store's name.
    pub storage_name: String,
}

/// `limits`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsSection {
    /// Largest produce body in bytes (default 5,000,000).
    pub max_produce_body: Option<usize>,
    /// Requests one queue may hold before answering "overloaded" (default 4096).
    pub max_requests_per_queue: Option<usize>,
}

impl Config {
    /// Parses a YAML document.
    pub fn from_yaml(text: &str) -> Result<Config, String> {
        let c: Config = serde_saphyr::from_str(text).map_err(|e| format!("invalid configuration: {e}"))?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &str) -> Result<Config, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read config file '{path}': {e}"))?;
        Self::from_yaml(&text).map_err(|e| format!("{path}: {e}"))
    }

    /// The configuration used when no file is given: persistent storage under `data_dir` when the embedded engine
    /// is compiled in, memory otherwise.
    pub fn default_persistent(data_dir: &str) -> Config {
        let (driver, dir) = if Driver::Fjall.compiled() {
            ("fjall", Some(data_dir.to_string()))
        } else {
            ("memory", None)
        };
        let store = |name: Option<&str>| StoreSection {
            name: name.map(str::to_string),
            driver: Some(driver.to_string()),
            affinity: name.map(|_| 1.0),
            config: StoreConfig {
                storage_dir: dir.clone(),
                ..Default::default()
            },
        };
        Config {
            queue_storage: Some(store(None)),
            partition_storage: vec![store(Some("default"))],
            ..Default::default()
        }
    }

    /// A memory-only configuration (tests).
    pub fn memory() -> Config {
        Config {
            queue_storage: Some(StoreSection {
                driver: Some("memory".into()),
                ..Default::default()
            }),
            partition_storage: vec![StoreSection {
                name: Some("memory-0".into()),
                driver: Some("memory".into()),
                affinity: Some(1.0),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The listen address.
    pub fn address(&self) -> &str {
        self.address.as_deref().unwrap_or(DEFAULT_ADDRESS)
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(h) = &self.logging.handler {
            if !matches!(h.as_str(), "text" | "color" | "json") {
                return Err(format!(
                    "logging.handler: invalid handler; '{h}' is not one of (text, color, json)"
                ));
            }
        }
        if let Some(l) = &self.logging.level {
            if !matches!(
                l.to_ascii_lowercase().as_str(),
                "debug" | "info" | "warn" | "error" | "trace"
            ) {
                return Err(format!(
                    "logging.level: invalid level; '{l}' is not one of (debug, info, warn, error)"
                ));
            }
        }
        if let Some(q) = &self.queue_storage {
            check_store("queue-storage", q, false)?;
        }
        let mut names = HashSet::new();
        for (i, s) in self.partition_storage.iter().enumerate() {
            let at = format!("partition-storage[{i}]");
            check_store(&at, s, true)?;
            let name = s.name.clone().unwrap_or_default();
            if !names.insert(name.clone()) {
                return Err(format!("{at}.name: '{name}' is used by more than one store"));
            }
        }
        if !self.partition_storage.is_empty()
            && !self
                .partition_storage
                .iter()
                .any(|s| s.affinity.unwrap_or(1.0) > 0.0)
        {
            return Err("partition-storage: at least one store needs an affinity greater than 0".into());
        }
        for q in &self.queues {
            for p in &q.partitions {
                if !self.partition_names().contains(&p.storage_name) {
                    return Err(format!(
                        "queues: invalid partition storage; queue '{}' references '{}' which is undefined",
                        q.name, p.storage_name
                    ));
                }
            }
        }
        Ok(())
    }

    fn partition_names(&self) -> Vec<String> {
        if self.partition_storage.is_empty() {
            return vec!["default".into()];
        }
        self.partition_storage
            .iter()
            .map(|s| s.name.clone().unwrap_or_default())
            .collect()
    }

    fn limits(&self) -> Limits {
        let mut l = Limits::default();
        if let Some(n) = self.limits.max_requests_per_queue {
            l.max_requests_per_queue = n.max(1);
        }
        l
    }

    /// Largest produce body.
    pub fn max_produce_body(&self) -> usize {
        self.limits.max_produce_body.unwrap_or(5_000_000)
    }

    /// Opens every store and builds the engine.
    pub async fn build_engine(&self, clock: SharedClock) -> Result<Engine, String> {
        let default = Config::default_persistent(DEFAULT_DATA_DIR);
        let qs = self
            .queue_storage
            .clone()
            .or(default.queue_storage.clone())
            .unwrap_or_default();
        let parts = if self.partition_storage.is_empty() {
            default.partition_storage.clone()
        } else {
            self.partition_storage.clone()
        };
        let queues = open_queues(&qs)
            .await
            .map_err(|e| format!("queue-storage: {e}"))?;
        let mut stores = Vec::new();
        for (i, s) in parts.iter().enumerate() {
            let store = open_partitions(s)
                .await
                .map_err(|e| format!("partition-storage[{i}]: {e}"))?;
            let name = s.name.clone().unwrap_or_else(|| "default".into());
            tracing::info!(store = %name, driver = store.driver(), affinity = s.affinity.unwrap_or(1.0), "partition storage ready");
            stores.push(NamedStore {
                name,
                affinity: s.affinity.unwrap_or(1.0),
                store,
            });
        }
        Engine::new(EngineConfig {
            queues,
            stores,
            limits: self.limits(),
            clock,
        })
        .map_err(|e| e.to_string())
    }

    /// The queues declared in the file, as definitions.
    pub fn declared_queues(&self) -> Result<Vec<QueueInfo>, String> {
        self.queues
            .iter()
            .map(|q| {
                let dur = |field: &str, v: &Option<String>| -> Result<Duration, String> {
                    match v {
                        None => Ok(Duration::ZERO),
                        Some(s) => {
                            parse_go_duration(s).map_err(|e| format!("queues: '{}': {field}: {e}", q.name))
                        }
                    }
                };
                Ok(QueueInfo {
                    name: q.name.clone(),
                    dead_queue: q.dead_queue.clone().unwrap_or_default(),
                    reference: q.reference.clone().unwrap_or_default(),
                    lease_timeout: dur("lease-timeout", &q.lease_timeout)?,
                    expire_timeout: dur("expire-timeout", &q.expire_timeout)?,
                    max_attempts: q.max_attempts.unwrap_or(0),
                    requested_partitions: q.requested_partitions.unwrap_or(q.partitions.len().max(1) as u32),
                    partitions: q
                        .partitions
                        .iter()
                        .map(|p| PartitionInfo {
                            partition: p.partition,
                            storage_name: p.storage_name.clone(),
                            read_only: p.read_only,
                        })
                        .collect(),
                    ..Default::default()
                })
            })
            .collect()
    }
}

fn driver_of(s: &StoreSection) -> Result<Driver, String> {
    let d: Driver = s.driver.as_deref().unwrap_or("memory").parse()?;
    if !d.compiled() {
        return Err(format!(
            "driver '{d}' is not compiled into this build; rebuild with `--features {d}`"
        ));
    }
    Ok(d)
}

fn check_store(at: &str, s: &StoreSection, partition: bool) -> Result<(), String> {
    let d = driver_of(s).map_err(|e| format!("{at}.driver: {e}"))?;
    if partition && s.name.as_deref().unwrap_or("").is_empty() {
        return Err(format!("{at}.name: a partition store needs a name"));
    }
    if !partition && s.affinity.is_some() {
        return Err(format!(
            "{at}.affinity: only partition-storage entries take an affinity"
        ));
    }
    if let Some(a) = s.affinity {
        if !a.is_finite() || a < 0.0 {
            return Err(format!(
                "{at}.affinity: must be zero or a positive number, got {a}"
            ));
        }
    }
    let c = &s.config;
    let reject = |key: &str, present: bool| -> Result<(), String> {
        if present {
            Err(format!("{at}.config.{key}: not a setting of driver '{d}'"))
        } else {
            Ok(())
        }
    };
    match d {
        Driver::Memory => {
            reject("storage-dir", c.storage_dir.is_some())?;
            reject("durability", c.durability.is_some())?;
            reject("sync-interval", c.sync_interval.is_some())?;
            reject("connection-string", c.connection_string.is_some())?;
            reject("max-conns", c.max_conns.is_some())?;
        }
        Driver::Fjall => {
            reject("connection-string", c.connection_string.is_some())?;
            reject("max-conns", c.max_conns.is_some())?;
            if c.storage_dir.as_deref().unwrap_or("").is_empty() {
                return Err(format!("{at}.config.storage-dir: required by driver 'fjall'"));
            }
            if let Some(m) = &c.durability {
                if !matches!(m.as_str(), "sync" | "interval" | "none") {
                    return Err(format!(
                        "{at}.config.durability: '{m}' is not one of (sync, interval, none)"
                    ));
                }
            }
            if let Some(i) = &c.sync_interval {
                parse_go_duration(i).map_err(|e| format!("{at}.config.sync-interval: {e}"))?;
            }
        }
        Driver::Postgres => {
            reject("storage-dir", c.storage_dir.is_some())?;
            reject("durability", c.durability.is_some())?;
            reject("sync-interval", c.sync_interval.is_some())?;
            if c.connection_string.as_deref().unwrap_or("").is_empty() {
                return Err(format!(
                    "{at}.config.connection-string: required by driver 'postgres'"
                ));
            }
        }
    }
    Ok(())
}

async fn open_queues(s: &StoreSection) -> Result<Arc<dyn QueuesStore>, String> {
    match driver_of(s)? {
        Driver::Memory => Ok(Arc::new(MemoryQueues::new())),
        Driver::Fjall => backends::fjall_queues(s).await,
        Driver::Postgres => backends::pg_queues(s).await,
    }
}

async fn open_partitions(s: &StoreSection) -> Result<Arc<dyn PartitionStore>, String> {
    match driver_of(s)? {
        Driver::Memory => Ok(Arc::new(MemoryStore::new())),
        Driver::Fjall => backends::fjall_partitions(s).await,
        Driver::Postgres => backends::pg_partitions(s).await,
    }
}

/// Constructors of the feature-gated backends. With a feature off, [`driver_of`] already refused the driver, so the
/// fallback arms only keep the match total.
mod backends {
    use super::*;

    #[cfg(feature = "fjall")]
    fn fjall_args(s: &StoreSection) -> Result<(String, lessor_storage::fjall::Durability), String> {
        let dir = s
            .config
            .storage_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_DATA_DIR.to_string());
        let interval = match &s.config.sync_interval {
            Some(i) => Some(
                parse_go_duration(i)
                    .map_err(|e| format!("sync-interval: {e}"))?
                    .as_millis() as u64,
            ),
            None => None,
        };
        let d = lessor_storage::fjall::Durability::from_config(s.config.durability.as_deref(), interval)
            .map_err(|e| e.message)?;
        Ok((dir, d))
    }

    #[cfg(feature = "fjall")]
    pub(super) async fn fjall_queues(s: &StoreSection) -> Result<Arc<dyn QueuesStore>, String> {
        let (dir, d) = fjall_args(s)?;
        // Opening reads the disk: keep it off the async workers.
        let q = tokio::task::spawn_blocking(move || lessor_storage::fjall::FjallQueues::open(dir, d))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.message)?;
        Ok(Arc::new(q))
    }

    #[cfg(feature = "fjall")]
    pub(super) async fn fjall_partitions(s: &StoreSection) -> Result<Arc<dyn PartitionStore>, String> {
        let (dir, d) = fjall_args(s)?;
        let p = tokio::task::spawn_blocking(move || lessor_storage::fjall::FjallStore::open(dir, d))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.message)?;
        Ok(Arc::new(p))
    }

    #[cfg(not(feature = "fjall"))]
    pub(super) async fn fjall_queues(_s: &StoreSection) -> Result<Arc<dyn QueuesStore>, String> {
        Err("driver 'fjall' is not compiled into this build".into())
    }

    #[cfg(not(feature = "fjall"))]
    pub(super) async fn fjall_partitions(_s: &StoreSection) -> Result<Arc<dyn PartitionStore>, String> {
        Err("driver 'fjall' is not compiled into this build".into())
    }

    #[cfg(feature = "postgres")]
    fn pg_config(s: &StoreSection) -> lessor_storage::postgres::PgConfig {
        let mut c =
            lessor_storage::postgres::PgConfig::new(s.config.connection_string.clone().unwrap_or_default());
        if let Some(n) = s.config.max_conns {
            c = c.with_max_conns(n);
        }
        c
    }

    #[cfg(feature = "postgres")]
    pub(super) async fn pg_queues(s: &StoreSection) -> Result<Arc<dyn QueuesStore>, String> {
        Ok(Arc::new(
            lessor_storage::postgres::PgQueues::new(&pg_config(s)).map_err(|e| e.message)?,
        ))
    }

    #[cfg(feature = "postgres")]
    pub(super) async fn pg_partitions(s: &StoreSection) -> Result<Arc<dyn PartitionStore>, String> {
        Ok(Arc::new(
            lessor_storage::postgres::PgStore::new(&pg_config(s)).map_err(|e| e.message)?,
        ))
    }

    #[cfg(not(feature = "postgres"))]
    pub(super) async fn pg_queues(_s: &StoreSection) -> Result<Arc<dyn QueuesStore>, String> {
        Err("driver 'postgres' is not compiled into this build".into())
    }

    #[cfg(not(feature = "postgres"))]
    pub(super) async fn pg_partitions(_s: &StoreSection) -> Result<Arc<dyn PartitionStore>, String> {
        Err("driver 'postgres' is not compiled into this build".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_yaml("adress: 1.2.3.4:1\n").expect_err("unknown key");
        assert!(e.contains("adress"), "{e}");
        let e =
            Config::from_yaml("queue-storage:\n  driver: memory\n  confg: {}\n").expect_err("unknown key");
        assert!(e.contains("confg"), "{e}");
        let e = Config::from_yaml(
            "partition-storage:\n  - name: a\n    driver: memory\n    config: { storge-dir: x }\n",
        )
        .expect_err("unknown key");
        assert!(e.contains("storge-dir"), "{e}");
    }

    #[test]
    fn unknown_driver_lists_valid_ones() {
        let e = Config::from_yaml("queue-storage:\n  driver: mysql\n").expect_err("bad driver");
        assert!(
            e.contains("'mysql'") && e.contains("memory") && e.contains("fjall") && e.contains("postgres"),
            "{e}"
        );
    }

    #[test]
    fn seeds_memory_config_parses() {
        let c = Config::from_yaml(
            "address: 0.0.0.0:2319\nlogging:\n  handler: json\n  level: debug\nqueue-storage:\n  driver: memory\n\
             partition-storage:\n  - name: memory-01\n    driver: memory\n    affinity: 1\n\
             queues:\n  - name: q\n    lease-timeout: 10m\n    expire-timeout: 10m\n    max-attempts: 10\n    \
             requested-partitions: 1\n    partitions: [ { partition: 0, read-only: false, storage-name: memory-01 } ]\n",
        )
        .expect("parses");
        assert_eq!(c.address(), "0.0.0.0:2319");
        let q = c.declared_queues().expect("queues");
        assert_eq!(q[0].lease_timeout, Duration::from_secs(600));
        assert_eq!(q[0].partitions[0].storage_name, "memory-01");
    }

    #[test]
    fn bad_values_are_explained() {
        let e = Config::from_yaml("logging:\n  handler: xml\n").expect_err("bad handler");
        assert!(e.contains("logging.handler"), "{e}");
        let e = Config::from_yaml("partition-storage:\n  - name: a\n    driver: memory\n    affinity: -1\n")
            .expect_err("negative affinity");
        assert!(e.contains("affinity"), "{e}");
        let e = Config::from_yaml(
            "partition-storage:\n  - name: a\n    driver: memory\nqueues:\n  - name: q\n    partitions: [ { partition: 0, storage-name: b } ]\n",
        )
        .expect_err("undefined store");
        assert!(e.contains("'b' which is undefined"), "{e}");
        let e = Config::from_yaml("queue-storage:\n  driver: memory\n  config: { storage-dir: /x }\n")
            .expect_err("memory dir");
        assert!(e.contains("storage-dir"), "{e}");
    }
}
