//! The in-memory history behind `/v1/queue.history`: for every queue, a ring of the last [`CAPACITY`] samples of
//! its event counters (as deltas) and depths, taken every [`INTERVAL`] by a task of the server.
//!
//! It exists so the dashboard can draw rate charts over the last minutes without an external store; Prometheus
//! (`/metrics`) stays the long-term record. The ring is per server process and starts empty at start-up. Its cost is
//! bounded: [`CAPACITY`] samples of 10 integers per queue (about 12 KB per queue; a ring grows to it with its
//! samples, so a queue loaded for a few seconds holds a few of them), queues that disappear from the
//! engine drop their ring at the next sample, and a sample takes a few hash-map steps per queue (it holds the
//! rings' lock meanwhile, so it must stay linear: 100,000 queues are a valid load). A queue unloaded for being idle
//! drops its ring too (its samples would be all zero rates, and 12 KB per queue ever touched is the growth
//! unloading exists to stop), baseline included: its first sample once loaded again counts from the counters its
//! figures recorded at the load (`QueueMetrics::at_load`), rather than from zero. Keeping a baseline here per
//! unloaded queue cost about 200 bytes each, most of what an unloaded queue held.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use lessor_core::engine::{Engine, QueueMetrics};
use lessor_proto::HistorySample;

/// Time between two samples.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Samples kept per queue: five minutes at [`INTERVAL`].
pub const CAPACITY: usize = 150;

/// The counters a sample subtracts from the previous one.
#[derive(Clone, Copy, Default)]
struct Totals {
    produced: u64,
    leased: u64,
    lease_age_us: u64,
    completed: u64,
    retried: u64,
    dead_lettered: u64,
}

impl Totals {
    fn of(m: &QueueMetrics) -> Self {
        Totals {
            produced: m.produced.load(Ordering::Relaxed),
            leased: m.leased.load(Ordering::Relaxed),
            lease_age_us: m.lease_age_us.load(Ordering::Relaxed),
            completed: m.completed.load(Ordering::Relaxed),
            retried: m.retried.load(Ordering::Relaxed),
            dead_lettered: m.dead_lettered.load(Ordering::Relaxed),
        }
    }
}

struct Ring {
    last: Totals,
    samples: VecDeque<HistorySample>,
    /// The number of the last sample that saw the queue: a ring a sample did not reach belongs to a deleted queue.
    seen: u64,
}

/// The rings by queue name, and the number of the last sample.
#[derive(Default)]
struct Rings {
    by_queue: HashMap<String, Ring>,
    sample: u64,
}

/// Recent per-second rates of one queue (see [`History::rates`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// Items produced per second.
    pub produced: f64,
    /// Items leased per second.
    pub leased: f64,
    /// Items completed per second.
    pub completed: f64,
}

/// Samples [`History::rates`] averages over: the last 10 s.
pub const RATE_SAMPLES: usize = 5;

/// The rings of all queues.
#[derive(Default)]
pub struct History {
    rings: Mutex<Rings>,
    /// Rings examined while dropping those of deleted queues, for the test that keeps a sample linear in the
    /// number of queues.
    #[cfg(test)]
    examined: std::sync::atomic::AtomicU64,
}

/// Samples a ring first makes room for: two (4 s of samples, 160 bytes). A queue loaded by one request is sampled
/// once or twice before a short `queue-idle-unload` unloads it, and a sweep over thousands of queues peaks at this
/// room per queue (it was 8 samples, 640 bytes); a queue loaded longer grows its ring 4, 8, 16... samples.
const FIRST_ROOM: usize = 2;

/// Makes room in a full ring below [`CAPACITY`]: twice its size (from [`FIRST_ROOM`]), never past `CAPACITY`, each
/// step exact (a `VecDeque` left to grow itself would double past it). A ring sized to `CAPACITY` at once held
/// 12 KB for every queue loaded even a few seconds, which a sweep over thousands of queues with a short idle time
/// (`queue-idle-unload`) turned into a peak of megabytes that the allocator then kept.
fn grow(samples: &mut VecDeque<HistorySample>) {
    let room = samples.capacity();
    if samples.len() == room && room < CAPACITY {
        samples.reserve_exact(room.max(FIRST_ROOM).min(CAPACITY - room));
    }
}

/// A counter delta as the wire's i64; a counter that went backwards (a queue deleted and created again between
/// two samples) counts as 0 rather than a negative rate.
fn delta(now: u64, before: u64) -> i64 {
    i64::try_from(now.saturating_sub(before)).unwrap_or(i64::MAX)
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl History {
    /// Takes one sample of every queue at `time_ms` (Unix milliseconds). The engine's counters start at zero when
    /// this process loads a queue, so a queue's first sample counts from there.
    pub fn sample(&self, time_ms: i64, queues: &[(String, std::sync::Arc<QueueMetrics>)]) {
        let Ok(mut rings) = self.rings.lock() else {
            return;
        };
        // Each ring is marked with the sample's number and the unmarked ones dropped afterwards: finding each ring's
        // queue in `queues` instead compared names R x Q times, 5e9 per sample at 100,000 queues (seconds of CPU
        // every 2 s, with the lock held).
        rings.sample += 1;
        let this = rings.sample;
        for (name, m) in queues {
            // An unloaded queue has no ring: its samples would be zero rates, and the baseline its first sample
            // after a load counts from is in its figures (`QueueMetrics::at_load`). A ring kept per unloaded queue
            // for that baseline (about 200 bytes with its slot) was most of what such a queue held.
            if m.unloaded.load(Ordering::Relaxed) {
                rings.by_queue.remove(name);
                continue;
            }
            let now = Totals::of(m);
            // Looked up before inserting, so a queue's name is copied once, not at every sample.
            if !rings.by_queue.contains_key(name) {
                // A queue seen for the first time since it loaded counts from its counters at the load (0 for a
                // queue new here). Its ring grows with its samples (see `grow`).
                let ring = Ring {
                    last: Totals::of(&m.at_load()),
                    samples: VecDeque::new(),
                    seen: this,
                };
                rings.by_queue.insert(name.clone(), ring);
            }
            let Some(ring) = rings.by_queue.get_mut(name) else {
                continue;
            };
            ring.seen = this;
            let last = ring.last;
            ring.last = now;
            grow(&mut ring.samples);
            if ring.samples.len() == CAPACITY {
                ring.samples.pop_front();
            }
            let leased = now.leased.saturating_sub(last.leased);
            // 0 when nothing was leased since the last sample.
            let lease_age_ms = now
                .lease_age_us
                .saturating_sub(last.lease_age_us)
                .checked_div(leased)
                .map_or(0, |us| gauge(us / 1000));
            ring.samples.push_back(HistorySample {
                time_ms,
                produced: delta(now.produced, last.produced),
                leased: delta(now.leased, last.leased),
                completed: delta(now.completed, last.completed),
                retried: delta(now.retried, last.retried),
                dead_lettered: delta(now.dead_lettered, last.dead_lettered),
                ready: gauge(m.ready.load(Ordering::Relaxed)),
                leased_now: gauge(m.leased_now.load(Ordering::Relaxed)),
                scheduled: gauge(m.scheduled.load(Ordering::Relaxed)),
                lease_age_ms,
            });
        }
        rings.by_queue.retain(|_, r| {
            #[cfg(test)]
            self.examined.fetch_add(1, Ordering::Relaxed);
            r.seen == this
        });
        // A table that emptied (queues unloaded or deleted) gives back its slots, as a `HashMap` never shrinks on
        // its own; to twice the rings left, so that the next shrink waits until it halves twice more (O(1) per ring).
        let left = rings.by_queue.len();
        if rings.by_queue.capacity() > 64 && left < rings.by_queue.capacity() / 4 {
            rings.by_queue.shrink_to(left * 2);
        }
    }

    /// The samples of `queue`, oldest first (empty when it has none yet).
    pub fn samples(&self, queue: &str) -> Vec<HistorySample> {
        match self.rings.lock() {
            Ok(rings) => rings
                .by_queue
                .get(queue)
                .map(|r| r.samples.iter().cloned().collect())
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Produce, lease and complete rates of `queue` per second over its last `k` samples (zeros without any), as
    /// the overview shows them: a few samples smooth a burst without hiding a stall for minutes.
    pub fn rates(&self, queue: &str, k: usize) -> Rates {
        let Ok(rings) = self.rings.lock() else {
            return Rates::default();
        };
        let Some(ring) = rings.by_queue.get(queue) else {
            return Rates::default();
        };
        let n = ring.samples.len().min(k);
        if n == 0 {
            return Rates::default();
        }
        let secs = INTERVAL.as_secs_f64() * n as f64;
        let sum = |f: fn(&HistorySample) -> i64| {
            ring.samples
                .iter()
                .rev()
                .take(n)
                .map(|s| f(s) as f64)
                .sum::<f64>()
                / secs
        };
        Rates {
            produced: sum(|s| s.produced),
            leased: sum(|s| s.leased),
            completed: sum(|s| s.completed),
        }
    }

    /// Samples every queue of `engine` every `interval`, until the task is aborted.
    pub async fn run(&self, engine: Engine, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let ms = engine.clock().now().0 / 1000;
            self.sample(ms, &engine.queue_metrics());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn samples_are_deltas_after_a_baseline_and_the_ring_is_bounded() {
        let h = History::default();
        let m = Arc::new(QueueMetrics::default());
        m.produced.store(100, Ordering::Relaxed);
        let queues = vec![("q".to_string(), m.clone())];
        h.sample(0, &queues);
        assert_eq!(
            h.samples("q")[0].produced,
            100,
            "the first sample counts from zero"
        );
        m.produced.store(130, Ordering::Relaxed);
        m.ready.store(30, Ordering::Relaxed);
        // Two items leased after waiting 1 s and 3 s: a mean of 2 s.
        m.leased.store(2, Ordering::Relaxed);
        m.lease_age_us.store(4_000_000, Ordering::Relaxed);
        h.sample(2000, &queues);
        let s = h.samples("q");
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].time_ms, s[1].produced, s[1].ready), (2000, 30, 30));
        assert_eq!((s[0].lease_age_ms, s[1].lease_age_ms), (0, 2000));
        for i in 0..(CAPACITY as i64 + 10) {
            h.sample(4000 + i, &queues);
        }
        let s = h.samples("q");
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].produced, 0);
        // Rates: the last two samples held 0 and 10 produced items: 10 items over 4 s.
        m.produced.store(140, Ordering::Relaxed);
        h.sample(9_000_000, &queues);
        let r = h.rates("q", 2);
        assert!((r.produced - 2.5).abs() < 1e-9, "{r:?}");
        assert_eq!(h.rates("other", 2), Rates::default());
        h.sample(9_999_999, &[]);
        assert!(h.samples("q").is_empty(), "a deleted queue drops its ring");
    }

    /// A ring grows with its samples, exactly, up to CAPACITY and no further: a queue loaded for a few samples
    /// holds a few of them, not 12 KB.
    #[test]
    fn a_ring_grows_with_its_samples_up_to_capacity() {
        let h = History::default();
        let queues = vec![("q".to_string(), Arc::new(QueueMetrics::default()))];
        let room = |h: &History| h.rings.lock().expect("rings").by_queue["q"].samples.capacity();
        h.sample(0, &queues);
        assert_eq!(room(&h), FIRST_ROOM);
        h.sample(1, &queues);
        assert_eq!(room(&h), FIRST_ROOM, "2 samples fit in the first room");
        h.sample(2, &queues);
        assert_eq!(room(&h), 2 * FIRST_ROOM, "then it doubles, exactly");
        for i in 3..5 {
            h.sample(i, &queues);
        }
        assert_eq!(room(&h), 8, "5 samples fit in 8");
        for i in 5..(CAPACITY as i64 * 3) {
            h.sample(i, &queues);
            assert!(room(&h) <= CAPACITY, "never past CAPACITY: {}", room(&h));
        }
        assert_eq!(room(&h), CAPACITY);
        assert_eq!(h.samples("q").len(), CAPACITY);
    }

    /// A sample costs a few steps per queue: with 100,000 loaded queues the server sampled every 2 s, and each
    /// sample compared every ring's name with every queue's (5e9 comparisons), which took 88 % of a CPU on an idle
    /// server, held the rings' lock for seconds (`queue.history` p50 7.1 s) and blocked a runtime thread
    /// (a produce to another queue took up to 5.7 s).
    #[test]
    fn a_sample_is_linear_in_the_number_of_queues() {
        const QUEUES: usize = 5_000;
        let h = History::default();
        let m = Arc::new(QueueMetrics::default());
        let mut queues: Vec<_> = (0..QUEUES).map(|i| (format!("q{i}"), m.clone())).collect();
        h.sample(0, &queues);
        h.sample(1, &queues);
        // One queue deleted: its ring goes, the others stay.
        queues.pop();
        h.sample(2, &queues);
        assert!(h.samples(&format!("q{}", QUEUES - 1)).is_empty());
        assert_eq!(h.samples("q0").len(), 3);
        let examined = h.examined.load(Ordering::Relaxed);
        assert!(
            examined <= 3 * QUEUES as u64,
            "3 samples of {QUEUES} queues examined {examined} names"
        );
    }

    /// An unloaded queue keeps no ring at all, not even a baseline: loaded again, its first sample counts what
    /// happened since the load (the figures' `at_load`), not its counters since start-up.
    #[test]
    fn an_unloaded_queue_drops_its_ring_and_counts_from_its_load_again() {
        let h = History::default();
        let m = Arc::new(QueueMetrics::default());
        m.produced.store(100, Ordering::Relaxed);
        let queues = vec![("q".to_string(), m.clone())];
        h.sample(0, &queues);
        m.unloaded.store(true, Ordering::Relaxed);
        h.sample(2000, &queues);
        assert!(h.samples("q").is_empty());
        {
            let rings = h.rings.lock().expect("rings");
            assert!(!rings.by_queue.contains_key("q"), "the ring's memory is freed");
        }
        // Loaded again (the engine records the counters at the load), then 5 more produced.
        m.unloaded.store(false, Ordering::Relaxed);
        m.mark_loaded();
        m.produced.store(105, Ordering::Relaxed);
        h.sample(4000, &queues);
        let s = h.samples("q");
        assert_eq!((s.len(), s[0].produced), (1, 5));
    }
}
