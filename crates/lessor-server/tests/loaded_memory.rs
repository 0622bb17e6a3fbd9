//! What a loaded, idle, empty queue holds in memory, counted exactly with a counting global allocator, through the
//! real server on port 0 (the pattern of `unload_memory.rs`): queues are created, each asked for its stats once
//! (which loads it), and the bytes allocated once the server settled, over what the queues held created and never
//! loaded (their definitions and partitions in the store), are divided by their number. Queues are never unloaded
//! here (the clock does not move): this is what a sweep over thousands of tenants' queues peaks at, each loaded by
//! one request and not yet idle for `limits.queue-idle-unload`.
//!
//! The breakdown by structure (`docs/operations.md`, "loaded queue") was read off heaptrack's record of the blocks
//! still allocated once the queues had loaded; this test bounds the total.
//!
//! This is what the process really holds, not its RSS: a freed block the allocator keeps for reuse is not counted.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use lessor_core::time::ManualClock;
use lessor_server::Config;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

mod counted;
use counted::{create, names, settled, touch};

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Queues measured: enough that what the server allocates or frees on its own meanwhile is a few bytes per queue.
const QUEUES: usize = 1000;

/// Moves the clock past the idle time and waits until no queue is loaded (the warm-up's queues).
async fn unload_all(srv: &lessor_server::RunningServer, clock: &ManualClock) {
    clock.advance(Duration::from_secs(301));
    lessor_testkit::eventually("every queue unloads", Duration::from_secs(60), || async {
        match srv.engine.loaded_queues().0 {
            0 => Ok(()),
            n => Err(format!("{n} queues still loaded")),
        }
    })
    .await;
}

/// Bytes held per loaded queue of `partitions` partitions on a server with `config`, over what the queues held
/// created and never loaded.
async fn per_loaded_queue(config: Config, partitions: i32, what: &str) -> f64 {
    let clock = ManualClock::starting_now();
    let (srv, c) = lessor_testkit::server::start(&config, Some(Arc::new(clock.clone()))).await;
    // Warm up: the first queues grow the tables every queue shares (the server's maps, the store's catalog) and
    // build the lazily built parts of the server.
    let warm = names("warm", QUEUES / 4);
    create(&c, &warm, partitions).await;
    touch(&c, &warm).await;
    unload_all(&srv, &clock).await;
    let queues = names("q", QUEUES);
    create(&c, &queues, partitions).await;
    let created = settled().await;
    touch(&c, &queues).await;
    let loaded = settled().await;
    assert_eq!(
        srv.engine.loaded_queues().0,
        QUEUES,
        "every queue measured is loaded"
    );
    let per_queue = (loaded - created) as f64 / QUEUES as f64;
    println!("{what}, {partitions} partition(s): {per_queue:.0} bytes per loaded queue");
    srv.stop().await;
    per_queue
}

/// The tests count every allocation of the process: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Most bytes a loaded, idle, empty queue of one partition may hold. It held 12,443 bytes on memory and 12,756 on
/// fjall (debug build), most of them allocated for a busy queue and unused by an idle one: the task's future with
/// the largest of its passes' states inline in it (4.9 KB), its inbox's first block of 32 messages (2.6 KB), its
/// partition's state (2.6 KB), the first room of its history ring, of its message batch and of its partitions' list.
/// Then 7,547 on memory and 7,861 on fjall; 6,251 and 6,948 once a partition's state held its per-priority state
/// and the paging writes waiting for the next write only once used; 5,883 and 6,392 once its paging counters too.
const BOUND_ONE: f64 = 7168.0;
/// Most bytes each further partition of a loaded queue may add, the partition's state in the store for most of it:
/// 2,565 on memory and 3,009 on fjall while every partition held its state for all ten priorities (about 900 bytes),
/// room for paging writes (about 600) and its paging counters (368) inline; 1,510 and 1,684 with the counters still
/// inline; 1,033 and 1,342 since all three are boxed on first use.
const BOUND_PER_PARTITION: f64 = 1600.0;
/// What a build with the `s3` feature (the `lessor` binary's default, and `--all-features`) adds to each partition
/// of a loaded queue, cold segments configured or not: 313 bytes on memory and 465 on fjall, most of it the cold
/// tier's state every `FjallPartition` holds inline (`cold::ColdState`, without its per-priority marks, boxed on
/// first use: with them it took about 1,160 bytes). The bounds above are read off a build without it: one partition
/// held 5,883 bytes on memory and 6,392 on fjall there, 6,207 and 6,883 with it (debug build; the fjall figure moves
/// by a few hundred bytes from run to run, see `unload_memory.rs`).
const S3_PER_PARTITION: f64 = if cfg!(feature = "s3") { 512.0 } else { 0.0 };

/// Whether a queue of `partitions` partitions holding `bytes` is within the bounds.
fn within(bytes: f64, partitions: i32) -> bool {
    let further = f64::from(partitions - 1);
    bytes <= BOUND_ONE + further * BOUND_PER_PARTITION + f64::from(partitions) * S3_PER_PARTITION
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_idle_queue_is_small_on_memory() {
    let _serial = SERIAL.lock().await;
    let one = per_loaded_queue(Config::memory(), 1, "memory").await;
    let sixteen = per_loaded_queue(Config::memory(), 16, "memory").await;
    assert!(
        within(one, 1),
        "a loaded queue of 1 partition holds {one:.0} bytes"
    );
    assert!(
        within(sixteen, 16),
        "a loaded queue of 16 partitions holds {sixteen:.0} bytes"
    );
}

#[cfg(feature = "fjall")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_idle_queue_is_small_on_fjall() {
    let _serial = SERIAL.lock().await;
    let fjall =
        |dir: &tempfile::TempDir| Config::default_persistent(dir.path().to_str().expect("utf-8 path"));
    let (a, b) = (
        tempfile::tempdir().expect("temp dir"),
        tempfile::tempdir().expect("temp dir"),
    );
    let one = per_loaded_queue(fjall(&a), 1, "fjall").await;
    let sixteen = per_loaded_queue(fjall(&b), 16, "fjall").await;
    assert!(
        within(one, 1),
        "a loaded queue of 1 partition holds {one:.0} bytes"
    );
    assert!(
        within(sixteen, 16),
        "a loaded queue of 16 partitions holds {sixteen:.0} bytes"
    );
}
