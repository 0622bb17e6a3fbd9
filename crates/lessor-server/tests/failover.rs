//! Partition failure handling: a produce whose partition fails is written to a healthy partition instead, the
//! failed partition is avoided and later recovered, and with every partition failing the caller gets a retryable
//! error instead of a false 200.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::error::{QueueError, StorageError};
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::hooked::{before, HookedStore, Op};

/// A memory store whose partitions fail every call but `list` while `down` is set, and whose opens fail then too.
fn flaky(down: &Arc<AtomicBool>) -> Arc<HookedStore> {
    let down = down.clone();
    let hook = before(move |c| {
        if !down.load(Ordering::SeqCst) {
            return Ok(());
        }
        match c.op {
            Op::Open => Err(StorageError::unavailable("injected: store down")),
            Op::List => Ok(()),
            op if op.on_partition() => Err(StorageError::unavailable("injected: partition down")),
            _ => Ok(()),
        }
    });
    Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), hook))
}

/// An engine over one store that fails every call while `down` is set.
fn one_flaky_store(down: &Arc<AtomicBool>, clock: &ManualClock) -> Engine {
    Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "flaky".into(),
            affinity: 1.0,
            store: flaky(down),
        }],
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine")
}

fn item(p: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes_of(p),
        ..Default::default()
    }
}

fn bytes_of(p: &str) -> bytes::Bytes {
    bytes::Bytes::from(p.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_fails_over_and_failed_partition_recovers() {
    let clock = ManualClock::starting_now();
    let flaky_down = Arc::new(AtomicBool::new(false));
    let stores = vec![
        NamedStore {
            name: "flaky".into(),
            affinity: 1.0,
            store: flaky(&flaky_down),
        },
        NamedStore {
            name: "good".into(),
            affinity: 1.0,
            store: Arc::new(MemoryStore::new()),
        },
    ];
    let engine = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores,
        limits: Limits::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine");
    let info = QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 2,
        ..Default::default()
    };
    engine.create_queue(info).await.expect("create");
    let t = Some(Duration::from_secs(5));
    // Both healthy: the first produce goes to partition 0 (the flaky store).
    engine.produce("q", vec![item("a")], t).await.expect("produce");
    flaky_down.store(true, Ordering::SeqCst);
    // Partition 0 now fails; partition 1 is less loaded anyway, so load partition 1 first to force the choice of 0.
    engine
        .produce("q", vec![item("b"), item("c")], t)
        .await
        .expect("produce to partition 1");
    // Least loaded is now partition 0 (1 item vs 2): its write fails and the request fails over to partition 1.
    engine
        .produce("q", vec![item("d")], t)
        .await
        .expect("fails over, never a false 200");
    let p1 = engine.storage_list("q", 1, None, 100, false).await.expect("list");
    let texts: Vec<_> = p1
        .iter()
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect();
    assert_eq!(texts, vec!["b", "c", "d"]);
    let stats = engine.stats("q").await.expect("stats");
    assert!(stats.partitions[0].failures > 0, "partition 0 is marked failing");
    // Complete/retry on the failed partition: a retryable error, not a 500.
    let err = engine
        .complete("q", 0, vec![lessor_core::types::ItemId(1)], t)
        .await
        .expect_err("failing partition");
    assert!(matches!(err, QueueError::PartitionUnavailable(0)), "{err:?}");
    // Recovery: once the store is back, the next probe (after the backoff) marks it healthy again.
    flaky_down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(10));
    let mut healthy = false;
    for _ in 0..200 {
        if engine.stats("q").await.expect("stats").partitions[0].failures == 0 {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(healthy, "partition 0 recovers");
    let l = engine.lease("q", 10, "c", t).await.expect("lease");
    assert!(!l.items.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_failing_is_a_retryable_error() {
    let down = Arc::new(AtomicBool::new(false));
    let engine = one_flaky_store(&down, &ManualClock::starting_now());
    let info = QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        ..Default::default()
    };
    engine.create_queue(info).await.expect("create");
    engine
        .produce("q", vec![item("a")], Some(Duration::from_secs(5)))
        .await
        .expect("produce");
    down.store(true, Ordering::SeqCst);
    let err = engine
        .produce("q", vec![item("b")], Some(Duration::from_secs(5)))
        .await
        .expect_err("down");
    assert!(
        matches!(err, QueueError::Transient(_) | QueueError::NoAvailablePartitions),
        "{err:?}"
    );
    let err = engine
        .produce("q", vec![item("c")], Some(Duration::from_secs(5)))
        .await
        .expect_err("still down");
    assert!(matches!(err, QueueError::NoAvailablePartitions), "{err:?}");
}

/// A server whose database is down still starts, even with queues declared in its file; calls answer 454 until the
/// database is back (here it never is).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_the_database_down_and_declared_queues() {
    let yaml = "queue-storage:\n  driver: postgres\n  config: { connection-string: 'postgres://nobody@127.0.0.1:1/none?connect_timeout=1' }\n\
                partition-storage:\n  - name: pg\n    driver: postgres\n    affinity: 1\n    config: { connection-string: 'postgres://nobody@127.0.0.1:1/none?connect_timeout=1' }\n\
                queues:\n  - name: jobs\n    lease-timeout: 1m\n    expire-timeout: 1h\n";
    let config = lessor_server::Config::from_yaml(yaml).expect("config");
    // Starts while the database is down.
    let (srv, c) = lessor_testkit::server::start(&config, None).await;
    let err = c
        .queues_info(&lessor_client::proto::QueuesInfoRequest {
            queue_name: "jobs".into(),
        })
        .await
        .expect_err("database down");
    assert_eq!(err.code(), Some(454), "{err:?}");
    let health = c.health().await.expect("health answers");
    assert_eq!(health["status"], "fail");
    srv.stop().await;
}

/// A keyed produce whose write fails gives its key back (the engine claims keys before the write): the client's
/// retry, once the store is back, stores the item, and only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_keyed_produce_gives_its_key_back() {
    let clock = ManualClock::starting_now();
    let down = Arc::new(AtomicBool::new(false));
    let engine = one_flaky_store(&down, &clock);
    let info = QueueInfo {
        name: "q".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        dedup_window: Duration::from_secs(600),
        ..Default::default()
    };
    engine.create_queue(info).await.expect("create");
    let t = Some(Duration::from_secs(5));
    let keyed = |p: &str| ProduceItem {
        payload: bytes_of(p),
        dedup_id: "order-1".into(),
        ..Default::default()
    };
    engine.produce("q", vec![item("a")], t).await.expect("produce");
    down.store(true, Ordering::SeqCst);
    engine
        .produce("q", vec![keyed("first try")], t)
        .await
        .expect_err("the store is down");
    down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(10));
    let mut stored = false;
    for _ in 0..200 {
        // Until the partition is probed healthy again, the produce is refused; then it must store the item.
        if engine.produce("q", vec![keyed("retry")], t).await.is_ok() {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(stored, "the partition recovers and the retry is stored");
    engine
        .produce("q", vec![keyed("duplicate")], t)
        .await
        .expect("a duplicate is acknowledged");
    let texts: Vec<String> = engine
        .storage_list("q", 0, None, 100, false)
        .await
        .expect("list")
        .iter()
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect();
    assert_eq!(
        texts,
        vec!["a", "retry"],
        "the failed try left no key behind, the duplicate was not stored"
    );
}
