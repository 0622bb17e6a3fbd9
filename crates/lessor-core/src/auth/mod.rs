//! Multi-tenancy and access control: Querator's model of namespaces, users, API keys, roles and role bindings,
//! working from any queue-storage backend.
//!
//! - [`permission`]: the 29 permissions, permission sets and the standard roles.
//! - [`model`]: the stored records and the [`model::Principal`] a request runs as.
//! - [`key`]: the `qtr-<tag>-<entropy>` key format, minting and hashing.
//! - [`store`]: [`store::AuthStore`], the ordered key-value trait each backend implements.
//! - [`memory`]: the in-RAM [`store::AuthStore`].
//! - [`records`]: where records and indexes live in that key space.
//! - [`service`]: [`Auth`], authentication and authorisation with a cache that costs no storage round trip per
//!   request, and cross-server revocation through the store's generation.
//! - [`admin`]: creating, listing and deleting records with Querator's rules, and the bootstrap run at start.
//! - [`error`]: the layer's error, [`AuthError`].

pub mod admin;
pub mod error;
pub mod key;
pub mod memory;
pub mod model;
pub mod permission;
pub mod records;
pub mod service;
pub mod store;

#[cfg(test)]
mod tests;

pub use admin::{BootstrapReport, KeySpec, NamespaceSpec};
pub use error::AuthError;
pub use model::{ApiKey, Namespace, Principal, Role, RoleBinding, User};
pub use permission::{Permission, PermissionSet};
pub use service::{Auth, AuthMode};
pub use store::{AuthStore, Check, CheckFailed, Commit, Write};
