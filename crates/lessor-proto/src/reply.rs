//! `duh.v1.Reply`, the envelope of every error and of successful calls that return nothing, plus the
//! status texts Querator puts in `code_text`.
//!
//! Field numbers: `code = 1`, `code_text = 2`, `message = 3`, `details = 4`. The duh-go release Querator
//! uses (v0.9.1) could not be read from the sources available when this was written (older duh-go
//! releases have `{code = 1, message = 2, details = 3}` and no `code_text`); these numbers follow the
//! layout of Querator's own `QueueProduceResponse {code = 1, code_text = 2, message = 3}`.

use std::collections::HashMap;

use crate::json::{message, Str, StrMap, I32};

message! {
    /// The DUH-RPC reply envelope: `{code, code_text, message, details}`. The HTTP status equals `code`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Reply {
        /// Status code, equal to the HTTP status.
        #[json(I32, "code")]
        #[prost(int32, tag = "1")]
        pub code: i32,
        /// Short text of the code (`"Bad Request"`, `"Retry Request"`, ...).
        #[json(Str, "code_text", "codeText")]
        #[prost(string, tag = "2")]
        pub code_text: String,
        /// Human-readable message, `<constant part>; <details>` by Querator's convention.
        #[json(Str, "message")]
        #[prost(string, tag = "3")]
        pub message: String,
        /// Extra key/value context.
        #[json(StrMap, "details")]
        #[prost(map = "string, string", tag = "4")]
        pub details: HashMap<String, String>,
    }
}

impl Reply {
    /// A reply with `code`, its standard `code_text`, and `message`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Reply {
            code,
            code_text: code_text(code).to_string(),
            message: message.into(),
            details: HashMap::new(),
        }
    }

    /// The success envelope `{code: 200, code_text: "OK"}`.
    pub fn ok() -> Self {
        Self::new(200, "")
    }
}

/// The standard `code_text` of a DUH/Querator status code; `""` for codes it does not know.
pub fn code_text(code: i32) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        452 => "Client Error",
        453 => "Request Failed",
        454 => "Retry Request",
        455 => "Client Content Error",
        500 => "Internal Service Error",
        501 => "Not Implemented",
        _ => "",
    }
}
