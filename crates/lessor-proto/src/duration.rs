//! Go duration strings (`"300ms"`, `"1.5h"`, `"1h2m3s"`), the format Querator uses for every duration field
//! on the wire (`request_timeout`, `lease_timeout`, `expire_timeout`, stats ages).
//!
//! [`parse_go_duration`] accepts the syntax of Go's `time.ParseDuration` except that negative durations are
//! refused, since no Querator field means anything when negative. [`format_go_duration`] writes what Go's
//! `time.Duration.String()` writes, so values round-trip with Querator clients byte for byte.

use std::time::Duration;

const NS: u128 = 1;
const US: u128 = 1_000;
const MS: u128 = 1_000_000;
const SEC: u128 = 1_000_000_000;
const MIN: u128 = 60 * SEC;
const HOUR: u128 = 60 * MIN;

/// Go's `time.Duration` is an `i64` of nanoseconds; anything longer is an overflow there too.
const MAX_NANOS: u128 = i64::MAX as u128;

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => NS,
        "us" | "\u{00b5}s" | "\u{03bc}s" => US,
        "ms" => MS,
        "s" => SEC,
        "m" => MIN,
        "h" => HOUR,
        _ => return None,
    })
}

/// `frac / scale` of a unit, in nanoseconds, computed in `f64` as Go does (the cast saturates and truncates).
fn scaled_fraction(frac: u64, unit_ns: u128, scale: f64) -> u128 {
    if frac == 0 {
        return 0;
    }
    u128::from((frac as f64 * (unit_ns as f64 / scale)) as u64)
}

/// Parses a Go duration string such as `"300ms"`, `"1.5h"`, `"1h2m3s"` or `"0"`.
///
/// # Errors
/// Returns a human-readable message for an empty or malformed string, a number without a unit, an unknown
/// unit, a value that overflows Go's `time.Duration` (about 292 years), or a negative duration.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration '{s}'");
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }

    let mut total: u128 = 0;
    while !rest.is_empty() {
        // Integer part.
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let mut whole: u128 = 0;
        for d in rest[..int_len].bytes() {
            whole = whole * 10 + u128::from(d - b'0');
            if whole > MAX_NANOS {
                return Err(invalid());
            }
        }
        rest = &rest[int_len..];

        // Optional fraction. Like Go, digits are gathered until they would overflow a u63, then ignored,
        // and the fraction is scaled in floating point; this keeps results identical to Go's, rounding
        // included (e.g. "0.3333333333333333333h" is exactly 20m in both).
        let mut frac: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut frac_len = 0;
        if let Some(after_dot) = rest.strip_prefix('.') {
            frac_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            let mut overflow = false;
            for d in after_dot[..frac_len].bytes() {
                if overflow {
                    continue;
                }
                if frac > (i64::MAX as u64) / 10 {
                    overflow = true;
                    continue;
                }
                let next = frac * 10 + u64::from(d - b'0');
                if next > 1 << 63 {
                    overflow = true;
                    continue;
                }
                frac = next;
                scale *= 10.0;
            }
            rest = &after_dot[frac_len..];
        } else if int_len == 0 {
            return Err(invalid());
        }
        if int_len == 0 && frac_len == 0 {
            // A lone "." has no digits on either side.
            return Err(invalid());
        }

        // Unit: everything up to the next digit or '.'.
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        if unit.is_empty() {
            return Err(format!("missing unit in duration '{s}'"));
        }
        let Some(unit_ns) = unit_nanos(unit) else {
            return Err(format!("unknown unit '{unit}' in duration '{s}'"));
        };
        rest = &rest[unit_len..];

        let value = whole
            .checked_mul(unit_ns)
            .and_then(|v| v.checked_add(scaled_fraction(frac, unit_ns, scale)))
            .ok_or_else(invalid)?;
        total = total.checked_add(value).ok_or_else(invalid)?;
        if total > MAX_NANOS {
            return Err(invalid());
        }
    }

    if negative && total != 0 {
        return Err(format!("negative duration '{s}' is not allowed"));
    }
    // total <= i64::MAX, so it fits in u64.
    Ok(Duration::from_nanos(total as u64))
}

/// Writes `v` as `whole[.fraction]` where the fraction has at most `prec` digits, trailing zeros removed.
fn push_frac(out: &mut String, v: u128, prec: u32) {
    let pow = 10u128.pow(prec);
    let whole = v / pow;
    let mut frac = v % pow;
    out.push_str(&whole.to_string());
    if frac != 0 {
        let mut digits = prec as usize;
        while frac.is_multiple_of(10) {
            frac /= 10;
            digits -= 1;
        }
        out.push('.');
        out.push_str(&format!("{frac:0digits$}"));
    }
}

/// Formats a duration the way Go's `time.Duration.String()` does: `"0s"`, `"300ms"`, `"1.5s"`, `"1m0s"`,
/// `"24h0m0s"`, `"1.5µs"` (with the micro sign U+00B5).
pub fn format_go_duration(d: Duration) -> String {
    let u = d.as_nanos();
    let mut out = String::new();
    if u < SEC {
        if u == 0 {
            return "0s".to_string();
        }
        if u < US {
            out.push_str(&u.to_string());
            out.push_str("ns");
        } else if u < MS {
            push_frac(&mut out, u, 3);
            out.push_str("\u{00b5}s");
        } else {
            push_frac(&mut out, u, 6);
            out.push_str("ms");
        }
        return out;
    }

    let whole_secs = u / SEC;
    let frac_nanos = u % SEC;
    let hours = whole_secs / 3600;
    let mins = (whole_secs / 60) % 60;
    let secs = whole_secs % 60;
    if hours > 0 {
        out.push_str(&format!("{hours}h{mins}m"));
    } else if mins > 0 {
        out.push_str(&format!("{mins}m"));
    }
    push_frac(&mut out, secs * SEC + frac_nanos, 9);
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    #[test]
    fn parse_table() {
        let cases: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("-0", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("-0s", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("+5s", Duration::from_secs(5)),
            ("30s", Duration::from_secs(30)),
            ("1478s", Duration::from_secs(1478)),
            ("300ms", Duration::from_millis(300)),
            ("15m", Duration::from_secs(900)),
            ("1.5h", Duration::from_secs(5400)),
            ("1h2m3s", Duration::from_secs(3723)),
            ("1h0m0s", Duration::from_secs(3600)),
            ("24h0m0s", Duration::from_secs(86_400)),
            ("5.6s", Duration::from_millis(5600)),
            ("5.s", Duration::from_secs(5)),
            (".5s", Duration::from_millis(500)),
            ("1.0s", Duration::from_secs(1)),
            ("1.00s", Duration::from_secs(1)),
            ("1.004s", Duration::from_millis(1004)),
            ("1.0040s", Duration::from_millis(1004)),
            ("100.00100s", Duration::from_micros(100_001_000)),
            ("10ns", ns(10)),
            ("11us", Duration::from_micros(11)),
            ("12\u{00b5}s", Duration::from_micros(12)),
            ("12\u{03bc}s", Duration::from_micros(12)),
            ("13ms", Duration::from_millis(13)),
            ("14s", Duration::from_secs(14)),
            ("15m", Duration::from_secs(15 * 60)),
            ("16h", Duration::from_secs(16 * 3600)),
            ("3h30m", Duration::from_secs(3 * 3600 + 30 * 60)),
            ("10.5s4m", Duration::from_millis(4 * 60_000 + 10_500)),
            ("1h1m1s1ms1us1ns", ns(3_661_001_001_001)),
            ("39h9m14.425s", Duration::from_millis(140_954_425)),
            ("52763797000ns", ns(52_763_797_000)),
            ("0.3333333333333333333h", Duration::from_secs(1200)),
            ("9007199254740993ns", ns(9_007_199_254_740_993)),
            ("9223372036854775807ns", ns(9_223_372_036_854_775_807)),
            ("9223372036854775.807us", ns(9_223_372_036_854_775_807)),
            ("9223372036s854ms775us807ns", ns(9_223_372_036_854_775_807)),
            ("0.100000000000000000000h", Duration::from_secs(360)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_go_duration(input), Ok(*want), "input {input:?}");
        }
    }

    #[test]
    fn parse_errors() {
        let cases = [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "1.5x",
            "5 s",
            " 5s",
            "5s ",
            "\u{00b5}",
            "1e3s",
            "-1s",
            "-1.5h",
            "-300ms",
            "9223372036854775808ns",
            "9223372036854775.808us",
            "9223372037s",
            "100000000000000000000h",
            "1h-1m",
            "0x10s",
        ];
        for input in cases {
            assert!(parse_go_duration(input).is_err(), "input {input:?} should fail");
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            parse_go_duration("3").expect_err("should fail"),
            "missing unit in duration '3'"
        );
        assert_eq!(
            parse_go_duration("1d").expect_err("should fail"),
            "unknown unit 'd' in duration '1d'"
        );
        assert_eq!(
            parse_go_duration("-1s").expect_err("should fail"),
            "negative duration '-1s' is not allowed"
        );
        assert_eq!(
            parse_go_duration("abc").expect_err("should fail"),
            "invalid duration 'abc'"
        );
    }

    #[test]
    fn format_table() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (ns(1), "1ns"),
            (ns(999), "999ns"),
            (ns(1_100), "1.1\u{00b5}s"),
            (ns(2_200_000), "2.2ms"),
            (Duration::from_millis(300), "300ms"),
            (ns(3_300_000_000), "3.3s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(1), "1s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(4 * 60 + 5), "4m5s"),
            (ns(4 * 60_000_000_000 + 5_001_000_000), "4m5.001s"),
            (Duration::from_secs(5 * 3600 + 6 * 60 + 7), "5h6m7s"),
            (
                ns((5 * 3600 + 6 * 60 + 7) * 1_000_000_000 + 1_000_000),
                "5h6m7.001s",
            ),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(86_400), "24h0m0s"),
            (ns(8 * 3600 * 1_000_000_000 + 1), "8h0m0.000000001s"),
            (ns(9_223_372_036_854_775_807), "2562047h47m16.854775807s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_go_duration(*d), *want, "duration {d:?}");
        }
    }

    #[test]
    fn format_then_parse_round_trips() {
        for n in [
            1u64,
            999,
            1_000,
            1_234_567,
            59_999_999_999,
            3_600_000_000_001,
            86_400_000_000_000,
        ] {
            let d = ns(n);
            assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
        }
    }
}
