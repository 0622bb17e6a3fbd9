//! Measurements of the default storage (fjall, `durability: sync`) through the whole server, ignored by default
//! because they take minutes and their figures only mean something in release mode. Run them one at a time, each
//! in its own process (the memory figures read this process's RSS):
//!
//! ```text
//! for t in throughput_with_1k_queued throughput_with_1m_queued_and_restart restart_after_sigkill_with_1m \
//!     idle_rss_per_partition; do
//!   cargo test --release -p lessor --test fjall_depth -- --ignored --nocapture --exact $t
//! done
//! ```
//!
//! Each test starts an in-process server on the default persistent configuration in a temporary directory and
//! drives it over HTTP with protobuf, as a client would:
//!
//! * **Throughput at a depth**: the queue (one partition) is pre-filled to the depth with produce batches of 1,000,
//!   then, once the server is idle again (the flushes and compactions the pre-fill left behind are the pre-fill's
//!   cost, not the depth's; `LESSOR_BENCH_NO_SETTLE=1` skips the wait), 25 rounds alternate a produce phase (4 producers, batches of 100 items of 100 bytes, 4,000 items) and a
//!   lease+complete phase (4 consumers, each leasing 100 and completing them in one request, 4,000 items), so the
//!   depth stays between D and D + 4,000. The rates are items over the summed wall time of each kind of phase; three such runs, the median is
//!   reported.
//! * **Start-up with 1,000,000 items**: after the deep run the server is stopped gracefully, and the time from
//!   calling `start` to the first successful lease is measured (twice; the data is in the page cache both times).
//!   The same after a SIGKILL of the real binary right after a 1,000,000-item pre-fill, when fjall has to replay
//!   its journal.
//! * **Idle memory per partition**: RSS before and after creating 10 queues of 100 partitions and opening them all
//!   (a stats call per queue), divided by 1,000; then the same for opening them from disk in a restarted server,
//!   measured on the real binary in its own process.
//!
//! Servers and clients share the process and its tokio runtime, so on a small machine the client's work competes
//! with the server's; the figures are for comparing depths on one machine, not absolute capacity.

use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client};
use lessor_server::{Config, RunningServer};
use lessor_testkit::measure::{disk_usage, rss_kib};
use lessor_testkit::process::{ServerCommand, ServerProcess};

const WORKERS: usize = 4;
const BATCH: usize = 100;
const PAYLOAD: usize = 100;
const PREFILL_BATCH: usize = 1000;
const ROUNDS: usize = 25;
/// Runs of `ROUNDS` rounds (`LESSOR_BENCH_ROUNDS` sets another number: 25 rounds of 4,000 items take a fraction
/// of a second on the memory backend, which a burst of other work on the machine can swing by 30 %); the median
/// is reported.
const REPEATS: usize = 3;
const ROUND_ITEMS: usize = 4000;
const QUEUE: &str = "depth";

/// What produced items carry (bits of [`MODE`]): set by the feature measurements before they start.
const MIXED_PRIORITIES: u8 = 1;
const DEDUP_KEYS: u8 = 2;
/// No key, but 36 more payload bytes: the control that shows what the key's bytes alone cost on the wire.
const PAD_36: u8 = 4;
static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The process the CPU and memory figures are read from: 0 = this one (in-process server), else the pid of the
/// real binary a measurement started.
static SERVER_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// `/proc/<this>` for the measured server process.
fn server_proc() -> String {
    match SERVER_PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => "/proc/self".to_string(),
        pid => format!("/proc/{pid}"),
    }
}

/// Resident memory of the measured server process in KiB (`VmRSS`).
fn own_rss_kib() -> u64 {
    match SERVER_PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => rss_kib("self"),
        pid => rss_kib(&pid.to_string()),
    }
}

/// utime + stime of one `/proc/.../stat` line, in clock ticks (1/100 s on Linux).
/// CPU time of every thread of process `pid` ("self" for this one) so far, in nanoseconds, from the scheduler's
/// own accounting (`/proc/<pid>/task/*/schedstat`): exact, where `stat`'s clock ticks are 10 ms (a 0.2 s run is
/// only 20 of them). Threads that already exited are not counted, so take it across a phase whose threads live.
fn sched_ns(pid: &str) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn stat_ticks(stat: &str) -> u64 {
    // The fields after the command name, which is in parentheses and may contain spaces; utime and stime are
    // fields 14 and 15 of the line, 12 and 13 after the name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// CPU time of this process so far: (all threads, fjall's background workers only). Everything runs in this
/// process: the server's tokio workers, its fjall writer thread, fjall's flush and compaction workers, the client.
fn cpu_time() -> (Duration, Duration) {
    let proc = server_proc();
    let total = stat_ticks(&std::fs::read_to_string(format!("{proc}/stat")).unwrap_or_default());
    let mut fjall = 0;
    for t in std::fs::read_dir(format!("{proc}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("fjall:") {
            fjall += stat_ticks(&std::fs::read_to_string(t.path().join("stat")).unwrap_or_default());
        }
    }
    (
        Duration::from_millis(total * 10),
        Duration::from_millis(fjall * 10),
    )
}

/// CPU used since `since`, as (all threads, fjall workers).
fn cpu_since(since: (Duration, Duration)) -> (Duration, Duration) {
    let now = cpu_time();
    (now.0.saturating_sub(since.0), now.1.saturating_sub(since.1))
}

/// CPU time the whole machine spent busy (all CPUs, every process, interrupts included), from `/proc/stat`.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    Duration::from_millis(busy * 10)
}

/// Share of the machine (0-100 %) that other processes used over `wall`, given the machine's and this process's
/// busy time over the same span.
fn other_pct(machine: Duration, own: Duration, wall: Duration) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    (machine.saturating_sub(own).as_secs_f64() / (wall.as_secs_f64() * cpus) * 100.0).min(100.0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn serve(dir: &tempfile::TempDir) -> (RunningServer, Client) {
    let path = dir.path().to_str().expect("utf-8 path");
    lessor_testkit::server::start(&Config::default_persistent(path), None).await
}

async fn create(c: &Client, name: &str, partitions: i32) {
    c.queues_create(&pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "10m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: partitions,
        ..Default::default()
    })
    .await
    .expect("create queue");
}

fn produce_req(first: usize, n: usize) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: QUEUE.into(),
        request_timeout: "1m".into(),
        items: (first..first + n)
            .map(|i| {
                let mode = MODE.load(std::sync::atomic::Ordering::Relaxed);
                pb::QueueProduceItem {
                    bytes: if mode & PAD_36 != 0 {
                        format!("{i:0w$}", w = PAYLOAD + 36).into_bytes()
                    } else {
                        format!("{i:0PAYLOAD$}").into_bytes()
                    },
                    // Priorities 0..=9 in turn, so every lease skips across all ten levels.
                    priority: if mode & MIXED_PRIORITIES != 0 {
                        (i % 10) as i32
                    } else {
                        0
                    },
                    // A 36-byte key per item (the length of a UUID), every one distinct.
                    dedup_id: if mode & DEDUP_KEYS != 0 {
                        format!("{i:036}")
                    } else {
                        String::new()
                    },
                    ..Default::default()
                }
            })
            .collect(),
    }
}

/// `total` items from `WORKERS` concurrent producers in batches of `batch`; returns the wall time.
async fn produce(c: &Client, first: usize, total: usize, batch: usize) -> Duration {
    let t0 = Instant::now();
    let per = total / WORKERS;
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                let start = first + w * per;
                let mut i = 0;
                while i < per {
                    let n = batch.min(per - i);
                    c.queue_produce(&produce_req(start + i, n))
                        .await
                        .expect("produce");
                    i += n;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("producer");
    }
    t0.elapsed()
}

/// `WORKERS` consumers lease and complete `total` items, batches of `BATCH`; returns the wall time.
async fn lease_complete(c: &Client, total: usize) -> Duration {
    let t0 = Instant::now();
    let per = total / WORKERS;
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut done = 0;
                while done < per {
                    let r = c
                        .queue_lease(&pb::QueueLeaseRequest {
                            queue_name: QUEUE.into(),
                            batch_size: BATCH.min(per - done) as i32,
                            client_id: format!("consumer-{w}"),
                            request_timeout: "10s".into(),
                        })
                        .await
                        .expect("lease");
                    done += r.items.len();
                    c.queue_complete(&pb::QueueCompleteRequest {
                        queue_name: QUEUE.into(),
                        partition: r.partition,
                        request_timeout: "1m".into(),
                        ids: r.items.into_iter().map(|i| i.id).collect(),
                    })
                    .await
                    .expect("complete");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("consumer");
    }
    t0.elapsed()
}

/// Items in the queue (all partitions): (total, leased).
async fn depth(c: &Client) -> (i64, i64) {
    let s = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: QUEUE.into(),
            ..Default::default()
        })
        .await
        .expect("stats");
    s.logical_queues
        .iter()
        .flat_map(|l| &l.partitions)
        .fold((0, 0), |(t, l), p| {
            (t + i64::from(p.total), l + i64::from(p.total_leased))
        })
}

fn rate(items: usize, d: Duration) -> f64 {
    items as f64 / d.as_secs_f64()
}

/// Pre-fills the queue to `base` items, then alternates produce and lease+complete phases; prints and returns
/// (produce items/s, lease+complete items/s).
async fn measure_at_depth(c: &Client, base: usize) -> (f64, f64) {
    create(c, QUEUE, 1).await;
    let rss0 = own_rss_kib();
    let cpu0 = cpu_time();
    let fill = produce(c, 0, base, PREFILL_BATCH).await;
    let fill_cpu = cpu_since(cpu0);
    let rss1 = own_rss_kib();
    println!(
        "pre-fill: {base} items in {:.2} s ({:.0} items/s, batches of {PREFILL_BATCH}; CPU {:.1} us per item, {:.1} in \
         fjall workers); RSS {:.0} -> {:.0} MiB ({:.0} bytes per item)",
        fill.as_secs_f64(),
        rate(base, fill),
        per_item(fill_cpu.0, base),
        per_item(fill_cpu.1, base),
        mib(rss0),
        mib(rss1),
        (rss1.saturating_sub(rss0) * 1024) as f64 / base as f64
    );
    // The pre-fill leaves work behind it (fjall flushes and compacts what it just wrote): that is the cost of the
    // pre-fill's own writes, not of operations at this depth, so it is waited out (and reported) before the clock
    // starts, at every depth alike. LESSOR_BENCH_NO_SETTLE=1 measures straight after the pre-fill instead.
    if std::env::var_os("LESSOR_BENCH_NO_SETTLE").is_none() {
        let (waited, busy) = settle(Duration::from_secs(300)).await;
        println!(
            "settled {:.1} s after the pre-fill (server CPU {busy:.0} % of a core in the last second)",
            waited.as_secs_f64()
        );
    }
    // One unmeasured round to warm connections and caches.
    let mut next = base;
    produce(c, next, ROUND_ITEMS, BATCH).await;
    next += ROUND_ITEMS;
    lease_complete(c, ROUND_ITEMS).await;
    let (mut ps, mut lcs) = (Vec::new(), Vec::new());
    let rounds: usize = std::env::var("LESSOR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    for rep in 1..=REPEATS {
        let (d0, _) = depth(c).await;
        let (mut tp, mut tc) = (Duration::ZERO, Duration::ZERO);
        let (mut cp, mut cc) = ((Duration::ZERO, Duration::ZERO), (Duration::ZERO, Duration::ZERO));
        let (mut lo, mut hi) = (i64::MAX, 0);
        let (wall0, machine0, own0) = (Instant::now(), machine_busy(), cpu_time().0);
        for _ in 0..rounds {
            lo = lo.min(depth(c).await.0);
            let cpu0 = cpu_time();
            tp += produce(c, next, ROUND_ITEMS, BATCH).await;
            let d = cpu_since(cpu0);
            (cp.0, cp.1) = (cp.0 + d.0, cp.1 + d.1);
            next += ROUND_ITEMS;
            hi = hi.max(depth(c).await.0);
            let cpu0 = cpu_time();
            tc += lease_complete(c, ROUND_ITEMS).await;
            let d = cpu_since(cpu0);
            (cc.0, cc.1) = (cc.0 + d.0, cc.1 + d.1);
        }
        let other = other_pct(
            machine_busy().saturating_sub(machine0),
            cpu_time().0.saturating_sub(own0),
            wall0.elapsed(),
        );
        let (d1, leased) = depth(c).await;
        let n = rounds * ROUND_ITEMS;
        let (p, lc) = (rate(n, tp), rate(n, tc));
        println!(
            "run {rep}: depth {d0} (range {lo}..{hi}; {d1} at the end, {leased} leased): produce {p:.0} items/s \
             ({n} items in {:.2} s; CPU {:.1} us per item, {:.1} of it in fjall workers), lease+complete {lc:.0} \
             items/s ({n} items in {:.2} s; CPU {:.1} us per item, {:.1} in fjall workers); other processes used \
             {other:.0} % of the machine",
            tp.as_secs_f64(),
            per_item(cp.0, n),
            per_item(cp.1, n),
            tc.as_secs_f64(),
            per_item(cc.0, n),
            per_item(cc.1, n),
        );
        ps.push(p);
        lcs.push(lc);
    }
    let (p, lc) = (median(ps), median(lcs));
    println!(
        "depth ~{base}: median of {REPEATS} runs: produce {p:.0} items/s, lease+complete {lc:.0} items/s \
         ({WORKERS} producers / {WORKERS} consumers, batches of {BATCH}, {PAYLOAD}-byte payloads)"
    );
    (p, lc)
}

/// Waits until the measured server is idle: under 3 % of a core over a whole second, by its threads' exact CPU
/// time (`schedstat`), or `limit` at the most. Returns the time waited and the last second's CPU in % of a core.
async fn settle(limit: Duration) -> (Duration, f64) {
    let pid = match SERVER_PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => "self".to_string(),
        pid => pid.to_string(),
    };
    let t0 = Instant::now();
    loop {
        let cpu0 = sched_ns(&pid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let busy = (sched_ns(&pid) - cpu0) as f64 / 1e7;
        if busy < 3.0 || t0.elapsed() >= limit {
            return (t0.elapsed(), busy);
        }
    }
}

fn per_item(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run in release, see the module docs"]
async fn throughput_with_1k_queued() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (srv, c) = serve(&dir).await;
    measure_at_depth(&c, 1_000).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run in release, see the module docs"]
async fn throughput_with_1m_queued_and_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (srv, c) = serve(&dir).await;
    measure_at_depth(&c, 1_000_000).await;
    let (mut items, _) = depth(&c).await;
    let t_stop = Instant::now();
    srv.stop().await;
    println!("graceful stop: {:.2} s", t_stop.elapsed().as_secs_f64());
    let size: u64 = disk_usage(dir.path());
    println!(
        "data directory: {:.0} MiB for {items} items",
        size as f64 / 1048576.0
    );

    for attempt in 1..=2 {
        let t0 = Instant::now();
        let (srv, c) = serve(&dir).await;
        let started = t0.elapsed();
        let r = c
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: QUEUE.into(),
                batch_size: 1,
                client_id: "restart".into(),
                request_timeout: "1m".into(),
            })
            .await
            .expect("first lease after restart");
        let leased = t0.elapsed();
        assert_eq!(r.items.len(), 1);
        c.queue_complete(&pb::QueueCompleteRequest {
            queue_name: QUEUE.into(),
            partition: r.partition,
            request_timeout: "1m".into(),
            ids: r.items.into_iter().map(|i| i.id).collect(),
        })
        .await
        .expect("complete");
        let (after, _) = depth(&c).await;
        println!(
            "restart {attempt} with {items} items: start returned after {:.3} s, first lease after {:.3} s; \
             {after} items after completing it; RSS {:.0} MiB",
            started.as_secs_f64(),
            leased.as_secs_f64(),
            mib(own_rss_kib())
        );
        assert_eq!(after, items - 1, "every item is back after the restart");
        items = after;
        srv.stop().await;
    }
}

/// Priorities: the same depth runs with items of priorities 0..=9 mixed, on fjall and on memory.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run in release, see the module docs"]
async fn priorities_1k_vs_1m_queued() {
    MODE.store(MIXED_PRIORITIES, std::sync::atomic::Ordering::Relaxed);
    // LESSOR_BENCH_BACKENDS=fjall (or memory) runs one of them, e.g. under a profiler.
    let only = std::env::var("LESSOR_BENCH_BACKENDS").unwrap_or_default();
    for backend in ["memory", "fjall"] {
        if !only.is_empty() && !only.split(',').any(|b| b == backend) {
            continue;
        }
        let mut rates = Vec::new();
        for base in [1_000, 1_000_000] {
            let dir = tempfile::tempdir().expect("temp dir");
            // The real binary, with the allocator it ships with; its CPU and memory are what the figures show.
            let mut server = spawn_backend(backend, dir.path()).await;
            SERVER_PID.store(server.pid(), std::sync::atomic::Ordering::Relaxed);
            println!("== {backend}, mixed priorities, depth {base} (real binary)");
            rates.push(measure_at_depth(&server.client().clone(), base).await);
            SERVER_PID.store(0, std::sync::atomic::Ordering::Relaxed);
            server.kill();
        }
        println!(
            "{backend}, mixed priorities: 1M/1k ratio: produce {:.2}, lease+complete {:.2}",
            rates[1].0 / rates[0].0,
            rates[1].1 / rates[0].1
        );
    }
}

/// Dedup: produce throughput and the server's CPU per item with a key on every item against none.
///
/// Measured on the real binary (its own process and allocator, as shipped). The three modes (no key, a key on
/// every item, no key but 36 more payload bytes) run on one server, each round on a fresh queue per mode, in an
/// order that rotates every round: a machine whose load drifts then weighs on every mode alike, and each round
/// gives one keyed/plain ratio measured minutes, not seconds, apart. The requests are built before the clock
/// starts; the medians of the rates and of the per-round ratios are reported, with the CPU per item of the server
/// and of this process (the client) read from the scheduler's accounting around each timed phase.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run in release, see the module docs"]
async fn dedup_cost() {
    const MODES: [&str; 3] = ["no key", "a key on every item", "no key, payload +36 B"];
    let env = |k: &str| std::env::var(k).ok();
    // LESSOR_BENCH_DEDUP_ITEMS: items per timed run (default 200,000); LESSOR_BENCH_DEDUP_ROUNDS: rounds (7).
    let n: usize = env("LESSOR_BENCH_DEDUP_ITEMS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let rounds: usize = env("LESSOR_BENCH_DEDUP_ROUNDS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    // LESSOR_BENCH_BACKENDS=memory (or fjall, or log) runs one of them, e.g. under a profiler.
    let only = env("LESSOR_BENCH_BACKENDS").unwrap_or_default();
    // LESSOR_BENCH_DEDUP_WINDOW=1s: the queue's dedup window, and a warm-up that fills it first (steady state:
    // keys expire as fast as they arrive). Unset: the default window, and every key lands in a growing index.
    let steady = env("LESSOR_BENCH_DEDUP_WINDOW");
    // LESSOR_BENCH_MODES=1 (0 plain, 1 keyed, 2 control) runs some of them only, e.g. under a profiler.
    let modes: Vec<usize> = env("LESSOR_BENCH_MODES")
        .unwrap_or_else(|| "0,1,2".into())
        .split(',')
        .filter_map(|m| m.parse().ok())
        .filter(|m| *m < 3)
        .collect();
    for backend in ["memory", "fjall", "log"] {
        if !only.is_empty() && !only.split(',').any(|b| b == backend) {
            continue;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = spawn_backend(backend, dir.path()).await;
        let c = server.client().clone();
        let pid = server.pid().to_string();
        // Per mode: items/s, server CPU µs per item, client CPU µs per item; one row per round.
        let mut runs: Vec<[[f64; 3]; 3]> = Vec::new();
        for round in 0..rounds {
            let mut row = [[f64::NAN; 3]; 3];
            for k in 0..3 {
                let mode = (round + k) % 3;
                if !modes.contains(&mode) {
                    continue;
                }
                MODE.store(
                    [0, DEDUP_KEYS, PAD_36][mode],
                    std::sync::atomic::Ordering::Relaxed,
                );
                let queue = format!("dedup-{round}-{mode}");
                c.queues_create(&pb::QueueInfo {
                    queue_name: queue.clone(),
                    lease_timeout: "10m".into(),
                    expire_timeout: "24h".into(),
                    requested_partitions: 1,
                    dedup_window: steady.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await
                .expect("create queue");
                let send = |first: usize, count: usize| {
                    let per = count / WORKERS;
                    let batches: Vec<Vec<pb::QueueProduceRequest>> = (0..WORKERS)
                        .map(|w| {
                            (0..per)
                                .step_by(BATCH)
                                .map(|i| {
                                    let mut r = produce_req(first + w * per + i, BATCH.min(per - i));
                                    r.queue_name = queue.clone();
                                    r
                                })
                                .collect()
                        })
                        .collect();
                    let c = c.clone();
                    // Returns the requests rather than dropping them as they go, so that freeing them (a key is
                    // one more allocation per item) is not charged to the timed phase.
                    async move {
                        let tasks: Vec<_> = batches
                            .into_iter()
                            .map(|reqs| {
                                let c = c.clone();
                                tokio::spawn(async move {
                                    for r in &reqs {
                                        c.queue_produce(r).await.expect("produce");
                                    }
                                    reqs
                                })
                            })
                            .collect();
                        let mut sent = Vec::with_capacity(tasks.len());
                        for t in tasks {
                            sent.push(t.await.expect("producer"));
                        }
                        sent
                    }
                };
                // The timed phase's requests are built first, so that the server goes from the warm-up straight
                // into the timed phase. Built after it, they left the server idle for as long as the client took to
                // make them, and longer with keys (0.44-0.50 s without, 0.65-0.75 s with, for 1M items): an idle
                // server's allocator gives freed memory back to the system after a second, which the timed phase
                // would then fault in again. Their ids start far above the warm-up's, so none of their keys was seen.
                let timed = send(1 << 40, n);
                // Warm-up: 20,000 items; in steady mode, two windows and half a second more, so that keys expire
                // as fast as new ones arrive and the index has reached the size it keeps (it is purged when it
                // holds twice the keys its last purge kept, so its table stops growing only after the second
                // window: with one window, the timed phase paid for the table's last doubling in some rounds and
                // not in others).
                let mut first = 0;
                let until = Instant::now()
                    + steady
                        .as_deref()
                        .map(|w| {
                            2 * lessor_proto::duration::parse_go_duration(w).expect("window")
                                + Duration::from_millis(500)
                        })
                        .unwrap_or_default();
                loop {
                    send(first, 20_000).await;
                    first += 20_000;
                    if Instant::now() >= until {
                        break;
                    }
                }
                let (server0, client0) = (sched_ns(&pid), sched_ns("self"));
                let t0 = Instant::now();
                let sent = timed.await;
                let d = t0.elapsed();
                // CPU per item of the server and of this process (the client: HTTP and protobuf encoding), in
                // µs: what the machine spends per item whatever else runs on it, where items/s follow its load.
                let server_us = (sched_ns(&pid) - server0) as f64 / 1000.0 / n as f64;
                let client_us = (sched_ns("self") - client0) as f64 / 1000.0 / n as f64;
                row[mode] = [rate(n, d), server_us, client_us];
                drop(sent);
                println!(
                    "{backend}, round {round}, {}: produce {:.0} items/s, CPU per item: server {server_us:.3} \
                     us, client {client_us:.3} us",
                    MODES[mode], row[mode][0]
                );
                c.queues_delete(&pb::QueuesDeleteRequest {
                    queue_name: queue.clone(),
                    ..Default::default()
                })
                .await
                .expect("delete queue");
            }
            runs.push(row);
        }
        server.kill();
        let median = |mut v: Vec<f64>| {
            v.retain(|x| x.is_finite());
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let col = |m: usize, f: usize| median(runs.iter().map(|r| r[m][f]).collect());
        // Per-round ratios: each pairs runs made moments apart.
        let slower = |m: usize| median(runs.iter().map(|r| (1.0 - r[m][0] / r[0][0]) * 100.0).collect());
        let total = |m: usize| median(runs.iter().map(|r| r[m][1] + r[m][2]).collect());
        println!(
            "{backend}: with a key on every item produce is {:.1} % slower (median of {rounds} per-round ratios; \
             medians {:.0} vs {:.0} items/s); CPU per item: server {:.3} vs {:.3} us, server + client {:.3} vs \
             {:.3} us; control, payload +36 B without a key: {:.1} % slower, {:.0} items/s, server {:.3} us, \
             server + client {:.3} us",
            slower(1),
            col(1, 0),
            col(0, 0),
            col(1, 1),
            col(0, 1),
            total(1),
            total(0),
            slower(2),
            col(2, 0),
            col(2, 1),
            total(2),
        );
    }
    // Memory per key: crates/lessor-server/tests/dedup_memory.rs counts it exactly.
}

/// Starts the real binary with `backend` ("memory", or "fjall": the default configuration on `dir`), its log in
/// `dir` too.
async fn spawn_backend(backend: &str, dir: &std::path::Path) -> ServerProcess {
    // LESSOR_BENCH_BIN: another build of the binary, to compare two builds with the same measurement.
    let bin = std::env::var("LESSOR_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lessor").to_string());
    let mut cmd = ServerCommand::new(bin, dir.join("server.log"))
        .arg("--log-level")
        .arg("warn")
        .startup_limit(Duration::from_secs(60));
    if backend == "memory" {
        let cfg = dir.join("memory.yaml");
        std::fs::write(
            &cfg,
            "queue-storage: { driver: memory }\npartition-storage: [ { name: ram, driver: memory } ]\n",
        )
        .expect("write config");
        cmd = cmd.config(&cfg);
    } else if backend == "log" {
        // The log store (partitions in RAM, an append-only log), durability sync as fjall's default.
        let cfg = dir.join("log.yaml");
        let data = dir.join("data");
        std::fs::write(
            &cfg,
            format!(
                "queue-storage: {{ driver: fjall, config: {{ storage-dir: {d} }} }}\n\
                 partition-storage: [ {{ name: log-0, driver: log, affinity: 1, config: {{ storage-dir: {d} }} }} ]\n",
                d = data.display()
            ),
        )
        .expect("write config");
        cmd = cmd.config(&cfg);
    } else if let Ok(window) = std::env::var("LESSOR_BENCH_WINDOW") {
        // LESSOR_BENCH_WINDOW: fjall's `memory-window-items` (the default otherwise), to tell what paging costs.
        let cfg = dir.join("fjall.yaml");
        let data = dir.join("data");
        std::fs::write(
            &cfg,
            format!(
                "queue-storage: {{ driver: fjall, config: {{ storage-dir: {d} }} }}\n\
                 partition-storage: [ {{ name: disk-0, driver: fjall, affinity: 1, config: \
                 {{ storage-dir: {d}, memory-window-items: {window} }} }} ]\n",
                d = data.display()
            ),
        )
        .expect("write config");
        cmd = cmd.config(&cfg);
    } else {
        cmd = cmd.data_dir(&dir.join("data"));
    }
    cmd.start().await
}

/// Starts the real binary on `dir` (default configuration) on a free port, logging to `log`, and waits until
/// `/health` passes.
async fn spawn_binary(dir: &std::path::Path, log: &std::path::Path) -> (ServerProcess, Client) {
    let server = ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), log)
        .data_dir(dir)
        .arg("--log-level")
        .arg("warn")
        .startup_limit(Duration::from_secs(60))
        .start()
        .await;
    let c = server.client().clone();
    (server, c)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run in release, see the module docs"]
async fn restart_after_sigkill_with_1m() {
    const N: usize = 1_000_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir for the server log");
    let (mut child, c) = spawn_binary(dir.path(), &logs.path().join("server.log")).await;
    create(&c, QUEUE, 1).await;
    let fill = produce(&c, 0, N, PREFILL_BATCH).await;
    println!(
        "pre-fill (real binary): {N} items in {:.2} s ({:.0} items/s)",
        fill.as_secs_f64(),
        rate(N, fill)
    );
    // SIGKILL right after the last acknowledgement: whatever fjall had not flushed must come back from the journal.
    child.kill();
    println!(
        "data directory after SIGKILL: {:.0} MiB",
        disk_usage(dir.path()) as f64 / 1048576.0
    );
    for attempt in 1..=2 {
        let t0 = Instant::now();
        let (mut child, c) = spawn_binary(dir.path(), &logs.path().join("server.log")).await;
        let healthy = t0.elapsed();
        let r = c
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: QUEUE.into(),
                batch_size: 1,
                client_id: "restart".into(),
                request_timeout: "1m".into(),
            })
            .await
            .expect("first lease after restart");
        let leased = t0.elapsed();
        let (items, _) = depth(&c).await;
        println!(
            "restart {attempt} after SIGKILL: /health after {:.3} s, first lease after {:.3} s; {items} items \
             ({} leased)",
            healthy.as_secs_f64(),
            leased.as_secs_f64(),
            r.items.len()
        );
        assert_eq!(items as usize, N, "every acknowledged item is back");
        child.kill();
    }
}

async fn stats(c: &Client, queue: &str) -> usize {
    let s = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: queue.into(),
            ..Default::default()
        })
        .await
        .expect("stats");
    s.logical_queues.iter().map(|l| l.partitions.len()).sum()
}

/// Stats on every queue (which opens all their partitions); returns the time taken.
async fn open_all(c: &Client, queues: usize, parts: usize) -> Duration {
    let t0 = Instant::now();
    for q in 0..queues {
        assert_eq!(
            stats(c, &format!("idle-{q}")).await,
            parts,
            "every partition is open"
        );
    }
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run in release, see the module docs"]
async fn idle_rss_per_partition() {
    const QUEUES: usize = 10;
    const PARTS: usize = 100;
    const N: usize = QUEUES * PARTS;
    let settle = Duration::from_millis(500);
    let dir = tempfile::tempdir().expect("temp dir");
    let logs = tempfile::tempdir().expect("temp dir for the server log");

    // 1. In this process: create the queues, then open them all.
    let (srv, c) = serve(&dir).await;
    // Warm the server and the client (connections, one queue's code paths) before the baseline.
    create(&c, "warm", 1).await;
    stats(&c, "warm").await;
    tokio::time::sleep(settle).await;
    let before = own_rss_kib();
    let t0 = Instant::now();
    for q in 0..QUEUES {
        create(&c, &format!("idle-{q}"), PARTS as i32).await;
    }
    let created = t0.elapsed();
    let opened = open_all(&c, QUEUES, PARTS).await;
    tokio::time::sleep(settle).await;
    let after = own_rss_kib();
    println!(
        "new: {N} partitions ({QUEUES} queues x {PARTS}) created in {:.2} s, opened (first stats) in {:.2} s; \
         RSS {:.1} -> {:.1} MiB: {:.1} KiB per idle partition",
        created.as_secs_f64(),
        opened.as_secs_f64(),
        mib(before),
        mib(after),
        after.saturating_sub(before) as f64 / N as f64
    );
    srv.stop().await;

    // 2. A restart in a fresh process (the real binary, so memory freed above cannot be reused): open them all
    //    from disk.
    let (mut child, c) = spawn_binary(dir.path(), &logs.path().join("server.log")).await;
    let pid = child.pid().to_string();
    stats(&c, "warm").await;
    tokio::time::sleep(settle).await;
    let before = rss_kib(&pid);
    let opened = open_all(&c, QUEUES, PARTS).await;
    tokio::time::sleep(settle).await;
    let after = rss_kib(&pid);
    child.kill();
    println!(
        "restart (separate process): {N} partitions opened from disk in {:.2} s; server RSS {:.1} -> {:.1} MiB: \
         {:.1} KiB per idle partition",
        opened.as_secs_f64(),
        mib(before),
        mib(after),
        after.saturating_sub(before) as f64 / N as f64
    );
}
