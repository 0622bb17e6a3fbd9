//! The cold-segment settings of a partition store: `cold-segments` (a name from the top-level `object-storage`
//! list), `cold-after-depth`, `cold-segment-items`, `cold-segment-bytes` and `cold-prefetch-items`. Every driver's
//! key check knows them, so a memory or PostgreSQL store that names them gets a config error saying why the driver
//! does not take them, not an "unknown setting".
//!
//! Which drivers move backlog to segments is decided here ([`DRIVERS_WITH_SEGMENTS`]): PostgreSQL never (the
//! database is already the tier that holds a deep backlog off the server's memory, and its rows cannot be moved
//! out of a transaction's reach); fjall and memory in builds with object storage (memory keeps its manifest in
//! RAM like everything else, and deletes the previous run's segments when it opens; see docs/operations.md, "Cold
//! backlog segments").

use super::offload::parse_size;
use super::{ObjectStoreConfig, Settings, SpecError};

/// The keys of this module.
pub const KEYS: &[&str] = &[
    "cold-segments",
    "cold-after-depth",
    "cold-segment-items",
    "cold-segment-bytes",
    "cold-prefetch-items",
];

/// Drivers that spill paged backlog to cold segments in this build.
pub const DRIVERS_WITH_SEGMENTS: &[&str] = if cfg!(feature = "s3") {
    &["fjall", "memory"]
} else {
    &[]
};

/// Default `cold-after-depth`: paged items further than this from the head of their priority may go cold.
pub const DEFAULT_AFTER_DEPTH: u64 = 1_000_000;
/// Default `cold-segment-items`: most items per segment. A segment is committed (its records deleted after a
/// spill, put back after a load) in one write under the partition's lock, which holds the queue up meanwhile:
/// 100,000 items per segment put the head's lease p99 at 3x a shallow queue's at 20M items deep, so segments are
/// kept small (docs/benchmarks.md, "Cold backlog segments"). Object requests stay few: one per 10,000 items.
pub const DEFAULT_SEGMENT_ITEMS: u32 = 10_000;
/// Default `cold-segment-bytes`: most record bytes per segment (before compression); bounds the same write for
/// large items.
pub const DEFAULT_SEGMENT_BYTES: usize = 4 << 20;
/// Largest `cold-segment-bytes` accepted (a segment is held whole in memory while it is written or loaded).
pub const MAX_SEGMENT_BYTES: usize = 256 << 20;
/// Default `cold-prefetch-items`, in segments (at most half of `cold-after-depth`): a segment is loaded once the disk-resident part of its priority's
/// backlog ahead of it is shorter than this many segments' worth of items, so at a steady lease rate the next
/// segment is back on disk before the head reaches it.
pub const DEFAULT_PREFETCH_SEGMENTS: u64 = 2;

/// Where and when a partition store moves paged backlog to object storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColdSettings {
    /// The object store segments go to.
    pub object_store: ObjectStoreConfig,
    /// Paged items further than this from the head of their priority's backlog may go cold.
    pub after_depth: u64,
    /// Most items in one segment.
    pub segment_items: u32,
    /// Most record bytes in one segment (before compression); a segment closes at whichever cap comes first.
    pub segment_bytes: usize,
    /// A segment is loaded back when fewer than this many disk-resident paged items stand before it.
    pub prefetch_items: u64,
}

/// Reads this module's keys for a store of driver `driver`; `None` when `cold-segments` is absent.
pub(super) fn parse(s: &Settings, driver: &'static str) -> Result<Option<ColdSettings>, SpecError> {
    parse_with(s, driver, DRIVERS_WITH_SEGMENTS.contains(&driver))
}

/// [`parse`] with whether the driver moves backlog to segments given (tests check the values for any driver).
fn parse_with(
    s: &Settings,
    driver: &'static str,
    supported: bool,
) -> Result<Option<ColdSettings>, SpecError> {
    let name = s.text("cold-segments").map(str::trim).filter(|n| !n.is_empty());
    let Some(name) = name else {
        if let Some(key) = KEYS[1..].iter().find(|k| s.text(k).is_some()) {
            return Err(SpecError::Invalid {
                key,
                reason: "applies only together with cold-segments".into(),
            });
        }
        return Ok(None);
    };
    if !supported {
        return Err(SpecError::Invalid {
            key: "cold-segments",
            reason: match driver {
                "postgres" => "driver 'postgres' keeps its backlog in the database, which is already the tier \
                               beyond memory; use partition-level retention or a fjall store for cold segments"
                    .into(),
                "memory" | "fjall" => {
                    format!("driver '{driver}' moves backlog to cold segments only in builds with object storage (feature s3)")
                }
                other => format!("driver '{other}' does not move backlog to cold segments in this build"),
            },
        });
    }
    let Some(object_store) = s.object_stores.iter().find(|c| c.name == name).cloned() else {
        let known: Vec<&str> = s.object_stores.iter().map(|c| c.name.as_str()).collect();
        return Err(SpecError::Invalid {
            key: "cold-segments",
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
    let segment_items = match s.u32("cold-segment-items")? {
        None => DEFAULT_SEGMENT_ITEMS,
        Some(0) => {
            return Err(SpecError::Invalid {
                key: "cold-segment-items",
                reason: "must be at least 1 (most items in one segment)".into(),
            })
        }
        Some(n) => n,
    };
    let segment_bytes = match s.text("cold-segment-bytes") {
        None => DEFAULT_SEGMENT_BYTES,
        Some(t) => {
            let n = parse_size(t).map_err(|reason| SpecError::Invalid {
                key: "cold-segment-bytes",
                reason,
            })?;
            if n == 0 || n > MAX_SEGMENT_BYTES {
                return Err(SpecError::Invalid {
                    key: "cold-segment-bytes",
                    reason: format!("must be above 0 and at most 256MiB, got {n} bytes"),
                });
            }
            n
        }
    };
    let after_depth = match s.u32("cold-after-depth")? {
        None => DEFAULT_AFTER_DEPTH,
        Some(0) => {
            return Err(SpecError::Invalid {
                key: "cold-after-depth",
                reason: "must be at least 1 (paged items kept on disk ahead of the first segment)".into(),
            })
        }
        Some(n) => u64::from(n),
    };
    let prefetch_items = match s.u32("cold-prefetch-items")? {
        // Two segments ahead, but never so far that a segment would be due for loading as soon as it is written.
        None => (DEFAULT_PREFETCH_SEGMENTS * u64::from(segment_items)).min(after_depth / 2),
        Some(n) => u64::from(n),
    };
    if prefetch_items >= after_depth {
        return Err(SpecError::Invalid {
            key: "cold-prefetch-items",
            reason: format!(
                "must be below cold-after-depth ({after_depth}), got {prefetch_items}: a segment would be loaded \
                 back as soon as it was written"
            ),
        });
    }
    Ok(Some(ColdSettings {
        object_store,
        after_depth,
        segment_items,
        segment_bytes,
        prefetch_items,
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::StoreSpec;

    fn settings() -> Settings {
        Settings::new(|_| Ok(Duration::from_secs(1))).with_object_stores(vec![ObjectStoreConfig {
            name: "s3-0".into(),
            bucket: "b".into(),
            ..Default::default()
        }])
    }

    fn err(s: &Settings) -> String {
        parse_with(s, "fjall", true).expect_err("refused").to_string()
    }

    #[test]
    fn defaults_and_values_are_read() {
        assert_eq!(parse_with(&settings(), "fjall", true), Ok(None));
        let c = parse_with(&settings().with("cold-segments", "s3-0"), "fjall", true)
            .expect("valid")
            .expect("on");
        assert_eq!(
            (
                c.object_store.name.as_str(),
                c.after_depth,
                c.segment_items,
                c.segment_bytes,
                c.prefetch_items
            ),
            ("s3-0", 1_000_000, 10_000, 4 << 20, 20_000)
        );
        let c = parse_with(
            &settings()
                .with("cold-segments", "s3-0")
                .with("cold-after-depth", "10")
                .with("cold-segment-items", "20")
                .with("cold-segment-bytes", "1MiB")
                .with("cold-prefetch-items", "5"),
            "fjall",
            true,
        )
        .expect("valid")
        .expect("on");
        assert_eq!(
            (c.after_depth, c.segment_items, c.segment_bytes, c.prefetch_items),
            (10, 20, 1 << 20, 5)
        );
        // Without cold-prefetch-items: two segments, at most half the depth.
        let c = parse_with(
            &settings()
                .with("cold-segments", "s3-0")
                .with("cold-after-depth", "5000")
                .with("cold-segment-items", "5000"),
            "fjall",
            true,
        )
        .expect("valid")
        .expect("on");
        assert_eq!(c.prefetch_items, 2500);
    }

    #[test]
    fn bad_values_name_their_key() {
        let on = || settings().with("cold-segments", "s3-0");
        assert!(err(&settings().with("cold-segments", "nope"))
            .starts_with("config.cold-segments: 'nope' is not declared"));
        assert!(err(&settings().with("cold-after-depth", "5"))
            .starts_with("config.cold-after-depth: applies only together with cold-segments"));
        assert!(err(&on().with("cold-after-depth", "0"))
            .starts_with("config.cold-after-depth: must be at least 1"));
        assert!(err(&on().with("cold-segment-items", "0"))
            .starts_with("config.cold-segment-items: must be at least 1"));
        assert!(err(&on().with("cold-segment-bytes", "1GiB"))
            .starts_with("config.cold-segment-bytes: must be above 0"));
        assert!(err(&on().with("cold-segment-bytes", "lots"))
            .starts_with("config.cold-segment-bytes: 'lots' is not a size"));
        assert!(err(&on()
            .with("cold-after-depth", "10")
            .with("cold-prefetch-items", "10"))
        .starts_with("config.cold-prefetch-items: must be below cold-after-depth (10)"));
    }

    #[test]
    fn drivers_without_segments_refuse_them_by_name() {
        // Memory takes them in builds with object storage (this crate's tests may run without).
        let m = StoreSpec::from_settings("memory", &settings().with("cold-segments", "s3-0"));
        if cfg!(feature = "s3") {
            assert!(m.is_ok(), "{:?}", m.err().map(|e| e.to_string()));
        } else {
            let e = m.expect_err("memory without s3").to_string();
            assert!(e.contains("only in builds with object storage"), "{e}");
        }
        let e = parse_with(&settings().with("cold-segments", "s3-0"), "postgres", false)
            .expect_err("postgres")
            .to_string();
        assert!(
            e.contains("driver 'postgres' keeps its backlog in the database"),
            "{e}"
        );
        // Keys of this module are known to every driver: never reported as unknown.
        let e = StoreSpec::from_settings("memory", &settings().with("cold-after-depth", "3"))
            .expect_err("alone")
            .to_string();
        assert!(e.contains("applies only together with cold-segments"), "{e}");
    }
}
