//! HTTP body codec: picks JSON or protobuf from `Content-Type`/`Accept` the way Querator (duh-go) does, and
//! encodes/decodes any wire message with the chosen encoding.
//!
//! Decoding never panics, whatever the bytes; errors carry a message fit to send back to the client.

use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// protojson (`application/json`).
    Json,
    /// Protobuf binary (`application/protobuf`).
    Protobuf,
}

impl Encoding {
    /// The MIME type written in `Content-Type` for this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Protobuf => "application/protobuf",
        }
    }
}

/// Why a body or a header could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The request's `Content-Type` names neither JSON nor protobuf.
    #[error("unsupported content type '{0}'; use application/json or application/protobuf")]
    UnsupportedContentType(String),
    /// The request's `Accept` names neither JSON nor protobuf.
    #[error("unsupported accept type '{0}'; use application/json or application/protobuf")]
    UnsupportedAccept(String),
    /// The body is not valid protojson for the expected message.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// The body is not a valid protobuf encoding of the expected message.
    #[error("invalid protobuf: {0}")]
    InvalidProtobuf(String),
}

/// Maps one media type (parameters already removed) to an encoding.
fn media_type(mt: &str) -> Option<Encoding> {
    match mt.trim().to_ascii_lowercase().as_str() {
        "" | "*/*" | "application/*" | "application/json" => Some(Encoding::Json),
        "application/protobuf" | "application/x-protobuf" => Some(Encoding::Protobuf),
        _ => None,
    }
}

/// Chooses the request encoding from `Content-Type`.
///
/// Absent, empty, `*/*`, `application/*` and `application/json` mean JSON; `application/protobuf` and
/// `application/x-protobuf` mean protobuf. Anything after `;` or `,` is ignored, and case does not matter.
///
/// # Errors
/// [`CodecError::UnsupportedContentType`] for any other type.
pub fn request_encoding(content_type: Option<&str>) -> Result<Encoding, CodecError> {
    let raw = content_type.unwrap_or("");
    let first = raw.split([';', ',']).next().unwrap_or("");
    media_type(first).ok_or_else(|| CodecError::UnsupportedContentType(raw.trim().to_string()))
}

/// Chooses the response encoding from `Accept`, with the same names as [`request_encoding`]. When several
/// types are listed (comma-separated), the first supported one wins; parameters such as `;q=0.9` are
/// ignored.
///
/// # Errors
/// [`CodecError::UnsupportedAccept`] when no listed type is supported.
pub fn response_encoding(accept: Option<&str>) -> Result<Encoding, CodecError> {
    let raw = accept.unwrap_or("");
    if raw.trim().is_empty() {
        return Ok(Encoding::Json);
    }
    raw.split(',')
        .filter_map(|part| media_type(part.split(';').next().unwrap_or("")))
        .next()
        .ok_or_else(|| CodecError::UnsupportedAccept(raw.trim().to_string()))
}

/// Decodes a message. An empty body is the default message in both encodings.
///
/// # Errors
/// [`CodecError::InvalidJson`] or [`CodecError::InvalidProtobuf`] with the reason (for JSON, an unknown
/// field is named: `invalid JSON: unknown field 'foo' at line 1 column 6`).
pub fn decode<T>(enc: Encoding, body: &[u8]) -> Result<T, CodecError>
where
    T: Message + Default + DeserializeOwned,
{
    if body.is_empty() {
        return Ok(T::default());
    }
    match enc {
        Encoding::Protobuf => T::decode(body).map_err(|e| CodecError::InvalidProtobuf(e.to_string())),
        Encoding::Json => serde_json::from_slice(body).map_err(|e| CodecError::InvalidJson(json_error(&e))),
    }
}

/// Encodes a message.
pub fn encode<T>(enc: Encoding, msg: &T) -> Vec<u8>
where
    T: Message + Serialize,
{
    match enc {
        Encoding::Protobuf => msg.encode_to_vec(),
        // The Serialize impls of this crate never fail (string map keys only, timestamps are clamped),
        // so the fallback is unreachable in practice; it keeps the call infallible.
        Encoding::Json => serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec()),
    }
}

/// serde_json's message, tidied: the long "expected one of ..." list serde adds after some errors is
/// dropped so the message stays short and names only the offending field.
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match (text.find(", expected one of"), text.rfind(" at line ")) {
        (Some(start), Some(loc)) if start < loc => format!("{}{}", &text[..start], &text[loc..]),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_rules() {
        for ct in [
            None,
            Some(""),
            Some("*/*"),
            Some("application/*"),
            Some("application/json"),
        ] {
            assert_eq!(request_encoding(ct), Ok(Encoding::Json), "{ct:?}");
        }
        for ct in [
            "Application/JSON; charset=utf-8",
            "application/json,text/plain",
            "  application/json  ",
        ] {
            assert_eq!(request_encoding(Some(ct)), Ok(Encoding::Json), "{ct:?}");
        }
        for ct in [
            "application/protobuf",
            "application/x-protobuf",
            "APPLICATION/PROTOBUF;x=1",
        ] {
            assert_eq!(request_encoding(Some(ct)), Ok(Encoding::Protobuf), "{ct:?}");
        }
        let err = request_encoding(Some("text/plain")).expect_err("should fail");
        assert_eq!(
            err.to_string(),
            "unsupported content type 'text/plain'; use application/json or application/protobuf"
        );
        assert!(request_encoding(Some("text/plain, application/json")).is_err());
    }

    #[test]
    fn accept_rules() {
        assert_eq!(response_encoding(None), Ok(Encoding::Json));
        assert_eq!(response_encoding(Some("  ")), Ok(Encoding::Json));
        assert_eq!(
            response_encoding(Some("application/protobuf")),
            Ok(Encoding::Protobuf)
        );
        assert_eq!(
            response_encoding(Some("text/html, application/protobuf;q=0.9")),
            Ok(Encoding::Protobuf)
        );
        assert_eq!(response_encoding(Some("text/html, */*")), Ok(Encoding::Json));
        assert_eq!(
            response_encoding(Some("application/json, application/protobuf")),
            Ok(Encoding::Json)
        );
        let err = response_encoding(Some("text/html")).expect_err("should fail");
        assert_eq!(
            err.to_string(),
            "unsupported accept type 'text/html'; use application/json or application/protobuf"
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(Encoding::Json.content_type(), "application/json");
        assert_eq!(Encoding::Protobuf.content_type(), "application/protobuf");
    }
}
