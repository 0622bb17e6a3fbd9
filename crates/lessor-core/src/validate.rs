//! Input rules shared by the engine and the server, each failing with a message that names the field and the
//! rule.
//!
//! Every client-facing validation message is built by [`invalid`], [`rejected`] or [`required`], so Querator's
//! phrasing is written once. The server's `convert` module uses the parsing rules here ([`item_id`],
//! [`partition`], [`not_negative`]) to turn wire values into domain types; the engine applies the rules that need
//! its limits.

use std::fmt;
use std::time::Duration;

use crate::error::QueueError;
use crate::types::ItemId;

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

/// A field's name in an error message: a `&str`, or a closure that builds it, for per-item names such as
/// `items[3].priority` that would otherwise be formatted for every valid item too (a cost on the produce path).
pub trait FieldName {
    /// The name.
    fn name(self) -> String;
}

impl FieldName for &str {
    fn name(self) -> String {
        self.to_string()
    }
}

impl<F: FnOnce() -> String> FieldName for F {
    fn name(self) -> String {
        self()
    }
}

/// The rule a value broke, in Querator's `<field> is invalid; <rule>` form. Every "is invalid" message is built
/// here, so the phrasing lives in one place and a message always names its field.
pub fn invalid(field: &str, rule: impl fmt::Display) -> QueueError {
    QueueError::Invalid(format!("{field} is invalid; {rule}"))
}

/// Querator's other phrasing, `invalid <what>; <rule>`, used for client ids, batch sizes, storage ids, clear
/// requests and partition storage (the wire messages must not change).
pub fn rejected(what: &str, rule: impl fmt::Display) -> QueueError {
    QueueError::Invalid(format!("invalid {what}; {rule}"))
}

/// A required value that is missing: `<field> is required; <hint>`.
pub fn required(field: &str, hint: impl fmt::Display) -> QueueError {
    QueueError::Invalid(format!("{field} is required; {hint}"))
}

/// Checks a queue name (also used for `dead_queue`, with `field` naming which).
pub fn queue_name(field: &str, name: &str) -> Result<(), QueueError> {
    if name.trim().is_empty() {
        return Err(invalid(field, "cannot be empty"));
    }
    if name.len() > MAX_QUEUE_NAME {
        return Err(invalid(
            field,
            format!("cannot be greater than '{MAX_QUEUE_NAME}' characters"),
        ));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(invalid(field, format!("'{name}' cannot contain whitespace")));
    }
    if name.contains('~') {
        return Err(invalid(field, format!("'{name}' cannot contain '~' character")));
    }
    if name.contains('/') || name.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("'{name}' cannot contain '/' or control characters"),
        ));
    }
    Ok(())
}

/// Checks a lease client id: not blank, not too long.
pub fn client_id(id: &str) -> Result<(), QueueError> {
    if id.trim().is_empty() {
        return Err(rejected("client id", "cannot be empty"));
    }
    if id.len() > MAX_CLIENT_ID {
        return Err(rejected(
            "client id",
            format!("cannot be longer than {MAX_CLIENT_ID} characters"),
        ));
    }
    Ok(())
}

/// Checks how many items a lease asks for: at least one, at most `max`.
pub fn lease_batch_size(n: usize, max: usize) -> Result<(), QueueError> {
    if n == 0 {
        return Err(rejected("batch size", "must be greater than zero"));
    }
    if n > max {
        return Err(rejected(
            "batch size",
            format!("max_lease_batch_size is {max}, but {n} was requested"),
        ));
    }
    Ok(())
}

/// Checks the size of a list in a request: `field` holds `got` entries, the `limit` setting allows `max`.
pub fn batch_len(field: &str, limit: &str, max: usize, got: usize) -> Result<(), QueueError> {
    if got > max {
        return Err(invalid(field, format!("{limit} is {max} but received {got}")));
    }
    Ok(())
}

/// Parses an item id as the wire carries it (16 lowercase hex digits).
pub fn item_id(s: &str) -> Result<ItemId, QueueError> {
    s.parse::<ItemId>()
        .map_err(|e| rejected("storage id", format!("'{s}': {e}")))
}

/// Parses a list of wire item ids; the first bad one fails the whole list.
pub fn item_ids<S: AsRef<str>>(ids: &[S]) -> Result<Vec<ItemId>, QueueError> {
    ids.iter().map(|s| item_id(s.as_ref())).collect()
}

/// Checks a partition number from the wire (a signed integer there).
pub fn partition(p: i64) -> Result<u32, QueueError> {
    u32::try_from(p).map_err(|_| no_such_partition(p))
}

/// The error for a partition number the queue does not have.
pub fn no_such_partition(p: impl fmt::Display) -> QueueError {
    invalid("partition", format!("'{p}' is not a valid partition"))
}

/// Checks a count that the wire carries signed but that cannot be negative (max_attempts, requested_partitions,
/// attempts).
pub fn not_negative(field: &str, v: i32) -> Result<u32, QueueError> {
    u32::try_from(v).map_err(|_| invalid(field, "cannot be negative"))
}

/// Checks a partition count against [`MAX_PARTITIONS`].
pub fn partition_count(n: u32) -> Result<(), QueueError> {
    if n > MAX_PARTITIONS {
        return Err(invalid(
            "requested_partitions",
            format!("cannot be greater than '{MAX_PARTITIONS}'"),
        ));
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
        None | Some(Duration::ZERO) => Err(required(
            "request timeout",
            "'5m' is recommended, 15m is the maximum",
        )),
        Some(t) if t > max => Err(invalid(
            "request timeout",
            format!(
                "maximum timeout is '{}' but '{}' was requested",
                fmt_secs(max),
                fmt_secs(t)
            ),
        )),
        Some(t) if t <= min_exclusive => Err(invalid(
            "request timeout",
            format!(
                "minimum timeout is greater than '{}' but '{}' was requested",
                fmt_secs(min_exclusive),
                fmt_secs(t)
            ),
        )),
        Some(t) => Ok(t),
    }
}

pub(crate) fn fmt_secs(d: Duration) -> String {
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

/// Most items one browse request returns.
pub const MAX_BROWSE: usize = 1000;
/// Longest deduplication window.
pub const MAX_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// Checks an item priority (0..=[`crate::types::MAX_PRIORITY`]).
pub fn priority(field: impl FieldName, p: i64) -> Result<u8, QueueError> {
    let max = crate::types::MAX_PRIORITY;
    if p < 0 || p > i64::from(max) {
        return Err(invalid(
            &field.name(),
            format!("must be between 0 and {max}, got '{p}'"),
        ));
    }
    Ok(p as u8)
}

/// Checks a deduplication key: empty means "no key"; otherwise at most [`crate::types::MAX_DEDUP_ID`] bytes, not
/// only white space, and no control characters (so keys print and compare as users expect).
pub fn dedup_id(field: impl FieldName, id: &str) -> Result<(), QueueError> {
    let max = crate::types::MAX_DEDUP_ID;
    if id.is_empty() {
        return Ok(());
    }
    if id.len() > max {
        return Err(invalid(
            &field.name(),
            format!("cannot be longer than {max} bytes, got {}", id.len()),
        ));
    }
    // Keys are on the produce path of every keyed item. The usual ones (UUIDs, hashes, order numbers) are printable
    // ASCII without spaces, which one branch-free predicate per byte settles; the rest take the detailed checks.
    // A fold, not `all`: without the early exit the compiler checks 16 or 32 bytes per instruction.
    if id.bytes().fold(true, |ok, b| ok & (b.wrapping_sub(0x21) < 0x5e)) {
        return Ok(());
    }
    let (mut blank, mut control, mut ascii) = (true, false, true);
    for b in id.bytes() {
        if !b.is_ascii() {
            ascii = false;
            break;
        }
        blank &= b.is_ascii_whitespace() || b == 0x0b;
        control |= b.is_ascii_control();
    }
    if !ascii {
        (blank, control) = (id.trim().is_empty(), id.chars().any(char::is_control));
    }
    if blank {
        return Err(invalid(&field.name(), "cannot be only white space"));
    }
    if control {
        return Err(invalid(&field.name(), "cannot contain control characters"));
    }
    Ok(())
}

/// Checks a queue's retry backoff policy.
pub fn backoff(b: &crate::types::Backoff) -> Result<(), QueueError> {
    let max = crate::types::MAX_BACKOFF;
    if b.base > max {
        return Err(invalid(
            "retry_backoff.base",
            format!("cannot be greater than {}", fmt_secs(max)),
        ));
    }
    if b.max > max {
        return Err(invalid(
            "retry_backoff.max",
            format!("cannot be greater than {}", fmt_secs(max)),
        ));
    }
    if !b.max.is_zero() && b.max < b.base {
        return Err(invalid(
            "retry_backoff.max",
            "cannot be less than retry_backoff.base",
        ));
    }
    if !(b.factor == 0.0 || (1.0..=100.0).contains(&b.factor)) {
        return Err(invalid(
            "retry_backoff.factor",
            format!("must be between 1 and 100 (0 means 2), got '{}'", b.factor),
        ));
    }
    if !(0.0..=1.0).contains(&b.jitter) {
        return Err(invalid(
            "retry_backoff.jitter",
            format!("must be between 0 and 1, got '{}'", b.jitter),
        ));
    }
    Ok(())
}

/// Checks a list limit, mapping 0 to the default.
pub fn list_limit(limit: i64, default: usize) -> Result<usize, QueueError> {
    if limit < 0 {
        return Err(invalid(
            "limit",
            format!("must be zero or positive, got '{limit}'"),
        ));
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if limit > MAX_LIST_LIMIT {
        return Err(invalid(
            "limit",
            format!("cannot be greater than '{MAX_LIST_LIMIT}'"),
        ));
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
    fn messages_name_field_and_rule() {
        assert_eq!(
            partition(-1).expect_err("negative").to_string(),
            "partition is invalid; '-1' is not a valid partition"
        );
        assert_eq!(partition(3).ok(), Some(3));
        assert_eq!(
            item_id("nope").expect_err("bad id").to_string(),
            "invalid storage id; 'nope': expected 16 lowercase hexadecimal digits"
        );
        assert_eq!(
            lease_batch_size(0, 10).expect_err("zero").to_string(),
            "invalid batch size; must be greater than zero"
        );
        assert_eq!(
            batch_len("ids", "max_complete_batch_size", 2, 3)
                .expect_err("too many")
                .to_string(),
            "ids is invalid; max_complete_batch_size is 2 but received 3"
        );
        assert_eq!(
            not_negative("attempts", -2).expect_err("negative").to_string(),
            "attempts is invalid; cannot be negative"
        );
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

    /// The ASCII fast path and the Unicode path agree: blanks and control characters are refused by name, keys of
    /// printable text of either kind pass, and the length limit is in bytes.
    #[test]
    fn dedup_ids() {
        let max = crate::types::MAX_DEDUP_ID;
        for ok in [
            "",
            "a",
            "order-1234",
            "k\u{e9}y",
            " padded ",
            "\u{3000}x",
            &"x".repeat(max),
        ] {
            assert!(dedup_id("dedup_id", ok).is_ok(), "{ok:?}");
        }
        for (bad, rule) in [
            (" ", "white space"),
            ("\t\r\n", "white space"),
            ("\u{b}", "white space"),
            ("\u{3000}", "white space"),
            ("a\u{0}b", "control"),
            ("a\u{1}redrive:x", "control"),
            ("a\u{7f}", "control"),
            ("\u{e9}\u{85}", "control"),
            (&"x".repeat(max + 1), "longer than"),
        ] {
            let e = dedup_id("dedup_id", bad).expect_err(bad).to_string();
            assert!(e.contains("dedup_id") && e.contains(rule), "{bad:?}: {e}");
        }
    }
}
