//! Partition failure handling: a produce whose partition fails is written to a healthy partition instead, the
//! failed partition is avoided and later recovered, and with every partition failing the caller gets a retryable
//! error instead of a false 200.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::error::{QueueError, StorageError};
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::ManualClock;
use lessor_core::types::{Limits, QueueInfo};
use lessor_storage::memory::{MemoryQueues, MemoryStore};

/// A memory store whose partitions fail every call while `down` is set.
#[derive(Debug)]
struct Flaky {
    inner: MemoryStore,
    down: Arc<AtomicBool>,
}

#[async_trait]
impl PartitionStore for Flaky {
    fn driver(&self) -> &'static str {
        "flaky"
    }
    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StorageError::unavailable("injected: store down"));
        }
        let p = self.inner.open(queue, partition).await?;
        Ok(Arc::new(FlakyPartition {
            inner: p,
            down: self.down.clone(),
        }))
    }
    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        self.inner.destroy(queue, partition).await
    }
    async fn close(&self) {}
}

#[derive(Debug)]
struct FlakyPartition {
    inner: Arc<dyn Partition>,
    down: Arc<AtomicBool>,
}

macro_rules! guard {
    ($s:expr) => {
        if $s.down.load(Ordering::SeqCst) {
            return Err(StorageError::unavailable("injected: partition down"));
        }
    };
}

#[async_trait]
impl Partition for FlakyPartition {
    async fn produce(
        &self,
        items: Vec<lessor_core::types::NewItem>,
    ) -> Result<Vec<lessor_core::types::ItemId>, StorageError> {
        guard!(self);
        self.inner.produce(items).await
    }
    async fn lease(
        &self,
        n: usize,
        d: lessor_core::time::Ts,
    ) -> Result<Vec<lessor_core::types::Item>, StorageError> {
        guard!(self);
        self.inner.lease(n, d).await
    }
    async fn complete(
        &self,
        r: Vec<Vec<lessor_core::types::ItemId>>,
    ) -> Result<Vec<Result<(), lessor_core::error::ItemError>>, StorageError> {
        guard!(self);
        self.inner.complete(r).await
    }
    async fn extend(
        &self,
        r: Vec<(Vec<lessor_core::types::ItemId>, lessor_core::time::Ts)>,
    ) -> Result<Vec<Result<(), lessor_core::error::ItemError>>, StorageError> {
        guard!(self);
        self.inner.extend(r).await
    }
    async fn dedup_records(
        &self,
        now: lessor_core::time::Ts,
    ) -> Result<Vec<lessor_core::types::DedupRecord>, StorageError> {
        guard!(self);
        self.inner.dedup_records(now).await
    }
    async fn retry(
        &self,
        r: Vec<Vec<lessor_core::storage::RetryOp>>,
        p: lessor_core::storage::LifecyclePolicy,
    ) -> Result<Vec<Result<lessor_core::storage::RetryOutcome, lessor_core::error::ItemError>>, StorageError>
    {
        guard!(self);
        self.inner.retry(r, p).await
    }
    async fn lifecycle(
        &self,
        now: lessor_core::time::Ts,
        p: lessor_core::storage::LifecyclePolicy,
        limit: usize,
    ) -> Result<lessor_core::storage::LifecycleOutcome, StorageError> {
        guard!(self);
        self.inner.lifecycle(now, p, limit).await
    }
    async fn dead_items(&self, limit: usize) -> Result<Vec<lessor_core::types::Item>, StorageError> {
        guard!(self);
        self.inner.dead_items(limit).await
    }
    async fn remove_dead(&self, ids: Vec<lessor_core::types::ItemId>) -> Result<(), StorageError> {
        guard!(self);
        self.inner.remove_dead(ids).await
    }
    async fn next_deadline(&self) -> Result<Option<lessor_core::time::Ts>, StorageError> {
        guard!(self);
        self.inner.next_deadline().await
    }
    async fn counts(&self) -> Result<lessor_core::types::PartitionCounts, StorageError> {
        guard!(self);
        self.inner.counts().await
    }
    async fn stats(
        &self,
        now: lessor_core::time::Ts,
    ) -> Result<lessor_core::types::PartitionStats, StorageError> {
        guard!(self);
        self.inner.stats(now).await
    }
    async fn list(
        &self,
        pivot: Option<lessor_core::types::ItemId>,
        limit: usize,
        scheduled: bool,
    ) -> Result<Vec<lessor_core::types::Item>, StorageError> {
        self.inner.list(pivot, limit, scheduled).await
    }
    async fn import(
        &self,
        items: Vec<lessor_core::types::Item>,
    ) -> Result<Vec<lessor_core::types::Item>, StorageError> {
        guard!(self);
        self.inner.import(items).await
    }
    async fn delete(&self, ids: Vec<lessor_core::types::ItemId>) -> Result<(), StorageError> {
        guard!(self);
        self.inner.delete(ids).await
    }
    async fn clear(&self, r: lessor_core::types::ClearRequest) -> Result<(), StorageError> {
        guard!(self);
        self.inner.clear(r).await
    }
    async fn close(&self) {}
}

/// An engine over one store that fails every call while `down` is set.
fn one_flaky_store(down: &Arc<AtomicBool>, clock: &ManualClock) -> Engine {
    Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "flaky".into(),
            affinity: 1.0,
            store: Arc::new(Flaky {
                inner: MemoryStore::new(),
                down: down.clone(),
            }),
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
            store: Arc::new(Flaky {
                inner: MemoryStore::new(),
                down: flaky_down.clone(),
            }),
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
