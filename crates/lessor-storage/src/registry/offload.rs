//! The settings every partition driver shares for payloads: `payload-offload` (a name from the top-level
//! `object-storage` list), `offload-threshold`, `compression`, `offload-sweep-interval` and `offload-grace`. The
//! registry reads them here, apart from the driver's own keys, and wraps the opened store in
//! `crate::offload::OffloadStore` (feature `s3`) when they ask for it.

use std::fmt;
use std::time::Duration;

use super::{Settings, SpecError};

/// Default `offload-threshold`: payloads longer than this go to object storage.
pub const DEFAULT_THRESHOLD: usize = 64 * 1024;
/// Default `offload-sweep-interval`: time between two sweeps for orphaned objects.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Default `offload-grace`: unreferenced objects younger than this are never swept (a produce may still be
/// writing them, possibly on another server sharing the database).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Largest `offload-threshold` accepted.
const MAX_THRESHOLD: usize = 1 << 30;

/// The keys of this module, accepted by every partition driver.
pub const KEYS: &[&str] = &[
    "payload-offload",
    "offload-threshold",
    "compression",
    "offload-sweep-interval",
    "offload-grace",
];

/// One entry of the top-level `object-storage` list: where an S3-compatible bucket is and how to sign in.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ObjectStoreConfig {
    /// The name stores refer to (`payload-offload: NAME`).
    pub name: String,
    /// Endpoint URL (`http://127.0.0.1:9000`); empty: AWS.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// The region (`us-east-1` when empty).
    pub region: String,
    /// Access key id (the server's configuration falls back to `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// Secret access key (the server's configuration falls back to `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// `ENDPOINT/BUCKET` addressing (most self-hosted servers) instead of `BUCKET.ENDPOINT`.
    pub path_style: bool,
    /// Prepended to every key (`lessor/`).
    pub prefix: String,
}

impl fmt::Debug for ObjectStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("ObjectStoreConfig")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Payload compression of a store (`compression: none|lz4|zstd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Payloads stored as given.
    #[default]
    None,
    /// LZ4 block compression (fast, moderate ratio).
    Lz4,
    /// zstd level 3 (slower, better ratio).
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!("'{other}' is not one of (none, lz4, zstd)")),
        }
    }
}

/// What a store does with payloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffloadSettings {
    /// Where large payloads go; `None`: every payload stays in the store (compression only).
    pub object_store: Option<ObjectStoreConfig>,
    /// Payloads longer than this many bytes are offloaded.
    pub threshold: usize,
    /// Compression of inline payloads and of object bodies.
    pub compression: Compression,
    /// Time between sweeps.
    pub sweep_interval: Duration,
    /// Unreferenced objects younger than this are kept.
    pub grace: Duration,
}

impl Default for OffloadSettings {
    fn default() -> Self {
        OffloadSettings {
            object_store: None,
            threshold: DEFAULT_THRESHOLD,
            compression: Compression::None,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            grace: DEFAULT_GRACE,
        }
    }
}

impl OffloadSettings {
    /// Whether the store needs the wrapper at all.
    pub fn active(&self) -> bool {
        self.object_store.is_some() || self.compression != Compression::None
    }
}

/// A size: a whole number of bytes with an optional unit (`65536`, `64KiB`, `64KB`, `1MiB`, `1MB`, `1GiB`).
///
/// # Errors
/// The text, and what is expected.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!("'{text}' is not a size (a whole number with an optional unit: B, KiB, MiB, GiB, KB, MB, GB)")
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(bad)
}

/// Reads this module's keys; `None` when none of them asks for anything.
pub(super) fn parse(s: &Settings) -> Result<Option<OffloadSettings>, SpecError> {
    let mut o = OffloadSettings::default();
    if let Some(name) = s.text("payload-offload").map(str::trim).filter(|n| !n.is_empty()) {
        let found = s.object_stores.iter().find(|c| c.name == name);
        let Some(cfg) = found else {
            let known: Vec<&str> = s.object_stores.iter().map(|c| c.name.as_str()).collect();
            return Err(SpecError::Invalid {
                key: "payload-offload",
                reason: if known.is_empty() {
                    format!("'{name}' is not declared; no object-storage entry is declared")
                } else {
                    format!(
                        "'{name}' is not declared under object-storage (declared: {})",
                        known.join(", ")
                    )
                },
            });
        };
        o.object_store = Some(cfg.clone());
    }
    if let Some(t) = s.text("offload-threshold") {
        let n = parse_size(t).map_err(|reason| SpecError::Invalid {
            key: "offload-threshold",
            reason,
        })?;
        if n == 0 || n > MAX_THRESHOLD {
            return Err(SpecError::Invalid {
                key: "offload-threshold",
                reason: format!("must be above 0 and at most 1GiB, got {n} bytes"),
            });
        }
        o.threshold = n;
    }
    if let Some(c) = s.text("compression") {
        o.compression = c.parse().map_err(|reason| SpecError::Invalid {
            key: "compression",
            reason,
        })?;
    }
    for (key, slot) in [
        ("offload-sweep-interval", &mut o.sweep_interval),
        ("offload-grace", &mut o.grace),
    ] {
        if let Some(d) = s.duration(key)? {
            if key == "offload-sweep-interval" && d.is_zero() {
                return Err(SpecError::Invalid {
                    key,
                    reason: "must be above 0".into(),
                });
            }
            *slot = d;
        }
    }
    for key in ["offload-threshold", "offload-sweep-interval", "offload-grace"] {
        if s.text(key).is_some() && o.object_store.is_none() {
            return Err(SpecError::Invalid {
                key,
                reason: "applies only together with payload-offload".into(),
            });
        }
    }
    if !o.active() {
        return Ok(None);
    }
    if !cfg!(feature = "s3") {
        return Err(SpecError::Invalid {
            key: if o.object_store.is_some() {
                "payload-offload"
            } else {
                "compression"
            },
            reason: "payload offload and compression are not compiled into this build; rebuild with `--features s3`"
                .into(),
        });
    }
    Ok(Some(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size(" 1 MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("64 KX").expect_err("unit").contains("not a size"));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }
}
