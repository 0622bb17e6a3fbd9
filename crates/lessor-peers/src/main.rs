//! `lessor-peers`: runs one produce → lease → complete pipeline against one queue system and prints what it
//! measured, for `scripts/peers-bench.sh`. Development only: not part of the `lessor` binary.
//!
//! Every system is driven from Rust, on tokio, the way its own users drive it at its fastest (see each module
//! in [`systems`]), so the figures measure the servers rather than the client. To show that, every result
//! carries the CPU the server's process tree and this driver used during the run (`--server-pid`): a server
//! at 100 % of a core, or a machine with no idle CPU, bounds the figure; otherwise the script doubles the
//! driver's concurrency and checks that the figure does not rise.
//!
//! ```text
//! lessor-peers redis --url redis://127.0.0.1:6379 --mode fsync --producers 4 --consumers 4 --batch 100 \
//!     --size 100 --duration 10 [--rate 10000] [--connections 1] [--server-pid PID] --json
//! ```

mod cpu;
mod run;
mod stats;
mod systems;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use run::{Outcome, Peer, Plan};

/// The systems `lessor-peers` can drive.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// Lessor over HTTP/protobuf (lessor-client): batched produce, lease and complete.
    Lessor,
    /// Redis Streams with a consumer group: pipelined XADD, XREADGROUP COUNT n, XACK of n ids.
    Redis,
    /// A PostgreSQL FOR UPDATE SKIP LOCKED table queue: batched INSERT, DELETE ... RETURNING in a transaction.
    Postgres,
    /// beanstalkd: put, reserve, delete, one job at a time per connection.
    Beanstalkd,
    /// NATS JetStream work-queue stream: async publish, pull consumer stream, ack.
    Nats,
}

impl System {
    fn default_url(self) -> &'static str {
        match self {
            System::Lessor => "http://127.0.0.1:2319",
            System::Redis => "redis://127.0.0.1:6379",
            System::Postgres => "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
            System::Beanstalkd => "127.0.0.1:11300",
            System::Nats => "nats://127.0.0.1:4222",
        }
    }
}

/// The durability the server was started with (a label: servers are configured by whoever started them).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every acknowledged write was fsynced first.
    Fsync,
    /// The system's default persistence setting.
    Default,
}

/// Command line of `lessor-peers`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "lessor-peers",
    about = "Drive one queue system with a produce/lease/complete pipeline"
)]
pub struct Args {
    /// The system to drive.
    #[arg(value_enum)]
    pub system: System,
    /// Where it listens: an http:// endpoint (lessor), redis:// or nats:// URL, host:port (beanstalkd) or a
    /// libpq key=value string (postgres). Default: the system's usual local port.
    #[arg(long)]
    pub url: Option<String>,
    /// The durability the server runs with (reported, not set: the server's own configuration decides).
    #[arg(long, value_enum, default_value_t = Mode::Fsync)]
    pub mode: Mode,
    /// Producers.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Consumers (each leases and completes).
    #[arg(long, default_value_t = 4)]
    pub consumers: usize,
    /// Items per produce and per lease (beanstalkd has no batches: its producers send them one by one).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Payload bytes per item (at least 8: the first 8 carry the send time).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Seconds the producers run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds the consumers may go on after the producers stopped, to finish the backlog.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Total produce rate in items/s (paced, for latency); default: as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Connections per producer and per consumer, each its own task with a request in flight (how beanstalkd,
    /// which has no batches, gets concurrency; also how the script doubles the driver's concurrency).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Pid of the server (its descendants are included, e.g. PostgreSQL's backends), for the CPU report.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the result as one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The validated workload.
    pub fn plan(&self) -> Result<Plan, String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(format!("--{name} must be a positive number of seconds, got {v}"))
            }
        };
        if !(1..=1000).contains(&self.batch) {
            return Err(format!("--batch must be between 1 and 1000, got {}", self.batch));
        }
        for (name, v) in [
            ("producers", self.producers),
            ("consumers", self.consumers),
            ("connections", self.connections),
        ] {
            if v == 0 {
                return Err(format!("--{name} must be at least 1"));
            }
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("--rate must be a positive number of items/s, got {r}"));
            }
        }
        if !(self.drain.is_finite() && self.drain >= 0.0) {
            return Err(format!(
                "--drain must be zero or more seconds, got {}",
                self.drain
            ));
        }
        Ok(Plan {
            producers: self.producers * self.connections,
            consumers: self.consumers * self.connections,
            batch: self.batch,
            size: self.size.max(8),
            duration: Duration::from_secs_f64(positive("duration", self.duration)?),
            drain: Duration::from_secs_f64(self.drain),
            rate: self.rate,
        })
    }
}

/// The driver allocates per request (bodies, replies, ids) as a client application would; glibc's allocator was
/// a fifth of its CPU in profiles, which the server under test then lacked on a 2-core machine. Every system is
/// driven through the same allocator, as the `lessor` binary's (mimalloc, huge pages off: see its `main`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Before any thread exists. Failure leaves the kernel's default, which only changes the latency tail.
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lessor-peers: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(measure(&args)) {
        Ok(doc) => {
            if args.json {
                println!("{doc}");
            } else {
                print!("{}", text(&doc));
            }
        }
        Err(e) => {
            eprintln!("lessor-peers {:?}: {e}", args.system);
            std::process::exit(1);
        }
    }
}

/// Sets the system up, runs the pipeline, tears down, and returns the result document.
async fn measure(args: &Args) -> Result<Value, String> {
    let plan = args.plan()?;
    let url = args
        .url
        .clone()
        .unwrap_or_else(|| args.system.default_url().to_string());
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let unique = format!("{}-{millis}", std::process::id());
    let (outcome, usage) = match args.system {
        System::Lessor => drive(systems::lessor::Lessor::setup(&url, &unique).await?, args, &plan).await?,
        System::Redis => {
            drive(
                systems::redis_streams::RedisStreams::setup(&url, &unique).await?,
                args,
                &plan,
            )
            .await?
        }
        System::Postgres => {
            drive(
                systems::postgres::Postgres::setup(&url, &unique).await?,
                args,
                &plan,
            )
            .await?
        }
        System::Beanstalkd => {
            drive(systems::beanstalkd::Beanstalkd::setup(&url, &unique), args, &plan).await?
        }
        System::Nats => {
            drive(
                systems::nats::Nats::setup(&url, &unique, plan.batch, plan.consumers).await?,
                args,
                &plan,
            )
            .await?
        }
    };
    Ok(document(args, &plan, &outcome, &usage))
}

async fn drive<P: Peer>(peer: P, args: &Args, plan: &Plan) -> Result<(Outcome, cpu::Usage), String> {
    let mut samples = Vec::with_capacity(2);
    let result = run::run(peer, plan.clone(), || {
        samples.push(cpu::Sample::now(args.server_pid))
    })
    .await;
    let (outcome, peer) = result?;
    peer.teardown().await;
    let usage = match samples.as_slice() {
        [a, b] => a.usage_until(b),
        _ => cpu::Usage::default(),
    };
    Ok((outcome, usage))
}

fn per_s(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// The result as JSON. `results.produce/complete.items_per_s` use the names of `lessor bench --json-out`, so
/// `lessor bench-chart` can draw these files too.
fn document(args: &Args, plan: &Plan, o: &Outcome, u: &cpu::Usage) -> Value {
    let produced_per_s = per_s(o.produced, o.produce_elapsed);
    let consumed_per_s = per_s(o.consumed, o.consume_elapsed);
    json!({
        "system": format!("{:?}", args.system).to_lowercase(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "config": {
            "producers": args.producers,
            "consumers": args.consumers,
            "connections": args.connections,
            "batch": plan.batch,
            "size": plan.size,
            "duration_s": plan.duration.as_secs_f64(),
            "drain_s": plan.drain.as_secs_f64(),
            "rate": plan.rate,
        },
        "produced": o.produced,
        "consumed": o.consumed,
        "produced_per_s": produced_per_s.round(),
        "consumed_per_s": consumed_per_s.round(),
        "produce_ack_ms": stats::summary(&o.produce_ack),
        "e2e_ms": stats::summary(&o.e2e),
        "schedule_lag_max_ms": plan.rate.map(|_| o.lag_max.as_secs_f64() * 1000.0),
        "cpu": {
            "server_pct": u.server_pct,
            "driver_pct": u.driver_pct,
            "machine_busy_pct": u.machine_busy_pct,
            "machine_iowait_pct": u.machine_iowait_pct,
            "other_pct": u.other_pct,
            "cores": u.cores,
        },
        "errors": o.errors,
        "first_errors": o.first_errors,
        "results": {
            "produce": {"items_per_s": produced_per_s.round()},
            "complete": {"items_per_s": consumed_per_s.round()},
        },
    })
}

/// A short human-readable form of the document.
fn text(doc: &Value) -> String {
    let f = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.1}"))
            .unwrap_or_else(|| "-".into())
    };
    let mut s = format!(
        "{} ({}): produced {} ({}/s), consumed {} ({}/s)\n",
        doc["system"].as_str().unwrap_or("?"),
        doc["mode"].as_str().unwrap_or("?"),
        doc["produced"],
        doc["produced_per_s"],
        doc["consumed"],
        doc["consumed_per_s"],
    );
    let e = &doc["e2e_ms"];
    s += &format!(
        "end-to-end ms: p50 {} p99 {} p99.9 {} max {}\n",
        f(&e["p50"]),
        f(&e["p99"]),
        f(&e["p99_9"]),
        f(&e["max"])
    );
    let c = &doc["cpu"];
    s += &format!(
        "cpu (% of one core): server {} driver {}; machine busy {}% iowait {}% other processes {}% ({} cores)\n",
        f(&c["server_pct"]),
        f(&c["driver_pct"]),
        f(&c["machine_busy_pct"]),
        f(&c["machine_iowait_pct"]),
        f(&c["other_pct"]),
        c["cores"],
    );
    if doc["errors"].as_u64().unwrap_or(0) > 0 {
        s += &format!("errors: {} (first: {})\n", doc["errors"], doc["first_errors"]);
    }
    s
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(a: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("lessor-peers").chain(a.iter().copied()))
    }

    #[test]
    fn arguments_parse_and_validate() {
        Args::command().debug_assert();
        let a = parse(&[
            "beanstalkd",
            "--mode",
            "default",
            "--connections",
            "16",
            "--rate",
            "10000",
            "--size",
            "4",
            "--json",
        ])
        .unwrap();
        assert_eq!(
            (a.system, a.mode, a.batch, a.json),
            (System::Beanstalkd, Mode::Default, 100, true)
        );
        let p = a.plan().unwrap();
        // Connections multiply the tasks; the size leaves room for the stamp.
        assert_eq!((p.producers, p.consumers, p.size), (64, 64, 8));
        assert_eq!(p.rate, Some(10_000.0));
        assert!(parse(&["kafka"]).is_err());
        let bad = |extra: &[&str]| {
            let mut v = vec!["redis"];
            v.extend_from_slice(extra);
            parse(&v).unwrap().plan()
        };
        assert!(bad(&["--batch", "0"]).is_err());
        assert!(bad(&["--batch", "1001"]).is_err());
        assert!(bad(&["--consumers", "0"]).is_err());
        assert!(bad(&["--connections", "0"]).is_err());
        assert!(bad(&["--rate", "0"]).is_err());
        assert!(bad(&["--duration", "0"]).is_err());
        assert!(bad(&["--duration", "0.5"]).is_ok());
    }

    #[test]
    fn the_document_has_what_the_script_and_the_chart_read() {
        let a = parse(&["nats", "--duration", "2"]).unwrap();
        let plan = a.plan().unwrap();
        let mut e2e = stats::new_hist();
        stats::record(&mut e2e, Duration::from_millis(3));
        let o = Outcome {
            produced: 1000,
            consumed: 800,
            produce_elapsed: Duration::from_secs(2),
            consume_elapsed: Duration::from_secs(4),
            produce_ack: stats::new_hist(),
            e2e,
            errors: 0,
            first_errors: vec![],
            lag_max: Duration::ZERO,
        };
        let doc = document(&a, &plan, &o, &cpu::Usage::default());
        assert_eq!(doc["produced_per_s"], 500.0);
        assert_eq!(doc["consumed_per_s"], 200.0);
        assert_eq!(doc["results"]["complete"]["items_per_s"], 200.0);
        assert!((doc["e2e_ms"]["p99"].as_f64().unwrap() - 3.0).abs() < 0.01);
        assert!(text(&doc).contains("consumed 800 (200.0/s)"));
    }
}
