//! Lessor's storage backends and the conformance suite they all pass.
//!
//! Each backend implements the traits of [`lessor_core::storage`]. `memory` is always compiled; persistent
//! backends sit behind cargo features (`fjall`, `postgres`) so a build carries only what it uses. The
//! [`registry`] names every backend whether compiled in or not (so configuration errors can tell "unknown driver"
//! apart from "not compiled into this build"), checks each driver's settings and opens its stores: code above this
//! crate opens stores only through [`registry::StoreSpec`].
//!
//! # Layout
//! - [`registry`]: the drivers, their settings, and the one entry point that opens a store from a specification.
//! - `offload` (feature `s3`): large payloads in S3-compatible object storage and payload compression, as a
//!   wrapper the registry puts around any partition store whose settings ask for it.
//! - [`tiers`]: per-tier running counters (memory, disk, object storage) every backend keeps for its stats.
//! - [`memory`]: RAM-only queues and partitions (tests, development, ephemeral work).
//! - `testsuite` (feature `testsuite`): the conformance suite, written once and instantiated for every backend by
//!   `conformance_tests!`.

#[cfg(feature = "fjall")]
pub mod fjall;
#[cfg(feature = "fjall")]
pub mod log;
pub mod memory;
#[cfg(feature = "s3")]
pub mod offload;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod registry;
pub mod state;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;
pub mod tiers;
