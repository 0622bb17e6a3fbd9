//! Latency histograms (HDR, microseconds, 3 significant digits) and the clock that stamps payloads.
//!
//! End-to-end latency is measured inside one process: producers write the send time (nanoseconds since
//! [`Clock`]'s origin, little-endian) into the first 8 bytes of every payload, and consumers subtract it from
//! the time the item arrived. Producers and consumers share one monotonic clock, so no clock skew enters.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Highest latency a histogram holds, in microseconds (one hour); larger values saturate.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds.
pub type Hist = Histogram<u64>;

/// An empty latency histogram.
pub fn new_hist() -> Hist {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Records `d` (at least 1 µs, saturating at one hour).
pub fn record(h: &mut Hist, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
}

/// `{count, p50, p99, p99_9, max}` of `h` in milliseconds (`null` percentiles when empty).
pub fn summary(h: &Hist) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return json!({"count": 0, "p50": null, "p99": null, "p99_9": null, "max": null});
    }
    json!({
        "count": h.len(),
        "p50": ms(h.value_at_quantile(0.50)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// The origin of payload timestamps, and payload construction.
#[derive(Debug, Clone)]
pub struct Clock {
    origin: Instant,
    filler: Vec<u8>,
}

impl Clock {
    /// A clock starting now, for payloads of `size` bytes (at least 8: the stamp).
    pub fn new(size: usize) -> Clock {
        Clock {
            origin: Instant::now(),
            filler: vec![b'x'; size.max(8)],
        }
    }

    /// Nanoseconds from the origin to `t`.
    pub fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// A payload stamped with `t`.
    pub fn payload_at(&self, t: Instant) -> Vec<u8> {
        let mut p = self.filler.clone();
        p[..8].copy_from_slice(&self.nanos(t).to_le_bytes());
        p
    }

    /// `n` payloads stamped now (a batch is sent at once, so it carries one send time).
    pub fn batch(&self, n: usize) -> Vec<Vec<u8>> {
        let now = Instant::now();
        (0..n).map(|_| self.payload_at(now)).collect()
    }

    /// The send time written into `payload`, if it has one.
    pub fn stamp(payload: &[u8]) -> Option<u64> {
        payload
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    }
}

/// Where a consumer records the end-to-end latency of the items it received.
#[derive(Debug)]
pub struct E2e {
    clock: Clock,
    /// Per item: arrival minus send.
    pub hist: Hist,
}

impl E2e {
    /// An empty recorder on `clock`.
    pub fn new(clock: Clock) -> E2e {
        E2e {
            clock,
            hist: new_hist(),
        }
    }

    /// Records one item that arrived at `at` (payloads without a stamp are ignored).
    pub fn item(&mut self, at: Instant, payload: &[u8]) {
        if let Some(sent) = Clock::stamp(payload) {
            let now = self.clock.nanos(at);
            record(&mut self.hist, Duration::from_nanos(now.saturating_sub(sent)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_milliseconds() {
        let mut h = new_hist();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us * 10));
        }
        let s = summary(&h);
        assert_eq!(s["count"], 1000);
        let p50 = s["p50"].as_f64().unwrap();
        let p99 = s["p99"].as_f64().unwrap();
        let p999 = s["p99_9"].as_f64().unwrap();
        let max = s["max"].as_f64().unwrap();
        assert!((p50 - 5.0).abs() < 0.01, "{s}");
        assert!((p99 - 9.9).abs() < 0.01, "{s}");
        assert!((p999 - 9.99).abs() < 0.01, "{s}");
        assert!((max - 10.0).abs() < 0.01, "{s}");
        assert!(summary(&new_hist())["p99"].is_null());
    }

    #[test]
    fn payloads_carry_their_send_time() {
        let clock = Clock::new(3);
        let later = clock.origin + Duration::from_millis(7);
        let p = clock.payload_at(later);
        assert_eq!(p.len(), 8);
        assert_eq!(Clock::stamp(&p), Some(7_000_000));
        let mut e = E2e::new(clock.clone());
        e.item(later + Duration::from_millis(2), &p);
        assert_eq!(e.hist.len(), 1);
        assert!((summary(&e.hist)["max"].as_f64().unwrap() - 2.0).abs() < 0.01);
        assert_eq!(Clock::stamp(b"short"), None);
        assert_eq!(clock.batch(3).len(), 3);
    }
}
