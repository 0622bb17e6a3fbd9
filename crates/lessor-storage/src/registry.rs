//! The driver registry: the one place that turns a store specification (a driver name plus its settings) into a
//! queue store or a partition store.
//!
//! Everything above this crate (the server's configuration, `lessor bench`, tests) names a driver and hands over
//! its raw settings; it never knows which settings a driver takes, how they are checked, or which constructor opens
//! the store. That knowledge sits next to each driver, in a [`DriverEntry`] listed once in [`DRIVERS`].
//!
//! # Adding a driver
//! 1. Write the backend module (behind a cargo feature when it pulls dependencies in).
//! 2. Write its entry: a module under `registry/` with a typed settings struct implementing [`DriverConfig`], a
//!    `parse` function reading it from [`Settings`], and a `pub(super) const DRIVER: DriverEntry`. Its `open_*`
//!    functions call the backend's constructors. In a build without the backend's feature, give the typed settings
//!    a field of an empty stand-in type (see `registry/fjall.rs`), so they cannot be built and the `open_*`
//!    functions are an empty `match`; [`StoreSpec::from_settings`] refuses the driver by name before that.
//! 3. Add one line to [`DRIVERS`].
//!
//! Nothing above this crate changes: the server's configuration accepts the new name, checks its keys and opens
//! it through [`StoreSpec`].
//!
//! # Errors
//! [`SpecError`] says what is wrong with a specification (unknown driver, driver not compiled in, a key the driver
//! does not take, a missing or invalid value), naming the key; the caller prefixes where the specification came from
//! (`partition-storage[1]`). [`OpenError`] is a store that could not be opened, with the backend's error as its
//! source.

mod cold;
mod fjall;
mod log;
mod memory;
mod offload;
mod postgres;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lessor_core::error::StorageError;
use lessor_core::storage::{PartitionStore, QueuesStore};
use thiserror::Error;

pub use self::cold::ColdSettings;
pub use self::fjall::{FjallConfig, DEFAULT_MEMORY_WINDOW, DEFAULT_MEMORY_WINDOW_BYTES};
pub use self::log::LogConfig;
pub use self::memory::MemoryConfig;
pub use self::offload::{
    parse_size, Compression, ObjectStoreConfig, OffloadSettings, DEFAULT_GRACE, DEFAULT_SWEEP_INTERVAL,
    DEFAULT_THRESHOLD, KEYS as PAYLOAD_KEYS,
};
pub use self::postgres::PostgresConfig;

/// Every driver Lessor knows, compiled in or not, in the order error messages list them. Adding a driver adds one
/// line here.
pub static DRIVERS: &[&DriverEntry] = &[&memory::DRIVER, &fjall::DRIVER, &postgres::DRIVER, &log::DRIVER];

/// One driver: its names, the settings it takes, whether this build has it, and how to read its settings.
pub struct DriverEntry {
    /// The canonical name (`driver:` in the configuration file, error messages, logs).
    pub name: &'static str,
    /// Other accepted names (matched without regard to case, like the canonical name).
    pub aliases: &'static [&'static str],
    /// The keys of its `config:` section.
    pub keys: &'static [&'static str],
    /// Whether this build includes the driver.
    pub compiled: bool,
    /// Reads the typed settings; the keys are already known to be among [`DriverEntry::keys`].
    pub parse: fn(&Settings) -> Result<Arc<dyn DriverConfig>, SpecError>,
}

impl DriverEntry {
    /// Whether `name` (any case) names this driver.
    pub fn answers_to(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.name == name || self.aliases.contains(&name.as_str())
    }
}

impl fmt::Debug for DriverEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverEntry")
            .field("name", &self.name)
            .field("aliases", &self.aliases)
            .field("compiled", &self.compiled)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DriverEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The driver named `name` (canonical name or alias, any case), compiled in or not.
///
/// # Errors
/// [`SpecError::UnknownDriver`], listing the known drivers.
pub fn lookup(name: &str) -> Result<&'static DriverEntry, SpecError> {
    DRIVERS
        .iter()
        .copied()
        .find(|d| d.answers_to(name))
        .ok_or_else(|| {
            let (known, aliases) = known_drivers();
            SpecError::UnknownDriver {
                name: name.to_string(),
                known,
                aliases,
            }
        })
}

/// Half of the memory this process may use: the machine's (`MemTotal` in `/proc/meminfo`), or its cgroup's limit
/// when that is lower (see [`memory_limit_within`]). `None` where neither can be read (not Linux). Half, because
/// the process needs room besides the items: requests in flight, the queue store, the allocator's slack, and
/// replay at the next start. Every store that holds its items in RAM shares it (see [`share_memory`]).
pub fn default_max_memory() -> Option<u64> {
    Some((memory_limit_within(std::path::Path::new("/"))? / 2).max(MIN_MAX_MEMORY))
}

/// Gives each store of `specs` that holds its items in RAM without a `max-memory` of its own (memory without
/// cold segments, log) its share of `half` ([`default_max_memory`]): what the other such stores' `max-memory`
/// leave of it, split evenly. Each store alone used to default to the whole of `half`, so two of them could
/// fill the machine between them and the process be killed for want of memory. Stores with a budget of their
/// own keep it. `half` unknown (`None`): nothing changes (the stores open without a budget, and say so).
///
/// # Errors
/// The index of the first store without a budget and why, when the others' budgets leave it less than 1 MiB: the
/// operator must then set `max-memory` on every such store.
pub fn share_memory(specs: &mut [&mut StoreSpec], half: Option<u64>) -> Result<(), (usize, SpecError)> {
    let Some(half) = half else { return Ok(()) };
    let mut set = 0u64;
    let mut defaulted = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        match spec.config.ram_budget() {
            Some(Some(max)) => set = set.saturating_add(max),
            Some(None) => defaulted.push(i),
            None => {}
        }
    }
    let Some(&first) = defaulted.first() else {
        return Ok(());
    };
    let share = half.saturating_sub(set) / defaulted.len() as u64;
    if share < MIN_MAX_MEMORY {
        let mib = |b: u64| b >> 20;
        return Err((
            first,
            SpecError::Invalid {
                key: "max-memory",
                reason: format!(
                    "required here: the stores that hold their items in RAM share half of the memory this process \
                     may use ({} MiB) by default, and the max-memory of the others ({} MiB) leaves less than 1MiB \
                     to each of the {} without one; set max-memory on each of them",
                    mib(half),
                    mib(set),
                    defaulted.len()
                ),
            },
        ));
    }
    for i in defaulted {
        let spec = &mut specs[i];
        if let Some(config) = spec.config.with_ram_budget(share) {
            spec.config = config;
        }
    }
    Ok(())
}

/// The memory this process may use as the files under `root` tell it (`/` but in tests): `MemTotal`, or the
/// lowest limit of the process's memory cgroup and its parents, as `/proc/self/cgroup` names it, when lower:
/// `memory.max` under `/sys/fs/cgroup` (cgroup v2) and `memory.limit_in_bytes` under `/sys/fs/cgroup/memory`
/// (v1). Reading `/sys/fs/cgroup/memory.max` alone found a container's limit (its cgroup namespace makes its
/// cgroup the root) but not a systemd service's `MemoryMax=` (below the root of a host's hierarchy), nor any
/// limit of cgroup v1. A cgroup path missing under the mount (a container without a cgroup namespace sees the
/// host's path, and its own cgroup at the mount's root) leaves the ancestors that are there.
#[doc(hidden)]
pub fn memory_limit_within(root: &std::path::Path) -> Option<u64> {
    let total = std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
    let mut limit = total;
    let mut lower = |n: u64| limit = Some(limit.map_or(n, |l| l.min(n)));
    // Lines `id:controllers:path`: v2's has no controllers, v1's memory line names `memory` among them.
    let cgroups = std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let (mount, file) = if controllers.is_empty() {
            ("sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mount = root.join(mount);
        // The cgroup and every parent up to the mount's root: a parent's limit holds its children too. `max`
        // (v2) and v1's huge "no limit" do not parse or are above `MemTotal`.
        let mut dir = Some(std::path::Path::new(path.trim_start_matches('/')));
        while let Some(d) = dir {
            if let Some(n) = std::fs::read_to_string(mount.join(d).join(file))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                lower(n);
            }
            dir = d.parent();
        }
    }
    limit
}

/// Smallest `max-memory`.
const MIN_MAX_MEMORY: u64 = 1 << 20;

/// `max-memory` of the drivers that hold their items in RAM (memory, log): the most their partitions may hold, by
/// estimate, before new items are refused (see `memory::MemoryBudget`); at least 1 MiB. `None` when not given.
fn parse_max_memory(s: &Settings) -> Result<Option<u64>, SpecError> {
    s.size_at_least(
        "max-memory",
        MIN_MAX_MEMORY,
        "1MiB",
        "the most the partitions may hold in RAM",
    )
}

/// The canonical names (`memory, fjall, postgres`) and a note on the aliases that are not just other spellings of
/// them (` (badger is accepted as an alias of fjall)`), for error messages.
fn known_drivers() -> (String, String) {
    let names: Vec<&str> = DRIVERS.iter().map(|d| d.name).collect();
    let aliases: Vec<String> = DRIVERS
        .iter()
        .flat_map(|d| {
            d.aliases
                .iter()
                .filter(|a| !a.starts_with(d.name) && !d.name.starts_with(**a) && !a.ends_with(d.name))
                .map(move |a| format!("{a} is accepted as an alias of {}", d.name))
        })
        .collect();
    let note = if aliases.is_empty() {
        String::new()
    } else {
        format!(" ({})", aliases.join("; "))
    };
    (names.join(", "), note)
}

/// Parses a duration written in a configuration file. Durations use the wire's Go syntax (`100ms`, `1m30s`), whose
/// parser lives in `lessor-proto` above this crate, so the caller supplies it.
pub type DurationParser = fn(&str) -> Result<Duration, String>;

/// The raw settings of one store (the `config:` mapping): key to value as written, every scalar as text.
#[derive(Clone)]
pub struct Settings {
    values: BTreeMap<String, String>,
    parse_duration: DurationParser,
    /// The declared object stores `payload-offload` may name.
    object_stores: Arc<Vec<ObjectStoreConfig>>,
    /// The store's name in the configuration (object keys of offloaded payloads start with it).
    store_name: String,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.values.iter()).finish()
    }
}

impl Settings {
    /// No settings; durations are read with `parse_duration`.
    pub fn new(parse_duration: DurationParser) -> Self {
        Settings {
            values: BTreeMap::new(),
            parse_duration,
            object_stores: Arc::new(Vec::new()),
            store_name: String::new(),
        }
    }

    /// The object stores declared in the configuration, which `payload-offload` may name.
    pub fn with_object_stores(mut self, stores: Vec<ObjectStoreConfig>) -> Self {
        self.object_stores = Arc::new(stores);
        self
    }

    /// The store's name in the configuration (`partition-storage[].name`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.store_name = name.into();
        self
    }

    /// Adds (or replaces) a setting.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(key, value);
        self
    }

    /// Adds (or replaces) a setting.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.values.insert(key.into(), value.into());
    }

    /// The keys given.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// The text of `key`, if given.
    pub fn text(&self, key: &'static str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The text of `key`, which must be given and not empty.
    pub fn required(&self, key: &'static str, driver: &'static str) -> Result<&str, SpecError> {
        match self.text(key) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(SpecError::Missing { key, driver }),
        }
    }

    /// `key` as a size (`256MiB`), if given, refused below `min` (written `min_text`, with `what` the setting is
    /// for, in the error).
    pub fn size_at_least(
        &self,
        key: &'static str,
        min: u64,
        min_text: &str,
        what: &str,
    ) -> Result<Option<u64>, SpecError> {
        let Some(t) = self.text(key) else {
            return Ok(None);
        };
        let n = offload::parse_size(t).map_err(|reason| SpecError::Invalid { key, reason })? as u64;
        if n < min {
            return Err(SpecError::Invalid {
                key,
                reason: format!("must be at least {min_text} ({what}), got {n}"),
            });
        }
        Ok(Some(n))
    }

    /// `key` as a whole number, if given.
    pub fn u32(&self, key: &'static str) -> Result<Option<u32>, SpecError> {
        self.text(key)
            .map(|v| {
                v.trim().parse::<u32>().map_err(|_| SpecError::Invalid {
                    key,
                    reason: format!("'{v}' is not a whole number between 0 and {}", u32::MAX),
                })
            })
            .transpose()
    }

    /// `key` as a duration in the wire's Go syntax, if given.
    pub fn duration(&self, key: &'static str) -> Result<Option<Duration>, SpecError> {
        self.text(key)
            .map(|v| (self.parse_duration)(v).map_err(|reason| SpecError::Invalid { key, reason }))
            .transpose()
    }
}

/// A driver's typed settings, and how to open its stores with them.
#[async_trait]
pub trait DriverConfig: fmt::Debug + Send + Sync {
    /// The driver these settings belong to.
    fn driver(&self) -> &'static DriverEntry;

    /// Opens (or creates) the store of queue definitions.
    async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError>;

    /// Opens (or creates) a store of partitions.
    async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError>;

    /// For a store that holds its partitions' items in RAM under a budget (`max-memory`): the budget its settings
    /// give (`Some(Some(bytes))`) or leave to the default (`Some(None)`). `None` for the others.
    fn ram_budget(&self) -> Option<Option<u64>> {
        None
    }

    /// These settings with `max` as their RAM budget (see [`share_memory`]); `None` for a store without one.
    fn with_ram_budget(&self, max: u64) -> Option<Arc<dyn DriverConfig>> {
        let _ = max;
        None
    }
}

/// A checked store specification: a compiled-in driver and its typed settings.
#[derive(Clone, Debug)]
pub struct StoreSpec {
    config: Arc<dyn DriverConfig>,
    /// Payload offload and compression (keys shared by every driver), when asked for.
    offload: Option<OffloadSettings>,
    /// Cold backlog segments (`cold-segments` and its keys), when asked for.
    cold: Option<ColdSettings>,
    /// The store's name, for object keys.
    store_name: String,
}

impl StoreSpec {
    /// Checks `settings` against the driver named `driver` and reads them into its typed settings.
    ///
    /// # Errors
    /// An unknown driver, a driver not compiled into this build, a key the driver does not take, or a missing or
    /// invalid value (see [`SpecError`]).
    pub fn from_settings(driver: &str, settings: &Settings) -> Result<StoreSpec, SpecError> {
        let entry = lookup(driver)?;
        if !entry.compiled {
            return Err(SpecError::NotCompiled { driver: entry.name });
        }
        for key in settings.keys() {
            if entry.keys.contains(&key) || offload::KEYS.contains(&key) || cold::KEYS.contains(&key) {
                continue;
            }
            return Err(if DRIVERS.iter().any(|d| d.keys.contains(&key)) {
                SpecError::NotASetting {
                    key: key.to_string(),
                    driver: entry.name,
                }
            } else {
                SpecError::UnknownSetting {
                    key: key.to_string(),
                    driver: entry.name,
                    known: entry.keys.join(", "),
                }
            });
        }
        let offload = offload::parse(settings)?;
        let cold = cold::parse(settings, entry.name)?;
        Ok(StoreSpec {
            config: (entry.parse)(settings)?,
            offload,
            cold,
            store_name: settings.store_name.clone(),
        })
    }

    /// A specification from typed settings (code that knows which driver it wants, such as tests).
    ///
    /// # Errors
    /// [`SpecError::NotCompiled`] when this build lacks the driver.
    pub fn new(config: impl DriverConfig + 'static) -> Result<StoreSpec, SpecError> {
        let entry = config.driver();
        if !entry.compiled {
            return Err(SpecError::NotCompiled { driver: entry.name });
        }
        Ok(StoreSpec {
            config: Arc::new(config),
            offload: None,
            cold: None,
            store_name: String::new(),
        })
    }

    /// The same specification with payload offload or compression (code that builds specifications directly).
    pub fn with_offload(mut self, store_name: impl Into<String>, offload: OffloadSettings) -> Self {
        self.store_name = store_name.into();
        self.offload = offload.active().then_some(offload);
        self
    }

    /// Cold backlog segment settings, when the store has them.
    pub fn cold(&self) -> Option<&ColdSettings> {
        self.cold.as_ref()
    }

    /// Payload offload and compression settings, when the store has any.
    pub fn offload(&self) -> Option<&OffloadSettings> {
        self.offload.as_ref()
    }

    /// The driver.
    pub fn driver(&self) -> &'static DriverEntry {
        self.config.driver()
    }

    /// The typed settings.
    pub fn config(&self) -> &dyn DriverConfig {
        self.config.as_ref()
    }

    /// Opens the store of queue definitions this specification describes.
    ///
    /// # Errors
    /// The backend's failure to open (see [`OpenError`]).
    pub async fn open_queues(&self) -> Result<Arc<dyn QueuesStore>, OpenError> {
        self.config.open_queues().await
    }

    /// Opens the partition store this specification describes.
    ///
    /// # Errors
    /// The backend's failure to open (see [`OpenError`]).
    pub async fn open_partitions(&self) -> Result<Arc<dyn PartitionStore>, OpenError> {
        let store = self.config.open_partitions().await?;
        // With the wrapper compiled in, every partition store gets it, also without offload or compression: a
        // store whose settings turned compression or offload off still holds frames written before, which must
        // keep reading as the payloads they stand for (the wrapper is then a byte comparison per payload).
        #[cfg(feature = "s3")]
        {
            let driver = self.driver().name;
            let settings = self.offload.clone().unwrap_or_default();
            let wrapped = crate::offload::OffloadStore::new(store, &self.store_name, settings)
                .map_err(|source| OpenError::Backend { driver, source })?;
            Ok(wrapped)
        }
        // `offload::parse` refuses the settings in a build without the wrapper.
        #[cfg(not(feature = "s3"))]
        Ok(store)
    }
}

/// What is wrong with a store specification. Messages name the key relative to the store entry
/// (`config.storage-dir: ...`, `driver: ...`) so the caller only prefixes the entry.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// No driver has this name.
    #[error("driver: invalid driver; '{name}' is not one of ({known}){aliases}")]
    UnknownDriver {
        /// The name given.
        name: String,
        /// The known drivers.
        known: String,
        /// Aliases worth mentioning (` (badger is accepted as an alias of fjall)`), or nothing.
        aliases: String,
    },
    /// The driver exists but this build does not include it.
    #[error("driver: driver '{driver}' is not compiled into this build; rebuild with `--features {driver}`")]
    NotCompiled {
        /// The driver.
        driver: &'static str,
    },
    /// A key of another driver.
    #[error("config.{key}: not a setting of driver '{driver}'")]
    NotASetting {
        /// The key.
        key: String,
        /// The driver.
        driver: &'static str,
    },
    /// A key no driver takes (a typo, usually).
    #[error("config.{key}: unknown setting; driver '{driver}' takes ({known})")]
    UnknownSetting {
        /// The key.
        key: String,
        /// The driver.
        driver: &'static str,
        /// The keys it takes.
        known: String,
    },
    /// A key the driver needs.
    #[error("config.{key}: required by driver '{driver}'")]
    Missing {
        /// The key.
        key: &'static str,
        /// The driver.
        driver: &'static str,
    },
    /// A value the driver cannot use.
    #[error("config.{key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

/// A store that could not be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The backend refused (a locked directory, an unreachable database, data of another format...).
    #[error("cannot open the {driver} store: {source}")]
    Backend {
        /// The driver.
        driver: &'static str,
        /// The backend's error.
        #[source]
        source: StorageError,
    },
    /// Opening panicked or was cancelled on the blocking thread pool.
    #[error("cannot open the {driver} store: the opening task failed: {source}")]
    Task {
        /// The driver.
        driver: &'static str,
        /// Why the task ended.
        #[source]
        source: tokio::task::JoinError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::new(|s| match s {
            "1s" => Ok(Duration::from_secs(1)),
            other => Err(format!("invalid duration '{other}'")),
        })
    }

    #[test]
    fn names_and_aliases_resolve() {
        assert_eq!(lookup("memory").expect("memory").name, "memory");
        assert_eq!(lookup("InMemory").expect("alias").name, "memory");
        assert_eq!(lookup("badger").expect("alias").name, "fjall");
        assert_eq!(lookup("PostgreSQL").expect("alias").name, "postgres");
        let e = lookup("mysql").expect_err("unknown").to_string();
        assert!(
            e.contains("'mysql'")
                && e.contains("memory, fjall, postgres")
                && e.contains("badger is accepted as an alias of fjall"),
            "{e}"
        );
    }

    #[test]
    fn every_driver_is_listed_once() {
        let mut names: Vec<&str> = DRIVERS
            .iter()
            .flat_map(|d| std::iter::once(d.name).chain(d.aliases.iter().copied()))
            .collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a name or alias is used by two drivers");
    }

    #[test]
    fn keys_are_checked_by_name() {
        let e = StoreSpec::from_settings("memory", &settings().with("storage-dir", "/x"))
            .expect_err("memory dir");
        assert_eq!(
            e.to_string(),
            "config.storage-dir: not a setting of driver 'memory'"
        );
        let e = StoreSpec::from_settings("memory", &settings().with("storge-dir", "/x")).expect_err("typo");
        assert!(
            e.to_string().starts_with("config.storge-dir: unknown setting"),
            "{e}"
        );
        StoreSpec::from_settings("memory", &settings()).expect("memory needs nothing");
        // Its one key of its own: the budget, checked as the log driver's.
        let spec =
            StoreSpec::from_settings("memory", &settings().with("max-memory", "64MiB")).expect("a budget");
        assert!(
            format!("{spec:?}").contains("max_memory: Some(67108864)"),
            "{spec:?}"
        );
        let e =
            StoreSpec::from_settings("memory", &settings().with("max-memory", "100")).expect_err("too small");
        assert!(
            e.to_string()
                .starts_with("config.max-memory: must be at least 1MiB"),
            "{e}"
        );
    }

    /// `memory-window-bytes` is a size of at least 1 MiB, 256 MiB when not given.
    #[test]
    fn fjall_memory_window_bytes_is_a_size() {
        if !fjall::DRIVER.compiled {
            return;
        }
        let window = |v: Option<&str>| {
            let mut s = settings().with("storage-dir", "d");
            if let Some(v) = v {
                s.insert("memory-window-bytes", v);
            }
            StoreSpec::from_settings("fjall", &s).map(|spec| {
                format!("{:?}", spec.config())
                    .split("memory_window_bytes: ")
                    .nth(1)
                    .and_then(|r| r.split(',').next())
                    .unwrap_or_default()
                    .to_string()
            })
        };
        assert_eq!(window(None).expect("default"), (256u64 << 20).to_string());
        assert_eq!(window(Some("64MiB")).expect("64MiB"), (64u64 << 20).to_string());
        assert_eq!(window(Some("2000000")).expect("bytes"), "2000000");
        for bad in ["1000", "lots", "0"] {
            let e = window(Some(bad)).expect_err(bad).to_string();
            assert!(e.starts_with("config.memory-window-bytes: "), "{bad}: {e}");
        }
    }

    /// The log driver reads `durability` as fjall does, bounds `checkpoint-bytes`, names a key it does not take,
    /// and refuses cold segments (everything it holds is in RAM and its log).
    #[cfg(target_os = "linux")]
    /// Half of what /proc/meminfo (or the cgroup) says: some memory, less than the machine has.
    #[test]
    fn the_default_budget_is_half_the_memory() {
        let half = super::default_max_memory().expect("Linux says how much memory there is");
        let total_kb: u64 = std::fs::read_to_string("/proc/meminfo")
            .expect("meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("MemTotal");
        assert!(half > 0 && half <= total_kb * 1024 / 2, "{half} of {total_kb} kB");
    }

    /// The budget `share_memory` left on a spec, read from its settings (`None`: no RAM budget).
    fn budget(spec: &StoreSpec) -> Option<Option<u64>> {
        spec.config().ram_budget()
    }

    /// Stores that hold their items in RAM without `max-memory` split what the others' budgets leave of the
    /// default; budgets set stay; other stores are not counted; too little left is refused, naming the store.
    #[test]
    fn stores_in_ram_share_the_default_budget() {
        const GIB: u64 = 1 << 30;
        let memory = |max: Option<&str>| {
            let mut s = settings();
            if let Some(m) = max {
                s.insert("max-memory", m);
            }
            StoreSpec::from_settings("memory", &s).expect("memory")
        };
        let log = || {
            log::DRIVER
                .compiled
                .then(|| StoreSpec::from_settings("log", &settings().with("storage-dir", "d")).expect("log"))
        };
        // Two without a budget: half each.
        let (mut a, mut b) = (memory(None), memory(None));
        share_memory(&mut [&mut a, &mut b], Some(8 * GIB)).expect("shared");
        assert_eq!(
            (budget(&a), budget(&b)),
            (Some(Some(4 * GIB)), Some(Some(4 * GIB)))
        );
        // One alone keeps the whole default; without a known default nothing changes.
        let mut a = memory(None);
        share_memory(&mut [&mut a], Some(8 * GIB)).expect("alone");
        assert_eq!(budget(&a), Some(Some(8 * GIB)));
        let (mut a, mut b) = (memory(None), memory(None));
        share_memory(&mut [&mut a, &mut b], None).expect("unknown");
        assert_eq!((budget(&a), budget(&b)), (Some(None), Some(None)));
        // A budget set is taken off the default first, and kept.
        let (mut a, mut b, mut c) = (memory(Some("2GiB")), memory(None), memory(None));
        share_memory(&mut [&mut a, &mut b, &mut c], Some(8 * GIB)).expect("shared");
        assert_eq!(
            (budget(&a), budget(&b), budget(&c)),
            (Some(Some(2 * GIB)), Some(Some(3 * GIB)), Some(Some(3 * GIB)))
        );
        // A store whose items are not in RAM takes no share.
        let mut f = StoreSpec::from_settings("fjall", &settings().with("storage-dir", "d"))
            .or_else(|_| {
                StoreSpec::from_settings("postgres", &settings().with("connection-string", "postgres://x"))
            })
            .ok();
        let mut a = memory(None);
        let mut specs: Vec<&mut StoreSpec> = f.iter_mut().collect();
        specs.push(&mut a);
        share_memory(&mut specs, Some(8 * GIB)).expect("shared");
        assert_eq!(budget(&a), Some(Some(8 * GIB)));
        if let Some(f) = &f {
            assert_eq!(budget(f), None);
        }
        // The log driver too.
        if let Some(mut l) = log() {
            let mut a = memory(None);
            share_memory(&mut [&mut a, &mut l], Some(8 * GIB)).expect("shared");
            assert_eq!(
                (budget(&a), budget(&l)),
                (Some(Some(4 * GIB)), Some(Some(4 * GIB)))
            );
        }
        // Budgets set that take the whole default leave nothing: the first store without one is named.
        let (mut a, mut b, mut c) = (memory(Some("6GiB")), memory(Some("2GiB")), memory(None));
        let (i, e) = share_memory(&mut [&mut a, &mut b, &mut c], Some(8 * GIB)).expect_err("nothing left");
        assert_eq!(i, 2);
        let e = e.to_string();
        assert!(
            e.starts_with("config.max-memory: required here:")
                && e.contains("(8192 MiB)")
                && e.contains("(8192 MiB) leaves less than 1MiB to each of the 1 without one"),
            "{e}"
        );
        assert_eq!(budget(&c), Some(None), "unchanged on error");
        // Budgets set beyond the default, with no store left to the default, are the operator's choice.
        let (mut a, mut b) = (memory(Some("6GiB")), memory(Some("6GiB")));
        share_memory(&mut [&mut a, &mut b], Some(8 * GIB)).expect("all set");
        assert_eq!(
            (budget(&a), budget(&b)),
            (Some(Some(6 * GIB)), Some(Some(6 * GIB)))
        );
    }

    #[test]
    fn log_driver_settings_are_checked() {
        if !log::DRIVER.compiled {
            let e = StoreSpec::from_settings("log", &settings()).expect_err("not compiled");
            assert!(matches!(e, SpecError::NotCompiled { driver: "log" }), "{e}");
            return;
        }
        let e = StoreSpec::from_settings("log", &settings()).expect_err("no dir");
        assert_eq!(e.to_string(), "config.storage-dir: required by driver 'log'");
        let spec = StoreSpec::from_settings(
            "log",
            &settings()
                .with("storage-dir", "d")
                .with("durability", "none")
                .with("checkpoint-bytes", "1MiB"),
        )
        .expect("valid");
        assert_eq!(spec.driver().name, "log");
        let e = StoreSpec::from_settings(
            "log",
            &settings()
                .with("storage-dir", "d")
                .with("checkpoint-bytes", "1KiB"),
        )
        .expect_err("too small");
        assert!(
            e.to_string()
                .starts_with("config.checkpoint-bytes: must be at least 64KiB"),
            "{e}"
        );
        let spec = StoreSpec::from_settings(
            "log",
            &settings().with("storage-dir", "d").with("max-memory", "2GiB"),
        )
        .expect("valid");
        assert!(
            format!("{spec:?}").contains("max_memory: Some(2147483648)"),
            "{spec:?}"
        );
        let e = StoreSpec::from_settings(
            "log",
            &settings().with("storage-dir", "d").with("max-memory", "64KiB"),
        )
        .expect_err("too small");
        assert!(
            e.to_string()
                .starts_with("config.max-memory: must be at least 1MiB"),
            "{e}"
        );
        let e = StoreSpec::from_settings(
            "log",
            &settings().with("storage-dir", "d").with("max-memory", "lots"),
        )
        .expect_err("not a size");
        assert!(e.to_string().starts_with("config.max-memory: "), "{e}");
        let e = StoreSpec::from_settings(
            "log",
            &settings().with("storage-dir", "d").with("durability", "often"),
        )
        .expect_err("bad mode");
        assert!(e.to_string().contains("'often' is not one of"), "{e}");
        let e = StoreSpec::from_settings(
            "log",
            &settings()
                .with("storage-dir", "d")
                .with("memory-window-items", "10"),
        )
        .expect_err("a fjall key");
        assert!(e.to_string().contains("memory-window-items"), "{e}");
        let e = StoreSpec::from_settings(
            "log",
            &settings().with("storage-dir", "d").with("cold-segments", "s3-0"),
        )
        .expect_err("no cold segments");
        assert!(e.to_string().starts_with("config.cold-segments: "), "{e}");
    }

    #[test]
    fn driver_settings_are_checked() {
        if fjall::DRIVER.compiled {
            let e = StoreSpec::from_settings("fjall", &settings()).expect_err("no dir");
            assert_eq!(e.to_string(), "config.storage-dir: required by driver 'fjall'");
            let e = StoreSpec::from_settings(
                "fjall",
                &settings().with("storage-dir", "d").with("durability", "often"),
            )
            .expect_err("bad mode");
            assert!(
                e.to_string()
                    .contains("'often' is not one of (sync, interval, none)"),
                "{e}"
            );
            let e = StoreSpec::from_settings(
                "fjall",
                &settings()
                    .with("storage-dir", "d")
                    .with("durability", "interval")
                    .with("sync-interval", "2x"),
            )
            .expect_err("bad interval");
            assert!(
                e.to_string()
                    .starts_with("config.sync-interval: invalid duration"),
                "{e}"
            );
            StoreSpec::from_settings(
                "badger",
                &settings()
                    .with("storage-dir", "d")
                    .with("durability", "interval")
                    .with("sync-interval", "1s"),
            )
            .expect("valid fjall settings");
        } else {
            let e = StoreSpec::from_settings("fjall", &settings()).expect_err("not compiled");
            assert!(matches!(e, SpecError::NotCompiled { driver: "fjall" }), "{e}");
        }
        if postgres::DRIVER.compiled {
            let e = StoreSpec::from_settings("postgres", &settings()).expect_err("no url");
            assert_eq!(
                e.to_string(),
                "config.connection-string: required by driver 'postgres'"
            );
            let e = StoreSpec::from_settings(
                "postgres",
                &settings()
                    .with("connection-string", "postgres://x")
                    .with("max-conns", "ten"),
            )
            .expect_err("bad pool size");
            assert!(
                e.to_string()
                    .starts_with("config.max-conns: 'ten' is not a whole number"),
                "{e}"
            );
            // The pool reserves room for every connection: a size beyond any server's limit is refused.
            let e = StoreSpec::from_settings(
                "postgres",
                &settings()
                    .with("connection-string", "postgres://x")
                    .with("max-conns", "4294967295"),
            )
            .expect_err("huge pool");
            assert_eq!(
                e.to_string(),
                "config.max-conns: 4294967295 is more than the 10000 connections a pool may open"
            );
        }
    }

    #[tokio::test]
    async fn memory_spec_opens_both_kinds() {
        let spec = StoreSpec::from_settings("memory", &settings()).expect("spec");
        assert_eq!(spec.driver().name, "memory");
        let queues = spec.open_queues().await.expect("queues");
        assert!(queues.get("nothing").await.expect("get").is_none());
        let parts = spec.open_partitions().await.expect("partitions");
        assert_eq!(parts.driver(), "memory");
    }
}
