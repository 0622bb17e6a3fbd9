//! Errors of the auth layer. `Display` is the client-facing message in Querator's `<constant>; <details>` form;
//! `lessor-server` maps each variant to a wire code in exactly one place.

use thiserror::Error;

use crate::error::StorageError;

/// An authentication, authorisation or auth-administration failure.
///
/// Deliberately not `#[non_exhaustive]`: the server's mapping to wire codes is an exhaustive match.
#[derive(Debug, Error, Clone)]
pub enum AuthError {
    /// No key, and anonymous requests are not allowed to do this (401).
    #[error("authentication required")]
    Unauthenticated,
    /// An `Authorization` header that is not `Bearer <key>` (401).
    #[error("invalid authorization header format")]
    BadHeader,
    /// A well-formed key that no user holds (401).
    #[error("api key does not exist")]
    UnknownKey,
    /// A key past its expiry (401).
    #[error("api key has expired")]
    ExpiredKey,
    /// A malformed key, or one that could not be checked (401).
    #[error("api key is invalid")]
    InvalidKey,
    /// The principal lacks the permission (403).
    #[error("access denied")]
    AccessDenied,
    /// Input that breaks a rule, or a conflict with stored state; the message names the field and the rule (400).
    #[error("{0}")]
    Invalid(String),
    /// A record the request names does not exist (453, as Querator's `... does not exist; ...`).
    #[error("{0}")]
    NotFound(String),
    /// Permissions could not be read from storage (453).
    #[error("authorization check failed")]
    CheckFailed,
    /// A transient storage failure; the request was not applied (454).
    #[error("internal error, try your request again; {0}")]
    Transient(String),
    /// A storage failure that retrying will not fix (453).
    #[error("storage failure; {0}")]
    StorageFailed(String),
}

impl AuthError {
    /// An [`AuthError::Invalid`] in the `<field> is invalid; <rule>` form.
    pub fn invalid(field: &str, rule: impl std::fmt::Display) -> Self {
        AuthError::Invalid(format!("{field} is invalid; {rule}"))
    }

    /// An [`AuthError::Invalid`] for a missing value: `<field> is required; <hint>`.
    pub fn required(field: &str, hint: impl std::fmt::Display) -> Self {
        AuthError::Invalid(format!("{field} is required; {hint}"))
    }
}

impl From<StorageError> for AuthError {
    fn from(e: StorageError) -> Self {
        if e.is_transient() {
            AuthError::Transient(e.message)
        } else {
            AuthError::StorageFailed(e.message)
        }
    }
}
