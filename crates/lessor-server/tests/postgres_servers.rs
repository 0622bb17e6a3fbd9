//! Servers that mix the embedded engine and PostgreSQL the way the seeds configure them, driven over HTTP:
//!
//! - queue definitions in fjall, items in PostgreSQL;
//! - one queue of 4 partitions spread over a fjall store and a postgres store (affinity 1 each): produce, lease and
//!   complete reach both, and the stored placement is honoured after a restart (same data directory and database),
//!   even when the restarted configuration lists the stores in another order with other affinities.
//!
//! What lives where is checked from the outside too: the postgres partition registry and item tables are read with SQL.
//! Needs features `fjall` and `postgres` and `LESSOR_TEST_DATABASE_URL` (skipped with a message without it, failed when
//! `CI` is set); each test creates a database of its own and drops it at the end.
#![cfg(all(feature = "fjall", feature = "postgres"))]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lessor_client::{proto as pb, Client};
use lessor_server::{Config, RunningServer};

use lessor_testkit::{connect, TestDatabase as Database};

/// The connection string quoted for YAML.
fn yaml_url(db: &Database) -> String {
    serde_json::to_string(db.url()).expect("string")
}

/// Where the items of `queue` live in postgres: partition -> item count, from the partition registry.
async fn postgres_partitions(db: &Database, queue: &str) -> BTreeMap<u32, i64> {
    let c = connect(db.url()).await;
    let rows = c
        .query(
            "SELECT partition, table_name FROM lessor_partitions WHERE queue = $1 ORDER BY partition",
            &[&queue],
        )
        .await
        .expect("read the partition registry");
    let mut out = BTreeMap::new();
    for r in rows {
        let p: i64 = r.get(0);
        let p = u32::try_from(p).expect("partition number");
        // The registered table: its name also carries the queue's incarnation.
        let table: String = r.get(1);
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count items")
            .get(0);
        out.insert(p, n);
    }
    out
}

async fn run(config: &Config) -> (RunningServer, Client) {
    lessor_testkit::server::start(config, None).await
}

async fn produce(c: &Client, queue: &str, payloads: Vec<String>) {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "10s".into(),
        items: payloads
            .into_iter()
            .map(|p| pb::QueueProduceItem {
                bytes: p.into_bytes(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .expect("produce");
}

/// One lease; `None` when nothing came within a second.
async fn lease(c: &Client, queue: &str, n: i32) -> Option<pb::QueueLeaseResponse> {
    match c
        .queue_lease(&pb::QueueLeaseRequest {
            queue_name: queue.into(),
            batch_size: n,
            client_id: "mix".into(),
            request_timeout: "1s".into(),
        })
        .await
    {
        Ok(r) => Some(r),
        Err(e) if e.code() == Some(454) => None,
        Err(e) => panic!("lease: {e}"),
    }
}

async fn complete(c: &Client, queue: &str, partition: i32, ids: Vec<String>) {
    c.queue_complete(&pb::QueueCompleteRequest {
        queue_name: queue.into(),
        partition,
        request_timeout: "10s".into(),
        ids,
    })
    .await
    .expect("complete");
}

fn payloads(items: &[pb::QueueLeaseItem]) -> Vec<String> {
    items
        .iter()
        .map(|i| String::from_utf8_lossy(&i.bytes).into_owned())
        .collect()
}

/// Partition -> ready plus leased items, from `queue.stats`.
async fn totals(c: &Client, queue: &str) -> BTreeMap<u32, i32> {
    let s = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: queue.into(),
            ..Default::default()
        })
        .await
        .expect("stats");
    s.logical_queues[0]
        .partitions
        .iter()
        .map(|p| (u32::try_from(p.partition).expect("partition"), p.total))
        .collect()
}

/// Leases and completes everything left; returns the payloads, each checked to come once.
async fn drain(c: &Client, queue: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    while let Some(l) = lease(c, queue, 50).await {
        for p in payloads(&l.items) {
            assert!(seen.insert(p.clone()), "{p} leased twice");
        }
        complete(
            c,
            queue,
            l.partition,
            l.items.iter().map(|i| i.id.clone()).collect(),
        )
        .await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_queue_storage_with_postgres_partitions() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_mix").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config::from_yaml(&format!(
        "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {dir}\n\
         partition-storage:\n  - name: pg-0\n    driver: postgres\n    affinity: 1\n    \
         config:\n      connection-string: {url}\n",
        dir = serde_json::to_string(&dir.path()).expect("path"),
        url = yaml_url(&db),
    ))
    .expect("config");

    let (srv, c) = run(&config).await;
    c.queues_create(&pb::QueueInfo {
        queue_name: "jobs".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 2,
        ..Default::default()
    })
    .await
    .expect("create");
    produce(&c, "jobs", (0..20).map(|i| format!("a{i}")).collect()).await;
    produce(&c, "jobs", (0..20).map(|i| format!("b{i}")).collect()).await;
    let done = lease(&c, "jobs", 10).await.expect("lease");
    complete(
        &c,
        "jobs",
        done.partition,
        done.items.iter().map(|i| i.id.clone()).collect(),
    )
    .await;
    let held = lease(&c, "jobs", 5).await.expect("lease");
    assert_eq!(
        postgres_partitions(&db, "jobs").await,
        (0..2u32)
            .map(|p| (
                p,
                if i64::from(p) == i64::from(done.partition) {
                    10
                } else {
                    20
                }
            ))
            .collect::<BTreeMap<_, _>>(),
        "both partitions are postgres tables, holding what was not completed"
    );
    let rows: i64 = connect(db.url())
        .await
        .query_one("SELECT count(*) FROM queues", &[])
        .await
        .expect("count queues")
        .get(0);
    assert_eq!(rows, 0, "the definition lives in fjall, not in postgres");
    srv.stop().await;

    // Restart: the definition comes back from fjall, the items and the lease from postgres.
    let (srv, c) = run(&config).await;
    let info = c
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "jobs".into(),
        })
        .await
        .expect("queue survives the restart");
    assert_eq!(info.requested_partitions, 2);
    assert_eq!(totals(&c, "jobs").await.values().sum::<i32>(), 30);
    complete(
        &c,
        "jobs",
        held.partition,
        held.items.iter().map(|i| i.id.clone()).collect(),
    )
    .await;
    let rest = drain(&c, "jobs").await;
    let mut all: BTreeSet<String> = rest;
    all.extend(payloads(&done.items));
    all.extend(payloads(&held.items));
    let expected: BTreeSet<String> = (0..20).flat_map(|i| [format!("a{i}"), format!("b{i}")]).collect();
    assert_eq!(all, expected, "every item was delivered once and completed");
    assert!(postgres_partitions(&db, "jobs").await.values().all(|n| *n == 0));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_and_postgres_partition_stores_share_a_queue() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = Database::create("lessor_mix").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let dir_yaml = serde_json::to_string(&dir.path()).expect("path");
    let disk = |affinity: u32| {
        format!(
            "  - name: disk-0\n    driver: fjall\n    affinity: {affinity}\n    config:\n      storage-dir: {dir_yaml}\n"
        )
    };
    let pg = |affinity: u32| {
        format!(
            "  - name: pg-0\n    driver: postgres\n    affinity: {affinity}\n    config:\n      connection-string: {}\n",
            yaml_url(&db)
        )
    };
    let head = format!(
        "queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {dir_yaml}\npartition-storage:\n"
    );
    let first = Config::from_yaml(&format!("{head}{}{}", disk(1), pg(1))).expect("config");
    // The same stores listed the other way round with other affinities: placing afresh would move partitions.
    let second = Config::from_yaml(&format!("{head}{}{}", pg(3), disk(1))).expect("config");

    let (srv, c) = run(&first).await;
    c.queues_create(&pb::QueueInfo {
        queue_name: "mixed".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 4,
        ..Default::default()
    })
    .await
    .expect("create");
    let placement: Vec<(u32, String)> = srv
        .engine
        .queue_info("mixed")
        .await
        .expect("info")
        .partitions
        .iter()
        .map(|p| (p.partition, p.storage_name.clone()))
        .collect();
    assert_eq!(
        placement,
        vec![
            (0, "disk-0".to_string()),
            (1, "disk-0".to_string()),
            (2, "pg-0".to_string()),
            (3, "pg-0".to_string())
        ],
        "affinity 1:1 over 4 partitions, in store order"
    );
    // Each produce request goes whole to the least loaded partition: four requests fill all four.
    for r in 0..4 {
        produce(&c, "mixed", (0..25).map(|i| format!("m{r}-{i}")).collect()).await;
    }
    assert_eq!(
        totals(&c, "mixed").await,
        BTreeMap::from([(0, 25), (1, 25), (2, 25), (3, 25)])
    );
    assert_eq!(
        postgres_partitions(&db, "mixed").await,
        BTreeMap::from([(2, 25), (3, 25)]),
        "exactly the pg-0 partitions are postgres tables"
    );
    // Lease from the fullest partition each time: the four leases take from all four partitions, across both
    // stores. Complete the first three leases, hold the fourth over the restart.
    let mut completed = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut held = None;
    for k in 0..4 {
        let l = lease(&c, "mixed", 10).await.expect("lease");
        assert!(
            used.insert(l.partition),
            "partition {} leased from twice",
            l.partition
        );
        if k < 3 {
            completed.extend(payloads(&l.items));
            complete(
                &c,
                "mixed",
                l.partition,
                l.items.iter().map(|i| i.id.clone()).collect(),
            )
            .await;
        } else {
            held = Some(l);
        }
    }
    let held = held.expect("held lease");
    let before = totals(&c, "mixed").await;
    assert_eq!(before.values().sum::<i32>(), 70);
    srv.stop().await;

    let (srv, c) = run(&second).await;
    let after: Vec<(u32, String)> = srv
        .engine
        .queue_info("mixed")
        .await
        .expect("info")
        .partitions
        .iter()
        .map(|p| (p.partition, p.storage_name.clone()))
        .collect();
    assert_eq!(
        after, placement,
        "the stored placement is honoured after the restart"
    );
    assert_eq!(
        totals(&c, "mixed").await,
        before,
        "every partition kept its items"
    );
    let pg_before: BTreeMap<u32, i64> = before
        .iter()
        .filter(|(p, _)| **p >= 2)
        .map(|(p, n)| (*p, i64::from(*n)))
        .collect();
    assert_eq!(postgres_partitions(&db, "mixed").await, pg_before);
    // The lease taken before the restart is still valid.
    complete(
        &c,
        "mixed",
        held.partition,
        held.items.iter().map(|i| i.id.clone()).collect(),
    )
    .await;
    completed.extend(payloads(&held.items));
    // New items still land on both stores, then everything drains.
    for r in 4..8 {
        produce(&c, "mixed", (0..5).map(|i| format!("m{r}-{i}")).collect()).await;
    }
    let pg_now = postgres_partitions(&db, "mixed").await;
    let t = totals(&c, "mixed").await;
    assert_eq!(
        pg_now,
        t.iter()
            .filter(|(p, _)| **p >= 2)
            .map(|(p, n)| (*p, i64::from(*n)))
            .collect::<BTreeMap<_, _>>()
    );
    assert_eq!(t.values().sum::<i32>(), 60 + 20);
    let rest = drain(&c, "mixed").await;
    for p in &rest {
        assert!(!completed.contains(p), "{p} delivered again after completion");
    }
    completed.extend(rest);
    let expected: BTreeSet<String> = (0..4)
        .flat_map(|r| (0..25).map(move |i| format!("m{r}-{i}")))
        .chain((4..8).flat_map(|r| (0..5).map(move |i| format!("m{r}-{i}"))))
        .collect();
    assert_eq!(completed, expected, "every item completed, none lost");
    assert!(totals(&c, "mixed").await.values().all(|n| *n == 0));
    assert!(postgres_partitions(&db, "mixed").await.values().all(|n| *n == 0));
    srv.stop().await;
    // Give the stopped server's pool a moment to close before the database is dropped.
    tokio::time::sleep(Duration::from_millis(50)).await;
}
