//! Online rebalance and PostgreSQL's per-incarnation tables (`items_<hash>_<incarnation>_<partition>`, see
//! `lessor_storage::postgres::incarnation_table_name`).
//!
//! A rebalance refuses a shared store (every PostgreSQL store is one: the other servers would keep serving the
//! partition from its old place), so these tests put the PostgreSQL store behind a wrapper that serves it as a store
//! of one server. They check that what the rebalance makes and destroys there is the queue's incarnation: before, it
//! made destinations and destroyed sources under incarnation 0 only, so a moved partition's table stayed registered
//! (and with it, once the queue was deleted, the queue's dedup records, which a queue created again under the name
//! took for its own), a move back made an unused table of incarnation 0 and drained into the old one (whatever a
//! failed source delete had left in it served again), and a deleted queue left it for good.
//!
//! Needs the `postgres` feature and `LESSOR_TEST_DATABASE_URL` (skipped without it, failed when `CI` is set).
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use lessor_core::engine::{
    Engine, EngineConfig, NamedStore, PartitionMove, ProduceItem, QueueUpdate, RebalanceRequest,
    RebalanceStatus, RebalanceTask,
};
use lessor_core::error::StorageError;
use lessor_core::storage::{Partition, PartitionStore, QueuesStore};
use lessor_core::time::{SystemClock, Ts};
use lessor_core::types::QueueInfo;
use lessor_storage::memory::MemoryStore;
use lessor_storage::postgres::{table_name, PgConfig, PgQueues, PgStore};
use lessor_testkit::eventually::poll_until;
use lessor_testkit::TestDatabase as Database;

const T: Option<Duration> = Some(Duration::from_secs(10));

/// A PostgreSQL store served as if by one server only (`shared` is false), so that a rebalance takes it; everything
/// else, incarnations included, is the PostgreSQL store's.
#[derive(Debug)]
struct OneServer(Arc<PgStore>);

#[async_trait]
impl PartitionStore for OneServer {
    fn driver(&self) -> &'static str {
        self.0.driver()
    }
    fn max_partitions(&self) -> u32 {
        self.0.max_partitions()
    }
    async fn create(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.0.create(queue, partitions).await
    }
    async fn open(&self, queue: &str, partition: u32) -> Result<Arc<dyn Partition>, StorageError> {
        self.0.open(queue, partition).await
    }
    async fn destroy(&self, queue: &str, partition: u32) -> Result<(), StorageError> {
        self.0.destroy(queue, partition).await
    }
    async fn destroy_many(&self, queue: &str, partitions: &[u32]) -> Result<(), StorageError> {
        self.0.destroy_many(queue, partitions).await
    }
    async fn create_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        self.0.create_incarnation(queue, incarnation, partitions).await
    }
    async fn open_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<Arc<dyn Partition>, StorageError> {
        self.0.open_incarnation(queue, incarnation, partition).await
    }
    async fn destroy_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partition: u32,
    ) -> Result<(), StorageError> {
        self.0.destroy_incarnation(queue, incarnation, partition).await
    }
    async fn destroy_many_incarnation(
        &self,
        queue: &str,
        incarnation: Ts,
        partitions: &[u32],
    ) -> Result<(), StorageError> {
        self.0
            .destroy_many_incarnation(queue, incarnation, partitions)
            .await
    }
    async fn close(&self) {
        self.0.close().await
    }
}

/// An engine on `db` with the PostgreSQL store `pg` (served by `pg`, where queues are placed) and the memory store
/// `mem` (affinity 0: only moves put partitions there).
fn engine(db: &Database, pg: Arc<dyn PartitionStore>) -> Engine {
    let cfg = PgConfig::new(db.url().to_string()).with_max_conns(4);
    let queues: Arc<dyn QueuesStore> = Arc::new(PgQueues::new(&cfg).expect("queues"));
    Engine::new(EngineConfig {
        queues,
        stores: vec![
            NamedStore {
                name: "pg".into(),
                affinity: 1.0,
                store: pg,
            },
            NamedStore {
                name: "mem".into(),
                affinity: 0.0,
                store: Arc::new(MemoryStore::new()),
            },
        ],
        limits: Default::default(),
        clock: Arc::new(SystemClock),
    })
    .expect("engine")
}

fn pg_store(db: &Database) -> Arc<PgStore> {
    let cfg = PgConfig::new(db.url().to_string()).with_max_conns(4);
    Arc::new(PgStore::new(&cfg).expect("store"))
}

fn jobs() -> QueueInfo {
    QueueInfo {
        name: "jobs".into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        ..Default::default()
    }
}

fn item(payload: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

fn keyed(key: &str) -> ProduceItem {
    ProduceItem {
        dedup_id: key.into(),
        ..item(key)
    }
}

/// `jobs` with `payloads` in partition 0 and an empty partition 1 (it takes the traffic while 0 moves), all in `pg`.
async fn jobs_with(e: &Engine, payloads: &[&str]) {
    e.create_queue(jobs()).await.expect("create");
    e.produce("jobs", payloads.iter().map(|p| item(p)).collect(), T)
        .await
        .expect("produce");
    e.update_queue(QueueUpdate {
        name: "jobs".into(),
        requested_partitions: Some(2),
        ..Default::default()
    })
    .await
    .expect("grow to 2 partitions");
}

/// Moves partition `partition` of `jobs` to `to` and waits until the move completed.
async fn move_partition(e: &Engine, partition: u32, to: &str) {
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "jobs".into(),
            moves: vec![PartitionMove {
                partition,
                to_store: to.into(),
            }],
            ..Default::default()
        })
        .await
        .expect("start the move");
    let id = task.id.clone();
    let t: RebalanceTask = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        let e = e.clone();
        let id = id.clone();
        async move {
            let t = e.rebalance_get(&id).await.map_err(|e| e.to_string())?;
            match t.status {
                RebalanceStatus::Running | RebalanceStatus::Cancelling => {
                    Err(format!("still running: {t:?}"))
                }
                _ => Ok(t),
            }
        }
    })
    .await
    .expect("the move finishes");
    assert_eq!(t.status, RebalanceStatus::Completed, "{t:?}");
    let info = e.queue_info("jobs").await.expect("info");
    assert_eq!(info.partitions[partition as usize].storage_name, to);
}

/// Every payload of `jobs`, sorted.
async fn payloads(e: &Engine) -> Vec<String> {
    let info = e.queue_info("jobs").await.expect("info");
    let mut out = Vec::new();
    for p in 0..info.partitions.len() as u32 {
        let items = e
            .storage_list("jobs", p, None, 1000, false)
            .await
            .unwrap_or_else(|e| panic!("partition {p}: {e}"));
        out.extend(
            items
                .iter()
                .map(|it| String::from_utf8_lossy(&it.payload).into_owned()),
        );
    }
    out.sort();
    out
}

/// The item tables of `jobs` in the database (registered or not), by name.
async fn tables_of_jobs(db: &Database) -> Vec<String> {
    // Every incarnation's tables start with the legacy name's prefix: `items_<hash>_`.
    let legacy = table_name("jobs", 0);
    let prefix = &legacy[..legacy.len() - "000000".len()];
    let c = lessor_testkit::db::connect(db.url()).await;
    let rows = c
        .query(
            "SELECT relname::text FROM pg_class WHERE relkind = 'r' AND starts_with(relname::text, $1)
             ORDER BY 1",
            &[&prefix],
        )
        .await
        .expect("list tables");
    rows.iter().map(|r| r.get(0)).collect()
}

/// The registered partitions of `jobs` (`lessor_partitions`), as (partition, table).
async fn registered(db: &Database) -> Vec<(i64, String)> {
    let c = lessor_testkit::db::connect(db.url()).await;
    let rows = c
        .query(
            "SELECT partition, table_name FROM lessor_partitions WHERE queue = 'jobs' ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("list partitions");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// A partition moved out of PostgreSQL and back serves exactly the queue's items, from a table of the queue's
/// incarnation made for the move back: the first move dropped the partition's table (before, it dropped the table of
/// incarnation 0 only; the old one stayed registered, the move back made a table of incarnation 0 that nothing used
/// and drained into the old one, so whatever a failed source delete had left there would have been served again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_out_of_postgres_and_back_serves_each_item_once() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_rebalance").await;
    let e = engine(&db, Arc::new(OneServer(pg_store(&db))));
    jobs_with(&e, &["a", "b", "c"]).await;
    let incarnation = e.queue_info("jobs").await.expect("info").created_at;
    let table0 = lessor_storage::postgres::incarnation_table_name("jobs", 0, incarnation.0);
    let table1 = lessor_storage::postgres::incarnation_table_name("jobs", 1, incarnation.0);
    assert_eq!(tables_of_jobs(&db).await, vec![table0.clone(), table1.clone()]);

    move_partition(&e, 0, "mem").await;
    assert_eq!(
        registered(&db).await,
        vec![(1, table1.clone())],
        "partition 0's table in PostgreSQL outlived its move to the memory store"
    );
    assert_eq!(tables_of_jobs(&db).await, vec![table1.clone()]);

    // One item is completed while the partition is away: it must not come back.
    let l = e.lease("jobs", 1, "worker", T).await.expect("lease");
    assert_eq!(l.items.len(), 1);
    let done = String::from_utf8_lossy(&l.items[0].payload).into_owned();
    e.complete("jobs", 0, vec![l.items[0].id], T)
        .await
        .expect("complete");

    move_partition(&e, 0, "pg").await;
    let mut want: Vec<String> = ["a", "b", "c"]
        .iter()
        .filter(|p| **p != done)
        .map(|p| p.to_string())
        .collect();
    want.sort();
    assert_eq!(
        payloads(&e).await,
        want,
        "the queue holds the items it should (not the old copies of the partition's first table)"
    );
    // The partition is back in the queue's own table.
    assert_eq!(registered(&db).await, vec![(0, table0), (1, table1)]);
    e.shutdown().await;
}

/// A queue deleted after one of its partitions moved away from PostgreSQL, and another moved in, leaves no item
/// table in the database, nor its dedup records: a queue created again under the name stores a key the old one had
/// (before, the moved partition's table of the queue's incarnation was left for good, registered, and PostgreSQL
/// keeps a queue's dedup records while any table of it is registered, so the new queue's produce of the key stored
/// nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_deleted_after_a_move_leaves_no_table_in_postgres() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_rebalance").await;
    let e = engine(&db, Arc::new(OneServer(pg_store(&db))));
    jobs_with(&e, &["a", "b", "c"]).await;
    e.produce("jobs", vec![keyed("k")], T)
        .await
        .expect("produce a keyed item");
    e.update_queue(QueueUpdate {
        name: "jobs".into(),
        requested_partitions: Some(3),
        ..Default::default()
    })
    .await
    .expect("grow to 3 partitions");
    move_partition(&e, 0, "mem").await;
    move_partition(&e, 0, "pg").await;
    move_partition(&e, 2, "mem").await;
    e.delete_queue("jobs").await.expect("delete");
    assert_eq!(tables_of_jobs(&db).await, Vec::<String>::new());
    assert_eq!(registered(&db).await, Vec::<(i64, String)>::new());
    e.create_queue(jobs()).await.expect("create again");
    e.produce("jobs", vec![keyed("k")], T)
        .await
        .expect("produce the key into the new queue");
    assert_eq!(
        payloads(&e).await,
        vec!["k".to_string()],
        "the deleted queue's dedup record of the key outlived it"
    );
    e.shutdown().await;
}

/// Why the tests above serve PostgreSQL through a wrapper: a rebalance that involves a store shared by several
/// servers is refused (a 400 naming it), so a move in or out of PostgreSQL does not happen in a server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_into_or_out_of_postgres_is_refused() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_rebalance").await;
    let e = engine(&db, pg_store(&db));
    jobs_with(&e, &["a"]).await;
    let err = e
        .rebalance_start(RebalanceRequest {
            queue: "jobs".into(),
            moves: vec![PartitionMove {
                partition: 0,
                to_store: "mem".into(),
            }],
            ..Default::default()
        })
        .await
        .expect_err("a move out of a shared store is refused");
    assert!(err.to_string().contains("shared by several servers"), "{err}");
    e.shutdown().await;
}
