//! Client errors, and how a non-200 HTTP reply becomes one.
//!
//! A reply that carries a `duh.v1.Reply` envelope (JSON or protobuf, chosen by its `Content-Type`) is a
//! service error, [`ClientError::Api`]. Anything else on a non-200 status (a proxy's HTML page, an empty
//! body, an unknown content type) is [`ClientError::Http`]. Failures before a reply arrives are
//! [`ClientError::Transport`].

use std::error::Error as _;
use std::fmt::Write as _;

use lessor_proto::{decode, request_encoding, CodecError, Reply};

/// Status code of Querator's "Retry Request" replies (lease long-poll timed out, queue overloaded,
/// partition unavailable, ...).
pub const CODE_RETRY_REQUEST: i32 = 454;

/// Everything a [`Client`](crate::Client) call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The endpoint given to [`Client::new`](crate::Client::new) is unusable.
    #[error("invalid endpoint '{endpoint}': {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it was refused.
        reason: String,
    },
    /// The service answered with a `duh.v1.Reply` error envelope.
    #[error("{code} {code_text}: {message}")]
    Api {
        /// The reply's code (equal to the HTTP status).
        code: i32,
        /// The reply's code text, such as `"Retry Request"`.
        code_text: String,
        /// The reply's message, `<constant>; <details>` by Querator's convention.
        message: String,
    },
    /// A non-200 reply whose body is not a reply envelope (it likely came from a proxy, not the service).
    #[error("HTTP {status}: {body}")]
    Http {
        /// HTTP status code.
        status: u16,
        /// The body, decoded as UTF-8 with replacement characters.
        body: String,
    },
    /// The request could not be sent or the reply could not be read.
    #[error("transport error: {}", chain(.0))]
    Transport(#[source] reqwest::Error),
    /// A 200 reply whose body does not decode as the expected message.
    #[error("could not decode the reply: {0}")]
    Decode(#[source] CodecError),
    /// The TLS settings cannot be used (a CA or certificate file that holds none, a key that does not match).
    #[error("TLS: {reason}")]
    Tls {
        /// What is wrong, naming the file.
        reason: String,
    },
}

impl ClientError {
    /// The status code of the failure: the envelope's code for [`ClientError::Api`], the HTTP status for
    /// [`ClientError::Http`], and `None` when no reply was received or it was a 200.
    pub fn code(&self) -> Option<i32> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            ClientError::Http { status, .. } => Some(i32::from(*status)),
            ClientError::InvalidEndpoint { .. }
            | ClientError::Transport(_)
            | ClientError::Decode(_)
            | ClientError::Tls { .. } => None,
        }
    }

    /// True when the service asked the client to try again (code 454, "Retry Request"). Querator's client
    /// does no retries itself; callers decide.
    pub fn is_retryable(&self) -> bool {
        self.code() == Some(CODE_RETRY_REQUEST)
    }

    /// The envelope's message for [`ClientError::Api`], else `None`.
    pub fn message(&self) -> Option<&str> {
        match self {
            ClientError::Api { message, .. } => Some(message),
            _ => None,
        }
    }
}

impl From<reqwest::Error> for ClientError {
    fn from(e: reqwest::Error) -> Self {
        ClientError::Transport(e)
    }
}

/// The error and its sources, joined with `": "` (reqwest's own message alone is rarely enough).
pub(crate) fn chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// Turns a non-200 reply into an error: an envelope decoded by `content_type` becomes
/// [`ClientError::Api`], anything else [`ClientError::Http`].
pub(crate) fn error_from_reply(status: u16, content_type: Option<&str>, body: &[u8]) -> ClientError {
    let http = || ClientError::Http {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    };
    if body.is_empty() {
        return http();
    }
    let Ok(enc) = request_encoding(content_type) else {
        return http();
    };
    match decode::<Reply>(enc, body) {
        // A reply without a code is not an envelope: `{}` or stray bytes that happen to parse.
        Ok(reply) if reply.code != 0 => ClientError::Api {
            code: reply.code,
            code_text: reply.code_text,
            message: reply.message,
        },
        _ => http(),
    }
}

#[cfg(test)]
mod tests {
    use lessor_proto::{encode, Encoding};

    use super::*;

    #[test]
    fn json_envelope_is_an_api_error() {
        let body =
            br#"{"code":454,"code_text":"Retry Request","message":"queue is overloaded; try again later"}"#;
        let err = error_from_reply(454, Some("application/json"), body);
        assert!(
            matches!(&err, ClientError::Api { code: 454, code_text, message }
                if code_text == "Retry Request" && message == "queue is overloaded; try again later"),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.code(), Some(454));
        assert_eq!(err.message(), Some("queue is overloaded; try again later"));
        assert_eq!(
            err.to_string(),
            "454 Retry Request: queue is overloaded; try again later"
        );
    }

    #[test]
    fn protobuf_envelope_is_an_api_error() {
        let body = encode(Encoding::Protobuf, &Reply::new(400, "invalid queue_name"));
        let err = error_from_reply(400, Some("application/protobuf"), &body);
        assert!(
            matches!(&err, ClientError::Api { code: 400, code_text, message }
                if code_text == "Bad Request" && message == "invalid queue_name"),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }

    #[test]
    fn envelope_code_wins_and_camel_case_is_accepted() {
        let body = br#"{"code":455,"codeText":"Client Content Error","message":"m"}"#;
        let err = error_from_reply(455, Some("application/json; charset=utf-8"), body);
        assert_eq!(err.code(), Some(455));
        assert!(matches!(err, ClientError::Api { .. }));
    }

    #[test]
    fn non_envelopes_are_http_errors() {
        let cases: [(u16, Option<&str>, &[u8]); 6] = [
            (502, Some("text/html"), b"<html>bad gateway</html>"),
            (503, None, b"upstream unavailable"),
            (500, Some("application/json"), b"{}"),
            (500, Some("application/json"), b"not json"),
            (404, Some("application/json"), b""),
            (500, Some("application/protobuf"), b"\xff\xff\xff"),
        ];
        for (status, ct, body) in cases {
            let err = error_from_reply(status, ct, body);
            assert!(
                matches!(&err, ClientError::Http { status: s, body: b } if *s == status
                    && b.as_bytes() == String::from_utf8_lossy(body).as_bytes()),
                "{status} {ct:?}: {err:?}"
            );
            assert_eq!(err.code(), Some(i32::from(status)));
        }
    }
}
