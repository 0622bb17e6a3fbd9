//! Measurements of `lessor bench` and how they are shown: per-operation counters with an HDR latency
//! histogram ([`OpStats`]), the text table printed at the end of a run, and the JSON document written by
//! `--json-out`.
//!
//! Latencies are recorded in microseconds (1 µs to 1 h, 3 significant digits) and shown in milliseconds.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Highest latency the histograms hold, in microseconds (one hour); larger values saturate.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds.
pub type Hist = Histogram<u64>;

/// A fresh latency histogram.
pub fn new_hist() -> Hist {
    // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Records `d` into `h` in microseconds (at least 1 µs, saturating at the upper bound).
pub fn record(h: &mut Hist, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
    h.saturating_record(us);
}

/// Counters and latencies of one operation (produce, lease or complete), for one worker or merged.
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Successful requests.
    pub requests: u64,
    /// Items carried by the successful requests.
    pub items: u64,
    /// Requests that failed with anything but a 454.
    pub errors: u64,
    /// 454 replies: lease long-polls that found nothing, or produce requests asked to retry.
    pub retries: u64,
    /// Latency of each successful request.
    pub hist: Hist,
    /// Paced producers: the furthest a send fell behind its scheduled time.
    pub lag_max: Duration,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            requests: 0,
            items: 0,
            errors: 0,
            retries: 0,
            hist: new_hist(),
            lag_max: Duration::ZERO,
        }
    }
}

impl OpStats {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &OpStats) {
        self.requests += other.requests;
        self.items += other.items;
        self.errors += other.errors;
        self.retries += other.retries;
        self.lag_max = self.lag_max.max(other.lag_max);
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }
}

/// One row of the result: an operation, how long it ran and what it measured.
#[derive(Debug, Clone)]
pub struct Row {
    /// `produce`, `lease`, `complete` or `end-to-end`.
    pub name: &'static str,
    /// The counters and latencies.
    pub stats: OpStats,
    /// The window over which `items/s` is computed; `None` for rows without a rate (end-to-end).
    pub elapsed: Option<Duration>,
    /// What the row measures, for the JSON document.
    pub note: &'static str,
}

impl Row {
    /// Items per second over the row's window.
    pub fn rate(&self) -> Option<f64> {
        let secs = self.elapsed?.as_secs_f64();
        (secs > 0.0).then(|| self.stats.items as f64 / secs)
    }

    fn quantile_ms(&self, q: f64) -> Option<f64> {
        (!self.stats.hist.is_empty()).then(|| self.stats.hist.value_at_quantile(q) as f64 / 1000.0)
    }

    fn max_ms(&self) -> Option<f64> {
        (!self.stats.hist.is_empty()).then(|| self.stats.hist.max() as f64 / 1000.0)
    }

    fn mean_ms(&self) -> Option<f64> {
        (!self.stats.hist.is_empty()).then(|| self.stats.hist.mean() / 1000.0)
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.stats.requests,
            "items": self.stats.items,
            "errors": self.stats.errors,
            "retries_454": self.stats.retries,
            "elapsed_s": self.elapsed.map(|d| d.as_secs_f64()),
            "items_per_s": self.rate(),
            "latency_ms": {
                "samples": self.stats.hist.len(),
                "mean": self.mean_ms(),
                "p50": self.quantile_ms(0.50),
                "p99": self.quantile_ms(0.99),
                "p99_9": self.quantile_ms(0.999),
                "max": self.max_ms(),
            },
            "schedule_lag_max_ms": (!self.stats.lag_max.is_zero()).then_some(self.stats.lag_max.as_secs_f64() * 1000.0),
            "measures": self.note,
        })
    }
}

/// `1234567.8` as `1,234,568`.
pub fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

/// The result table, one line per row, with a header.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<11} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}\n",
        "operation",
        "requests",
        "items",
        "items/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "454s",
        "errors"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<11} {:>10} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}\n",
            r.name,
            if r.elapsed.is_some() {
                thousands(r.stats.requests as f64)
            } else {
                "-".into()
            },
            thousands(r.stats.items as f64),
            r.rate().map_or_else(|| "-".to_string(), thousands),
            ms(r.quantile_ms(0.50)),
            ms(r.quantile_ms(0.99)),
            ms(r.quantile_ms(0.999)),
            ms(r.max_ms()),
            r.stats.retries,
            r.stats.errors,
        ));
    }
    out
}

/// The JSON document: the run's settings under `config`, one object per row under `results`.
pub fn document(
    config: Value,
    rows: &[Row],
    wall: Duration,
    cpu: Option<(f64, f64)>,
    phases: &[CpuPhase],
    errors: &[String],
) -> Value {
    let mut results = serde_json::Map::new();
    for r in rows {
        results.insert(r.name.to_string(), r.json());
    }
    let mut per_item = serde_json::Map::new();
    for p in phases {
        per_item.insert(p.name.to_string(), json!(p.per_item_us()));
    }
    json!({
        "tool": "lessor bench",
        "version": env!("CARGO_PKG_VERSION"),
        "config": config,
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "cpu_model": cpu_model(),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpu_pct_this_process": cpu.map(|c| c.0),
            "cpu_pct_other_processes": cpu.map(|c| c.1),
        },
        "wall_s": wall.as_secs_f64(),
        "results": Value::Object(results),
        "cpu_us_per_item": Value::Object(per_item),
        "first_errors": errors,
    })
}

/// CPU time counters of the machine and of this process, from `/proc` (Linux only), in clock ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    busy: u64,
    total: u64,
    own: u64,
}

impl CpuSample {
    /// Reads the counters; `None` without `/proc`.
    pub fn now() -> Option<CpuSample> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user/nice].
        // Interrupt time (irq, softirq) is left out of `busy`: loopback traffic of the benchmark itself lands
        // there, so counting it as "other processes" would overstate competing load.
        let total: u64 = fields.iter().take(8).sum();
        let at = |i: usize| fields.get(i).copied().unwrap_or(0);
        let busy = at(0) + at(1) + at(2) + at(7);
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
        let rest = own_stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let own = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some(CpuSample { busy, total, own })
    }

    /// CPU use between `self` and `later`, as percentages of the whole machine: (this process, everything
    /// else but interrupts). "Everything else" shows whether other work competed with the benchmark.
    pub fn usage_since(&self, later: &CpuSample) -> Option<(f64, f64)> {
        let total = later.total.checked_sub(self.total)? as f64;
        if total <= 0.0 {
            return None;
        }
        let busy = later.busy.saturating_sub(self.busy) as f64;
        // The process's ticks (/proc/self/stat) and the machine's (/proc/stat) are counted apart, so over a short
        // span the process can show a tick more than the whole machine: 106 % of it was seen on 2 cores.
        let own = (later.own.saturating_sub(self.own) as f64).min(total);
        Some((100.0 * own / total, 100.0 * (busy - own).max(0.0) / total))
    }
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (Linux only; 10 ms steps).
pub fn process_cpu() -> Option<Duration> {
    let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = own_stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture's user ABI.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time (user + system) used so far by this process's threads, summed by thread name (`tokio-rt-worker`,
/// `lessor-fjall-writer`, `fjall:worker`, ...), from `/proc/self/task` (Linux only; empty elsewhere). Threads that
/// ended are missing, so a phase's breakdown covers the threads alive at both ends.
pub fn thread_cpu() -> std::collections::BTreeMap<String, Duration> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some((head, rest))) = (stat.find('('), stat.rsplit_once(')')) else {
            continue;
        };
        let name = head.get(open + 1..).unwrap_or_default().to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        *out.entry(name).or_insert(Duration::ZERO) += Duration::from_millis((ticks(11) + ticks(12)) * 10);
    }
    out
}

/// The CPU this process spent in one phase of a run, per item: the figure that stays comparable when other
/// processes share the machine (items/s does not). The process includes the in-process server and the clients.
#[derive(Debug, Clone)]
pub struct CpuPhase {
    /// What the items are, e.g. `produce` or `lease+complete`.
    pub name: &'static str,
    /// CPU time (user + system) of the whole process during the phase.
    pub cpu: Duration,
    /// Items the phase counted.
    pub items: u64,
    /// CPU time per thread name during the phase (see [`thread_cpu`]), largest first.
    pub threads: Vec<(String, Duration)>,
}

impl CpuPhase {
    /// Microseconds of CPU per item; `None` without items.
    pub fn per_item_us(&self) -> Option<f64> {
        (self.items > 0).then(|| self.cpu.as_secs_f64() * 1e6 / self.items as f64)
    }
}

/// One line per phase: `cpu per item: produce 5.12 us (...)`.
pub fn cpu_lines(phases: &[CpuPhase]) -> String {
    let mut out = String::new();
    for p in phases {
        if let Some(us) = p.per_item_us() {
            out.push_str(&format!(
                "cpu per item: {} {us:.2} us ({:.2} s of CPU for {} items)\n",
                p.name,
                p.cpu.as_secs_f64(),
                thousands(p.items as f64)
            ));
            let total: f64 = p.threads.iter().map(|(_, d)| d.as_secs_f64()).sum();
            if total > 0.0 {
                let parts: Vec<String> = p
                    .threads
                    .iter()
                    .filter(|(_, d)| !d.is_zero())
                    .map(|(name, d)| format!("{name} {:.0}%", 100.0 * d.as_secs_f64() / total))
                    .collect();
                out.push_str(&format!("  by thread: {}\n", parts.join(", ")));
            }
        }
    }
    out
}

/// The CPU model from `/proc/cpuinfo`, when there is one.
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }

    #[test]
    fn rows_report_rates_and_quantiles() {
        let mut s = OpStats::default();
        for us in 1..=1000u64 {
            record(&mut s.hist, Duration::from_micros(us));
        }
        s.requests = 10;
        s.items = 1000;
        let row = Row {
            name: "produce",
            stats: s,
            elapsed: Some(Duration::from_secs(2)),
            note: "",
        };
        assert_eq!(row.rate(), Some(500.0));
        let p50 = row.quantile_ms(0.5).unwrap_or_default();
        assert!((0.49..=0.51).contains(&p50), "{p50}");
        let t = table(std::slice::from_ref(&row));
        assert!(t.contains("produce") && t.contains("500"), "{t}");
        let doc = document(json!({}), &[row], Duration::from_secs(3), None, &[], &[]);
        assert_eq!(doc["results"]["produce"]["items"], 1000);
        assert_eq!(doc["results"]["produce"]["items_per_s"], 500.0);
    }

    #[test]
    fn cpu_samples_give_percentages_on_linux() {
        let Some(a) = CpuSample::now() else { return };
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let Some(b) = CpuSample::now() else { return };
        if let Some((own, other)) = a.usage_since(&b) {
            assert!(
                (0.0..=100.0).contains(&own) && (0.0..=100.0).contains(&other),
                "{own} {other}"
            );
        }
    }

    #[test]
    fn merge_adds_counts_and_samples() {
        let mut a = OpStats::default();
        let mut b = OpStats::default();
        record(&mut a.hist, Duration::from_millis(1));
        record(&mut b.hist, Duration::from_millis(3));
        b.items = 5;
        b.retries = 2;
        a.merge(&b);
        assert_eq!((a.items, a.retries, a.hist.len()), (5, 2, 2));
    }
}
