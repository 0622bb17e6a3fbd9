//! The server's error type and the one place where every error becomes a wire code.

use lessor_core::auth::AuthError;
use lessor_core::error::QueueError;
use lessor_proto::CodecError;

/// Anything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The engine refused or failed the request.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Authentication, authorisation or auth administration failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A header or body that does not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The body is larger than the route allows.
    #[error("request body exceeds {0} limit")]
    BodyTooLarge(usize),
    /// A method other than POST on an RPC route.
    #[error("http method '{0}' not allowed; only POST")]
    MethodNotAllowed(String),
    /// An unknown path.
    #[error("no such method; {0}")]
    NoSuchMethod(String),
    /// Requests in flight hold as many body bytes as `limits.max-inflight-bytes` allows (454, retryable): this one's
    /// body found no room in time and was not read on.
    #[error("server is overloaded; requests in flight hold {0} bytes (limits.max-inflight-bytes), try again later")]
    InflightFull(u64),
    /// The body holds more repeated values than any request needs (400), refused before it is decoded.
    #[error("request body has too many values; more than {0} repeated values, at most {0} per request")]
    TooManyValues(usize),
    /// The body could not be read from the connection.
    #[error("request body could not be read; {0}")]
    BodyRead(String),
    /// A browser sent the request for a page of another origin (`Sec-Fetch-Site` or `Origin`, given here); see
    /// `http::cross_site`.
    #[error("cross-site request refused; a page of another origin ('{0}') may not call this server")]
    CrossSite(String),
}

impl ApiError {
    /// The wire code (also the HTTP status). Exhaustive on purpose: a new error cannot ship without a code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::Queue(e) => match e {
                QueueError::Invalid(_)
                | QueueError::QueueNotFound(_)
                | QueueError::QueueExists(_)
                | QueueError::DuplicateClientId
                | QueueError::NoSuchId(_)
                | QueueError::CannotComplete(_)
                | QueueError::CannotRetry(_)
                | QueueError::CannotExtend(_)
                | QueueError::Restoring(_) => 400,
                QueueError::LeaseTimeout
                | QueueError::RequestTimeout(_)
                | QueueError::Untimed(..)
                | QueueError::Overloaded
                | QueueError::DedupFull(_)
                | QueueError::PartitionUnavailable(_)
                | QueueError::NoAvailablePartitions
                | QueueError::Transient(_) => 454,
                QueueError::StorageFailed(_) | QueueError::ShuttingDown | QueueError::QueueShuttingDown => {
                    453
                }
            },
            ApiError::Auth(e) => match e {
                AuthError::Unauthenticated
                | AuthError::BadHeader
                | AuthError::UnknownKey
                | AuthError::ExpiredKey
                | AuthError::InvalidKey => 401,
                AuthError::AccessDenied => 403,
                AuthError::Invalid(_) => 400,
                AuthError::NotFound(_) | AuthError::CheckFailed | AuthError::StorageFailed(_) => 453,
                AuthError::Transient(_) => 454,
            },
            ApiError::Codec(e) => match e {
                CodecError::UnsupportedContentType(_) | CodecError::UnsupportedAccept(_) => 455,
                CodecError::InvalidJson(_) | CodecError::InvalidProtobuf(_) => 455,
            },
            ApiError::BodyTooLarge(_) | ApiError::MethodNotAllowed(_) => 400,
            ApiError::BodyRead(_) => 400,
            ApiError::InflightFull(_) => 454,
            ApiError::TooManyValues(_) => 400,
            ApiError::NoSuchMethod(_) => 501,
            ApiError::CrossSite(_) => 403,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeouts_are_retryable_454() {
        let produce = ApiError::from(QueueError::RequestTimeout("produce"));
        assert_eq!(produce.code(), 454);
        assert!(produce.to_string().starts_with("request timeout; "), "{produce}");
        assert_eq!(ApiError::from(QueueError::LeaseTimeout).code(), 454);
    }
}
