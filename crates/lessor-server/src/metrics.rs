//! `/metrics`: Prometheus text from a registry owned by this server instance (no global state, so several servers
//! in one test process do not mix their figures).
//!
//! Request latency is a histogram per route; queue figures are read from the engine's per-queue counters at scrape
//! time by a collector, so the hot path only bumps atomics.
//!
//! Per-queue series are bounded (`limits.metrics-max-queues`, see [`QueueCollector`]): a scrape's size and cost
//! follow the bound, not every queue touched since start-up. Unlabelled `lessor_queues_*` totals cover every queue,
//! and `/metrics?queue=NAME` ([`Metrics::render_queues`]) reaches a queue the bound leaves out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lessor_core::engine::{Engine, MetricsEntry, QueueMetrics, TIERS};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Most queue names one `/metrics?queue=` request may carry: each costs a pass over the queues' names.
pub const MAX_NAMED_QUEUES: usize = 100;

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
    /// Items written into backups.
    pub backup_items: Counter,
    /// Bytes of backup files sent.
    pub backup_bytes: Counter,
    /// Backups that ended with an error.
    pub backups_failed: Counter,
    /// Backups being sent now.
    pub backups_running: Gauge,
    /// Items restored from backups (including blocks sent again by a resumed restore).
    pub restore_items: Counter,
    /// TLS certificate files read again and put in use while serving (see [`crate::tls::TlsCertificates`]).
    pub tls_reloads: Counter,
    /// TLS certificate files that changed but could not be used (the previous ones went on serving).
    pub tls_reload_failures: Counter,
    /// Requests answered by the API routes (not exported): background work such as a backup reads it to see
    /// whether the server is serving, and yields while it is.
    pub answered: std::sync::atomic::AtomicU64,
    /// Most queues with per-queue series (`limits.metrics-max-queues`), shared with the queue collector.
    max_queues: Arc<AtomicUsize>,
    engine: Engine,
    /// The queue collector's floor under its total counters, shared with the collectors of `?queue=` scrapes.
    floor: Arc<Mutex<[u64; 8]>>,
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
        let backup_items = Counter::default();
        let backup_bytes = Counter::default();
        let backups_failed = Counter::default();
        let backups_running = Gauge::default();
        let restore_items = Counter::default();
        registry.register("backup_items", "Items written into backups", backup_items.clone());
        registry.register("backup_bytes", "Bytes of backup files sent", backup_bytes.clone());
        registry.register(
            "backups_failed",
            "Backups that ended with an error",
            backups_failed.clone(),
        );
        registry.register(
            "backups_running",
            "Backups being sent now",
            backups_running.clone(),
        );
        registry.register(
            "restore_items",
            "Items received by restores (blocks a resumed restore sends again count again)",
            restore_items.clone(),
        );
        let tls_reloads = Counter::default();
        let tls_reload_failures = Counter::default();
        registry.register(
            "tls_reloads",
            "TLS certificate files read again and put in use while serving",
            tls_reloads.clone(),
        );
        registry.register(
            "tls_reload_failures",
            "TLS certificate files that changed but could not be used; the previous ones went on serving",
            tls_reload_failures.clone(),
        );
        let max_queues = Arc::new(AtomicUsize::new(crate::config::DEFAULT_METRICS_MAX_QUEUES));
        let floor = Arc::default();
        registry.register_collector(Box::new(QueueCollector {
            engine: engine.clone(),
            max_queues: max_queues.clone(),
            only: None,
            floor: Arc::clone(&floor),
        }));
        #[cfg(feature = "s3")]
        registry.register_collector(Box::new(OffloadCollector));
        Metrics {
            registry,
            requests,
            latency,
            backup_items,
            backup_bytes,
            backups_failed,
            backups_running,
            restore_items,
            tls_reloads,
            tls_reload_failures,
            answered: std::sync::atomic::AtomicU64::new(0),
            max_queues,
            engine,
            floor,
        }
    }

    /// Sets the most queues with per-queue series (`limits.metrics-max-queues`).
    pub fn set_max_queues(&self, n: usize) {
        self.max_queues.store(n, Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition (what scrapers asking for `application/openmetrics-text` get).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The Prometheus text format 0.0.4 (what every other scraper gets, as Querator serves).
    pub fn render_text(&self) -> String {
        openmetrics_to_text(&self.render())
    }

    /// `/metrics?queue=...`: the per-queue series of exactly the queues named (those with figures; at most
    /// [`MAX_NAMED_QUEUES`], checked by the caller), whether the bound reports them or not, with the server-wide
    /// queue totals; OpenMetrics text like [`Metrics::render`].
    pub fn render_queues(&self, mut names: Vec<String>) -> String {
        // Sorted, so that picking the queues is a binary search per queue.
        names.sort_unstable();
        names.dedup();
        let mut registry = Registry::with_prefix("lessor");
        registry.register_collector(Box::new(QueueCollector {
            engine: self.engine.clone(),
            max_queues: self.max_queues.clone(),
            only: Some(names),
            floor: self.floor.clone(),
        }));
        let mut out = String::new();
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Rewrites an OpenMetrics exposition as Prometheus text format 0.0.4: no `# EOF` or `# UNIT` lines, `unknown`
/// becomes `untyped`, and a counter family is named after its samples (`x_total`), since 0.0.4 has no family name
/// apart from the sample name. Histogram and gauge lines are the same in both formats.
pub fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // The HELP line waits for its TYPE line, which says whether its name needs `_total`.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !name.ends_with("_total") => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some((name, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some((name, text)) = help.take() {
        out.push_str(&format!("# HELP {name} {text}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::openmetrics_to_text;

    #[test]
    fn openmetrics_becomes_text_0_0_4() {
        let om = "# HELP lessor_http_requests Requests answered.\n# TYPE lessor_http_requests counter\n\
                  lessor_http_requests_total{route=\"/v1/queue.lease\",code=\"200\"} 3\n\
                  # HELP lessor_up Whether.\n# TYPE lessor_up unknown\n# UNIT lessor_up seconds\nlessor_up 1\n\
                  # HELP lessor_lat Latency.\n# TYPE lessor_lat histogram\nlessor_lat_bucket{le=\"+Inf\"} 1\n\
                  lessor_lat_sum 0.1\nlessor_lat_count 1\n# EOF\n";
        let text = openmetrics_to_text(om);
        assert_eq!(
            text,
            "# HELP lessor_http_requests_total Requests answered.\n# TYPE lessor_http_requests_total counter\n\
             lessor_http_requests_total{route=\"/v1/queue.lease\",code=\"200\"} 3\n\
             # HELP lessor_up Whether.\n# TYPE lessor_up untyped\nlessor_up 1\n\
             # HELP lessor_lat Latency.\n# TYPE lessor_lat histogram\nlessor_lat_bucket{le=\"+Inf\"} 1\n\
             lessor_lat_sum 0.1\nlessor_lat_count 1\n"
        );
    }
}

/// Queue figures, read from the engine at scrape time.
///
/// Per-queue series (19 per queue) cover at most `max_queues` queues: with a queue per tenant, every queue touched
/// since start-up in each scrape made 95 MB of text (1.9 million series) at 100,000 queues, more than a Prometheus
/// takes from one target and seconds of the server's CPU per scrape. Which queues: the loaded ones, longest loaded
/// first (a busy queue stays loaded, so its series stay), then the unloaded ones, most recently unloaded (so most
/// recently active) first. The choice is a selection in O(n), the output sorted by name; it changes only when
/// queues load or unload. Unlabelled `lessor_queues_*` totals cover every queue whatever the bound.
#[derive(Debug)]
struct QueueCollector {
    engine: Engine,
    /// `limits.metrics-max-queues`.
    max_queues: Arc<AtomicUsize>,
    /// The queues a `/metrics?queue=` request asked for: exactly those get per-queue series, bound or not.
    only: Option<Vec<String>>,
    /// The total counters last exported: a total never goes below them. Deleting a queue hands its counters to the
    /// engine's deleted-queue sums only once its task has stopped; a scrape in between misses them for a moment.
    floor: Arc<Mutex<[u64; 8]>>,
}

type Pick = fn(&QueueMetrics) -> u64;

/// Per-queue gauges: (per-queue family, total family, help, value).
const GAUGES: [(&str, &str, &str, Pick); 5] = [
    (
        "queue_ready_items",
        "queues_ready_items",
        "Items ready to lease",
        |m| m.ready.load(Ordering::Relaxed),
    ),
    ("queue_leased_items", "queues_leased_items", "Items leased", |m| {
        m.leased_now.load(Ordering::Relaxed)
    }),
    (
        "queue_scheduled_items",
        "queues_scheduled_items",
        "Items scheduled for later",
        |m| m.scheduled.load(Ordering::Relaxed),
    ),
    (
        "queue_lease_waiting",
        "queues_lease_waiting",
        "Lease requests long-polling",
        |m| m.lease_waiting.load(Ordering::Relaxed),
    ),
    (
        "queue_dedup_keys",
        "queues_dedup_keys",
        "Dedup keys remembered in memory",
        |m| m.dedup_keys.load(Ordering::Relaxed),
    ),
];

type Tier = fn(&QueueMetrics) -> &[std::sync::atomic::AtomicU64; 3];

/// Per-queue tier gauges: (per-queue family, total family, help, values by tier).
const TIER_GAUGES: [(&str, &str, &str, Tier); 2] = [
    (
        "queue_tier_items",
        "queues_tier_items",
        "Items held per storage tier (memory, disk, object); an item can count in several",
        |m| &m.tier_items,
    ),
    (
        "queue_tier_bytes",
        "queues_tier_bytes",
        "Payload bytes held per storage tier (object: before compression)",
        |m| &m.tier_bytes,
    ),
];

/// Per-queue counters: (per-queue family, total family, help, value).
const COUNTERS: [(&str, &str, &str, Pick); 8] = [
    ("queue_produced", "queues_produced", "Items produced", |m| {
        m.produced.load(Ordering::Relaxed)
    }),
    ("queue_leased", "queues_leased", "Items leased", |m| {
        m.leased.load(Ordering::Relaxed)
    }),
    ("queue_completed", "queues_completed", "Items completed", |m| {
        m.completed.load(Ordering::Relaxed)
    }),
    ("queue_retried", "queues_retried", "Items retried", |m| {
        m.retried.load(Ordering::Relaxed)
    }),
    (
        "queue_lease_expired",
        "queues_lease_expired",
        "Leases that expired",
        |m| m.lease_expired.load(Ordering::Relaxed),
    ),
    (
        "queue_dead_lettered",
        "queues_dead_lettered",
        "Items dead-lettered or dropped as dead",
        |m| m.dead_lettered.load(Ordering::Relaxed),
    ),
    (
        "queue_deduplicated",
        "queues_deduplicated",
        "Produced items acknowledged without being stored again (dedup key seen)",
        |m| m.deduplicated.load(Ordering::Relaxed),
    ),
    ("queue_extended", "queues_extended", "Leases extended", |m| {
        m.extended.load(Ordering::Relaxed)
    }),
];

/// The order in which queues get per-queue series when not all can: loaded before unloaded; loaded longest
/// first; unloaded most recently first; then by name, so the order is total and the choice the same each scrape.
fn report_order(a: &MetricsEntry, b: &MetricsEntry) -> std::cmp::Ordering {
    b.loaded
        .cmp(&a.loaded)
        .then_with(|| {
            if a.loaded {
                a.transition.cmp(&b.transition)
            } else {
                b.transition.cmp(&a.transition)
            }
        })
        .then_with(|| a.name.cmp(&b.name))
}

fn gauge(v: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl prometheus_client::collector::Collector for QueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.engine.metrics_snapshot();
        let mut queues = snapshot.queues;
        let all = queues.len();

        // Totals over every queue, before the choice below leaves some out.
        let sum = |pick: &dyn Fn(&QueueMetrics) -> u64| {
            queues
                .iter()
                .fold(0u64, |t, e| t.saturating_add(pick(&e.metrics)))
        };
        let gauge_totals = GAUGES.map(|(_, _, _, pick)| sum(&pick));
        let tier_totals = TIER_GAUGES.map(|(_, _, _, pick)| {
            [0, 1, 2].map(|i| sum(&|m: &QueueMetrics| pick(m)[i].load(Ordering::Relaxed)))
        });
        let mut counter_totals =
            COUNTERS.map(|(_, _, _, pick)| sum(&pick).saturating_add(pick(&snapshot.deleted)));
        if let Ok(mut floor) = self.floor.lock() {
            for (t, f) in counter_totals.iter_mut().zip(floor.iter_mut()) {
                *t = (*t).max(*f);
                *f = *t;
            }
        }

        match &self.only {
            Some(names) => queues.retain(|e| names.binary_search(&e.name).is_ok()),
            None => {
                let bound = self.max_queues.load(Ordering::Relaxed);
                if queues.len() > bound {
                    if let Some(last) = bound.checked_sub(1) {
                        queues.select_nth_unstable_by(last, report_order);
                    }
                    queues.truncate(bound);
                }
            }
        }
        queues.sort_unstable_by(|a, b| a.name.cmp(&b.name));

        for (name, _, help, pick) in GAUGES {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for e in &queues {
                let labels = [("queue", e.name.as_str())];
                gauge(pick(&e.metrics)).encode(fam.encode_family(&labels)?)?;
            }
        }
        // Per queue and storage tier: three tiers per queue, a fixed set like the gauges above (no per-partition
        // series). Refreshed by each queue's task (see `lessor_core::engine::TIER_REFRESH`).
        for (name, _, help, pick) in TIER_GAUGES {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for e in &queues {
                for (tier, v) in TIERS.iter().zip(pick(&e.metrics)) {
                    let labels = [("queue", e.name.as_str()), ("tier", tier)];
                    gauge(v.load(Ordering::Relaxed)).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        for (name, _, help, pick) in COUNTERS {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for e in &queues {
                let labels = [("queue", e.name.as_str())];
                ConstCounter::new(pick(&e.metrics)).encode(fam.encode_family(&labels)?)?;
            }
        }

        for ((_, name, help, _), v) in GAUGES.iter().zip(gauge_totals) {
            let help = format!("{help}, all queues");
            let fam = encoder.encode_descriptor(name, &help, None, MetricType::Gauge)?;
            gauge(v).encode(fam)?;
        }
        for ((_, name, help, _), v) in TIER_GAUGES.iter().zip(tier_totals) {
            let help = format!("{help}, all queues");
            let mut fam = encoder.encode_descriptor(name, &help, None, MetricType::Gauge)?;
            for (tier, v) in TIERS.iter().zip(v) {
                gauge(v).encode(fam.encode_family(&[("tier", *tier)])?)?;
            }
        }
        for ((_, name, help, _), v) in COUNTERS.iter().zip(counter_totals) {
            let help = format!("{help}, all queues (deleted ones included)");
            let fam = encoder.encode_descriptor(name, &help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(fam)?;
        }
        let fam = encoder.encode_descriptor(
            "metrics_queues_omitted",
            "Queues with figures whose per-queue series this scrape left out (limits.metrics-max-queues); the \
             lessor_queues_* totals count them",
            None,
            MetricType::Gauge,
        )?;
        gauge((all - queues.len()) as u64).encode(fam)?;
        if self.only.is_some() {
            // A `?queue=` scrape is for those queues' series; the server-wide families are in the plain one.
            return Ok(());
        }
        // Loaded queues (their tasks and state in memory) against the per-queue series above, which also cover
        // queues unloaded for being idle (`limits.queue-idle-unload`), with their last figures.
        let (loaded, loads) = self.engine.loaded_queues();
        let fam = encoder.encode_descriptor(
            "queues_loaded",
            "Queues loaded now; the others with series here are unloaded for being idle",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::try_from(loaded).unwrap_or(i64::MAX)).encode(fam)?;
        let fam = encoder.encode_descriptor(
            "queue_loads",
            "Queue loads since start-up (a queue loaded again after an unload counts again)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(loads).encode(fam)?;
        // The memory budgets of the stores that hold their items in RAM (memory, log): an operator sees one
        // filling before produce answers 454 for it.
        let budgets = self.engine.store_memory();
        type Budget = fn(&(String, u64, u64)) -> u64;
        let memory: [(&str, &str, Budget); 2] = [
            (
                "store_memory_bytes",
                "What a store's partitions hold in RAM, by the estimate its max-memory is checked against",
                |b| b.1,
            ),
            (
                "store_memory_max_bytes",
                "A store's max-memory: beyond it, new items are refused (454) until consumers make room",
                |b| b.2,
            ),
        ];
        for (name, help, pick) in memory {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for b in &budgets {
                ConstGauge::new(i64::try_from(pick(b)).unwrap_or(i64::MAX))
                    .encode(fam.encode_family(&[("store", b.0.as_str())])?)?;
            }
        }
        // Rebalance tasks watched by this server: items moved and left, by task and queue.
        let mut tasks = self.engine.rebalance_progress();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        type Progress = fn(&lessor_core::engine::RebalanceProgress) -> u64;
        let progress: [(&str, &str, Progress); 2] = [
            (
                "rebalance_moved_items",
                "Items a running rebalance task moved so far",
                |p| p.moved,
            ),
            (
                "rebalance_remaining_items",
                "Items left in the partitions a running rebalance task drains",
                |p| p.remaining,
            ),
        ];
        for (name, help, pick) in progress {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for t in &tasks {
                let labels = [("task", t.id.as_str()), ("queue", t.queue.as_str())];
                ConstGauge::new(i64::try_from(pick(t)).unwrap_or(i64::MAX))
                    .encode(fam.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Payload offload figures (object storage), process-wide: the offload wrappers of every partition store of this
/// process add to the same counters (see `lessor_storage::offload::metrics`). Exported only by builds with `s3`.
#[cfg(feature = "s3")]
#[derive(Debug)]
struct OffloadCollector;

#[cfg(feature = "s3")]
impl prometheus_client::collector::Collector for OffloadCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use lessor_storage::offload::{metrics, LATENCY_BUCKETS};
        let m = metrics();
        let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 10] = [
            (
                "offload_objects_written",
                "Payload objects written to object storage",
                &m.objects_written,
            ),
            (
                "offload_objects_deleted",
                "Payload objects deleted after their item was gone",
                &m.objects_deleted,
            ),
            (
                "offload_orphans_swept",
                "Payload objects no item referenced, deleted by the sweeper",
                &m.orphans_swept,
            ),
            (
                "offload_payload_bytes",
                "Payload bytes offloaded to object storage (before compression)",
                &m.bytes_offloaded,
            ),
            (
                "offload_object_bytes",
                "Object bytes written to object storage (after compression)",
                &m.object_bytes_written,
            ),
            (
                "cold_segments_written",
                "Cold backlog segments written to object storage",
                &m.segments_written,
            ),
            (
                "cold_segments_loaded",
                "Cold backlog segments loaded back from object storage",
                &m.segments_loaded,
            ),
            (
                "cold_segments_swept",
                "Orphaned cold segment objects deleted by the segment sweeper",
                &m.segments_swept,
            ),
            (
                "cold_segment_load_errors",
                "Cold segment loads that failed (missing, corrupt, object storage unavailable)",
                &m.segment_failures,
            ),
            (
                "cold_segment_fetches_paused",
                "Cold segment fetches not made because the segment's last fetch failed and its retry pause has not passed",
                &m.segment_fetches_paused,
            ),
        ];
        for (name, help, v) in counters {
            let fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(fam)?;
        }
        let mut fam = encoder.encode_descriptor(
            "offload_fetch_errors",
            "Offloaded payloads that could not be served, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, v) in [
            ("missing", &m.fetch_missing),
            ("corrupt", &m.fetch_corrupt),
            ("unavailable", &m.fetch_unavailable),
        ] {
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(fam.encode_family(&[("reason", reason)])?)?;
        }
        let mut fam = encoder.encode_descriptor(
            "offload_request_duration_seconds",
            "Object-storage request latency (put, get, delete, list)",
            None,
            MetricType::Histogram,
        )?;
        let counts: Vec<u64> = m
            .latency_counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .zip(counts.iter().copied())
            .collect();
        buckets.push((f64::INFINITY, counts.last().copied().unwrap_or(0)));
        let sum = m.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        fam.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            sum,
            counts.iter().sum(),
            &buckets,
            None,
        )?;
        Ok(())
    }
}
