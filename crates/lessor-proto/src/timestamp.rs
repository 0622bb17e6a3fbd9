//! `google.protobuf.Timestamp`, defined here so the crate needs neither protoc nor `prost-types`.
//!
//! On the protobuf wire it is `{seconds int64 = 1, nanos int32 = 2}`. In JSON it is an RFC 3339 string in
//! UTC with a `Z` suffix, and the fraction is cut to 0, 3, 6 or 9 digits, exactly as protojson writes it
//! (`"2026-01-02T03:04:05.123456Z"`). Input accepts 0 to 9 fraction digits and a `Z` or `±HH:MM` offset.
//! The valid range is `0001-01-01T00:00:00Z` to `9999-12-31T23:59:59.999999999Z`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// Seconds of `0001-01-01T00:00:00Z`, the earliest timestamp protojson accepts.
pub const MIN_SECONDS: i64 = -62_135_596_800;
/// Seconds of `9999-12-31T23:59:59Z`, the latest whole second protojson accepts.
pub const MAX_SECONDS: i64 = 253_402_300_799;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// A point in time: seconds and nanoseconds since the Unix epoch (wire-compatible with
/// `google.protobuf.Timestamp`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct Timestamp {
    /// Whole seconds since 1970-01-01T00:00:00Z; may be negative.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second, `0..=999_999_999` when normalised.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl Timestamp {
    /// Builds a timestamp from its two wire fields.
    pub fn new(seconds: i64, nanos: i32) -> Self {
        Timestamp { seconds, nanos }
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    /// Converts a [`SystemTime`] (before or after the epoch).
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self::from_unix_nanos(i128::try_from(d.as_nanos()).unwrap_or(i128::MAX)),
            Err(e) => Self::from_unix_nanos(-i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX)),
        }
    }

    /// Converts to a [`SystemTime`]; `None` when the value does not fit the platform's `SystemTime`.
    pub fn to_system_time(&self) -> Option<SystemTime> {
        let n = self.unix_nanos();
        let abs = Duration::new(
            u64::try_from((n / NANOS_PER_SEC).unsigned_abs()).ok()?,
            u32::try_from((n % NANOS_PER_SEC).unsigned_abs()).ok()?,
        );
        if n >= 0 {
            UNIX_EPOCH.checked_add(abs)
        } else {
            UNIX_EPOCH.checked_sub(abs)
        }
    }

    /// Builds a normalised timestamp from nanoseconds since the epoch. Values beyond the `i64` seconds
    /// range saturate.
    pub fn from_unix_nanos(n: i128) -> Self {
        let secs = n.div_euclid(NANOS_PER_SEC);
        let nanos = n.rem_euclid(NANOS_PER_SEC);
        let seconds = i64::try_from(secs).unwrap_or(if secs < 0 { i64::MIN } else { i64::MAX });
        // rem_euclid keeps nanos in 0..1e9, which fits i32.
        Timestamp {
            seconds,
            nanos: nanos as i32,
        }
    }

    /// Nanoseconds since the epoch (exact for every `seconds`/`nanos` pair).
    pub fn unix_nanos(&self) -> i128 {
        i128::from(self.seconds) * NANOS_PER_SEC + i128::from(self.nanos)
    }

    /// The same instant with `nanos` in `0..1e9` and `seconds` clamped to the protojson range.
    pub fn normalized(&self) -> Self {
        let n = self.unix_nanos();
        let min = i128::from(MIN_SECONDS) * NANOS_PER_SEC;
        let max = i128::from(MAX_SECONDS) * NANOS_PER_SEC + (NANOS_PER_SEC - 1);
        Self::from_unix_nanos(n.clamp(min, max))
    }

    /// Formats as protojson does: RFC 3339, UTC, `Z`, fraction of 0/3/6/9 digits. Out-of-range values
    /// are normalised and clamped first (protojson would refuse to write them).
    pub fn to_rfc3339(&self) -> String {
        let t = self.normalized();
        let days = t.seconds.div_euclid(86_400);
        let secs_of_day = t.seconds.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (hh, mm, ss) = (secs_of_day / 3600, (secs_of_day / 60) % 60, secs_of_day % 60);
        let mut out = format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}");
        let nanos = t.nanos;
        if nanos != 0 {
            if nanos % 1_000_000 == 0 {
                out.push_str(&format!(".{:03}", nanos / 1_000_000));
            } else if nanos % 1_000 == 0 {
                out.push_str(&format!(".{:06}", nanos / 1_000));
            } else {
                out.push_str(&format!(".{nanos:09}"));
            }
        }
        out.push('Z');
        out
    }

    /// Parses an RFC 3339 timestamp as protojson does (`YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|±HH:MM)`).
    ///
    /// # Errors
    /// Returns a message naming the problem when the text is malformed or out of range.
    pub fn parse_rfc3339(s: &str) -> Result<Self, String> {
        parse_rfc3339(s.as_bytes()).map_err(|why| format!("invalid timestamp '{s}': {why}"))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self::from_system_time(t)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Timestamp, E> {
                Timestamp::parse_rfc3339(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ => {
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            if leap {
                29
            } else {
                28
            }
        }
    }
}

/// A tiny cursor over ASCII bytes; every accessor is bounds-checked so malformed input cannot panic.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn digits(&mut self, n: usize, what: &str) -> Result<i64, String> {
        let mut v = 0i64;
        for _ in 0..n {
            match self.b.get(self.i) {
                Some(c) if c.is_ascii_digit() => {
                    v = v * 10 + i64::from(c - b'0');
                    self.i += 1;
                }
                _ => return Err(format!("expected {n} digits for {what}")),
            }
        }
        Ok(v)
    }

    fn lit(&mut self, c: u8) -> Result<(), String> {
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at position {}", c as char, self.i))
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
}

fn parse_rfc3339(b: &[u8]) -> Result<Timestamp, String> {
    let mut c = Cursor { b, i: 0 };
    let year = c.digits(4, "year")?;
    c.lit(b'-')?;
    let month = c.digits(2, "month")?;
    c.lit(b'-')?;
    let day = c.digits(2, "day")?;
    c.lit(b'T')?;
    let hour = c.digits(2, "hour")?;
    c.lit(b':')?;
    let minute = c.digits(2, "minute")?;
    c.lit(b':')?;
    let second = c.digits(2, "second")?;

    let mut nanos = 0i64;
    if c.peek() == Some(b'.') {
        c.i += 1;
        let mut count = 0;
        while let Some(d) = c.peek().filter(u8::is_ascii_digit) {
            if count == 9 {
                return Err("more than 9 fraction digits".to_string());
            }
            nanos = nanos * 10 + i64::from(d - b'0');
            count += 1;
            c.i += 1;
        }
        if count == 0 {
            return Err("empty fraction".to_string());
        }
        for _ in count..9 {
            nanos *= 10;
        }
    }

    let offset = match c.peek() {
        Some(b'Z') => {
            c.i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            c.i += 1;
            let oh = c.digits(2, "offset hour")?;
            c.lit(b':')?;
            let om = c.digits(2, "offset minute")?;
            if oh > 23 || om > 59 {
                return Err("offset out of range".to_string());
            }
            let off = oh * 3600 + om * 60;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return Err("missing 'Z' or offset".to_string()),
    };
    if c.i != b.len() {
        return Err("unexpected trailing characters".to_string());
    }

    if !(1..=12).contains(&month) {
        return Err("month out of range".to_string());
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err("day out of range".to_string());
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err("time of day out of range".to_string());
    }

    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&seconds) {
        return Err("outside 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z".to_string());
    }
    // nanos < 1e9 by construction.
    Ok(Timestamp {
        seconds,
        nanos: nanos as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip_over_wide_range() {
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1, 1, 1) * 86_400, MIN_SECONDS);
        assert_eq!(days_from_civil(9999, 12, 31) * 86_400 + 86_399, MAX_SECONDS);
    }
}
