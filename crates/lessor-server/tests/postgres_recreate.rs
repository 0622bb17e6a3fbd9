//! Two servers (two engines) on one PostgreSQL database: a queue deleted on both and created again on one of them,
//! while the other's delete of the old queue is still under way (stopped at a gate before it drops the tables).
//!
//! The late delete read the old definition, so it destroys the old queue only: the queue created again keeps its
//! definition, every partition and every item acknowledged into it, whether the late drops run after the new queue
//! was stored or between its tables being made and its definition being stored. Before incarnations the tables were
//! named by queue and partition alone, so the late delete dropped the new queue's tables (its items with them) and
//! tombstoned them (its opens refused for a day), and removed its definition.
//!
//! Needs the `postgres` feature and `LESSOR_TEST_DATABASE_URL` (skipped without it, failed when `CI` is set).
#![cfg(feature = "postgres")]

use std::sync::Arc;
use std::time::Duration;

use lessor_core::engine::{Engine, EngineConfig, NamedStore, ProduceItem};
use lessor_core::storage::{PartitionStore, QueuesStore};
use lessor_core::time::ManualClock;
use lessor_core::types::QueueInfo;
use lessor_storage::postgres::{PgConfig, PgQueues, PgStore};
use lessor_testkit::hooked::{nothing, Gate, Hook, HookedQueues, HookedStore, Op};
use lessor_testkit::TestDatabase as Database;

const T: Option<Duration> = Some(Duration::from_secs(10));

/// An engine on `db` whose partition store runs `store_hook` and whose queue store runs `queues_hook`.
fn engine(
    db: &Database,
    clock: &ManualClock,
    store_hook: Arc<dyn Hook>,
    queues_hook: Arc<dyn Hook>,
) -> Engine {
    let cfg = PgConfig::new(db.url().to_string()).with_max_conns(4);
    let queues: Arc<dyn QueuesStore> = Arc::new(PgQueues::new(&cfg).expect("queues"));
    let store: Arc<dyn PartitionStore> = Arc::new(PgStore::new(&cfg).expect("store"));
    Engine::new(EngineConfig {
        queues: Arc::new(HookedQueues::new(queues, queues_hook)),
        stores: vec![NamedStore {
            name: "pg-0".into(),
            affinity: 1.0,
            store: Arc::new(HookedStore::new(store, store_hook)),
        }],
        limits: Default::default(),
        clock: Arc::new(clock.clone()),
    })
    .expect("engine")
}

fn jobs() -> QueueInfo {
    QueueInfo {
        name: "jobs".into(),
        lease_timeout: Duration::from_secs(30),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 2,
        ..Default::default()
    }
}

fn item(payload: &str) -> ProduceItem {
    ProduceItem {
        payload: bytes::Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

/// The payloads of every partition of `q` as `e` lists them (each partition is opened: a refused one fails).
async fn stored(e: &Engine, q: &str) -> Result<Vec<String>, String> {
    let info = e.queue_info(q).await.map_err(|e| format!("definition: {e}"))?;
    let mut out = Vec::new();
    for p in 0..info.partitions.len() as u32 {
        let items = e
            .storage_list(q, p, None, 1000, false)
            .await
            .map_err(|e| format!("partition {p}: {e}"))?;
        out.extend(
            items
                .iter()
                .map(|it| String::from_utf8_lossy(&it.payload).into_owned()),
        );
    }
    out.sort();
    Ok(out)
}

/// Server A's delete of `jobs` stopped before its drops; server B's own delete of `jobs` done meanwhile. Returns the
/// gate holding A's drops and A's delete.
async fn a_late_delete(a: &Engine, b: &Engine, a_drops: &Arc<Gate>) -> tokio::task::JoinHandle<()> {
    a.create_queue(jobs()).await.expect("create");
    a.produce("jobs", vec![item("old")], T)
        .await
        .expect("produce into the old queue");
    a_drops.arm(0);
    let late = {
        let a = a.clone();
        tokio::spawn(async move { a.delete_queue("jobs").await.expect("A's delete") })
    };
    a_drops.reached().await;
    b.delete_queue("jobs").await.expect("B's delete");
    late
}

/// The late drops run after the queue created again was stored and acknowledged an item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delete_leaves_the_queue_created_again_alone() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_recreate").await;
    let clock = ManualClock::starting_now();
    let a_drops = Gate::on(|c| c.op == Op::DestroyMany && c.queue == "jobs");
    let a = engine(&db, &clock, a_drops.clone(), nothing());
    let b = engine(&db, &clock, nothing(), nothing());
    let late = a_late_delete(&a, &b, &a_drops).await;
    // Another server's clock: the new queue is created at another instant than the old one.
    clock.advance(Duration::from_secs(1));
    b.create_queue(jobs()).await.expect("create again on B");
    b.produce("jobs", vec![item("new-1"), item("new-2")], T)
        .await
        .expect("produce into the new queue");
    a_drops.release();
    late.await.expect("A's delete ends");
    assert_eq!(
        stored(&b, "jobs").await,
        Ok(vec!["new-1".to_string(), "new-2".to_string()]),
        "the queue created again lost its definition, a partition or its items to the late delete"
    );
    b.produce("jobs", vec![item("new-3")], T)
        .await
        .expect("the queue created again takes produces");
    a.shutdown().await;
    b.shutdown().await;
}

/// The late drops run after the queue created again made its tables, before it stored its definition (and the late
/// delete's removal of the definition finds none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delete_between_the_new_tables_and_the_new_definition_leaves_the_queue_usable() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_recreate").await;
    let clock = ManualClock::starting_now();
    let a_drops = Gate::on(|c| c.op == Op::DestroyMany && c.queue == "jobs");
    let b_add = Gate::on(|c| c.op == Op::QueueAdd && c.queue == "jobs");
    let a = engine(&db, &clock, a_drops.clone(), nothing());
    let b = engine(&db, &clock, nothing(), b_add.clone());
    let late = a_late_delete(&a, &b, &a_drops).await;
    clock.advance(Duration::from_secs(1));
    b_add.arm(0);
    let create = {
        let b = b.clone();
        tokio::spawn(async move { b.create_queue(jobs()).await })
    };
    b_add.reached().await;
    a_drops.release();
    late.await.expect("A's delete ends");
    b_add.release();
    create.await.expect("B's create ends").expect("create again on B");
    b.produce("jobs", vec![item("new-1"), item("new-2")], T)
        .await
        .expect("produce into the new queue");
    assert_eq!(
        stored(&b, "jobs").await,
        Ok(vec!["new-1".to_string(), "new-2".to_string()]),
        "a partition of the queue created again is refused (tombstoned by the late delete)"
    );
    a.shutdown().await;
    b.shutdown().await;
}
