//! Error types of the core layer.
//!
//! [`StorageError`] is what backends return: a [`StorageErrorKind`] the engine branches on, a message for the log,
//! and optionally the driver error underneath as its `source`. [`QueueError`] is what the engine returns to the
//! server; its `Display` is the client-facing message in Querator's `<constant>; <details>` form, and
//! `lessor-server` maps each variant to a wire code in exactly one place.

use std::sync::Arc;

use thiserror::Error;

/// What kind of failure a backend hit; the engine decides retry and health from this, never from text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageErrorKind {
    /// The backend cannot be reached or answered too late; trying again later may work.
    Unavailable,
    /// The disk (or database) is out of space; writes resume once space is back.
    NoSpace,
    /// A write's durability is unknown (a failed fsync): the store refuses writes until it is reopened.
    Poisoned,
    /// Another process holds the store.
    Locked,
    /// The stored data is not in a format this build reads.
    Corrupt,
    /// The record to add already exists.
    AlreadyExists,
    /// The configuration of the store is wrong.
    Config,
    /// The object storage that holds an item's payload could not be written or read; the partition itself is fine,
    /// so the engine answers the request (454) without marking the partition failed.
    PayloadUnavailable,
    /// The store holds as much as its memory budget allows (the log store's `max-memory`): calls that would add
    /// items are refused until consumers make room; the partition goes on serving everything else.
    Full,
    /// Anything else.
    Other,
}

impl StorageErrorKind {
    /// The kind in words, as it starts a log line.
    pub fn describe(self) -> &'static str {
        match self {
            StorageErrorKind::Unavailable => "storage unavailable",
            StorageErrorKind::NoSpace => "storage out of space",
            StorageErrorKind::Poisoned => "storage refuses writes after a failed sync",
            StorageErrorKind::Locked => "storage locked by another process",
            StorageErrorKind::Corrupt => "stored data unreadable",
            StorageErrorKind::AlreadyExists => "record already exists",
            StorageErrorKind::Config => "storage misconfigured",
            StorageErrorKind::PayloadUnavailable => "payload storage unavailable",
            StorageErrorKind::Full => "storage full",
            StorageErrorKind::Other => "storage failed",
        }
    }
}

impl std::fmt::Display for StorageErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The underlying error a [`StorageError`] was built from; shared so the error stays `Clone` (one failed storage
/// call answers every request of its batch).
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A backend failure: what kind (the engine branches on it), what failed (for the log), and optionally the error
/// from the driver underneath, kept as the [`std::error::Error::source`] so a log line can print the whole chain.
#[derive(Debug, Error, Clone)]
#[error("{kind}: {message}")]
pub struct StorageError {
    /// What kind of failure.
    pub kind: StorageErrorKind,
    /// Details for logs and operators.
    pub message: String,
    /// The driver's error underneath, when there is one.
    #[source]
    pub source: Option<ErrorSource>,
}

impl StorageError {
    /// Builds an error of `kind`.
    pub fn new(kind: StorageErrorKind, message: impl Into<String>) -> Self {
        StorageError {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A transient failure.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Unavailable, message)
    }

    /// Any other failure.
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(StorageErrorKind::Other, message)
    }

    /// Keeps `source` as the cause of this error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Whether retrying the request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            StorageErrorKind::Unavailable
                | StorageErrorKind::NoSpace
                | StorageErrorKind::PayloadUnavailable
                | StorageErrorKind::Full
        )
    }

    /// Whether the failure leaves the partition healthy (a payload's object storage failed, not the partition; a
    /// full store refused items, and consumers must go on taking them to make room): the engine then fails the
    /// request without taking the partition out of service.
    pub fn partition_healthy(&self) -> bool {
        matches!(
            self.kind,
            StorageErrorKind::PayloadUnavailable | StorageErrorKind::Full
        )
    }
}

/// Why one id of a complete or retry request cannot be applied. A request with any such id changes nothing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ItemError {
    /// No item has that id in the partition (completed, moved by a lease expiry, or never existed).
    #[error("'{0}' does not exist")]
    NotFound(String),
    /// The item exists but nobody holds it.
    #[error("'{0}' is not marked as leased")]
    NotLeased(String),
    /// The same id appears twice in one request.
    #[error("'{0}' appears more than once")]
    Duplicate(String),
}

/// An engine failure, as returned to the server. Variants map one-to-one onto wire codes in `lessor-server`.
///
/// Deliberately not `#[non_exhaustive]`: the server's mapping to wire codes must be an exhaustive match, so a new
/// variant cannot ship without a code.
#[derive(Debug, Error, Clone)]
pub enum QueueError {
    /// Input that breaks a rule; the message names the field and the rule (400).
    #[error("{0}")]
    Invalid(String),
    /// The named queue does not exist (400).
    #[error("queue does not exist; no such queue named '{0}'")]
    QueueNotFound(String),
    /// A queue with that name exists already (400).
    #[error("invalid queue; '{0}' already exists")]
    QueueExists(String),
    /// Another lease request with the same client id is waiting (400).
    #[error("duplicate client id; a client cannot make multiple leased requests to the same queue")]
    DuplicateClientId,
    /// A complete or retry names an id that no item has (400); nothing in the request was applied. Querator's
    /// wording, which clients match on the part before the `;`.
    #[error("invalid storage id; '{0}' does not exist")]
    NoSuchId(String),
    /// A complete names an id that cannot be completed (400); nothing in the request was applied.
    #[error("item(s) cannot be completed; {0}")]
    CannotComplete(ItemError),
    /// A retry names an id that cannot be retried (400); nothing in the request was applied.
    #[error("item(s) cannot be retried; {0}")]
    CannotRetry(ItemError),
    /// An extend names an id that cannot be extended (400); nothing in the request was applied.
    #[error("item(s) cannot be extended; {0}")]
    CannotExtend(ItemError),
    /// The queue is being restored from a backup and takes no traffic until the restore finishes (400).
    #[error("queue is being restored; '{0}' accepts requests once `lessor restore` has finished")]
    Restoring(String),
    /// The long-poll lease ended with no item (454).
    #[error("request timeout; no items are in the queue, try again")]
    LeaseTimeout,
    /// A produce could not be stored before its request_timeout ran out (454). Whether storage took it in the
    /// end is unknown to the caller, as with any timeout; the argument names the request.
    #[error("request timeout; {0} did not finish within request_timeout, try again")]
    RequestTimeout(&'static str),
    /// A request without a `request_timeout` of its own (retry, stats, browse, and the admin calls that wait for a
    /// queue's task: clear, reload, the storage API, update, delete, snapshots, restore pages...) found no answer
    /// within `limits.default-request-timeout` (454): its queue is stuck in a storage call. As with any timeout,
    /// the request may still be carried out (a delete that timed out deleted nothing).
    #[error("request timeout; {0} did not finish within limits.default-request-timeout ({1:?}), try again")]
    Untimed(&'static str, std::time::Duration),
    /// The queue's inbox is full (454).
    #[error("queue is overloaded; try again later")]
    Overloaded,
    /// The queue holds as many live dedup keys as `limits.max-dedup-keys` allows (454): the produce added none of its
    /// items; it succeeds once older keys leave the dedup window.
    #[error("queue is overloaded; it holds {0} live dedup keys (limits.max-dedup-keys), try again once older keys leave the dedup window")]
    DedupFull(usize),
    /// The partition is failing; retry later (454).
    #[error("partition not available; partition '{0}' is failing, retry again")]
    PartitionUnavailable(u32),
    /// Every partition of the queue is failing (454).
    #[error("queue has no available partitions; every partition is failing, retry again")]
    NoAvailablePartitions,
    /// A transient storage failure (454); the request was not applied.
    #[error("internal error, try your request again; {0}")]
    Transient(String),
    /// A storage failure that retrying will not fix (453).
    #[error("storage failure; {0}")]
    StorageFailed(String),
    /// The server is stopping (453).
    #[error("service is shutting down")]
    ShuttingDown,
    /// The queue is stopping (deleted, or the server is stopping) (453).
    #[error("queue is shutting down")]
    QueueShuttingDown,
}

impl QueueError {
    /// The error for an id a complete cannot apply.
    pub fn cannot_complete(e: ItemError) -> Self {
        match e {
            ItemError::NotFound(id) => QueueError::NoSuchId(id),
            other => QueueError::CannotComplete(other),
        }
    }

    /// The error for an id a retry cannot apply.
    pub fn cannot_retry(e: ItemError) -> Self {
        match e {
            ItemError::NotFound(id) => QueueError::NoSuchId(id),
            other => QueueError::CannotRetry(other),
        }
    }

    /// The error for an id an extend cannot apply.
    pub fn cannot_extend(e: ItemError) -> Self {
        match e {
            ItemError::NotFound(id) => QueueError::NoSuchId(id),
            other => QueueError::CannotExtend(other),
        }
    }

    /// Builds the error for a failed storage call.
    pub fn from_storage(e: &StorageError) -> Self {
        if e.is_transient() {
            QueueError::Transient(e.message.clone())
        } else {
            QueueError::StorageFailed(e.message.clone())
        }
    }
}

impl From<StorageError> for QueueError {
    fn from(e: StorageError) -> Self {
        QueueError::from_storage(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn storage_error_reads_well_and_keeps_its_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
        let e = StorageError::unavailable("partition 'q/0' unreachable").with_source(io);
        assert_eq!(e.to_string(), "storage unavailable: partition 'q/0' unreachable");
        let cause = e.source().expect("source kept");
        assert_eq!(cause.to_string(), "connect timed out");
        // Clone shares the cause rather than dropping it.
        assert!(e.clone().source().is_some());
        assert!(StorageError::other("x").source().is_none());
    }
}
