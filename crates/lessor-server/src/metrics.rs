//! `/metrics`: Prometheus text from a registry owned by this server instance (no global state, so several servers
//! in one test process do not mix their figures).
//!
//! Request latency is a histogram per route; queue figures are read from the engine's per-queue counters at scrape
//! time by a collector, so the hot path only bumps atomics.

use std::sync::atomic::Ordering;

use lessor_core::engine::Engine;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Labels of request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route path.
    pub route: String,
    /// The wire code answered.
    pub code: u16,
}

/// Labels of latency metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnly {
    /// The route path.
    pub route: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route and code.
    pub requests: Family<RouteLabels, Counter>,
    /// Request latency in seconds, by route.
    pub latency: Family<RouteOnly, Histogram>,
}

impl Metrics {
    /// A fresh registry with the engine's queue collector.
    pub fn new(engine: Engine) -> Self {
        let mut registry = Registry::with_prefix("lessor");
        let requests = Family::<RouteLabels, Counter>::default();
        // 50 µs .. ~26 s in 20 doubling steps: long-poll leases land in the top buckets, hot calls in the bottom.
        let latency = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00005, 2.0, 20))
        });
        registry.register(
            "http_requests",
            "Requests answered, by route and wire code",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Request latency by route",
            latency.clone(),
        );
        registry.register_collector(Box::new(QueueCollector { engine }));
        Metrics {
            registry,
            requests,
            latency,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Debug)]
struct QueueCollector {
    engine: Engine,
}

impl prometheus_client::collector::Collector for QueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut queues = self.engine.queue_metrics();
        queues.sort_by(|a, b| a.0.cmp(&b.0));
        type Pick = fn(&lessor_core::engine::QueueMetrics) -> u64;
        let gauges: [(&str, &str, Pick); 4] = [
            ("queue_ready_items", "Items ready to lease", |m| {
                m.ready.load(Ordering::Relaxed)
            }),
            ("queue_leased_items", "Items leased", |m| {
                m.leased_now.load(Ordering::Relaxed)
            }),
            ("queue_scheduled_items", "Items scheduled for later", |m| {
                m.scheduled.load(Ordering::Relaxed)
            }),
            ("queue_lease_waiting", "Lease requests long-polling", |m| {
                m.lease_waiting.load(Ordering::Relaxed)
            }),
        ];
        for (name, help, pick) in gauges {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (q, m) in &queues {
                let labels = [("queue", q.as_str())];
                ConstGauge::new(pick(m) as i64).encode(fam.encode_family(&labels)?)?;
            }
        }
        let counters: [(&str, &str, Pick); 6] = [
            ("queue_produced", "Items produced", |m| {
                m.produced.load(Ordering::Relaxed)
            }),
            ("queue_leased", "Items leased", |m| {
                m.leased.load(Ordering::Relaxed)
            }),
            ("queue_completed", "Items completed", |m| {
                m.completed.load(Ordering::Relaxed)
            }),
            ("queue_retried", "Items retried", |m| {
                m.retried.load(Ordering::Relaxed)
            }),
            ("queue_lease_expired", "Leases that expired", |m| {
                m.lease_expired.load(Ordering::Relaxed)
            }),
            (
                "queue_dead_lettered",
                "Items dead-lettered or dropped as dead",
                |m| m.dead_lettered.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, pick) in counters {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (q, m) in &queues {
                let labels = [("queue", q.as_str())];
                ConstCounter::new(pick(m)).encode(fam.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
