//! Lessor's storage backends and the conformance suite they all pass.
//!
//! Each backend implements the traits of [`lessor_core::storage`]. `memory` is always compiled; persistent
//! backends sit behind cargo features (`fjall`, `postgres`) so a build carries only what it uses. [`Driver`] names
//! every backend whether compiled in or not, so configuration errors can tell "unknown driver" apart from "not
//! compiled into this build".
//!
//! # Layout
//! - [`memory`]: RAM-only queues and partitions (tests, development, ephemeral work).
//! - `testsuite` (feature `testsuite`): the conformance suite, written once and instantiated for every backend by
//!   `conformance_tests!`.

#[cfg(feature = "fjall")]
pub mod fjall;
pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod state;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;

use std::fmt;
use std::str::FromStr;

/// Every storage driver Lessor knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// RAM only.
    Memory,
    /// Embedded LSM engine (fjall); `badger` is accepted as an alias for the seeds' configuration files.
    Fjall,
    /// PostgreSQL.
    Postgres,
}

impl Driver {
    /// All drivers, for error messages.
    pub const ALL: [Driver; 3] = [Driver::Memory, Driver::Fjall, Driver::Postgres];

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Driver::Memory => "memory",
            Driver::Fjall => "fjall",
            Driver::Postgres => "postgres",
        }
    }

    /// Whether this build includes the driver.
    pub fn compiled(self) -> bool {
        match self {
            Driver::Memory => true,
            Driver::Fjall => cfg!(feature = "fjall"),
            Driver::Postgres => cfg!(feature = "postgres"),
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Driver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "" | "memory" | "inmemory" => Ok(Driver::Memory),
            "fjall" | "badger" => Ok(Driver::Fjall),
            "postgres" | "postgresql" => Ok(Driver::Postgres),
            other => Err(format!(
                "invalid driver; '{other}' is not one of ({}) (badger is accepted as an alias of fjall)",
                Driver::ALL
                    .iter()
                    .map(|d| d.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}
