//! Input rules shared by the engine and the server, each failing with a message that names the field and the
//! rule.

use std::time::Duration;

use crate::error::QueueError;

/// Longest queue name.
pub const MAX_QUEUE_NAME: usize = 512;
/// Longest queue reference.
pub const MAX_REFERENCE: usize = 2000;
/// Highest max_attempts.
pub const MAX_ATTEMPTS: u32 = 65_536;
/// Most partitions one queue may have (each costs a store handle and an index set).
pub const MAX_PARTITIONS: u32 = 65_536;
/// Largest list limit.
pub const MAX_LIST_LIMIT: usize = 65_536;
/// Longest client id.
pub const MAX_CLIENT_ID: usize = 512;

fn invalid(msg: String) -> QueueError {
    QueueError::Invalid(msg)
}

/// Checks a queue name (also used for `dead_queue`, with `field` naming which).
pub fn queue_name(field: &str, name: &str) -> Result<(), QueueError> {
    if name.trim().is_empty() {
        return Err(invalid(format!("{field} is invalid; cannot be empty")));
    }
    if name.len() > MAX_QUEUE_NAME {
        return Err(invalid(format!(
            "{field} is invalid; cannot be greater than '{MAX_QUEUE_NAME}' characters"
        )));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(invalid(format!(
            "{field} is invalid; '{name}' cannot contain whitespace"
        )));
    }
    if name.contains('~') {
        return Err(invalid(format!(
            "{field} is invalid; '{name}' cannot contain '~' character"
        )));
    }
    if name.contains('/') || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} is invalid; '{name}' cannot contain '/' or control characters"
        )));
    }
    Ok(())
}

/// Checks a request_timeout for produce and lease: required, above the minimum, at most the maximum.
pub fn request_timeout(
    timeout: Option<Duration>,
    min_exclusive: Duration,
    max: Duration,
) -> Result<Duration, QueueError> {
    match timeout {
        None | Some(Duration::ZERO) => Err(invalid(
            "request timeout is required; '5m' is recommended, 15m is the maximum".to_string(),
        )),
        Some(t) if t > max => Err(invalid(format!(
            "request timeout is invalid; maximum timeout is '{}' but '{}' was requested",
            fmt_secs(max),
            fmt_secs(t)
        ))),
        Some(t) if t <= min_exclusive => Err(invalid(format!(
            "request timeout is invalid; minimum timeout is greater than '{}' but '{}' was requested",
            fmt_secs(min_exclusive),
            fmt_secs(t)
        ))),
        Some(t) => Ok(t),
    }
}

fn fmt_secs(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{d:?}")
    } else if d.as_millis() < 1000 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

/// Checks a list limit, mapping 0 to the default.
pub fn list_limit(limit: i64, default: usize) -> Result<usize, QueueError> {
    if limit < 0 {
        return Err(invalid(format!(
            "limit is invalid; must be zero or positive, got '{limit}'"
        )));
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if limit > MAX_LIST_LIMIT {
        return Err(invalid(format!(
            "limit is invalid; cannot be greater than '{MAX_LIST_LIMIT}'"
        )));
    }
    Ok(if limit == 0 { default } else { limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        assert!(queue_name("queue_name", "ok-name.1").is_ok());
        for bad in ["", "  ", "a b", "a~b", "a/b"] {
            let e = queue_name("queue_name", bad).expect_err(bad).to_string();
            assert!(e.starts_with("queue_name is invalid;"), "{e}");
        }
        assert!(queue_name("dead_queue", &"x".repeat(513)).is_err());
    }

    #[test]
    fn timeouts() {
        let min = Duration::from_millis(10);
        let max = Duration::from_secs(900);
        assert!(request_timeout(None, min, max).is_err());
        assert!(request_timeout(Some(Duration::from_millis(10)), min, max).is_err());
        assert!(request_timeout(Some(Duration::from_secs(901)), min, max).is_err());
        assert_eq!(
            request_timeout(Some(Duration::from_secs(900)), min, max).ok(),
            Some(max)
        );
    }
}
