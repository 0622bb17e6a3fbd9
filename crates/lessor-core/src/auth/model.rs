//! The records of the auth model: namespaces, users, API keys, roles and role bindings, and the principal a request
//! runs as.
//!
//! They are stored as JSON documents through [`super::store::AuthStore`]; field names are part of the stored format
//! (renaming one needs a migration), and fields added later must have a default so older records still read.

use serde::{Deserialize, Serialize};

use super::permission::PermissionSet;
use crate::time::Ts;

/// An isolation boundary: queues, roles and bindings belong to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Tag embedded in API keys scoped to this namespace (empty: none).
    #[serde(default)]
    pub api_key_tag: String,
    /// Creation time (kept across updates).
    pub created_at: Ts,
    /// Last update.
    #[serde(default)]
    pub updated_at: Ts,
}

/// Someone (or something) that holds API keys and is bound to roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Generated id.
    pub id: String,
    /// Unique name.
    pub username: String,
    /// Contact address, not verified.
    #[serde(default)]
    pub email: String,
    /// Id in an external directory.
    #[serde(default)]
    pub external_id: String,
    /// Creation time.
    pub created_at: Ts,
    /// Last update.
    #[serde(default)]
    pub updated_at: Ts,
}

/// An API key's stored record. The key itself is never stored: only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// Generated id.
    pub id: String,
    /// The user the key authenticates as.
    pub user_id: String,
    /// When set, the key works only in this namespace (and in `_system` through `_system` bindings).
    #[serde(default)]
    pub namespace_scope: String,
    /// Free text.
    #[serde(default)]
    pub name: String,
    /// `qtr-<tag>-<first 8 entropy characters>`, for display.
    pub prefix: String,
    /// SHA-256 of the whole key, hex.
    pub hash: String,
    /// When the key stops working; zero: never.
    #[serde(default)]
    pub expires_at: Ts,
    /// When the key was last seen by a server whose cache did not hold it.
    #[serde(default)]
    pub last_used_at: Ts,
    /// Creation time.
    pub created_at: Ts,
}

/// A named set of permissions in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Generated id.
    pub id: String,
    /// The namespace the role belongs to.
    pub namespace: String,
    /// Name, unique in the namespace.
    pub name: String,
    /// Permission names, each one of [`super::permission::Permission`].
    pub permissions: Vec<String>,
    /// Creation time.
    pub created_at: Ts,
    /// Last update.
    #[serde(default)]
    pub updated_at: Ts,
}

impl Role {
    /// The role's permissions as a set; names this build does not know grant nothing.
    pub fn permission_set(&self) -> PermissionSet {
        self.permissions.iter().filter_map(|p| p.parse().ok()).collect()
    }
}

/// A user holding a role in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleBinding {
    /// Generated id.
    pub id: String,
    /// The namespace the grant applies to (the role's namespace).
    pub namespace: String,
    /// The user.
    pub user_id: String,
    /// The role.
    pub role_id: String,
    /// Creation time.
    pub created_at: Ts,
}

/// Who a request runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's id; [`ANONYMOUS`] for a request without a key.
    pub user_id: String,
    /// The user's name.
    pub username: String,
    /// The key's namespace scope (empty: none).
    pub namespace_scope: String,
    /// The key's id (empty without a key).
    pub key_id: String,
}

/// User id (and name) of requests that carry no key.
pub const ANONYMOUS: &str = "anonymous";

impl Principal {
    /// The principal of a request without a key.
    pub fn anonymous() -> Principal {
        Principal {
            user_id: ANONYMOUS.to_string(),
            username: ANONYMOUS.to_string(),
            namespace_scope: String::new(),
            key_id: String::new(),
        }
    }

    /// Whether the request carried no key.
    pub fn is_anonymous(&self) -> bool {
        self.key_id.is_empty()
    }
}
