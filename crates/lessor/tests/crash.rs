//! Crash safety of the real `lessor` binary on its default storage (fjall, `durability: sync`).
//!
//! The test starts `lessor server --data-dir <tmp>/data --address 127.0.0.1:<port>`, drives a mixed load
//! (produce, including scheduled items; lease; complete; immediate and delayed retry) from several client tasks
//! over protobuf, and kills the server with SIGKILL at a random moment. It then restarts the server on the same
//! data directory, checks that it becomes healthy within a few seconds (a torn journal tail never prevents
//! start-up), lists every item of the queue (both partitions, ready/leased and scheduled, with paging) and compares
//! the listing with what the clients were told:
//!
//! * every item whose produce got a 200 is present exactly once (items are tracked by a unique payload);
//! * every item whose complete got a 200 is gone, and an item once seen gone never comes back;
//! * an item is never present twice, and nothing is present that no client produced;
//! * items whose produce or complete got no answer (in flight at the kill) may be either way.
//!
//! Leased items are accepted whether they are still leased or back in the queue: the lease timeout is 2 s of wall
//! time in a separate process, so the test cannot control when leases expire. The data directory is kept across
//! all iterations, so state (and the journal) accumulates; after each verification the model takes the observed
//! state as the truth for the next round.
//!
//! A second variant kills while rounds are in flight: eight producers, and the SIGKILL waits until at least
//! [`IN_FLIGHT_AT_KILL`] produce requests are unanswered. The fjall writer pipelines its group commit (one group is
//! fsynced while the next is written) and each queue task goes on with its next pass while the last one's fsync
//! runs (`lessor_core::durability`: a request is answered once an fsync covers it), so several unanswered
//! producers at the kill mean, nearly always, one round being fsynced and another written behind it; every
//! acknowledged item must survive all the same.
//!
//! A third test is the control: with partitions kept in memory, the same procedure must report lost items, so the
//! check cannot pass vacuously.
//!
//! The choices (load length, batch sizes, actions) come from a seed printed at the start; set `LESSOR_CRASH_SEED`
//! (or `LESSOR_TEST_SEED`) to repeat them (the interleaving with the server is not reproducible, the choices are).
//! Set `LESSOR_CRASH_DIR` to a new directory to keep the data directory and the server logs afterwards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lessor_client::{proto as pb, Client, ClientError};
use lessor_testkit::process::{log_tail, ServerCommand};
use lessor_testkit::Rng;

const QUEUE: &str = "crash";
const PARTITIONS: i32 = 2;
/// Kill points: each iteration is restart → verify → load → SIGKILL.
const ITERATIONS: usize = 20;
const PRODUCERS: usize = 2;
const CONSUMERS: usize = 4;
/// Producers of the in-flight variant, and the unanswered produce requests it waits for before the SIGKILL.
const IN_FLIGHT_PRODUCERS: usize = 8;
const IN_FLIGHT_AT_KILL: u64 = 3;
/// How long a restarted server may take to answer `/health` with `pass`.
const STARTUP_LIMIT: Duration = Duration::from_secs(10);
/// Page size of the storage listings (small, so paging is exercised).
const PAGE: i32 = 250;

/// How the server of every round is started: the real binary on `data` (the default configuration, or the YAML
/// file `config` when given), logging to `log`.
fn server_command(data: &Path, log: &Path, config: Option<&Path>) -> ServerCommand {
    let mut cmd = ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), log)
        .startup_limit(STARTUP_LIMIT)
        .data_dir(data)
        .arg("--log-level")
        .arg("info");
    if let Some(c) = config {
        cmd = cmd.config(c);
    }
    cmd
}

// ---- the model of what the clients were told ----------------------------------------------------------------------

#[derive(Default)]
struct Entry {
    /// A produce got a 200, or a verification saw the item.
    known: bool,
    /// Complete requests naming the item that have not been answered yet.
    completing: u32,
    /// A complete got a 200: the item must be gone.
    completed: bool,
    /// A complete got no answer (or an ambiguous one): the item may be gone.
    complete_unknown: bool,
    /// A verification saw the item absent: it must never come back.
    gone: bool,
}

type Model = Arc<Mutex<HashMap<String, Entry>>>;

#[derive(Default)]
struct Counters {
    produced: AtomicU64,
    produce_unknown: AtomicU64,
    leased: AtomicU64,
    completed: AtomicU64,
    complete_rejected: AtomicU64,
    complete_unknown: AtomicU64,
    retried: AtomicU64,
    retry_rejected: AtomicU64,
    retry_unknown: AtomicU64,
}

impl Counters {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64, n: usize) {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What every load task shares.
struct Shared {
    client: Client,
    model: Model,
    counters: Counters,
    /// Set just before the SIGKILL: transport errors from then on are expected.
    killed: AtomicBool,
    /// Set after the SIGKILL: tasks stop.
    stop: AtomicBool,
    /// Produce requests sent and not answered yet.
    producing: AtomicU64,
    /// Things that must not happen, reported at the end of the iteration.
    violations: Mutex<Vec<String>>,
}

impl Shared {
    fn unexpected(&self, what: String) {
        self.violations.lock().expect("lock").push(what);
    }

    /// Whether an error is the expected consequence of the kill; otherwise it is recorded as a violation.
    fn after_kill(&self, op: &str, e: &ClientError) -> bool {
        if matches!(e, ClientError::Transport(_)) && self.killed.load(Ordering::SeqCst) {
            return true;
        }
        self.unexpected(format!("{op}: unexpected error before the kill: {e}"));
        false
    }
}

fn now_plus(d: Duration) -> pb::Timestamp {
    pb::Timestamp::from_system_time(SystemTime::now() + d)
}

async fn producer(sh: Arc<Shared>, iter: usize, task: usize, mut rng: Rng) {
    let mut seq = 0u32;
    while !sh.stop.load(Ordering::SeqCst) {
        let n = rng.range(1, 10);
        let scheduled = rng.range(0, 9) == 0;
        let payloads: Vec<String> = (0..n)
            .map(|_| {
                seq += 1;
                format!("i{iter:02}-p{task}-{seq:06}")
            })
            .collect();
        {
            let mut m = sh.model.lock().expect("lock");
            for p in &payloads {
                m.insert(p.clone(), Entry::default());
            }
        }
        let enqueue_at = scheduled.then(|| now_plus(Duration::from_millis(rng.range(300, 3000))));
        let req = pb::QueueProduceRequest {
            queue_name: QUEUE.into(),
            request_timeout: "5s".into(),
            items: payloads
                .iter()
                .map(|p| pb::QueueProduceItem {
                    encoding: "text/plain".into(),
                    kind: "crash".into(),
                    reference: p.clone(),
                    enqueue_at,
                    bytes: p.as_bytes().to_vec(),
                    utf8: String::new(),
                    ..Default::default()
                })
                .collect(),
        };
        sh.producing.fetch_add(1, Ordering::SeqCst);
        let res = sh.client.queue_produce(&req).await;
        sh.producing.fetch_sub(1, Ordering::SeqCst);
        match res {
            Ok(()) => {
                let mut m = sh.model.lock().expect("lock");
                for p in &payloads {
                    m.get_mut(p).expect("inserted above").known = true;
                }
                Counters::add(&sh.counters.produced, payloads.len());
            }
            Err(e) => {
                // No answer: the items may or may not be stored; the model keeps them as "maybe".
                Counters::add(&sh.counters.produce_unknown, payloads.len());
                if sh.after_kill("produce", &e) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

enum Action {
    Complete,
    RetryNow,
    RetryLater,
    Abandon,
}

async fn consumer(sh: Arc<Shared>, task: usize, mut rng: Rng) {
    while !sh.stop.load(Ordering::SeqCst) {
        let lease = sh
            .client
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: QUEUE.into(),
                batch_size: rng.range(1, 20) as i32,
                client_id: format!("consumer-{task}"),
                request_timeout: "250ms".into(),
            })
            .await;
        let resp = match lease {
            Ok(r) => r,
            Err(e) if e.is_retryable() => continue, // nothing to lease within the request timeout
            Err(e) => {
                if sh.after_kill("lease", &e) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        Counters::add(&sh.counters.leased, resp.items.len());
        let mut complete: Vec<(String, String)> = Vec::new();
        let mut retry: Vec<pb::QueueRetryItem> = Vec::new();
        {
            let m = sh.model.lock().expect("lock");
            for it in &resp.items {
                let payload = String::from_utf8_lossy(&it.bytes).into_owned();
                match m.get(&payload) {
                    None => sh.unexpected(format!("leased an item nobody produced: {payload:?} ({})", it.id)),
                    Some(e) if e.gone => sh.unexpected(format!(
                        "leased {payload} ({}), which a verification had seen gone",
                        it.id
                    )),
                    Some(_) => {}
                }
                let action = match rng.range(0, 99) {
                    0..=69 => Action::Complete,
                    70..=84 => Action::RetryNow,
                    85..=91 => Action::RetryLater,
                    _ => Action::Abandon,
                };
                match action {
                    Action::Complete => complete.push((it.id.clone(), payload)),
                    Action::RetryNow => retry.push(pb::QueueRetryItem {
                        id: it.id.clone(),
                        retry_at: None,
                        dead: false,
                    }),
                    Action::RetryLater => retry.push(pb::QueueRetryItem {
                        id: it.id.clone(),
                        retry_at: Some(now_plus(Duration::from_millis(rng.range(300, 1500)))),
                        dead: false,
                    }),
                    Action::Abandon => {} // the lease expires after 2 s
                }
            }
        }
        if !complete.is_empty() {
            {
                let mut m = sh.model.lock().expect("lock");
                for (_, p) in &complete {
                    if let Some(e) = m.get_mut(p) {
                        e.completing += 1;
                    }
                }
            }
            let r = sh
                .client
                .queue_complete(&pb::QueueCompleteRequest {
                    queue_name: QUEUE.into(),
                    partition: resp.partition,
                    request_timeout: "5s".into(),
                    ids: complete.iter().map(|(id, _)| id.clone()).collect(),
                })
                .await;
            let mut m = sh.model.lock().expect("lock");
            for (_, p) in &complete {
                if let Some(e) = m.get_mut(p) {
                    e.completing -= 1;
                    match &r {
                        Ok(()) => e.completed = true,
                        // 400: the request was refused as a whole (a lease that expired meanwhile); nothing applied.
                        Err(err) if err.code() == Some(400) => {}
                        Err(_) => e.complete_unknown = true,
                    }
                }
            }
            drop(m);
            match &r {
                Ok(()) => Counters::add(&sh.counters.completed, complete.len()),
                Err(err) if err.code() == Some(400) => {
                    Counters::add(&sh.counters.complete_rejected, complete.len())
                }
                Err(err) => {
                    Counters::add(&sh.counters.complete_unknown, complete.len());
                    if sh.after_kill("complete", err) {
                        return;
                    }
                }
            }
        }
        if !retry.is_empty() {
            let n = retry.len();
            let r = sh
                .client
                .queue_retry(&pb::QueueRetryRequest {
                    queue_name: QUEUE.into(),
                    partition: resp.partition,
                    items: retry,
                })
                .await;
            // A retry never removes an item (no `dead`), so the model does not change either way.
            match &r {
                Ok(()) => Counters::add(&sh.counters.retried, n),
                Err(err) if err.code() == Some(400) => Counters::add(&sh.counters.retry_rejected, n),
                Err(err) => {
                    Counters::add(&sh.counters.retry_unknown, n);
                    if sh.after_kill("retry", err) {
                        return;
                    }
                }
            }
        }
    }
}

// ---- verification --------------------------------------------------------------------------------------------------

/// One listed item: (partition, scheduled list?, id, payload, leased?).
type Listed = (i32, bool, String, String, bool);

/// Lists every item of the queue, all partitions, both lists, page by page (the pivot is inclusive).
async fn list_all(client: &Client) -> Vec<Listed> {
    let mut out = Vec::new();
    for partition in 0..PARTITIONS {
        for scheduled in [false, true] {
            let mut pivot = String::new();
            loop {
                let req = pb::StorageItemsListRequest {
                    queue_name: QUEUE.into(),
                    partition,
                    pivot: pivot.clone(),
                    limit: PAGE,
                };
                let page = if scheduled {
                    client.storage_scheduled_list(&req).await
                } else {
                    client.storage_items_list(&req).await
                }
                .expect("list items")
                .items;
                let full = page.len() == PAGE as usize;
                let mut last = None;
                for it in page {
                    if !pivot.is_empty() && it.id == pivot {
                        continue; // the pivot itself, already taken from the previous page
                    }
                    last = Some(it.id.clone());
                    let payload = String::from_utf8_lossy(&it.payload).into_owned();
                    out.push((partition, scheduled, it.id, payload, it.is_leased));
                }
                match last {
                    Some(id) if full => pivot = id,
                    _ => break,
                }
            }
        }
    }
    out
}

/// The violations one listing shows, by payload, without changing the model.
fn check(model: &HashMap<String, Entry>, listed: &[Listed]) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let mut seen: HashMap<&str, Vec<&Listed>> = HashMap::new();
    for l in listed {
        seen.entry(l.3.as_str()).or_default().push(l);
    }
    for (payload, copies) in &seen {
        if copies.len() > 1 {
            v.insert(
                payload.to_string(),
                format!("{payload} is present {} times: {copies:?}", copies.len()),
            );
        }
        if !model.contains_key(*payload) {
            v.insert(
                payload.to_string(),
                format!("{payload} is present but no client produced it: {copies:?}"),
            );
        }
    }
    for (payload, e) in model {
        assert_eq!(e.completing, 0, "every task has finished");
        let present = seen.get(payload.as_str());
        let problem = if e.gone && present.is_some() {
            format!("{payload} came back after being gone: {present:?}")
        } else if e.completed && present.is_some() {
            format!("{payload} was completed (200) but is present: {present:?}")
        } else if e.known && !e.completed && !e.complete_unknown && present.is_none() {
            format!(
                "{payload} was acknowledged (produce 200 or seen before) and never completed, but is lost"
            )
        } else {
            continue;
        };
        v.insert(payload.clone(), problem);
    }
    v
}

/// Lists the queue and compares it with the model; on success the observed state becomes the model's truth and the
/// last listing is returned with the number of distinct items present and the number of listings taken.
///
/// The server's timers keep running while the test pages through the lists: a lease that expires or a schedule that
/// comes due gives its item a new id, so one listing can show the item twice (old and new id) or miss it (moved
/// behind the pages already read). Each item moves at most once during a verification (nobody leases, completes or
/// retries meanwhile, and the expire timeout is a day), and items never disappear on their own. So a violation is
/// only reported when every one of several listings shows it, and an item counts as present when any listing shows
/// it.
async fn verify(client: &Client, model: &Model) -> Result<(Vec<Listed>, usize, usize), Vec<String>> {
    let mut listings = vec![list_all(client).await, list_all(client).await];
    let mut persisting = {
        let m = model.lock().expect("lock");
        let first = check(&m, &listings[0]);
        let mut second = check(&m, &listings[1]);
        second.retain(|k, _| first.contains_key(k));
        second
    };
    for _ in 0..3 {
        if persisting.is_empty() {
            break;
        }
        let next = list_all(client).await;
        let now = check(&model.lock().expect("lock"), &next);
        persisting = now
            .into_iter()
            .filter(|(k, _)| persisting.contains_key(k))
            .collect();
        listings.push(next);
    }
    if !persisting.is_empty() {
        return Err(persisting.into_values().collect());
    }
    let present: HashSet<&str> = listings.iter().flatten().map(|l| l.3.as_str()).collect();
    let mut m = model.lock().expect("lock");
    for (payload, e) in m.iter_mut() {
        let here = present.contains(payload.as_str());
        *e = Entry {
            known: here,
            gone: !here,
            ..Entry::default()
        };
    }
    let (n, taken) = (present.len(), listings.len());
    Ok((listings.pop().unwrap_or_default(), n, taken))
}

// ---- the test ------------------------------------------------------------------------------------------------------

/// The seed of the load's choices (printed; `LESSOR_CRASH_SEED` or `LESSOR_TEST_SEED` sets it).
fn seed() -> u64 {
    lessor_testkit::rng::seed("LESSOR_CRASH_SEED")
}

/// How the load of each round is shaped.
#[derive(Clone, Copy)]
struct Load {
    producers: usize,
    /// The SIGKILL waits (up to 2 s) until this many produce requests are unanswered; 0: kill at once.
    kill_with_in_flight: u64,
}

const DEFAULT_LOAD: Load = Load {
    producers: PRODUCERS,
    kill_with_in_flight: 0,
};

/// `iterations` rounds of restart → verify → load → SIGKILL, then a last restart → verify. Returns the summed
/// counters (produced, produce unanswered, leased, completed, complete refused, complete unanswered, retried,
/// retry refused, retry unanswered), or the violations found.
async fn run(
    seed: u64,
    iterations: usize,
    root: &Path,
    config: Option<&Path>,
    shape: Load,
) -> Result<[u64; 9], String> {
    let mut rng = Rng::new(seed);
    let data = root.join("data");
    let model: Model = Arc::new(Mutex::new(HashMap::new()));
    let t_start = Instant::now();
    let mut slowest_start = Duration::ZERO;
    let mut totals = [0u64; 9];

    for iter in 0..=iterations {
        let log = root.join(format!("server-{iter:02}.log"));
        let mut server = server_command(&data, &log, config).start().await;
        let (client, startup) = (server.client().clone(), server.startup());
        slowest_start = slowest_start.max(startup);
        if iter == 0 {
            client
                .queues_create(&pb::QueueInfo {
                    queue_name: QUEUE.into(),
                    lease_timeout: "2s".into(),
                    expire_timeout: "24h".into(),
                    requested_partitions: PARTITIONS,
                    ..Default::default()
                })
                .await
                .expect("create queue");
        }

        // Verify what the previous kill left behind.
        let (listed, present, listings) = match verify(&client, &model).await {
            Ok(r) => r,
            Err(violations) => {
                return Err(format!(
                    "seed {seed}, after kill {iter}: {} violation(s):\n{}\nserver log:\n{}",
                    violations.len(),
                    violations.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
                    log_tail(&log)
                ))
            }
        };
        let leased = listed.iter().filter(|l| l.4).count();
        let scheduled = listed.iter().filter(|l| l.1).count();
        if iter == iterations {
            println!(
                "after the last kill: start-up {} ms, verified {present} items ({leased} leased, {scheduled} scheduled)",
                startup.as_millis()
            );
            break;
        }
        // Load, then SIGKILL at a random moment.
        let sh = Arc::new(Shared {
            client: client.clone(),
            model: model.clone(),
            counters: Counters::default(),
            killed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            producing: AtomicU64::new(0),
            violations: Mutex::new(Vec::new()),
        });
        let mut tasks = Vec::new();
        for task in 0..shape.producers {
            tasks.push(tokio::spawn(producer(sh.clone(), iter, task, rng.fork())));
        }
        for task in 0..CONSUMERS {
            tasks.push(tokio::spawn(consumer(sh.clone(), task, rng.fork())));
        }
        let load = Duration::from_millis(rng.range(100, 500));
        tokio::time::sleep(load).await;
        if shape.kill_with_in_flight > 0 {
            let give_up = Instant::now() + Duration::from_secs(2);
            while sh.producing.load(Ordering::SeqCst) < shape.kill_with_in_flight && Instant::now() < give_up
            {
                tokio::task::yield_now().await;
            }
        }
        let in_flight = sh.producing.load(Ordering::SeqCst);
        sh.killed.store(true, Ordering::SeqCst);
        server.kill();
        sh.stop.store(true, Ordering::SeqCst);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("load task ends after the kill")
                .expect("load task does not panic");
        }
        let c = &sh.counters;
        let figures = [
            &c.produced,
            &c.produce_unknown,
            &c.leased,
            &c.completed,
            &c.complete_rejected,
            &c.complete_unknown,
            &c.retried,
            &c.retry_rejected,
            &c.retry_unknown,
        ]
        .map(Counters::get);
        for (t, f) in totals.iter_mut().zip(figures) {
            *t += f;
        }
        println!(
            "round {iter:>2}: start-up {:>4} ms, verified {present} items ({leased} leased, {scheduled} scheduled; {listings} listings) | \
             load {} ms, SIGKILL with {in_flight} produce(s) in flight: produced {} (+{} unanswered), leased {}, completed {} (+{} refused, +{} unanswered), \
             retried {} (+{} refused, +{} unanswered)",
            startup.as_millis(),
            load.as_millis(),
            figures[0],
            figures[1],
            figures[2],
            figures[3],
            figures[4],
            figures[5],
            figures[6],
            figures[7],
            figures[8],
        );
        let violations = std::mem::take(&mut *sh.violations.lock().expect("lock"));
        if !violations.is_empty() {
            return Err(format!(
                "seed {seed}, during load {iter}: {}\nserver log:\n{}",
                violations.join("\n"),
                log_tail(&log)
            ));
        }
    }
    println!(
        "{iterations} kills in {:.1} s; slowest start-up {} ms; totals: produced {} (+{} unanswered), leased {}, \
         completed {} (+{} refused, +{} unanswered), retried {} (+{} refused, +{} unanswered)",
        t_start.elapsed().as_secs_f64(),
        slowest_start.as_millis(),
        totals[0],
        totals[1],
        totals[2],
        totals[3],
        totals[4],
        totals[5],
        totals[6],
        totals[7],
        totals[8],
    );
    Ok(totals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill() {
    let seed = seed();
    // LESSOR_CRASH_DIR keeps the data directory and the server logs for inspection (it must not exist yet).
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = match std::env::var_os("LESSOR_CRASH_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            std::fs::create_dir(&dir).expect("LESSOR_CRASH_DIR must be a new directory");
            dir
        }
        None => tmp.path().to_path_buf(),
    };
    match run(seed, ITERATIONS, &root, None, DEFAULT_LOAD).await {
        Ok(totals) => assert!(
            totals[0] > 0 && totals[3] > 0,
            "the load produced and completed something"
        ),
        Err(e) => panic!("{e}"),
    }
}

/// SIGKILL while several produce rounds are in flight in the pipelined group commit (see the module doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill_with_rounds_in_flight() {
    let seed = seed();
    let tmp = tempfile::tempdir().expect("temp dir");
    let shape = Load {
        producers: IN_FLIGHT_PRODUCERS,
        kill_with_in_flight: IN_FLIGHT_AT_KILL,
    };
    match run(seed, ITERATIONS, tmp.path(), None, shape).await {
        Ok(totals) => assert!(
            totals[0] > 0 && totals[1] > 0,
            "the load produced something, and some produces were in flight at the kills"
        ),
        Err(e) => panic!("{e}"),
    }
}

/// SIGKILL with paging active: partitions keep 5 ready items in memory (`memory-window-items`), so nearly every
/// produce pages items out and every lease pages them in; acknowledged work must survive all the same, and a
/// restart reads the paging counters and index instead of the items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill_with_paging() {
    survives_with_partition_config("paged", "memory-window-items: 5").await;
}

/// Runs the SIGKILL procedure (half the iterations) against a server whose queues (fjall) and partitions are in one
/// storage-dir, the partition store named `name` with the extra config line `extra` (for example
/// `durability: none`), and fails the test on any acknowledged work lost.
async fn survives_with_partition_config(name: &str, extra: &str) {
    survives_with_partition_driver("fjall", name, extra).await
}

/// [`survives_with_partition_config`] with a partition store of driver `driver`.
async fn survives_with_partition_driver(driver: &str, name: &str, extra: &str) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join(format!("{name}.yaml"));
    let data = tmp.path().join("data");
    std::fs::write(
        &config,
        format!(
            "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {dir}\npartition-storage:\n  - name: {name}\n    \
             driver: {driver}\n    affinity: 1\n    config:\n      storage-dir: {dir}\n      {extra}\n",
            dir = data.display()
        ),
    )
    .expect("write config");
    let seed = seed();
    match run(seed, ITERATIONS / 2, tmp.path(), Some(&config), DEFAULT_LOAD).await {
        Ok(totals) => assert!(
            totals[0] > 0 && totals[3] > 0,
            "the load produced and completed something ({name}: {extra})"
        ),
        Err(e) => panic!("{name} ({extra}): {e}"),
    }
}

/// SIGKILL with `durability: interval` and `none`: writes wait for no fsync, so a partition's write that finds the
/// writer thread idle is written by the calling worker (`block_in_place`), and an answer means the write is in the
/// OS. A process kill (not a power loss) must lose nothing acknowledged on either path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill_without_fsyncs() {
    for durability in ["interval", "none"] {
        survives_with_partition_config("nofsync", &format!("durability: {durability}")).await;
    }
}

/// SIGKILL against the log store (partitions in RAM, an append-only log), in `sync` and `none`, with checkpoints
/// every 64 KiB of log so that kills land before, during and after them: nothing acknowledged may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill_on_the_log_store() {
    for durability in ["sync", "none"] {
        survives_with_partition_driver(
            "log",
            "log",
            &format!("durability: {durability}\n      checkpoint-bytes: 64KiB"),
        )
        .await;
    }
}

/// The check is not vacuous: with items kept in memory only (queue definitions on disk, so the queue survives), the
/// same procedure must report acknowledged items as lost after the first kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_catches_lost_items() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("volatile.yaml");
    let data = tmp.path().join("data");
    std::fs::write(
        &config,
        format!(
            "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {}\npartition-storage:\n  - name: volatile\n    \
             driver: memory\n    affinity: 1\n",
            data.display()
        ),
    )
    .expect("write config");
    let seed = seed();
    let e = run(seed, 2, tmp.path(), Some(&config), DEFAULT_LOAD)
        .await
        .expect_err("items kept only in memory are lost by a SIGKILL, and the check must notice");
    assert!(e.contains("after kill 1") && e.contains("is lost"), "{e}");
    println!(
        "control run with memory partitions failed as it must:\n{}",
        e.lines().next().unwrap_or("")
    );
}

/// The same ledger with every payload offloaded to S3-compatible object storage (`LESSOR_TEST_S3_ENDPOINT`, from
/// `scripts/s3-test-server.sh`; threshold 1 byte) and a sweeper running every second during the load: nothing
/// acknowledged is lost or duplicated, every payload reads back whole, and once the sweeper has run after the last
/// restart there is exactly one object per item left (no orphan from a produce or complete cut by the SIGKILL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_offloaded_work_survives_sigkill_and_leaves_no_orphan() {
    use futures::TryStreamExt;
    use object_store::ObjectStore;

    let bucket = "lessor-crash";
    let Some(endpoint) = lessor_testkit::s3::bucket(bucket).await else {
        return;
    };
    let prefix = format!("crash-{}-{}/", std::process::id(), seed());
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let config = tmp.path().join("offload.yaml");
    std::fs::write(
        &config,
        format!(
            "object-storage:\n  - name: s3-0\n    endpoint: {endpoint}\n    bucket: {bucket}\n    \
             access-key-id: test\n    secret-access-key: test\n    path-style: true\n    prefix: {prefix}\n\
             queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {d}\n\
             partition-storage:\n  - name: disk-0\n    driver: fjall\n    affinity: 1\n    config:\n      \
             storage-dir: {d}\n      payload-offload: s3-0\n      offload-threshold: 1B\n      \
             offload-sweep-interval: 1s\n      offload-grace: 2s\n      compression: lz4\n",
            d = data.display()
        ),
    )
    .expect("write config");
    let seed = seed();
    let totals = match run(seed, 8, tmp.path(), Some(&config), DEFAULT_LOAD).await {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert!(
        totals[0] > 0 && totals[3] > 0,
        "the load produced and completed something"
    );

    // A last start: the sweeper removes what the kills left; one object per item must remain.
    let log = tmp.path().join("server-final.log");
    let server = server_command(&data, &log, Some(&config)).start().await;
    // Items are counted again on every look: a listing is not a snapshot, and an item whose schedule comes due
    // between the ready and the scheduled listing is missed by one of them.
    let mut items = 0;
    let objects = lessor_storage_client(&endpoint, bucket);
    let root = object_store::path::Path::from(prefix.as_str());
    let mut last = 0;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let keys: Vec<object_store::ObjectMeta> = objects
            .list(Some(&root))
            .try_collect()
            .await
            .expect("list objects");
        last = keys.len();
        first.get_or_insert(last);
        items = list_all(server.client()).await.len();
        if last == items {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if last != items {
        // Which object is it? The raw partitions (below the offload wrapper) say which keys items reference.
        let keys: Vec<String> = objects
            .list(Some(&root))
            .map_ok(|m| format!("{} ({})", m.location, m.last_modified))
            .try_collect()
            .await
            .expect("list objects");
        drop(server);
        let store = lessor_storage::fjall::FjallStore::open(&data, lessor_storage::fjall::Durability::Sync)
            .expect("open the partitions");
        let mut referenced = Vec::new();
        for partition in 0..PARTITIONS as u32 {
            use lessor_core::storage::PartitionStore;
            let p = store.open(QUEUE, partition).await.expect("open partition");
            let mut snap = p.snapshot().await.expect("snapshot");
            loop {
                let page = snap.next(1000).await.expect("snapshot page");
                if page.is_empty() {
                    break;
                }
                for it in page {
                    let key = lessor_storage::offload::frame::object_key(&it.payload);
                    referenced.push(format!(
                        "p{partition} id {} leased {} dead {} sched {} -> {key:?}",
                        it.id.0,
                        it.is_leased,
                        it.dead,
                        it.is_scheduled()
                    ));
                }
            }
        }
        panic!(
            "after the sweeper ran: {last} objects for {items} items (orphans left?)\nobjects:\n{}\nitems:\n{}\n\
             server log:\n{}",
            keys.join("\n"),
            referenced.join("\n"),
            log_tail(&log)
        );
    }
    println!(
        "offload crash: {items} items; {} objects at the last start, {last} after the sweeper",
        first.unwrap_or(0)
    );
}

/// The ledger with cold backlog segments on (`cold-segments`, a window of 5, a depth of 10 and segments of 10 items
/// on the S3 test server): the kills land during spills and loads (a ticker starts one every second per partition,
/// and leases load segments they reach); nothing acknowledged is lost or duplicated (the ledger lists every item,
/// which loads the segments back), and after the last restart and a sweep every manifest entry names an object and
/// every segment object is named by one (no orphan, no lost segment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_work_survives_sigkill_with_cold_segments() {
    use futures::TryStreamExt;
    use object_store::ObjectStore;

    let bucket = "lessor-crash-cold";
    let Some(endpoint) = lessor_testkit::s3::bucket(bucket).await else {
        return;
    };
    let prefix = format!("cold-{}-{}/", std::process::id(), seed());
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    let config = tmp.path().join("cold.yaml");
    std::fs::write(
        &config,
        format!(
            "object-storage:\n  - name: s3-0\n    endpoint: {endpoint}\n    bucket: {bucket}\n    \
             access-key-id: test\n    secret-access-key: test\n    path-style: true\n    prefix: {prefix}\n\
             queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {d}\n\
             partition-storage:\n  - name: disk-0\n    driver: fjall\n    affinity: 1\n    config:\n      \
             storage-dir: {d}\n      memory-window-items: 5\n      cold-segments: s3-0\n      \
             cold-after-depth: 10\n      cold-segment-items: 10\n      cold-prefetch-items: 5\n",
            d = data.display()
        ),
    )
    .expect("write config");
    let seed = seed();
    let totals = match run(seed, 8, tmp.path(), Some(&config), DEFAULT_LOAD).await {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert!(
        totals[0] > 0 && totals[3] > 0,
        "the load produced and completed something"
    );
    // The partitions opened directly, swept, and compared with the bucket.
    let objects = lessor_storage_client(&endpoint, bucket);
    let root = object_store::path::Path::from(format!("{prefix}disk-0/segments/").as_str());
    let store = lessor_storage::fjall::FjallStore::open(&data, lessor_storage::fjall::Durability::Sync)
        .expect("open the partitions");
    store
        .set_cold(
            lessor_storage::registry::ColdSettings {
                object_store: lessor_storage::offload::ObjectStoreConfig {
                    name: "s3-0".into(),
                    endpoint: endpoint.clone(),
                    bucket: bucket.into(),
                    access_key_id: Some("test".into()),
                    secret_access_key: Some("test".into()),
                    path_style: true,
                    prefix: prefix.clone(),
                    ..Default::default()
                },
                after_depth: 10,
                segment_items: 10,
                segment_bytes: 1 << 20,
                prefetch_items: 5,
            },
            "disk-0",
        )
        .expect("cold settings");
    let mut named = std::collections::BTreeSet::new();
    let mut in_flight = std::collections::BTreeSet::new();
    let mut swept = 0;
    for partition in 0..PARTITIONS as u32 {
        use lessor_core::storage::PartitionStore;
        let _p = store.open(QUEUE, partition).await.expect("open partition");
        let p = store.live_partition(QUEUE, partition).expect("live");
        swept += p.sweep_segments(Duration::ZERO).await.expect("sweep");
        let (keys, job) = p.segment_keys().await.expect("keys");
        named.extend(keys);
        in_flight.extend(job);
    }
    let listed: std::collections::BTreeSet<String> = objects
        .list(Some(&root))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .expect("list objects");
    let lost: Vec<&String> = named.difference(&listed).collect();
    let orphans: Vec<&String> = listed
        .difference(&named)
        .filter(|k| !in_flight.contains(*k))
        .collect();
    assert!(lost.is_empty(), "manifest entries without their object: {lost:?}");
    assert!(
        orphans.is_empty(),
        "orphaned segments after the sweep: {orphans:?}"
    );
    let (written, loaded, failed) = store.segment_counters();
    println!(
        "cold crash: {} segments named, {swept} orphans swept; this last open wrote {written}, loaded {loaded}, failed {failed}",
        named.len()
    );
}

fn lessor_storage_client(endpoint: &str, bucket: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
    std::sync::Arc::new(
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("client"),
    )
}
