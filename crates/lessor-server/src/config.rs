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
//! (memory otherwise). `config.example.yaml` at the repository root lists every key with its meaning.
//!
//! This module only maps the file to typed values: which settings a driver takes, how they are checked and how a
//! store is opened belong to the driver registry of `lessor-storage` ([`lessor_storage::registry`]); a store entry
//! becomes a [`StoreSpec`] there. Errors are [`ConfigError`]s that name the key (`partition-storage[1].config.
//! storage-dir: required by driver 'fjall'`).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore};
use lessor_core::error::QueueError;
use lessor_core::time::SharedClock;
use lessor_core::types::{Limits, PartitionInfo, QueueInfo};
use lessor_proto::duration::parse_go_duration;
use lessor_storage::registry::{self, ObjectStoreConfig, OpenError, Settings, SpecError, StoreSpec};
use serde::Deserialize;
use thiserror::Error;

/// Default listen address.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:2319";
/// Default data directory of the embedded engine.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default largest produce body, in bytes (Querator's).
pub const DEFAULT_MAX_PRODUCE_BODY: usize = 5_000_000;
/// Highest `limits.max-dedup-keys` accepted: a billion keys take about 115 GB on the memory backend.
const MAX_DEDUP_KEYS: usize = 1_000_000_000;
/// Highest `limits.max-lease-bytes` accepted (1 GiB): above it a single answer is the memory problem the limit
/// exists to prevent.
const MAX_LEASE_BYTES_LIMIT: u64 = 1 << 30;
/// Highest `limits.max-produce-body` and `limits.max-offload-produce-body` accepted (1 GiB): a body is held in
/// memory whole, and one larger than `limits.max-inflight-bytes` is let through alone, so without a cap one client
/// could make the server hold any amount; a lease answer carries at least one item, and its own cap is the same.
pub const MAX_PRODUCE_BODY_LIMIT: usize = 1 << 30;
/// Lowest `limits.max-inflight-bytes` accepted: below it a server could not hold one small request per client.
const MIN_INFLIGHT_BYTES: u64 = 64 * 1024;
/// Highest `limits.max-inflight-bytes` accepted (1 TiB): the bound must stay below any machine's memory to mean
/// anything, and charges are counted in KiB in a `u32`.
const MAX_INFLIGHT_BYTES: u64 = 1 << 40;
/// Longest `limits.inflight-wait` accepted: a request waiting longer holds its connection for nothing.
const MAX_INFLIGHT_WAIT: Duration = Duration::from_secs(60);

/// Longest `limits.queue-idle-unload`: a longer one is as good as never, which `0s` says plainly.
const MAX_QUEUE_IDLE_UNLOAD: Duration = Duration::from_secs(24 * 3600);
/// Default `limits.metrics-max-queues`: per-queue series of 10,000 queues make a scrape of about 10 MB (190,000
/// series), as much as a Prometheus server is commonly given per target.
pub const DEFAULT_METRICS_MAX_QUEUES: usize = 10_000;
/// Highest `limits.metrics-max-queues`: 1,000,000 queues' series are about 1 GB of text per scrape, already more than
/// any Prometheus takes from one target; a higher bound would be no bound.
const MAX_METRICS_MAX_QUEUES: usize = 1_000_000;
/// Longest `limits.default-request-timeout`: the longest `request_timeout` a request may carry (15m).
const MAX_DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Default `limits.header-read-timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `limits.body-read-timeout`: a 64 MB body at about 1 MB/s.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `limits.reply-write-timeout`: a client that reads nothing of its answer for a minute is gone or stuck.
pub const DEFAULT_REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest header read, body read or reply write timeout accepted: beyond it the timeout no longer frees
/// connections in useful time.
const MAX_READ_TIMEOUT: Duration = Duration::from_secs(3600);
/// Highest `limits.max-requests-per-queue` accepted: an inbox is a channel that panics at creation above
/// `usize::MAX >> 3`, and a million waiting requests is already far more than any queue serves before they time
/// out (each also holds at least 1 KiB of `limits.max-inflight-bytes`).
const MAX_REQUESTS_PER_QUEUE: usize = 1_000_000;
/// Default `limits.max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Highest `limits.max-connections` accepted: each connection may hold a 64 KiB header buffer, so a million of
/// them is already 64 GB.
const MAX_CONNECTIONS: usize = 1_000_000;

/// What is wrong with a configuration, or why the stores it describes could not be opened.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file '{path}': {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A problem in a given file (the path prefixes the inner error).
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: String,
        /// The problem.
        #[source]
        source: Box<ConfigError>,
    },
    /// Not YAML, or not the expected shape (unknown keys are reported here, by name).
    #[error("invalid configuration: {source}")]
    Syntax {
        /// The parser's error.
        #[source]
        source: serde_saphyr::Error,
    },
    /// `logging.handler` or `logging.level` has a value outside its list.
    #[error("logging.{field}: invalid {field}; '{value}' is not one of ({allowed})")]
    Logging {
        /// `handler` or `level`.
        field: &'static str,
        /// The value given.
        value: String,
        /// The values allowed.
        allowed: &'static str,
    },
    /// `auth-backend.driver` is not a known backend.
    #[error("auth-backend.driver: invalid auth-backend driver; '{value}' is not one of (none, internal)")]
    AuthDriver {
        /// The value given.
        value: String,
    },
    /// `auth-backend` options that do not fit together.
    #[error("auth-backend: {reason}")]
    AuthOption {
        /// What is wrong.
        reason: &'static str,
    },
    /// A store entry the driver registry refused (unknown driver, driver not compiled in, bad settings).
    #[error("{at}.{source}")]
    Store {
        /// The entry (`queue-storage`, `partition-storage[1]`).
        at: String,
        /// The registry's reason, naming the key.
        #[source]
        source: SpecError,
    },
    /// A partition store without a name.
    #[error("{at}.name: a partition store needs a name")]
    StoreNameMissing {
        /// The entry.
        at: String,
    },
    /// Two partition stores with one name.
    #[error("{at}.name: '{name}' is used by more than one store")]
    StoreNameTaken {
        /// The entry.
        at: String,
        /// The name.
        name: String,
    },
    /// An affinity on the queue store.
    #[error("{at}.affinity: only partition-storage entries take an affinity")]
    AffinityNotAllowed {
        /// The entry.
        at: String,
    },
    /// A negative, infinite or NaN affinity.
    #[error("{at}.affinity: must be zero or a positive number, got {value}")]
    AffinityInvalid {
        /// The entry.
        at: String,
        /// The value given.
        value: f64,
    },
    /// Every partition store has affinity 0, so no new partition could be placed.
    #[error("partition-storage: at least one store needs an affinity greater than 0")]
    NoAffinity,
    /// A declared queue places a partition on a store that is not defined.
    #[error("queues: invalid partition storage; queue '{queue}' references '{store}' which is undefined")]
    UndefinedStore {
        /// The queue.
        queue: String,
        /// The store named.
        store: String,
    },
    /// A `limits` value out of its range.
    #[error("{field}: {reason}")]
    Limit {
        /// The key.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A declared queue's duration is not a Go duration.
    #[error("queues: '{queue}': {field}: {reason}")]
    QueueDuration {
        /// The queue.
        queue: String,
        /// The key.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// An `object-storage` entry that is incomplete or clashes with another.
    #[error("object-storage[{index}].{field}: {reason}")]
    ObjectStorage {
        /// Its place in the list.
        index: usize,
        /// The key.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Payload settings on the queue store, which holds no payloads.
    #[error("queue-storage.config.{key}: only partition-storage entries hold payloads")]
    PayloadKeyOnQueueStore {
        /// The key.
        key: String,
    },
    /// A store could not be opened.
    #[error("{at}: {source}")]
    Open {
        /// The entry.
        at: String,
        /// The backend's failure.
        #[source]
        source: OpenError,
    },
    /// The `tls` section is invalid, or its files cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The engine refused the stores.
    #[error("cannot start the engine: {source}")]
    Engine {
        /// The engine's reason.
        #[source]
        source: QueueError,
    },
}

/// Whether this build includes the storage driver `name` (canonical name or alias); unknown drivers are not.
pub fn driver_compiled(name: &str) -> bool {
    registry::lookup(name).is_ok_and(|d| d.compiled)
}

/// The stores a configuration describes, checked by the driver registry but not opened.
#[derive(Clone, Debug)]
pub struct StoreSpecs {
    /// The queue store.
    pub queues: StoreSpec,
    /// The partition stores, in file order.
    pub partitions: Vec<PartitionSpec>,
}

/// One partition store of a configuration.
#[derive(Clone, Debug)]
pub struct PartitionSpec {
    /// Its name (queue placement refers to it).
    pub name: String,
    /// Its placement weight.
    pub affinity: f64,
    /// What to open.
    pub spec: StoreSpec,
}

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
    /// Authentication and authorisation (Querator's key).
    #[serde(default)]
    pub auth_backend: AuthSection,
    /// HTTPS: the server's certificate and key, and optionally the CA of client certificates.
    pub tls: Option<crate::tls::TlsSection>,
    /// Whether the web dashboard is served at `/ui`; absent: served (see [`Config::ui_enabled`]).
    pub ui: Option<bool>,
    /// S3-compatible object stores, referenced by name from partition stores (`payload-offload: NAME`).
    #[serde(default)]
    pub object_storage: Vec<ObjectStorageSection>,
}

/// One `object-storage` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectStorageSection {
    /// The name partition stores use.
    pub name: Option<String>,
    /// Endpoint URL; absent: AWS.
    pub endpoint: Option<String>,
    /// The bucket (must exist).
    pub bucket: Option<String>,
    /// Region (default `us-east-1`).
    pub region: Option<String>,
    /// Access key id; absent: `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// Secret access key; absent: `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// Path-style addressing (`ENDPOINT/BUCKET`), which most self-hosted servers need.
    pub path_style: Option<bool>,
    /// Prepended to every object key.
    pub prefix: Option<String>,
}

impl ObjectStorageSection {
    /// The entry as the registry's type, credentials falling back to the `AWS_*` environment variables.
    pub fn to_config(&self) -> ObjectStoreConfig {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ObjectStoreConfig {
            name: self.name.clone().unwrap_or_default(),
            endpoint: self.endpoint.clone().unwrap_or_default(),
            bucket: self.bucket.clone().unwrap_or_default(),
            region: self.region.clone().unwrap_or_default(),
            access_key_id: self.access_key_id.clone().or_else(|| env("AWS_ACCESS_KEY_ID")),
            secret_access_key: self
                .secret_access_key
                .clone()
                .or_else(|| env("AWS_SECRET_ACCESS_KEY")),
            path_style: self.path_style.unwrap_or(false),
            prefix: self.prefix.clone().unwrap_or_default(),
        }
    }
}

/// `auth-backend`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthSection {
    /// `none` (default: every request is allowed everything) or `internal` (users, keys and roles kept in the
    /// queue storage).
    pub driver: Option<String>,
    /// With `internal`: whether requests without a key are administrators until the operator closes the door
    /// (default true, as Querator).
    pub open_door: Option<bool>,
    /// With `internal` and `open-door: false`: where the first start writes the key of the user `admin`.
    pub bootstrap_key_file: Option<String>,
}

impl AuthSection {
    /// Whether the `internal` backend is on.
    pub fn internal(&self) -> bool {
        self.driver
            .as_deref()
            .is_some_and(|d| d.eq_ignore_ascii_case("internal"))
    }

    /// Whether anonymous requests start out as administrators.
    pub fn open_door(&self) -> bool {
        self.open_door.unwrap_or(true)
    }
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
    /// Driver settings, as written; the driver registry says which keys a driver takes and checks their values.
    #[serde(default)]
    pub config: BTreeMap<String, Scalar>,
}

/// One value of a store's `config:` mapping. The driver reads every value from its text, so `max-conns: 10` and
/// `max-conns: "10"` mean the same.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// `true` or `false`.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Text.
    Text(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Text(t) => t.clone(),
        }
    }
}

impl From<&str> for Scalar {
    fn from(s: &str) -> Self {
        Scalar::Text(s.to_string())
    }
}

impl StoreSection {
    /// The driver named by the entry (`memory` when none is given).
    pub fn driver_name(&self) -> &str {
        self.driver.as_deref().unwrap_or("memory")
    }

    /// The entry as a checked store specification (driver known and compiled in, settings valid).
    ///
    /// # Errors
    /// The registry's reason, naming the key relative to the entry (prefix it with the entry's place).
    pub fn spec(&self) -> Result<StoreSpec, SpecError> {
        self.spec_with(&[])
    }

    /// [`StoreSection::spec`] with the configuration's object stores, which `payload-offload` may name.
    ///
    /// # Errors
    /// The registry's reason, naming the key relative to the entry.
    pub fn spec_with(&self, objects: &[ObjectStoreConfig]) -> Result<StoreSpec, SpecError> {
        let mut settings = Settings::new(parse_go_duration)
            .with_object_stores(objects.to_vec())
            .named(self.name.clone().unwrap_or_default());
        for (k, v) in &self.config {
            settings.insert(k.clone(), v.text());
        }
        StoreSpec::from_settings(self.driver_name(), &settings)
    }
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
    /// Lessor extension: dedup window (Go duration; default 5m).
    pub dedup_window: Option<String>,
    /// Lessor extension: longest lease an extension may set (Go duration; default the expire timeout).
    pub max_lease_timeout: Option<String>,
    /// Lessor extension: retry backoff (off unless `base` is set).
    pub retry_backoff: Option<BackoffSection>,
}

/// A declared queue's retry backoff.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackoffSection {
    /// Go duration: the delay before the second attempt.
    pub base: Option<String>,
    /// Go duration: the longest delay.
    pub max: Option<String>,
    /// Growth per attempt (1 to 100; 0 means 2).
    pub factor: Option<f64>,
    /// Random fraction of each delay (0 to 1).
    pub jitter: Option<f64>,
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
    /// Largest produce body in bytes for queues whose every partition is on a store with `payload-offload`
    /// (default: `max-produce-body`; never below it).
    pub max_offload_produce_body: Option<usize>,
    /// Requests one queue may hold before answering "overloaded" (default 4096, at most 1,000,000; 0 reads as 1).
    pub max_requests_per_queue: Option<usize>,
    /// How often a server re-reads partitions that other servers share (Go duration, default 500ms; PostgreSQL
    /// also wakes consumers at once by notification, so this bounds only the delay after a lost one).
    pub shared_refresh: Option<String>,
    /// Live dedup keys one queue may hold (default 10,000,000, about 1.8 GB of index); keyed produce beyond it gets
    /// 454 until older keys leave the window.
    pub max_dedup_keys: Option<usize>,
    /// Most payload bytes one lease answer carries (default 16 MiB; at least one item whatever its size).
    pub max_lease_bytes: Option<u64>,
    /// How long a queue stays loaded without a request before it unloads, when nothing keeps it (Go duration,
    /// default 5m, `0s` never unloads; see [`lessor_core::types::Limits::queue_idle_unload`]).
    pub queue_idle_unload: Option<String>,
    /// Most queues with per-queue series in `/metrics` (default 10,000, at most 1,000,000; 0: none, only the
    /// server-wide totals); see [`crate::metrics`].
    pub metrics_max_queues: Option<usize>,
    /// How long requests that carry no `request_timeout` (`queue.retry`, `queue.stats`, browsing, and the admin
    /// calls that wait for a queue's task: clear, reload, `storage/items.*`, update, delete, pause, rebalance,
    /// snapshots, restore pages) wait for a queue stuck in a storage call before 454 (Go duration, default 30s,
    /// between 1ms and 15m); see [`lessor_core::types::Limits::default_request_timeout`].
    pub default_request_timeout: Option<String>,
    /// Body bytes of requests read and not yet answered, server-wide (default 1 GiB); see [`crate::inflight`].
    pub max_inflight_bytes: Option<u64>,
    /// How long a request whose body does not fit under `max-inflight-bytes` waits for room before 454 (Go
    /// duration, default 1s, 0 refuses at once).
    pub inflight_wait: Option<String>,
    /// How long a client may take to send a request's headers, and how long an idle kept-alive connection stays
    /// open (Go duration, default 30s).
    pub header_read_timeout: Option<String>,
    /// How long a client may take to send a request's body once its headers are in (Go duration, default 60s).
    pub body_read_timeout: Option<String>,
    /// How long writing a reply may make no progress (the client reads nothing) before the connection is closed
    /// (Go duration, default 60s).
    pub reply_write_timeout: Option<String>,
    /// Connections served at once; more are closed as soon as they are accepted (default 10000).
    pub max_connections: Option<usize>,
}

impl Config {
    /// Whether the dashboard is served at `/ui` (`ui`, on unless `ui: false`).
    pub fn ui_enabled(&self) -> bool {
        self.ui.unwrap_or(true)
    }

    /// Parses a YAML document.
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let c: Config = serde_saphyr::from_str(text).map_err(|source| ConfigError::Syntax { source })?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &str) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_string(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|e| ConfigError::InFile {
            path: path.to_string(),
            source: Box::new(e),
        })
    }

    /// The configuration used when no file is given: persistent storage under `data_dir` when the embedded engine
    /// is compiled in, memory otherwise.
    pub fn default_persistent(data_dir: &str) -> Config {
        let (driver, config) = if driver_compiled("fjall") {
            (
                "fjall",
                BTreeMap::from([("storage-dir".to_string(), Scalar::from(data_dir))]),
            )
        } else {
            ("memory", BTreeMap::new())
        };
        let store = |name: Option<&str>| StoreSection {
            name: name.map(str::to_string),
            driver: Some(driver.to_string()),
            affinity: name.map(|_| 1.0),
            config: config.clone(),
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

    /// Cross-field checks that serde cannot express; every store entry is checked by the driver registry.
    ///
    /// # Errors
    /// The first problem found, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(h) = &self.logging.handler {
            if !matches!(h.as_str(), "text" | "color" | "json") {
                return Err(ConfigError::Logging {
                    field: "handler",
                    value: h.clone(),
                    allowed: "text, color, json",
                });
            }
        }
        if let Some(l) = &self.logging.level {
            if !matches!(
                l.to_ascii_lowercase().as_str(),
                "debug" | "info" | "warn" | "error" | "trace"
            ) {
                return Err(ConfigError::Logging {
                    field: "level",
                    value: l.clone(),
                    allowed: "debug, info, warn, error",
                });
            }
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if let Some(d) = &self.limits.shared_refresh {
            match parse_go_duration(d) {
                Ok(v) if !v.is_zero() && v <= Duration::from_secs(3600) => {}
                Ok(_) => {
                    return Err(ConfigError::Limit {
                        field: "limits.shared-refresh",
                        reason: "must be above 0 and at most 1h".into(),
                    })
                }
                Err(reason) => {
                    return Err(ConfigError::Limit {
                        field: "limits.shared-refresh",
                        reason,
                    })
                }
            }
        }
        if let Some(n) = self.limits.max_requests_per_queue {
            // 0 has always read as 1; only the upper bound is new.
            if n > MAX_REQUESTS_PER_QUEUE {
                return Err(ConfigError::Limit {
                    field: "limits.max-requests-per-queue",
                    reason: format!("must be at most {MAX_REQUESTS_PER_QUEUE}"),
                });
            }
        }
        if let Some(n) = self.limits.max_dedup_keys {
            if n == 0 || n > MAX_DEDUP_KEYS {
                return Err(ConfigError::Limit {
                    field: "limits.max-dedup-keys",
                    reason: format!("must be between 1 and {MAX_DEDUP_KEYS}"),
                });
            }
        }
        if let Some(d) = &self.limits.queue_idle_unload {
            match parse_go_duration(d) {
                Ok(v) if v <= MAX_QUEUE_IDLE_UNLOAD => {}
                Ok(_) => {
                    return Err(ConfigError::Limit {
                        field: "limits.queue-idle-unload",
                        reason: "must be at most 24h (0s keeps queues loaded)".into(),
                    })
                }
                Err(reason) => {
                    return Err(ConfigError::Limit {
                        field: "limits.queue-idle-unload",
                        reason,
                    })
                }
            }
        }
        if let Some(n) = self.limits.metrics_max_queues {
            if n > MAX_METRICS_MAX_QUEUES {
                return Err(ConfigError::Limit {
                    field: "limits.metrics-max-queues",
                    reason: format!("must be at most {MAX_METRICS_MAX_QUEUES} (0: no per-queue series)"),
                });
            }
        }
        if let Some(d) = &self.limits.default_request_timeout {
            match parse_go_duration(d) {
                Ok(v) if !v.is_zero() && v <= MAX_DEFAULT_REQUEST_TIMEOUT => {}
                Ok(_) => {
                    return Err(ConfigError::Limit {
                        field: "limits.default-request-timeout",
                        reason: "must be greater than 0s and at most 15m".into(),
                    })
                }
                Err(reason) => {
                    return Err(ConfigError::Limit {
                        field: "limits.default-request-timeout",
                        reason,
                    })
                }
            }
        }
        for (field, value) in [
            ("limits.max-produce-body", self.limits.max_produce_body),
            (
                "limits.max-offload-produce-body",
                self.limits.max_offload_produce_body,
            ),
        ] {
            if value.is_some_and(|n| n == 0 || n > MAX_PRODUCE_BODY_LIMIT) {
                return Err(ConfigError::Limit {
                    field,
                    reason: format!("must be between 1 and {MAX_PRODUCE_BODY_LIMIT}"),
                });
            }
        }
        if let Some(n) = self.limits.max_lease_bytes {
            if n == 0 || n > MAX_LEASE_BYTES_LIMIT {
                return Err(ConfigError::Limit {
                    field: "limits.max-lease-bytes",
                    reason: format!("must be between 1 and {MAX_LEASE_BYTES_LIMIT}"),
                });
            }
        }
        if let Some(n) = self.limits.max_inflight_bytes {
            if !(MIN_INFLIGHT_BYTES..=MAX_INFLIGHT_BYTES).contains(&n) {
                return Err(ConfigError::Limit {
                    field: "limits.max-inflight-bytes",
                    reason: format!("must be between {MIN_INFLIGHT_BYTES} and {MAX_INFLIGHT_BYTES}"),
                });
            }
        }
        if let Some(d) = &self.limits.inflight_wait {
            match parse_go_duration(d) {
                Ok(v) if v <= MAX_INFLIGHT_WAIT => {}
                Ok(_) => {
                    return Err(ConfigError::Limit {
                        field: "limits.inflight-wait",
                        reason: "must be at most 1m".into(),
                    })
                }
                Err(reason) => {
                    return Err(ConfigError::Limit {
                        field: "limits.inflight-wait",
                        reason,
                    })
                }
            }
        }
        for (field, value) in [
            ("limits.header-read-timeout", &self.limits.header_read_timeout),
            ("limits.body-read-timeout", &self.limits.body_read_timeout),
            ("limits.reply-write-timeout", &self.limits.reply_write_timeout),
        ] {
            if let Some(d) = value {
                match parse_go_duration(d) {
                    Ok(v) if !v.is_zero() && v <= MAX_READ_TIMEOUT => {}
                    Ok(_) => {
                        return Err(ConfigError::Limit {
                            field,
                            reason: "must be above 0 and at most 1h".into(),
                        })
                    }
                    Err(reason) => return Err(ConfigError::Limit { field, reason }),
                }
            }
        }
        if let Some(n) = self.limits.max_connections {
            if n == 0 || n > MAX_CONNECTIONS {
                return Err(ConfigError::Limit {
                    field: "limits.max-connections",
                    reason: format!("must be between 1 and {MAX_CONNECTIONS}"),
                });
            }
        }
        if let Some(d) = &self.auth_backend.driver {
            if !matches!(d.to_ascii_lowercase().as_str(), "" | "none" | "internal") {
                return Err(ConfigError::AuthDriver { value: d.clone() });
            }
        }
        if !self.auth_backend.internal()
            && (self.auth_backend.open_door.is_some() || self.auth_backend.bootstrap_key_file.is_some())
        {
            return Err(ConfigError::AuthOption {
                reason: "open-door and bootstrap-key-file apply only to driver: internal",
            });
        }
        if self.auth_backend.internal()
            && !self.auth_backend.open_door()
            && self
                .auth_backend
                .bootstrap_key_file
                .as_deref()
                .unwrap_or("")
                .is_empty()
        {
            return Err(ConfigError::AuthOption {
                reason:
                    "open-door: false needs bootstrap-key-file, where the first start writes the admin key",
            });
        }
        let objects = self.object_stores()?;
        if let Some(q) = &self.queue_storage {
            check_store("queue-storage", q, false, &objects)?;
            if let Some(key) = q
                .config
                .keys()
                .find(|k| registry::PAYLOAD_KEYS.contains(&k.as_str()))
            {
                return Err(ConfigError::PayloadKeyOnQueueStore { key: key.clone() });
            }
        }
        let mut names = HashSet::new();
        for (i, s) in self.partition_storage.iter().enumerate() {
            let at = format!("partition-storage[{i}]");
            check_store(&at, s, true, &objects)?;
            let name = s.name.clone().unwrap_or_default();
            if !names.insert(name.clone()) {
                return Err(ConfigError::StoreNameTaken { at, name });
            }
        }
        // Across entries: the stores that hold their items in RAM share the default budget (`share_memory`).
        self.store_specs()?;
        if !self.partition_storage.is_empty()
            && !self
                .partition_storage
                .iter()
                .any(|s| s.affinity.unwrap_or(1.0) > 0.0)
        {
            return Err(ConfigError::NoAffinity);
        }
        for q in &self.queues {
            for p in &q.partitions {
                if !self.partition_names().contains(&p.storage_name) {
                    return Err(ConfigError::UndefinedStore {
                        queue: q.name.clone(),
                        store: p.storage_name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The `object-storage` entries, checked: each has a unique name and a bucket.
    ///
    /// # Errors
    /// The first entry without a name or bucket, or with a name used before.
    pub fn object_stores(&self) -> Result<Vec<ObjectStoreConfig>, ConfigError> {
        let mut out: Vec<ObjectStoreConfig> = Vec::new();
        for (index, o) in self.object_storage.iter().enumerate() {
            let c = o.to_config();
            let err = |field, reason: &str| ConfigError::ObjectStorage {
                index,
                field,
                reason: reason.to_string(),
            };
            if c.name.trim().is_empty() {
                return Err(err("name", "an object store needs a name"));
            }
            if out.iter().any(|p| p.name == c.name) {
                return Err(err(
                    "name",
                    &format!("'{}' is used by more than one object store", c.name),
                ));
            }
            if c.bucket.trim().is_empty() {
                return Err(err("bucket", "an object store needs a bucket"));
            }
            if !c.endpoint.is_empty()
                && !c.endpoint.starts_with("http://")
                && !c.endpoint.starts_with("https://")
            {
                return Err(err("endpoint", "must start with http:// or https://"));
            }
            out.push(c);
        }
        Ok(out)
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

    /// Most queues with per-queue series in `/metrics` (`limits.metrics-max-queues`).
    pub fn metrics_max_queues(&self) -> usize {
        self.limits
            .metrics_max_queues
            .unwrap_or(DEFAULT_METRICS_MAX_QUEUES)
    }

    /// The engine's limits: the defaults with the file's `limits` applied.
    pub fn limits(&self) -> Limits {
        let mut l = Limits::default();
        if let Some(n) = self.limits.max_requests_per_queue {
            l.max_requests_per_queue = n.max(1);
        }
        if let Some(d) = self.limits.shared_refresh.as_deref().map(parse_go_duration) {
            // Checked by `validate`.
            l.shared_refresh = d.unwrap_or(l.shared_refresh);
        }
        if let Some(n) = self.limits.max_dedup_keys {
            l.max_dedup_keys = n;
        }
        if let Some(n) = self.limits.max_lease_bytes {
            l.max_lease_bytes = n;
        }
        if let Some(d) = self.limits.queue_idle_unload.as_deref().map(parse_go_duration) {
            // Checked by `validate`.
            l.queue_idle_unload = d.unwrap_or(l.queue_idle_unload);
        }
        if let Some(d) = self
            .limits
            .default_request_timeout
            .as_deref()
            .map(parse_go_duration)
        {
            // Checked by `validate`.
            l.default_request_timeout = d.unwrap_or(l.default_request_timeout);
        }
        l
    }

    /// Largest produce body.
    pub fn max_produce_body(&self) -> usize {
        self.limits.max_produce_body.unwrap_or(DEFAULT_MAX_PRODUCE_BODY)
    }

    /// Body bytes of requests in flight, server-wide (`limits.max-inflight-bytes`).
    pub fn max_inflight_bytes(&self) -> u64 {
        self.limits
            .max_inflight_bytes
            .unwrap_or(crate::inflight::DEFAULT_MAX_INFLIGHT_BYTES)
    }

    /// How long a body waits for room under `max-inflight-bytes` (`limits.inflight-wait`; validated).
    pub fn inflight_wait(&self) -> Duration {
        self.limits
            .inflight_wait
            .as_deref()
            .and_then(|d| parse_go_duration(d).ok())
            .unwrap_or(crate::inflight::DEFAULT_INFLIGHT_WAIT)
    }

    /// How long a client may take to send a request's headers (`limits.header-read-timeout`; validated).
    pub fn header_read_timeout(&self) -> Duration {
        self.limits
            .header_read_timeout
            .as_deref()
            .and_then(|d| parse_go_duration(d).ok())
            .unwrap_or(DEFAULT_HEADER_READ_TIMEOUT)
    }

    /// How long a client may take to send a request's body (`limits.body-read-timeout`; validated).
    pub fn body_read_timeout(&self) -> Duration {
        self.limits
            .body_read_timeout
            .as_deref()
            .and_then(|d| parse_go_duration(d).ok())
            .unwrap_or(DEFAULT_BODY_READ_TIMEOUT)
    }

    /// How long writing a reply may make no progress before its connection is closed
    /// (`limits.reply-write-timeout`; validated).
    pub fn reply_write_timeout(&self) -> Duration {
        self.limits
            .reply_write_timeout
            .as_deref()
            .and_then(|d| parse_go_duration(d).ok())
            .unwrap_or(DEFAULT_REPLY_WRITE_TIMEOUT)
    }

    /// Connections served at once (`limits.max-connections`).
    pub fn max_connections(&self) -> usize {
        self.limits.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS)
    }

    /// Largest produce body for queues placed only on stores that offload payloads (at least
    /// [`Config::max_produce_body`]).
    pub fn max_offload_produce_body(&self) -> usize {
        self.limits
            .max_offload_produce_body
            .unwrap_or(0)
            .max(self.max_produce_body())
    }

    /// The names of the partition stores that offload payloads to object storage.
    pub fn offload_store_names(&self) -> Vec<String> {
        self.store_specs()
            .map(|specs| {
                specs
                    .partitions
                    .into_iter()
                    .filter(|p| p.spec.offload().is_some_and(|o| o.object_store.is_some()))
                    .map(|p| p.name)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The queue store's and the partition stores' specifications, with the defaults filled in for sections the
    /// file leaves out.
    ///
    /// # Errors
    /// A store entry the driver registry refuses.
    pub fn store_specs(&self) -> Result<StoreSpecs, ConfigError> {
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
        let objects = self.object_stores()?;
        let queues = spec_at("queue-storage", &qs, &[])?;
        let mut partitions = Vec::new();
        for (i, s) in parts.iter().enumerate() {
            partitions.push(PartitionSpec {
                name: s.name.clone().unwrap_or_else(|| "default".into()),
                affinity: s.affinity.unwrap_or(1.0),
                spec: spec_at(&format!("partition-storage[{i}]"), s, &objects)?,
            });
        }
        share_memory(&mut partitions, registry::default_max_memory())?;
        Ok(StoreSpecs { queues, partitions })
    }

    /// Opens every store and builds the engine.
    ///
    /// # Errors
    /// A store entry that is invalid or cannot be opened, or stores the engine refuses.
    pub async fn build_engine(&self, clock: SharedClock) -> Result<Engine, ConfigError> {
        let specs = self.store_specs()?;
        let queues = specs
            .queues
            .open_queues()
            .await
            .map_err(|source| ConfigError::Open {
                at: "queue-storage".into(),
                source,
            })?;
        let mut stores = Vec::new();
        for (i, PartitionSpec { name, affinity, spec }) in specs.partitions.into_iter().enumerate() {
            let store = spec.open_partitions().await.map_err(|source| ConfigError::Open {
                at: format!("partition-storage[{i}]"),
                source,
            })?;
            tracing::info!(store = %name, driver = store.driver(), affinity, "partition storage ready");
            stores.push(NamedStore {
                name,
                affinity,
                store,
            });
        }
        Engine::new(EngineConfig {
            queues,
            stores,
            limits: self.limits(),
            clock,
        })
        .map_err(|source| ConfigError::Engine { source })
    }

    /// The queues declared in the file, as definitions.
    ///
    /// # Errors
    /// A duration that is not a Go duration.
    pub fn declared_queues(&self) -> Result<Vec<QueueInfo>, ConfigError> {
        self.queues
            .iter()
            .map(|q| {
                let dur = |field: &'static str, v: &Option<String>| -> Result<Duration, ConfigError> {
                    match v {
                        None => Ok(Duration::ZERO),
                        Some(s) => parse_go_duration(s).map_err(|reason| ConfigError::QueueDuration {
                            queue: q.name.clone(),
                            field,
                            reason,
                        }),
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
                    dedup_window: dur("dedup-window", &q.dedup_window)?,
                    max_lease_timeout: dur("max-lease-timeout", &q.max_lease_timeout)?,
                    retry_backoff: match &q.retry_backoff {
                        None => lessor_core::types::Backoff::OFF,
                        Some(b) => lessor_core::types::Backoff {
                            base: dur("retry-backoff.base", &b.base)?,
                            max: dur("retry-backoff.max", &b.max)?,
                            factor: b.factor.unwrap_or(0.0),
                            jitter: b.jitter.unwrap_or(0.0),
                        },
                    },
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

/// The entry's specification, with errors placed at `at`.
fn spec_at(at: &str, s: &StoreSection, objects: &[ObjectStoreConfig]) -> Result<StoreSpec, ConfigError> {
    s.spec_with(objects).map_err(|source| ConfigError::Store {
        at: at.to_string(),
        source,
    })
}

/// Splits the default RAM budget between the partition stores that hold their items in RAM (see
/// [`lessor_storage::registry::share_memory`]); `half` is the default budget of one such store alone.
fn share_memory(partitions: &mut [PartitionSpec], half: Option<u64>) -> Result<(), ConfigError> {
    let mut specs: Vec<&mut StoreSpec> = partitions.iter_mut().map(|p| &mut p.spec).collect();
    registry::share_memory(&mut specs, half).map_err(|(i, source)| ConfigError::Store {
        at: format!("partition-storage[{i}]"),
        source,
    })
}

/// Checks one store entry: its place-specific rules here, its driver and settings in the registry.
fn check_store(
    at: &str,
    s: &StoreSection,
    partition: bool,
    objects: &[ObjectStoreConfig],
) -> Result<(), ConfigError> {
    spec_at(at, s, objects)?;
    if partition && s.name.as_deref().unwrap_or("").is_empty() {
        return Err(ConfigError::StoreNameMissing { at: at.to_string() });
    }
    if !partition && s.affinity.is_some() {
        return Err(ConfigError::AffinityNotAllowed { at: at.to_string() });
    }
    if let Some(value) = s.affinity {
        if !value.is_finite() || value < 0.0 {
            return Err(ConfigError::AffinityInvalid {
                at: at.to_string(),
                value,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_storage_is_checked_and_referenced_by_name() {
        let base = "object-storage:\n  - name: s3-0\n    endpoint: http://127.0.0.1:9000\n    bucket: b\n    path-style: true\n    prefix: lessor/\n";
        let e = Config::from_yaml("object-storage:\n  - name: s3-0\n    bucket: b\n    bukket: c\n")
            .expect_err("typo");
        assert!(e.to_string().contains("bukket"), "{e}");
        let e = Config::from_yaml("object-storage:\n  - name: s3-0\n").expect_err("no bucket");
        assert_eq!(
            e.to_string(),
            "object-storage[0].bucket: an object store needs a bucket"
        );
        let e = Config::from_yaml(&format!(
            "{base}partition-storage:\n  - name: a\n    driver: memory\n    config: {{ payload-offload: s3-9 }}\n"
        ))
        .expect_err("unknown store");
        assert_eq!(
            e.to_string(),
            "partition-storage[0].config.payload-offload: 's3-9' is not declared under object-storage (declared: s3-0)"
        );
        let e = Config::from_yaml(&format!(
            "{base}partition-storage:\n  - name: a\n    driver: memory\n    config: {{ payload-offload: s3-0, offload-threshold: 64 parsecs }}\n"
        ))
        .expect_err("bad size");
        assert!(
            e.to_string()
                .starts_with("partition-storage[0].config.offload-threshold: '64 parsecs' is not a size"),
            "{e}"
        );
        let e = Config::from_yaml(&format!(
            "{base}partition-storage:\n  - name: a\n    driver: memory\n    config: {{ compression: brotli }}\n"
        ))
        .expect_err("bad codec");
        assert!(
            e.to_string().contains("'brotli' is not one of (none, lz4, zstd)"),
            "{e}"
        );
        let e = Config::from_yaml(&format!(
            "{base}queue-storage:\n  driver: memory\n  config: {{ compression: zstd }}\n"
        ))
        .expect_err("queue store");
        assert!(
            e.to_string().starts_with("queue-storage.config.compression"),
            "{e}"
        );
        let yaml = format!(
            "{base}partition-storage:\n  - name: a\n    driver: memory\n    config: {{ payload-offload: s3-0, offload-threshold: 64KiB, compression: zstd }}\n"
        );
        match Config::from_yaml(&yaml) {
            Ok(c) => {
                let specs = c.store_specs().expect("specs");
                let o = specs.partitions[0].spec.offload().expect("offload on");
                assert_eq!(o.threshold, 65536);
                assert_eq!(o.compression, registry::Compression::Zstd);
                assert_eq!(
                    o.object_store.as_ref().map(|s| s.prefix.as_str()),
                    Some("lessor/")
                );
            }
            Err(e) => assert!(e.to_string().contains("--features s3"), "{e}"),
        }
    }

    /// Two stores that hold their items in RAM, neither with `max-memory`: each gets half of the default budget
    /// (each used to take all of it); budgets set that leave nothing to a store without one refuse the file.
    #[test]
    fn stores_in_ram_split_the_default_budget() {
        let Some(half) = registry::default_max_memory() else {
            return; // Not Linux: no default budget to share.
        };
        let c = Config::from_yaml(
            "partition-storage:\n  - { name: a, driver: memory }\n  - { name: b, driver: memory }\n",
        )
        .expect("two memory stores");
        let specs = c.store_specs().expect("specs");
        for p in &specs.partitions {
            assert_eq!(p.spec.config().ram_budget(), Some(Some(half / 2)), "{}", p.name);
        }
        let e = Config::from_yaml(
            "partition-storage:\n  - { name: a, driver: memory, config: { max-memory: 1000000GiB } }\n  - { name: b, driver: memory }\n",
        )
        .expect_err("nothing left for b");
        assert!(
            e.to_string()
                .starts_with("partition-storage[1].config.max-memory: required here:"),
            "{e}"
        );
    }

    #[test]
    fn a_memory_store_takes_cold_segments_postgres_does_not() {
        let base = "object-storage:\n  - name: s3-0\n    endpoint: http://127.0.0.1:9000\n    bucket: b\n    path-style: true\n    prefix: lessor/\n";
        let yaml = format!(
            "{base}partition-storage:\n  - name: m\n    driver: memory\n    config: {{ cold-segments: s3-0, cold-after-depth: 1000, cold-segment-items: 100 }}\n"
        );
        let r = Config::from_yaml(&yaml)
            .and_then(|c| c.store_specs().map(|s| s.partitions[0].spec.cold().cloned()));
        if cfg!(feature = "s3") {
            let cold = r.expect("memory with cold segments").expect("cold on");
            assert_eq!((cold.after_depth, cold.segment_items), (1000, 100));
        } else {
            let e = r.expect_err("no s3").to_string();
            assert!(e.contains("cold-segments"), "{e}");
        }
        let e = Config::from_yaml(&format!(
            "{base}partition-storage:\n  - name: m\n    driver: memory\n    config: {{ cold-segments: s3-0, cold-after-depth: 0 }}\n"
        ))
        .and_then(|c| c.store_specs().map(|_| ()));
        if cfg!(feature = "s3") {
            let e = e.expect_err("depth 0").to_string();
            assert!(e.contains("cold-after-depth: must be at least 1"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::from_yaml("adress: 1.2.3.4:1\n")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("adress"), "{e}");
        let e = Config::from_yaml("queue-storage:\n  driver: memory\n  confg: {}\n")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("confg"), "{e}");
        let e = Config::from_yaml(
            "partition-storage:\n  - name: a\n    driver: memory\n    config: { storge-dir: x }\n",
        )
        .expect_err("unknown key")
        .to_string();
        assert!(e.contains("storge-dir"), "{e}");
    }

    /// `limits.max-produce-body` and `limits.max-offload-produce-body` are between 1 and 1 GiB: a body is held whole.
    #[test]
    fn produce_body_limits_are_bounded() {
        let c = Config::from_yaml("limits:\n  max-offload-produce-body: 1073741824\n").expect("valid");
        assert_eq!(c.max_offload_produce_body(), 1 << 30);
        for key in ["max-produce-body", "max-offload-produce-body"] {
            for bad in ["0", "1073741825", "18446744073709551615"] {
                let e = Config::from_yaml(&format!("limits:\n  {key}: {bad}\n"))
                    .expect_err(bad)
                    .to_string();
                assert!(
                    e.contains(&format!("limits.{key}")) && e.contains("between 1 and 1073741824"),
                    "{key} {bad}: {e}"
                );
            }
        }
    }

    /// `limits.max-lease-bytes` is between 1 and 1 GiB; the default is 16 MiB.
    #[test]
    fn max_lease_bytes_is_checked_and_applied() {
        assert_eq!(Config::memory().limits().max_lease_bytes, 16 << 20);
        let c = Config::from_yaml("limits:\n  max-lease-bytes: 65536\n").expect("valid");
        assert_eq!(c.limits().max_lease_bytes, 65536);
        for bad in ["0", "1073741825"] {
            let e = Config::from_yaml(&format!("limits:\n  max-lease-bytes: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("limits.max-lease-bytes"), "{bad}: {e}");
        }
    }

    /// `limits.max-inflight-bytes` is between 64 KiB and 1 TiB (default 1 GiB); `limits.inflight-wait` is a Go
    /// duration of at most 1m (default 1s).
    #[test]
    fn inflight_limits_are_checked_and_applied() {
        let c = Config::memory();
        assert_eq!(c.max_inflight_bytes(), 1 << 30);
        assert_eq!(c.inflight_wait(), Duration::from_secs(1));
        let c =
            Config::from_yaml("limits:\n  max-inflight-bytes: 65536\n  inflight-wait: 0s\n").expect("valid");
        assert_eq!(c.max_inflight_bytes(), 65536);
        assert_eq!(c.inflight_wait(), Duration::ZERO);
        for (key, bad) in [
            ("max-inflight-bytes", "65535"),
            ("max-inflight-bytes", "1099511627777"),
            ("inflight-wait", "61s"),
            ("inflight-wait", "soon"),
        ] {
            let e = Config::from_yaml(&format!("limits:\n  {key}: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains(&format!("limits.{key}")), "{bad}: {e}");
        }
    }

    /// The read and write timeouts are Go durations above 0 and at most 1h (defaults 30s, 60s and 60s); `limits.max-connections`
    /// is between 1 and a million (default 10,000).
    #[test]
    fn connection_limits_are_checked_and_applied() {
        let c = Config::memory();
        assert_eq!(c.header_read_timeout(), Duration::from_secs(30));
        assert_eq!(c.body_read_timeout(), Duration::from_secs(60));
        assert_eq!(c.reply_write_timeout(), Duration::from_secs(60));
        assert_eq!(c.max_connections(), 10_000);
        let c = Config::from_yaml(
            "limits:\n  header-read-timeout: 2s\n  body-read-timeout: 1m\n  reply-write-timeout: 5s\n  max-connections: 5\n",
        )
        .expect("valid");
        assert_eq!(c.reply_write_timeout(), Duration::from_secs(5));
        assert_eq!(c.header_read_timeout(), Duration::from_secs(2));
        assert_eq!(c.body_read_timeout(), Duration::from_secs(60));
        assert_eq!(c.max_connections(), 5);
        for (key, bad) in [
            ("header-read-timeout", "0s"),
            ("header-read-timeout", "2h"),
            ("body-read-timeout", "never"),
            ("reply-write-timeout", "0s"),
            ("reply-write-timeout", "61m"),
            ("max-connections", "0"),
            ("max-connections", "1000001"),
        ] {
            let e = Config::from_yaml(&format!("limits:\n  {key}: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains(&format!("limits.{key}")), "{bad}: {e}");
        }
    }

    /// `limits.max-requests-per-queue` is at most a million (default 4,096; 0 reads as 1). The inbox is a tokio
    /// channel of that capacity, which panics above `usize::MAX >> 3`: 2305843009213693952 was accepted and every
    /// queue's first request panicked in the channel's constructor.
    #[test]
    fn max_requests_per_queue_is_checked_and_applied() {
        assert_eq!(Config::memory().limits().max_requests_per_queue, 4096);
        for (v, want) in [("0", 1), ("1000000", 1_000_000)] {
            let c = Config::from_yaml(&format!("limits:\n  max-requests-per-queue: {v}\n")).expect(v);
            assert_eq!(c.limits().max_requests_per_queue, want, "{v}");
        }
        for bad in ["1000001", "2305843009213693952"] {
            let e = Config::from_yaml(&format!("limits:\n  max-requests-per-queue: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("limits.max-requests-per-queue"), "{bad}: {e}");
        }
    }

    /// `limits.max-dedup-keys` is between 1 and a billion; the default is ten million.
    #[test]
    fn max_dedup_keys_is_checked_and_applied() {
        assert_eq!(Config::memory().limits().max_dedup_keys, 10_000_000);
        let c = Config::from_yaml("limits:\n  max-dedup-keys: 5000\n").expect("valid");
        assert_eq!(c.limits().max_dedup_keys, 5000);
        for bad in ["0", "1000000001"] {
            let e = Config::from_yaml(&format!("limits:\n  max-dedup-keys: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("limits.max-dedup-keys"), "{bad}: {e}");
        }
    }

    /// `limits.queue-idle-unload` is a Go duration of at most a day, `0s` turning unloading off; the default is 5m.
    #[test]
    fn queue_idle_unload_is_checked_and_applied() {
        assert_eq!(
            Config::memory().limits().queue_idle_unload,
            Duration::from_secs(300)
        );
        for (text, want) in [("30s", 30), ("0s", 0), ("24h", 86_400)] {
            let c = Config::from_yaml(&format!("limits:\n  queue-idle-unload: {text}\n")).expect(text);
            assert_eq!(c.limits().queue_idle_unload, Duration::from_secs(want), "{text}");
        }
        for bad in ["25h", "soon", "-1s"] {
            let e = Config::from_yaml(&format!("limits:\n  queue-idle-unload: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("limits.queue-idle-unload"), "{bad}: {e}");
        }
    }

    /// `limits.metrics-max-queues` bounds the queues with per-queue series in `/metrics`: 0 (none) to 1,000,000;
    /// the default is 10,000.
    #[test]
    fn metrics_max_queues_is_checked_and_applied() {
        assert_eq!(Config::memory().metrics_max_queues(), 10_000);
        for n in [0, 3, 10_000, 1_000_000] {
            let c = Config::from_yaml(&format!("limits:\n  metrics-max-queues: {n}\n")).expect("valid");
            assert_eq!(c.metrics_max_queues(), n);
        }
        let e = Config::from_yaml("limits:\n  metrics-max-queues: 1000001\n")
            .expect_err("above the bound")
            .to_string();
        assert!(e.contains("limits.metrics-max-queues"), "{e}");
        // Not a count at all: the parser's error, which quotes the line.
        for bad in ["-1", "many"] {
            let e = Config::from_yaml(&format!("limits:\n  metrics-max-queues: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("metrics-max-queues"), "{bad}: {e}");
        }
    }

    /// `limits.default-request-timeout` is a Go duration above 0 and at most 15m; the default is 30s.
    #[test]
    fn default_request_timeout_is_checked_and_applied() {
        assert_eq!(
            Config::memory().limits().default_request_timeout,
            Duration::from_secs(30)
        );
        for (text, want) in [("1s", 1_000), ("250ms", 250), ("15m", 900_000)] {
            let c = Config::from_yaml(&format!("limits:\n  default-request-timeout: {text}\n")).expect(text);
            assert_eq!(
                c.limits().default_request_timeout,
                Duration::from_millis(want),
                "{text}"
            );
        }
        for bad in ["0s", "16m", "soon", "-1s"] {
            let e = Config::from_yaml(&format!("limits:\n  default-request-timeout: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("limits.default-request-timeout"), "{bad}: {e}");
        }
    }

    /// `limits.shared-refresh` is a Go duration above 0 and at most an hour; the default is 500ms.
    #[test]
    fn shared_refresh_is_checked_and_applied() {
        assert_eq!(
            Config::memory().limits().shared_refresh,
            Duration::from_millis(500)
        );
        let c = Config::from_yaml("limits:\n  shared-refresh: 2s\n").expect("valid");
        assert_eq!(c.limits().shared_refresh, Duration::from_secs(2));
        for bad in ["0s", "2h", "soon", "-1s"] {
            let e = Config::from_yaml(&format!("limits:\n  shared-refresh: {bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains("limits.shared-refresh"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_driver_lists_valid_ones() {
        let e = Config::from_yaml("queue-storage:\n  driver: mysql\n")
            .expect_err("bad driver")
            .to_string();
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
        let e = Config::from_yaml("logging:\n  handler: xml\n")
            .expect_err("bad handler")
            .to_string();
        assert!(e.contains("logging.handler"), "{e}");
        let e = Config::from_yaml("partition-storage:\n  - name: a\n    driver: memory\n    affinity: -1\n")
            .expect_err("negative affinity")
            .to_string();
        assert!(e.contains("affinity"), "{e}");
        let e = Config::from_yaml(
            "partition-storage:\n  - name: a\n    driver: memory\nqueues:\n  - name: q\n    partitions: [ { partition: 0, storage-name: b } ]\n",
        )
        .expect_err("undefined store").to_string();
        assert!(e.contains("'b' which is undefined"), "{e}");
        let e = Config::from_yaml("queue-storage:\n  driver: memory\n  config: { storage-dir: /x }\n")
            .expect_err("memory dir")
            .to_string();
        assert!(e.contains("storage-dir"), "{e}");
    }

    /// The example file shipped at the repository root.
    const EXAMPLE: &str = include_str!("../../../config.example.yaml");

    #[test]
    fn example_file_parses_and_builds_specs() {
        let all_compiled = ["fjall", "postgres"].iter().all(|d| driver_compiled(d)) && cfg!(feature = "s3");
        let c = match Config::from_yaml(EXAMPLE) {
            Ok(c) => c,
            Err(e) => {
                // A build without a driver refuses it by name, as documented; anything else is a broken example.
                assert!(!all_compiled, "config.example.yaml: {e}");
                assert!(e.to_string().contains("not compiled into this build"), "{e}");
                return;
            }
        };
        assert_eq!(c.address(), "127.0.0.1:2319");
        assert_eq!(c.max_produce_body(), 5_000_000);
        assert_eq!(c.limits().max_requests_per_queue, 4096);
        let specs = c.store_specs().expect("specs");
        assert_eq!(specs.queues.driver().name, "fjall");
        let drivers: Vec<(&str, &str)> = specs
            .partitions
            .iter()
            .map(|p| (p.name.as_str(), p.spec.driver().name))
            .collect();
        assert_eq!(
            drivers,
            [
                ("disk-0", "fjall"),
                ("pg-0", "postgres"),
                ("ram-0", "memory"),
                ("log-0", "log")
            ]
        );
        let declared = c.declared_queues().expect("queues");
        assert_eq!(declared[1].name, "jobs");
        assert_eq!(declared[1].dead_queue, "jobs-dead");
        assert_eq!(declared[1].partitions[1].storage_name, "pg-0");
        assert_eq!(declared[1].dedup_window, Duration::from_secs(600));
        assert_eq!(declared[1].max_lease_timeout, Duration::from_secs(7200));
        assert_eq!(declared[1].retry_backoff.base, Duration::from_secs(1));
        assert_eq!(declared[1].retry_backoff.max, Duration::from_secs(300));
        assert_eq!(
            (declared[1].retry_backoff.factor, declared[1].retry_backoff.jitter),
            (2.0, 0.2)
        );
        assert_eq!(declared[0].retry_backoff, lessor_core::types::Backoff::OFF);
    }

    #[test]
    fn example_file_shows_every_key() {
        let keys = [
            "address",
            "logging",
            "handler",
            "level",
            "queue-storage",
            "partition-storage",
            "name",
            "driver",
            "affinity",
            "config",
            "queues",
            "dead-queue",
            "lease-timeout",
            "expire-timeout",
            "max-attempts",
            "reference",
            "requested-partitions",
            "partitions",
            "partition",
            "read-only",
            "storage-name",
            "dedup-window",
            "max-lease-timeout",
            "retry-backoff",
            "base",
            "max",
            "factor",
            "jitter",
            "limits",
            "max-produce-body",
            "max-offload-produce-body",
            "max-requests-per-queue",
            "auth-backend",
            "open-door",
            "bootstrap-key-file",
            "object-storage",
            "endpoint",
            "bucket",
            "region",
            "access-key-id",
            "secret-access-key",
            "path-style",
            "prefix",
        ];
        // Every setting of every driver, compiled in or not: a new driver's keys must be documented too.
        let driver_keys = registry::DRIVERS
            .iter()
            .flat_map(|d| d.keys.iter().copied())
            .chain(registry::PAYLOAD_KEYS.iter().copied());
        for key in keys.into_iter().chain(driver_keys) {
            assert!(
                EXAMPLE.lines().any(|l| l
                    .trim_start()
                    .trim_start_matches("- ")
                    .starts_with(&format!("{key}:"))),
                "config.example.yaml does not show '{key}'"
            );
        }
        // The tls block is commented out (its files do not exist here); it must still show every key and parse.
        let tls_block: String = EXAMPLE
            .lines()
            .skip_while(|l| !l.starts_with("# tls:"))
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').strip_prefix(' ').unwrap_or("")))
            .collect();
        for key in [
            "tls",
            "cert-file",
            "key-file",
            "client-ca-file",
            "client-auth",
            "reload-interval",
        ] {
            assert!(
                tls_block
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{key}:"))),
                "config.example.yaml does not show 'tls.{key}'"
            );
        }
        let c = Config::from_yaml(&tls_block).expect("the example's tls block parses");
        assert!(c
            .tls
            .is_some_and(|t| t.client_auth == Some(crate::tls::ClientAuth::Required)));
        for d in registry::DRIVERS {
            assert!(
                EXAMPLE.contains(&format!("driver: {}", d.name)),
                "no store uses driver '{}'",
                d.name
            );
        }
    }

    #[test]
    fn errors_name_the_entry_and_key() {
        let e = Config::from_yaml(
            "partition-storage:\n  - name: a\n    driver: memory\n  - name: a\n    driver: memory\n",
        )
        .expect_err("duplicate");
        assert_eq!(
            e.to_string(),
            "partition-storage[1].name: 'a' is used by more than one store"
        );
        let e = Config::from_yaml("queue-storage:\n  driver: memory\n  config: { max-conns: 3 }\n")
            .expect_err("key");
        assert_eq!(
            e.to_string(),
            "queue-storage.config.max-conns: not a setting of driver 'memory'"
        );
        assert!(
            matches!(
                e,
                ConfigError::Store {
                    source: SpecError::NotASetting { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let e = Config::from_yaml("queue-storage:\n  driver: mysql\n").expect_err("driver");
        assert!(
            e.to_string()
                .starts_with("queue-storage.driver: invalid driver; 'mysql' is not one of"),
            "{e}"
        );
        let e = Config::from_file("/nonexistent/lessor.yaml").expect_err("missing file");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the io error is kept as the source"
        );
        assert!(
            e.to_string()
                .starts_with("cannot read config file '/nonexistent/lessor.yaml'"),
            "{e}"
        );
    }

    #[test]
    fn tls_section_keys_and_values_are_checked() {
        let e = Config::from_yaml("tls:\n  cert-file: a\n  key-file: b\n  cert-fil: c\n")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("cert-fil"), "{e}");
        let e = Config::from_yaml(
            "tls:\n  cert-file: a\n  key-file: b\n  client-ca-file: c\n  client-auth: maybe\n",
        )
        .expect_err("bad client-auth")
        .to_string();
        assert!(e.contains("maybe"), "{e}");
        let e = Config::from_yaml("tls:\n  cert-file: a\n  key-file: b\n  client-auth: optional\n")
            .expect_err("client-auth without a CA")
            .to_string();
        assert!(
            e.contains("tls.client-auth") && e.contains("client-ca-file"),
            "{e}"
        );
        let e = Config::from_yaml("tls:\n  cert-file: a\n")
            .expect_err("no key-file")
            .to_string();
        assert!(e.contains("key-file"), "{e}");
        let c =
            Config::from_yaml("tls:\n  cert-file: /x/a.crt\n  key-file: /x/a.key\n").expect("minimal tls");
        let tls = c.tls.expect("tls");
        assert_eq!(tls.cert_file, std::path::PathBuf::from("/x/a.crt"));
        assert!(tls.client_ca_file.is_none() && tls.client_auth.is_none());
        assert_eq!(
            tls.reload_every().unwrap(),
            Some(crate::tls::DEFAULT_RELOAD_INTERVAL)
        );
        let with = |v: &str| {
            Config::from_yaml(&format!(
                "tls:\n  cert-file: a\n  key-file: b\n  reload-interval: {v}\n"
            ))
        };
        let tls = with("0").expect("0 turns the periodic check off").tls.unwrap();
        assert_eq!(tls.reload_every().unwrap(), None);
        let tls = with("30s").expect("30s").tls.unwrap();
        assert_eq!(
            tls.reload_every().unwrap(),
            Some(std::time::Duration::from_secs(30))
        );
        for bad in ["soon", "-1m", "25h"] {
            let e = with(bad).expect_err(bad).to_string();
            assert!(e.contains("tls.reload-interval") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_driver_not_compiled_in_is_its_own_error() {
        for d in registry::DRIVERS.iter().filter(|d| !d.compiled) {
            let e = Config::from_yaml(&format!("queue-storage:\n  driver: {}\n", d.name))
                .expect_err("not compiled");
            assert!(e.to_string().contains("is not compiled into this build"), "{e}");
        }
        if driver_compiled("fjall") {
            let c = Config::from_yaml(
                "queue-storage:\n  driver: badger\n  config: { storage-dir: /tmp/x, durability: none, max-conns: 1 }\n",
            );
            let e = c.expect_err("postgres key on fjall").to_string();
            assert_eq!(
                e,
                "queue-storage.config.max-conns: not a setting of driver 'fjall'"
            );
        }
    }
}
