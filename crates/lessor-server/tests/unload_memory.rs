//! What a queue unloaded for being idle (`limits.queue-idle-unload`) still holds in memory, counted exactly with a
//! counting global allocator, through the real server on port 0 with an injected clock: queues are created, each
//! asked for its stats once (which loads it), the clock moves past the idle time, and once every queue has unloaded
//! (and `/metrics` and the dashboard's history have seen them unloaded) the bytes still allocated, over what the
//! queues held once created and before they loaded (their definitions and partitions in the store), are divided by
//! their number.
//!
//! This is what the process really holds, not its RSS: a freed block the allocator keeps for reuse is not counted.
//! The memory store keeps each partition's state from its first open (its storage, measured apart and taken off);
//! fjall keeps nothing of a closed partition but its catalog entry, written when the queue is created. See
//! `docs/operations.md` ("about 330 bytes per queue") for the figures.
//!
//! The figure is the same from run to run, within a few bytes. It differed between builds, not runs: 330 bytes was
//! a build without the `s3` feature; with it (the `lessor` binary's default, `--all-features`) every partition store
//! is wrapped in the offload store, whose map of open partitions kept an entry per partition ever opened, and with
//! it the whole allocation of the closed partition (a `Weak` keeps its `Arc`'s block): 3,979 bytes per unloaded
//! fjall queue, until the wrapper forgot a partition as it closes.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use lessor_client::Client;
use lessor_core::time::ManualClock;
use lessor_server::Config;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

mod counted;
use counted::{create, live, names, settled, touch};

#[global_allocator]
static ALLOC: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Queues measured: enough that the few kilobytes the server allocates or frees on its own meanwhile (a
/// connection's buffers, a timer wheel's slots) are a few bytes per queue.
const QUEUES: usize = 2000;

/// Moves the clock past the idle time, waits until no queue is loaded, then lets `/metrics` and the dashboard's
/// history (sampled every 2 s of real time) see the queues unloaded, twice, so that nothing measured is a sample
/// still to come.
async fn unload_all(srv: &lessor_server::RunningServer, clock: &ManualClock) {
    clock.advance(Duration::from_secs(301));
    lessor_testkit::eventually("every queue unloads", Duration::from_secs(60), || async {
        match srv.engine.loaded_queues().0 {
            0 => Ok(()),
            n => Err(format!("{n} queues still loaded")),
        }
    })
    .await;
    // On a client of its own, dropped afterwards: a scrape of thousands of queues is megabytes, and a connection
    // keeps a read buffer of up to 400 KB while it is pooled, which is the test's, not the server's.
    let scraper = Client::new(&srv.endpoint()).expect("client");
    for _ in 0..2 {
        tokio::time::sleep(lessor_server::history::INTERVAL + Duration::from_millis(200)).await;
        scraper.metrics().await.expect("metrics");
    }
    drop(scraper);
}

/// Bytes held per queue on a server with `config` once its queues were loaded and unloaded, over what they held
/// created and never loaded (their definitions and partitions in the store, written before the measure starts).
async fn per_unloaded_queue(config: Config) -> f64 {
    let clock = ManualClock::starting_now();
    let (srv, c) = lessor_testkit::server::start(&config, Some(Arc::new(clock.clone()))).await;
    // Warm up: the first queues grow the tables every queue shares (the server's maps, the store's catalog) to a
    // size that the measured ones then grow in proportion, and the lazily built parts of the server get built.
    let warm = names("warm", QUEUES / 4);
    create(&c, &warm, 1).await;
    touch(&c, &warm).await;
    unload_all(&srv, &clock).await;
    let queues = names("q", QUEUES);
    let before = settled().await;
    create(&c, &queues, 1).await;
    let created = settled().await;
    touch(&c, &queues).await;
    let loaded = settled().await;
    unload_all(&srv, &clock).await;
    let unloaded = settled().await;
    let per = |from: isize, to: isize| (to - from) as f64 / QUEUES as f64;
    let per_queue = per(created, unloaded);
    println!(
        "{QUEUES} queues, bytes per queue: {:.0} created, {:.0} more loaded, {per_queue:.0} more once unloaded",
        per(before, created),
        per(created, loaded),
    );
    srv.stop().await;
    per_queue
}

/// What an unloaded queue may hold of its own: its last figures for `/metrics` (`QueueMetrics` in an `Arc`, 272
/// bytes), its name, and its slot in the engine's table of unloaded queues (33 bytes, up to twice that at the
/// table's load factor): about 350 bytes, and a name longer than the test's 7 bytes. It used to hold also the
/// dashboard history's ring with its baseline (about 200 bytes with its slot) and the slots that the tables of
/// loaded queues and open partitions kept from the peak (about 120 bytes): 580 bytes in all.
const BOUND: f64 = 400.0;

/// Bytes a memory store holds per partition opened once and read as a queue's load and `queue.stats` read it
/// (its state, kept until the partition is destroyed: the memory backend's storage, not something an unloaded
/// queue could give up). In a build with `s3` the store is measured inside the offload wrapper, as the server opens
/// it: the wrapper's map of open partitions keeps the entry of a memory partition (about 95 bytes) as long as the
/// store keeps the partition, so that its orphaned objects are still swept while its queue is unloaded.
async fn memory_partition() -> f64 {
    use lessor_core::storage::PartitionStore;
    let store: Arc<dyn PartitionStore> = Arc::new(lessor_storage::memory::MemoryStore::new());
    #[cfg(feature = "s3")]
    let store: Arc<dyn PartitionStore> =
        lessor_storage::offload::OffloadStore::new(store, "memory-0", Default::default())
            .expect("offload wrapper");
    let now = lessor_core::time::Ts::from_system(std::time::SystemTime::now());
    // A server stopped by the other test just before (they take turns) still frees megabytes for a while.
    let mut last = live();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let l = live();
        if (l - last).abs() < 4096 {
            break;
        }
        last = l;
    }
    let before = live();
    for i in 0..QUEUES {
        let p = store.open(&format!("m{i:06}"), 0).await.expect("open");
        p.dedup_records(now).await.expect("dedup records");
        p.counts().await.expect("counts");
        p.next_deadline().await.expect("next deadline");
        p.stats(now).await.expect("stats");
        p.close().await;
    }
    let per = (live() - before) as f64 / QUEUES as f64;
    drop(store);
    per
}

/// The tests count every allocation of the process: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_queue_holds_only_its_last_figures_on_memory() {
    let _serial = SERIAL.lock().await;
    // Before the server, which would still be freeing memory for a while after it stopped.
    let partition = memory_partition().await;
    let per_queue = per_unloaded_queue(Config::memory()).await;
    println!("the memory store holds {partition:.0} bytes per partition opened once");
    assert!(
        per_queue - partition <= BOUND,
        "an unloaded queue holds {per_queue:.0} bytes, {partition:.0} of them its partition in the memory store"
    );
}

#[cfg(feature = "fjall")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloaded_queue_holds_only_its_last_figures_on_fjall() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config::default_persistent(dir.path().to_str().expect("utf-8 path"));
    let per_queue = per_unloaded_queue(config).await;
    assert!(per_queue <= BOUND, "an unloaded queue holds {per_queue:.0} bytes");
}
