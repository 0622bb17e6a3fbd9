//! `lessor bench`: a load generator that drives a Lessor (or Querator) server over its HTTP API and reports
//! throughput and latency.
//!
//! It starts its own in-process server (`--backend memory|fjall`) or targets `--endpoint URL`, creates a queue
//! with a unique name, runs one workload, prints a table (and writes JSON with `--json-out`), and deletes
//! the queue.
//!
//! # Workloads
//! * `produce`: N producers send batches of `--batch` items until `--duration` elapses or `--items` are sent.
//! * `drain`: the producers pre-fill the queue with `--items` items (reported as the `produce` row), then M
//!   consumers lease and complete everything; the lease and complete rates cover the drain only.
//! * `pipeline`: producers, and consumers that lease and complete, run at the same time. When the producers
//!   stop, the consumers finish the backlog; their rate is measured up to the last completion.
//!
//! # What is measured
//! * `produce`: acknowledgement latency of each produce request. With `--rate`, producers follow a fixed
//!   schedule (open loop: a slow reply does not delay the next send beyond the schedule) and latency is
//!   counted from the actual send. How far sends fell behind the schedule is reported (`schedule lag`),
//!   so a stalled run is visible; tokio's timer alone accounts for about 1 ms of it.
//! * `lease`: time from sending a lease request to receiving items. Long-polls that end with 454 (nothing
//!   to lease within `--request-timeout`) are counted in the `454s` column, not in the latency.
//! * `complete`: latency of each complete request.
//! * `end-to-end`: produce-to-lease time of every leased item: producers write the send time (nanoseconds
//!   since the start of the run, little-endian) into the first 8 bytes of each payload, and consumers
//!   subtract it from the time the lease reply arrived. Producers and consumers share one clock because
//!   they run in this process. Only reported by `pipeline`.
//!
//! The module does not retry anything but 454 replies; other errors are counted and the first few are
//! printed.

pub mod chart;
mod report;

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use lessor_client::{Client, Encoding};
use lessor_proto::{
    QueueCompleteRequest, QueueInfo, QueueLeaseRequest, QueueProduceItem, QueueProduceRequest,
    QueuesDeleteRequest,
};
use lessor_server::{Config, RunningServer};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use report::{process_cpu, record, thread_cpu, CpuPhase, OpStats, Row};

/// What the benchmark does; see the module documentation.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Produce only.
    Produce,
    /// Pre-fill the queue with --items, then lease and complete all of it.
    Drain,
    /// Produce, lease and complete at the same time.
    Pipeline,
}

/// Which in-process server to start when no --endpoint is given.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Memory storage.
    Memory,
    /// The embedded fjall engine, in a temporary directory removed afterwards.
    Fjall,
    /// Partitions in RAM made durable by an append-only log (the `log` driver; queue definitions in fjall), in a
    /// temporary directory removed afterwards.
    Log,
}

/// `lessor bench`: load-test an in-process server (`--backend`) or a running one (`--endpoint`).
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server to benchmark when no --backend is given (under the `lessor` binary this is the global
    /// --endpoint, default http://127.0.0.1:2319 or LESSOR_ENDPOINT).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// API key for --endpoint (under the `lessor` binary this is the global --api-key or LESSOR_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// TLS settings for an `https://` --endpoint (under the `lessor` binary: the global --tls-ca, --tls-cert and
    /// --tls-key).
    #[arg(skip)]
    pub tls: Option<Box<lessor_client::TlsConfig>>,
    /// Start an in-process server with this storage and benchmark it instead of --endpoint.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// With --backend: turn auth on in the in-process server (`auth-backend: internal`, door closed) and send its
    /// bootstrap admin key with every request, to measure what authentication and authorisation cost.
    #[arg(long, requires = "backend")]
    pub auth: bool,
    /// Durability of the in-process server (fjall or log): sync, interval or none (default: the server's).
    #[arg(long)]
    pub durability: Option<String>,
    /// Speak JSON instead of protobuf.
    #[arg(long)]
    pub json: bool,
    /// What to run.
    #[arg(long, value_enum, default_value_t = Workload::Pipeline)]
    pub workload: Workload,
    /// Concurrent producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Concurrent consumers (lease + complete).
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Items per produce request and per lease request (1..=1000).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Payload size in bytes (at least 8: the first 8 carry the send time).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Partitions of the benchmark queue.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// How long producers run (Go duration); the default when --items is not given is 10s.
    #[arg(long)]
    pub duration: Option<String>,
    /// Items to produce in total (drain: the pre-fill, default 1,000,000).
    #[arg(long)]
    pub items: Option<u64>,
    /// Total produce rate in items/s, spread over the producers (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Long-poll time of each lease request (Go duration).
    #[arg(long, default_value = "1s")]
    pub request_timeout: String,
    /// Lease timeout of the benchmark queue (Go duration).
    #[arg(long, default_value = "1m")]
    pub lease_timeout: String,
    /// How long consumers may take to finish the backlog once producers stop (Go duration).
    #[arg(long, default_value = "60s")]
    pub drain_timeout: String,
    /// Name prefix of the benchmark queue; a unique suffix is appended.
    #[arg(long, default_value = "bench")]
    pub queue_prefix: String,
    /// Use this queue (created when missing, kept afterwards) instead of a new one, so that several bench
    /// processes can drive one queue through different servers. End-to-end latency means nothing when several
    /// processes share the queue: each measures from its own clock origin.
    #[arg(long, conflicts_with = "queue_prefix")]
    pub queue: Option<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// How many distinct error messages are kept for the report.
const KEPT_ERRORS: usize = 5;
/// Request timeout of produce and complete calls.
const CALL_TIMEOUT: &str = "30s";

/// Runs the benchmark described by `args` and prints its results.
///
/// # Errors
/// Invalid arguments, a server that cannot be started or reached, or a queue that cannot be created.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    let plan = Plan::from_args(&args)?;
    let wall = Instant::now();
    // The in-process server logs only when asked (`RUST_LOG=lessor_storage=debug,fjall=debug` shows slow writes
    // next to what the storage engine was doing): the bench's own output stays a table.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }

    // The server: our own, or the one given.
    let mut tempdir: Option<tempfile::TempDir> = None;
    let mut server: Option<RunningServer> = None;
    let mut api_key = args.api_key.clone().filter(|k| !k.is_empty());
    let key_dir = if args.auth {
        Some(
            tempfile::Builder::new()
                .prefix("lessor-bench-key-")
                .tempdir()
                .map_err(|e| format!("bench: cannot create a temporary directory: {e}"))?,
        )
    } else {
        None
    };
    let backend = match (args.backend, &args.endpoint) {
        (Some(b), _) => Some(b),
        (None, Some(_)) => None,
        (None, None) => Some(Backend::Memory),
    };
    let endpoint = match backend {
        None => args.endpoint.clone().unwrap_or_default(),
        Some(backend) => {
            let mut config = match backend {
                Backend::Memory => Config::memory(),
                Backend::Fjall | Backend::Log => {
                    let dir = tempfile::Builder::new()
                        .prefix("lessor-bench-")
                        .tempdir()
                        .map_err(|e| format!("bench: cannot create a temporary directory: {e}"))?;
                    let config = persistent_config(
                        dir.path().to_string_lossy().as_ref(),
                        args.durability.as_deref(),
                        backend == Backend::Log,
                    )?;
                    tempdir = Some(dir);
                    config
                }
            };
            let key_file = key_dir.as_ref().map(|d| d.path().join("admin.key"));
            if let Some(file) = &key_file {
                config.auth_backend = lessor_server::config::AuthSection {
                    driver: Some("internal".into()),
                    open_door: Some(false),
                    bootstrap_key_file: Some(file.to_string_lossy().into_owned()),
                };
            }
            let s = lessor_server::start(&config, "127.0.0.1:0", None)
                .await
                .map_err(|e| {
                    format!("bench: cannot start the in-process {backend:?} server: {e}").to_lowercase()
                })?;
            if let Some(file) = &key_file {
                let key = std::fs::read_to_string(file)
                    .map_err(|e| format!("bench: cannot read the bootstrap key: {e}"))?;
                api_key = Some(key.trim().to_string());
            }
            let e = s.endpoint();
            server = Some(s);
            e
        }
    };
    let encoding = if args.json {
        Encoding::Json
    } else {
        Encoding::Protobuf
    };
    let mut client = Client::new(&endpoint)
        .map_err(|e| format!("bench: {e}"))?
        .with_encoding(encoding);
    if let (None, Some(tls)) = (backend, &args.tls) {
        client = client.with_tls(tls).map_err(|e| format!("bench: {e}"))?;
    }
    if let Some(key) = api_key.as_deref() {
        client = client.with_api_key(key);
    }

    let own_queue = args.queue.is_none();
    let queue = args
        .queue
        .clone()
        .unwrap_or_else(|| unique_queue_name(&args.queue_prefix));
    let created = client
        .queues_create(&QueueInfo {
            queue_name: queue.clone(),
            lease_timeout: args.lease_timeout.clone(),
            expire_timeout: "24h".into(),
            requested_partitions: i32::try_from(args.partitions).unwrap_or(i32::MAX),
            reference: "lessor bench".into(),
            ..Default::default()
        })
        .await;
    // A shared queue may have been created by another bench process already.
    let created = match created {
        Err(e) if !own_queue && e.to_string().contains("already exists") => Ok(()),
        other => other.map(|_| ()),
    };
    created.map_err(|e| {
        let hint = if backend.is_none() {
            " (start a server there, or pass --backend memory|fjall for an in-process one)"
        } else {
            ""
        };
        format!("bench: cannot create queue '{queue}' at {endpoint}: {e}{hint}")
    })?;

    let target = match backend {
        None => endpoint.clone(),
        Some(b) => format!("in-process {b:?} server at {endpoint}").to_lowercase(),
    };
    eprintln!(
        "lessor bench: {:?} workload on {target}, queue {queue}, {}, {} producer(s), {} consumer(s), batch {}, \
         payload {} B, {} partition(s), {}{}",
        args.workload,
        if args.json { "JSON" } else { "protobuf" },
        plan.producers,
        plan.consumers,
        plan.batch,
        plan.payload,
        args.partitions,
        plan.stop.describe(),
        args.rate.map(|r| format!(", paced at {} items/s", report::thousands(r))).unwrap_or_default(),
    );

    let shared = Arc::new(Shared {
        client: client.clone(),
        queue: queue.clone(),
        epoch: Instant::now(),
        client_prefix: queue.clone(),
        request_timeout: args.request_timeout.clone(),
        plan: plan.clone(),
        produced: AtomicU64::new(0),
        leased: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        last_complete_ns: AtomicU64::new(0),
        consuming: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
    });

    let progress = (!args.quiet).then(|| tokio::spawn(progress(shared.clone())));
    let cpu_before = report::CpuSample::now();
    let outcome = execute(&shared, args.workload).await;
    let (outcome, phases) = match outcome {
        Ok((rows, phases)) => (Ok(rows), phases),
        Err(e) => (Err(e), Vec::new()),
    };
    let cpu = cpu_before
        .zip(report::CpuSample::now())
        .and_then(|(a, b)| a.usage_since(&b));
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }

    // Clean up whatever happened (a queue named by --queue stays).
    let deleted = if own_queue {
        client
            .queues_delete(&QueuesDeleteRequest {
                queue_name: queue.clone(),
                force: true,
            })
            .await
            .map(|_| ())
    } else {
        Ok(())
    };
    if let Some(s) = server {
        s.stop().await;
    }
    drop(tempdir);
    let rows = outcome?;
    if let Err(e) = deleted {
        eprintln!("warning: could not delete queue '{queue}': {e}");
    }

    let errors = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    print!("{}", report::table(&rows));
    if let Some((own, other)) = cpu {
        println!(
            "cpu: this process {own:.0}% of the machine ({} cpus), other processes {other:.0}%",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
    }
    print!("{}", report::cpu_lines(&phases));
    if let Some(lag) = rows
        .iter()
        .map(|r| r.stats.lag_max)
        .max()
        .filter(|l| !l.is_zero())
    {
        println!(
            "schedule lag: sends were at most {:.3} ms behind the --rate schedule",
            lag.as_secs_f64() * 1000.0
        );
    }
    for e in &errors {
        eprintln!("error seen: {e}");
    }
    if let Some(path) = &args.json_out {
        let config = json!({
            "workload": format!("{:?}", args.workload).to_lowercase(),
            "endpoint": if backend.is_none() { Some(&endpoint) } else { None },
            "backend": backend.map(|b| format!("{b:?}").to_lowercase()),
            "durability": args.durability,
            "encoding": if args.json { "json" } else { "protobuf" },
            "producers": plan.producers,
            "consumers": plan.consumers,
            "batch": plan.batch,
            "payload_bytes": plan.payload,
            "partitions": args.partitions,
            "duration_s": match plan.stop { Stop::For(d) => Some(d.as_secs_f64()), Stop::Items(_) => None },
            "items": match plan.stop { Stop::Items(n) => Some(n), Stop::For(_) => None },
            "rate_items_per_s": args.rate,
            "request_timeout": args.request_timeout,
            "queue": queue,
        });
        let doc = report::document(config, &rows, wall.elapsed(), cpu, &phases, &errors);
        let text = serde_json::to_string_pretty(&doc).map_err(|e| format!("bench: {e}"))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("bench: cannot write '{}': {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The in-process fjall configuration, or a clear error when this build has no fjall. The stores are opened by the
/// storage crate's driver registry like the server's, so the durability value is checked there too.
fn persistent_config(dir: &str, durability: Option<&str>, log: bool) -> Result<Config, String> {
    let backend = if log { "log" } else { "fjall" };
    let compiled = lessor_server::config::driver_compiled(backend);
    if !compiled {
        return Err(format!(
            "bench: --backend {backend}: the {backend} storage driver is not compiled into this build \
                    (rebuild with the 'fjall' feature, or use --backend memory or --endpoint)"
        ));
    }
    let mut config = Config::default_persistent(dir);
    if log {
        for s in &mut config.partition_storage {
            s.driver = Some("log".into());
        }
    }
    if let Some(d) = durability {
        for s in config
            .partition_storage
            .iter_mut()
            .chain(config.queue_storage.iter_mut())
        {
            s.config.insert("durability".into(), d.into());
        }
    }
    config
        .validate()
        .map_err(|e| format!("bench: --backend {backend}: {e}"))?;
    Ok(config)
}

/// `<prefix>-<pid>-<unix millis>`: unique enough for concurrent runs against one server.
fn unique_queue_name(prefix: &str) -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{prefix}-{}-{millis}", std::process::id())
}

/// When producers stop.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// After this long.
    For(Duration),
    /// After this many items in total.
    Items(u64),
}

impl Stop {
    fn describe(&self) -> String {
        match self {
            Stop::For(d) => format!("{:.1} s", d.as_secs_f64()),
            Stop::Items(n) => format!("{} items", report::thousands(*n as f64)),
        }
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
struct Plan {
    producers: usize,
    consumers: usize,
    batch: usize,
    payload: usize,
    stop: Stop,
    /// Time between two batches of one producer, when paced.
    pace: Option<Duration>,
    drain_timeout: Duration,
}

impl Plan {
    fn from_args(a: &BenchArgs) -> Result<Plan, String> {
        let dur = |flag: &str, v: &str| {
            lessor_proto::duration::parse_go_duration(v).map_err(|e| format!("bench: --{flag} '{v}': {e}"))
        };
        if !(1..=1000).contains(&a.batch) {
            return Err(format!(
                "bench: --batch must be between 1 and 1000, got {}",
                a.batch
            ));
        }
        if a.partitions == 0 {
            return Err("bench: --partitions must be at least 1".into());
        }
        let producers = a.producers;
        let consumers = if a.workload == Workload::Produce {
            0
        } else {
            a.consumers
        };
        if producers == 0 {
            return Err("bench: --producers must be at least 1".into());
        }
        if a.workload != Workload::Produce && consumers == 0 {
            return Err(
                format!("bench: the {:?} workload needs --consumers >= 1", a.workload).to_lowercase(),
            );
        }
        let stop = match (a.workload, a.items, &a.duration) {
            (Workload::Drain, _, Some(_)) => {
                return Err(
                    "bench: the drain workload runs until --items are consumed; drop --duration".into(),
                )
            }
            (Workload::Drain, None, None) => Stop::Items(1_000_000),
            (_, Some(_), Some(_)) => return Err("bench: give --duration or --items, not both".into()),
            (_, Some(0), _) => return Err("bench: --items must be at least 1".into()),
            (_, Some(n), None) => Stop::Items(n),
            (_, None, Some(d)) => Stop::For(dur("duration", d)?),
            (_, None, None) => Stop::For(Duration::from_secs(10)),
        };
        let pace = match a.rate {
            None => None,
            Some(r) if r.is_finite() && r > 0.0 => {
                let per_producer = r / producers as f64;
                Some(Duration::from_secs_f64(a.batch as f64 / per_producer))
            }
            Some(r) => return Err(format!("bench: --rate must be a positive number, got {r}")),
        };
        dur("request-timeout", &a.request_timeout)?;
        dur("lease-timeout", &a.lease_timeout)?;
        Ok(Plan {
            producers,
            consumers,
            batch: a.batch,
            payload: a.payload.max(8),
            stop,
            pace,
            drain_timeout: dur("drain-timeout", &a.drain_timeout)?,
        })
    }
}

/// State shared by the workers and the progress line.
struct Shared {
    client: Client,
    queue: String,
    /// Origin of the timestamps written into payloads.
    epoch: Instant,
    client_prefix: String,
    request_timeout: String,
    plan: Plan,
    produced: AtomicU64,
    leased: AtomicU64,
    completed: AtomicU64,
    /// Nanoseconds since `epoch` of the latest completion.
    last_complete_ns: AtomicU64,
    /// Whether consumers are running (for the progress line).
    consuming: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn since_epoch(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn note_error(&self, what: &str, e: &dyn std::fmt::Display) {
        let msg = format!("{what}: {e}");
        if let Ok(mut errors) = self.errors.lock() {
            if errors.len() < KEPT_ERRORS && !errors.contains(&msg) {
                errors.push(msg);
            }
        }
    }
}

/// Items producers may still send.
enum Budget {
    Until(Instant),
    Items(AtomicU64),
}

impl Budget {
    fn new(stop: Stop) -> Budget {
        match stop {
            Stop::For(d) => Budget::Until(Instant::now() + d),
            Stop::Items(n) => Budget::Items(AtomicU64::new(n)),
        }
    }

    /// Takes up to `want` items; 0 means stop.
    fn claim(&self, want: u64) -> u64 {
        match self {
            Budget::Until(t) => {
                if Instant::now() < *t {
                    want
                } else {
                    0
                }
            }
            Budget::Items(left) => {
                let mut cur = left.load(Ordering::Relaxed);
                loop {
                    if cur == 0 {
                        return 0;
                    }
                    let take = cur.min(want);
                    match left.compare_exchange_weak(cur, cur - take, Ordering::Relaxed, Ordering::Relaxed) {
                        Ok(_) => return take,
                        Err(now) => cur = now,
                    }
                }
            }
        }
    }
}

/// Process and per-thread CPU counters at one moment (see [`CpuPhase`]).
type CpuMark = (Option<Duration>, std::collections::BTreeMap<String, Duration>);

fn cpu_mark() -> CpuMark {
    (process_cpu(), thread_cpu())
}

/// The phase `name` that began at `from` and counted `items`, when `/proc` tells.
fn cpu_phase(name: &'static str, from: &CpuMark, items: u64) -> Option<CpuPhase> {
    let (cpu, threads) = cpu_mark();
    let cpu = cpu?.saturating_sub(from.0?);
    let mut threads: Vec<(String, Duration)> = threads
        .into_iter()
        .map(|(n, d)| {
            let before = from.1.get(&n).copied().unwrap_or_default();
            (n, d.saturating_sub(before))
        })
        .collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.1));
    Some(CpuPhase {
        name,
        cpu,
        items,
        threads,
    })
}

/// Runs the workload and returns the result rows and the CPU each phase cost.
async fn execute(shared: &Arc<Shared>, workload: Workload) -> Result<(Vec<Row>, Vec<CpuPhase>), String> {
    let plan = &shared.plan;
    let mut phases = Vec::new();
    let mut phase = |name, from: &CpuMark, items| phases.extend(cpu_phase(name, from, items));
    let cpu0 = cpu_mark();
    let rows: Result<Vec<Row>, String> = match workload {
        Workload::Produce => {
            let (produce, elapsed) = produce_phase(shared, plan.stop, plan.pace).await?;
            phase("produce", &cpu0, produce.items);
            Ok(vec![Row {
                name: "produce",
                stats: produce,
                elapsed: Some(elapsed),
                note: "produce acknowledgement latency",
            }])
        }
        Workload::Drain => {
            let (produce, p_elapsed) = produce_phase(shared, plan.stop, plan.pace).await?;
            phase("produce", &cpu0, produce.items);
            let target = shared.produced.load(Ordering::Relaxed);
            let (stop_tx, stop_rx) = watch::channel(false);
            let start = Instant::now();
            let cpu1 = cpu_mark();
            let consumers = spawn_consumers(shared, &stop_rx, false);
            wait_for_completion(shared, target, plan.drain_timeout).await;
            let _ = stop_tx.send(true);
            let (lease, complete, _) = join_consumers(consumers).await?;
            let c_elapsed = consume_elapsed(shared, start);
            // An item counts once here: leasing and completing it are one unit of work.
            phase("lease+complete", &cpu1, complete.items);
            Ok(vec![
                Row {
                    name: "produce",
                    stats: produce,
                    elapsed: Some(p_elapsed),
                    note: "pre-fill, no consumers running; produce acknowledgement latency",
                },
                Row {
                    name: "lease",
                    stats: lease,
                    elapsed: Some(c_elapsed),
                    note: "drain of the pre-filled queue; lease request latency (454s excluded)",
                },
                Row {
                    name: "complete",
                    stats: complete,
                    elapsed: Some(c_elapsed),
                    note: "drain of the pre-filled queue; complete request latency",
                },
            ])
        }
        Workload::Pipeline => {
            let (stop_tx, stop_rx) = watch::channel(false);
            let start = Instant::now();
            let consumers = spawn_consumers(shared, &stop_rx, true);
            let produced = produce_phase(shared, plan.stop, plan.pace).await;
            let target = shared.produced.load(Ordering::Relaxed);
            if produced.is_ok() {
                wait_for_completion(shared, target, plan.drain_timeout).await;
            }
            let _ = stop_tx.send(true);
            let (lease, complete, e2e) = join_consumers(consumers).await?;
            let (produce, p_elapsed) = produced?;
            let c_elapsed = consume_elapsed(shared, start);
            phase("produce+lease+complete", &cpu0, complete.items);
            let mut e2e_stats = OpStats {
                items: e2e.len(),
                ..Default::default()
            };
            e2e_stats.hist = e2e;
            Ok(vec![
                Row {
                    name: "produce",
                    stats: produce,
                    elapsed: Some(p_elapsed),
                    note: "produce acknowledgement latency, consumers running",
                },
                Row {
                    name: "lease",
                    stats: lease,
                    elapsed: Some(c_elapsed),
                    note: "lease request latency (454s excluded); rate up to the last completion",
                },
                Row {
                    name: "complete",
                    stats: complete,
                    elapsed: Some(c_elapsed),
                    note: "complete request latency; rate up to the last completion",
                },
                Row {
                    name: "end-to-end",
                    stats: e2e_stats,
                    elapsed: None,
                    note: "per item: lease reply received minus produce request sent",
                },
            ])
        }
    };
    Ok((rows?, phases))
}

/// Runs the producers until the budget is spent; returns their merged stats and how long they ran.
async fn produce_phase(
    shared: &Arc<Shared>,
    stop: Stop,
    pace: Option<Duration>,
) -> Result<(OpStats, Duration), String> {
    let budget = Arc::new(Budget::new(stop));
    let start = Instant::now();
    let handles: Vec<_> = (0..shared.plan.producers)
        .map(|i| {
            let (shared, budget) = (shared.clone(), budget.clone());
            // Stagger paced producers so their batches do not all leave at once.
            let offset = pace.map(|p| p * u32::try_from(i).unwrap_or(0) / shared.plan.producers as u32);
            tokio::spawn(
                async move { producer(&shared, &budget, pace, start + offset.unwrap_or_default()).await },
            )
        })
        .collect();
    let mut total = OpStats::default();
    for h in handles {
        let s = h.await.map_err(|e| format!("bench: a producer failed: {e}"))?;
        total.merge(&s);
    }
    let elapsed = start.elapsed();
    if total.requests == 0 && total.errors > 0 {
        let first = shared
            .errors
            .lock()
            .ok()
            .and_then(|e| e.first().cloned())
            .unwrap_or_default();
        return Err(format!(
            "bench: every produce request failed; first error: {first}"
        ));
    }
    Ok((total, elapsed))
}

/// One producer: sends batches until the budget is spent.
async fn producer(shared: &Shared, budget: &Budget, pace: Option<Duration>, start: Instant) -> OpStats {
    let plan = &shared.plan;
    let mut stats = OpStats::default();
    let filler = vec![b'x'; plan.payload];
    let mut tick: u32 = 0;
    loop {
        if let Some(interval) = pace {
            let at = start + interval * tick;
            tick = tick.saturating_add(1);
            tokio::time::sleep_until(at.into()).await;
            // tokio's timer wakes up to ~1 ms late; only lateness beyond that means the producer fell behind.
            stats.lag_max = stats.lag_max.max(at.elapsed());
        }
        let t0 = Instant::now();
        let n = budget.claim(plan.batch as u64);
        if n == 0 {
            break;
        }
        let stamp = shared.since_epoch(t0).to_le_bytes();
        let items = (0..n)
            .map(|_| {
                let mut bytes = filler.clone();
                bytes[..8].copy_from_slice(&stamp);
                QueueProduceItem {
                    bytes,
                    ..Default::default()
                }
            })
            .collect();
        let req = QueueProduceRequest {
            queue_name: shared.queue.clone(),
            request_timeout: CALL_TIMEOUT.into(),
            items,
        };
        loop {
            match shared.client.queue_produce(&req).await {
                Ok(()) => {
                    record(&mut stats.hist, t0.elapsed());
                    stats.requests += 1;
                    stats.items += n;
                    shared.produced.fetch_add(n, Ordering::Relaxed);
                    break;
                }
                Err(e) if e.is_retryable() => {
                    stats.retries += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => {
                    stats.errors += 1;
                    shared.note_error("produce", &e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
            }
        }
    }
    stats
}

type ConsumerResult = (OpStats, OpStats, report::Hist);

fn spawn_consumers(
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
    e2e: bool,
) -> Vec<JoinHandle<ConsumerResult>> {
    shared.consuming.store(true, Ordering::Relaxed);
    (0..shared.plan.consumers)
        .map(|i| {
            let (shared, stop) = (shared.clone(), stop.clone());
            tokio::spawn(async move { consumer(&shared, i, stop, e2e).await })
        })
        .collect()
}

async fn join_consumers(handles: Vec<JoinHandle<ConsumerResult>>) -> Result<ConsumerResult, String> {
    let (mut lease, mut complete, mut e2e) = (OpStats::default(), OpStats::default(), report::new_hist());
    for h in handles {
        let (l, c, e) = h.await.map_err(|e| format!("bench: a consumer failed: {e}"))?;
        lease.merge(&l);
        complete.merge(&c);
        let _ = e2e.add(&e);
    }
    Ok((lease, complete, e2e))
}

/// Waits until `target` items are completed, or `timeout` passes without progress.
async fn wait_for_completion(shared: &Shared, target: u64, timeout: Duration) {
    let mut last = shared.completed.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        let done = shared.completed.load(Ordering::Relaxed);
        if done >= target {
            return;
        }
        if done != last {
            last = done;
            last_change = Instant::now();
        } else if last_change.elapsed() > timeout {
            shared.note_error(
                "drain",
                &format!("gave up after {timeout:?} without progress: {done} of {target} items completed"),
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// From `start` to the latest completion.
fn consume_elapsed(shared: &Shared, start: Instant) -> Duration {
    let last = Duration::from_nanos(shared.last_complete_ns.load(Ordering::Relaxed));
    let started = start.saturating_duration_since(shared.epoch);
    last.saturating_sub(started)
}

/// One consumer: leases, records, completes, until told to stop.
async fn consumer(shared: &Shared, id: usize, mut stop: watch::Receiver<bool>, e2e: bool) -> ConsumerResult {
    let (mut lease, mut complete, mut e2e_hist) =
        (OpStats::default(), OpStats::default(), report::new_hist());
    let req = QueueLeaseRequest {
        queue_name: shared.queue.clone(),
        batch_size: i32::try_from(shared.plan.batch).unwrap_or(1000),
        client_id: format!("{}-consumer-{id}", shared.client_prefix),
        request_timeout: shared.request_timeout.clone(),
    };
    loop {
        if *stop.borrow() {
            break;
        }
        let t0 = Instant::now();
        let res = tokio::select! {
            r = shared.client.queue_lease(&req) => r,
            _ = stop.changed() => break,
        };
        let got = Instant::now();
        let resp = match res {
            Ok(resp) if !resp.items.is_empty() => resp,
            Ok(_) => {
                lease.retries += 1;
                continue;
            }
            Err(e) if e.is_retryable() => {
                lease.retries += 1;
                continue;
            }
            Err(e) => {
                lease.errors += 1;
                shared.note_error("lease", &e);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let n = resp.items.len() as u64;
        record(&mut lease.hist, got - t0);
        lease.requests += 1;
        lease.items += n;
        shared.leased.fetch_add(n, Ordering::Relaxed);
        if e2e {
            let now = shared.since_epoch(got);
            for item in &resp.items {
                if let Some(stamp) = item.bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                    let sent = u64::from_le_bytes(stamp);
                    record(&mut e2e_hist, Duration::from_nanos(now.saturating_sub(sent)));
                }
            }
        }
        let done = QueueCompleteRequest {
            queue_name: shared.queue.clone(),
            partition: resp.partition,
            request_timeout: CALL_TIMEOUT.into(),
            ids: resp.items.into_iter().map(|i| i.id).collect(),
        };
        let t1 = Instant::now();
        match shared.client.queue_complete(&done).await {
            Ok(()) => {
                let end = Instant::now();
                record(&mut complete.hist, end - t1);
                complete.requests += 1;
                complete.items += n;
                shared.completed.fetch_add(n, Ordering::Relaxed);
                shared
                    .last_complete_ns
                    .fetch_max(shared.since_epoch(end), Ordering::Relaxed);
            }
            Err(e) => {
                complete.errors += 1;
                shared.note_error("complete", &e);
            }
        }
    }
    (lease, complete, e2e_hist)
}

/// Prints a progress line on stderr every second (in place on a terminal).
async fn progress(shared: Arc<Shared>) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let (mut last_p, mut last_c) = (0u64, 0u64);
    loop {
        ticker.tick().await;
        let p = shared.produced.load(Ordering::Relaxed);
        let c = shared.completed.load(Ordering::Relaxed);
        let mut line = format!(
            "[{:>4.0}s] produced {:>12} ({:>10}/s)",
            start.elapsed().as_secs_f64(),
            report::thousands(p as f64),
            report::thousands((p - last_p) as f64)
        );
        if shared.consuming.load(Ordering::Relaxed) {
            line.push_str(&format!(
                "  completed {:>12} ({:>10}/s)  backlog {:>10}",
                report::thousands(c as f64),
                report::thousands(c.saturating_sub(last_c) as f64),
                report::thousands(p.saturating_sub(c) as f64),
            ));
        }
        (last_p, last_c) = (p, c);
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser, Subcommand};

    use super::*;

    /// Mirrors how the binary mounts the command: global `--endpoint` and `--json` on the parent.
    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, global = true, default_value = "http://127.0.0.1:2319")]
        endpoint: String,
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Bench(BenchArgs),
    }

    fn parse(args: &[&str]) -> BenchArgs {
        let cli = Cli::try_parse_from(std::iter::once("lessor").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"));
        let Cmd::Bench(b) = cli.command;
        b
    }

    #[test]
    fn args_parse_under_a_parent_with_global_flags() {
        Cli::command().debug_assert();
        let b = parse(&["bench"]);
        assert_eq!(
            (b.workload, b.backend, b.batch, b.payload),
            (Workload::Pipeline, None, 100, 100)
        );
        // The parent's default reaches the subcommand: without --backend, bench targets it.
        assert_eq!(b.endpoint.as_deref(), Some("http://127.0.0.1:2319"));
        assert!(!b.json);
        let b = parse(&["--json", "bench", "--backend", "fjall"]);
        assert!(b.json);
        assert_eq!(b.backend, Some(Backend::Fjall));
        let b = parse(&[
            "bench",
            "--json",
            "--endpoint",
            "http://h:1",
            "--workload",
            "drain",
            "--items",
            "5",
            "--rate",
            "10",
        ]);
        assert!(b.json);
        assert_eq!(b.endpoint.as_deref(), Some("http://h:1"));
        assert_eq!((b.workload, b.items), (Workload::Drain, Some(5)));
    }

    #[test]
    fn plans_validate_their_inputs() {
        let plan = |a: &[&str]| Plan::from_args(&parse(a));
        assert!(matches!(plan(&["bench"]).map(|p| p.stop), Ok(Stop::For(d)) if d == Duration::from_secs(10)));
        assert!(matches!(
            plan(&["bench", "--workload", "drain"]).map(|p| p.stop),
            Ok(Stop::Items(1_000_000))
        ));
        assert!(plan(&["bench", "--workload", "drain", "--duration", "1s"]).is_err());
        assert!(plan(&["bench", "--items", "1", "--duration", "1s"]).is_err());
        assert!(plan(&["bench", "--batch", "0"]).is_err());
        assert!(plan(&["bench", "--batch", "1001"]).is_err());
        assert!(plan(&["bench", "--duration", "ten"]).is_err());
        assert!(plan(&["bench", "--rate", "0"]).is_err());
        assert!(plan(&["bench", "--consumers", "0"]).is_err());
        assert!(plan(&["bench", "--workload", "produce", "--consumers", "0"]).is_ok());
        let p = plan(&[
            "bench",
            "--rate",
            "10000",
            "--producers",
            "4",
            "--batch",
            "100",
            "--payload",
            "3",
        ]);
        let p = p.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.pace, Some(Duration::from_millis(40)));
        assert_eq!(p.payload, 8);
    }

    #[test]
    fn item_budget_is_shared_exactly() {
        let b = Budget::new(Stop::Items(250));
        assert_eq!(
            (b.claim(100), b.claim(100), b.claim(100), b.claim(100)),
            (100, 100, 50, 0)
        );
        let b = Budget::new(Stop::For(Duration::ZERO));
        assert_eq!(b.claim(100), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_workload_runs_against_an_in_process_server() {
        for workload in ["produce", "drain", "pipeline"] {
            for json in [false, true] {
                let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
                let out = dir.path().join("out.json");
                let out_s = out.to_string_lossy().to_string();
                let mut a = vec![
                    "bench",
                    "--backend",
                    "memory",
                    "--workload",
                    workload,
                    "--items",
                    "2000",
                ];
                a.extend(["--batch", "50"]);
                a.extend([
                    "--producers",
                    "2",
                    "--consumers",
                    "2",
                    "--quiet",
                    "--json-out",
                    &out_s,
                ]);
                if json {
                    a.push("--json");
                }
                run(parse(&a)).await.unwrap_or_else(|e| panic!("{workload}: {e}"));
                let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("{e}"));
                let doc: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(doc["results"]["produce"]["items"], 2000, "{workload}: {doc}");
                assert_eq!(doc["results"]["produce"]["errors"], 0, "{workload}: {doc}");
                if workload != "produce" {
                    assert_eq!(doc["results"]["complete"]["items"], 2000, "{workload}: {doc}");
                    assert_eq!(doc["results"]["lease"]["errors"], 0, "{workload}: {doc}");
                }
                if workload == "pipeline" {
                    assert_eq!(doc["results"]["end-to-end"]["items"], 2000, "{workload}: {doc}");
                }
            }
        }
    }

    #[tokio::test]
    async fn fjall_backend_runs_or_explains_why_not() {
        let a = parse(&[
            "bench",
            "--backend",
            "fjall",
            "--workload",
            "drain",
            "--items",
            "200",
            "--quiet",
        ]);
        match run(a).await {
            Ok(()) => {}
            Err(e) => assert!(e.contains("fjall"), "{e}"),
        }
    }
}
