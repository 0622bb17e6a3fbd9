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

/// How many repeated values `body` holds, counted without decoding it and without allocating, stopping once past
/// `max`: in protobuf the top-level fields (each element of a repeated field is one), in JSON the elements of
/// every array at any depth. A body that does not parse is counted up to where it stops; decoding reports it.
///
/// A server calls this before [`decode`]: an element costs two bytes on the wire (`{},` three in JSON) and a whole
/// struct once decoded, so a body of empty items decodes to about a hundred times its size before any item count
/// can be checked.
pub fn repeated_values(enc: Encoding, body: &[u8], max: usize) -> usize {
    match enc {
        Encoding::Protobuf => protobuf_fields(body, max),
        Encoding::Json => {
            let mut n = 0;
            let mut de = serde_json::Deserializer::from_slice(body);
            // An error is either the count passing `max` (n says so) or a body decoding will refuse anyway.
            let _ = serde::de::DeserializeSeed::deserialize(Count { n: &mut n, max }, &mut de);
            n
        }
    }
}

/// Top-level fields of a protobuf body, up to just past `max`.
fn protobuf_fields(mut body: &[u8], max: usize) -> usize {
    let mut n = 0;
    while !body.is_empty() && n <= max {
        let Ok(key) = prost::encoding::decode_varint(&mut body) else {
            break;
        };
        let skip = match key & 7 {
            0 => match prost::encoding::decode_varint(&mut body) {
                Ok(_) => 0,
                Err(_) => break,
            },
            1 => 8,
            2 => match prost::encoding::decode_varint(&mut body) {
                Ok(len) => usize::try_from(len).unwrap_or(usize::MAX),
                Err(_) => break,
            },
            5 => 4,
            // Groups (3, 4) are not used by any message here, and 6, 7 do not exist: decoding refuses them.
            _ => break,
        };
        if skip > body.len() {
            break;
        }
        body = &body[skip..];
        n += 1;
    }
    n
}

/// Counts the array elements of a JSON value, at any depth, into `n`; fails once past `max`.
struct Count<'a> {
    n: &'a mut usize,
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Count { n, max } = self;
        while seq.next_element_seed(Count { n: &mut *n, max })?.is_some() {
            *n += 1;
            if *n > max {
                return Err(serde::de::Error::custom("too many values"));
            }
        }
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Count { n, max } = self;
        while map.next_key::<serde::de::IgnoredAny>()?.is_some() {
            map.next_value_seed(Count { n: &mut *n, max })?;
        }
        Ok(())
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

    /// Protobuf counts top-level fields, JSON the elements of every array; both stop just past `max`, and a body
    /// that does not parse counts what came before the fault.
    #[test]
    fn repeated_values_are_counted_without_decoding() {
        let req = crate::QueueProduceRequest {
            queue_name: "q".into(),
            request_timeout: "1m".into(),
            items: vec![crate::QueueProduceItem::default(); 5],
        };
        let proto = encode(Encoding::Protobuf, &req);
        assert_eq!(repeated_values(Encoding::Protobuf, &proto, 100), 7);
        assert_eq!(repeated_values(Encoding::Protobuf, &proto, 3), 4);
        assert_eq!(
            repeated_values(Encoding::Protobuf, &proto[..proto.len() - 1], 100),
            6
        );
        let json = br#"{"queue_name":"q","items":[{},{"utf8":"a,b"},{}],"x":[[1,2],[3]]}"#;
        assert_eq!(repeated_values(Encoding::Json, json, 100), 3 + 2 + 3);
        assert_eq!(repeated_values(Encoding::Json, json, 2), 3);
        assert_eq!(repeated_values(Encoding::Json, br#"{"items":[{},{},"#, 100), 2);
        assert_eq!(repeated_values(Encoding::Json, b"", 100), 0);
    }

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
