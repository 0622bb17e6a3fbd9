//! The postgres backend across a database outage: calls fail with `Unavailable` while PostgreSQL is stopped and
//! work again, with the data intact, once it is back (stale pooled connections are dropped, not reused).
//!
//! Runs its own throwaway cluster through `scripts/pg-test-cluster.sh` (in a private directory and port, so it can
//! stop and start it without disturbing other tests), and only when `LESSOR_TEST_DATABASE_URL` is set, the sign that
//! this machine runs the postgres tests.
#![cfg(feature = "postgres")]

use std::time::Duration;

use bytes::Bytes;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{Partition, PartitionStore, QueuesStore};
use lessor_core::types::{NewItem, QueueInfo};
use lessor_storage::postgres::{PgConfig, PgQueues, PgStore};
use lessor_storage::testsuite::T0;

use lessor_testkit::{postgres_installed, Cluster};

fn item(i: usize) -> NewItem {
    NewItem {
        expire_deadline: T0.add(Duration::from_secs(3600)),
        created_at: T0,
        payload: Bytes::from(format!("item-{i}")),
        ..Default::default()
    }
}

/// Retries `f` until it succeeds (a pool may hold connections that died with the old server: each fails once).
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, lessor_core::error::StorageError>>,
{
    let attempt = || {
        let call = f();
        async move {
            call.await.map_err(|e| {
                // Only "unavailable" may happen while the pool replaces dead connections.
                assert_eq!(e.kind, StorageErrorKind::Unavailable, "{what}: {e}");
                format!("{e:?}")
            })
        }
    };
    match lessor_testkit::poll_until(Duration::from_secs(2), Duration::from_millis(100), attempt).await {
        Ok(v) => v,
        Err(t) => panic!("{what} did not recover: {t}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_while_the_database_is_down_and_recover_after() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    if !postgres_installed() {
        lessor_testkit::skip_or_fail("the test database is remote and no local PostgreSQL can be started");
        return;
    }
    let (cluster, url) = Cluster::start("restart", 63439, "lessor_restart");
    let cfg = PgConfig::new(&url).with_max_conns(4);
    let store = PgStore::new(&cfg).expect("store");
    let queues = PgQueues::new(&cfg).expect("queues");
    let p: std::sync::Arc<dyn Partition> = store.open("restart", 0).await.expect("open");
    p.produce((0..10).map(item).collect()).await.expect("produce");
    queues
        .add(&QueueInfo {
            name: "restart".into(),
            ..Default::default()
        })
        .await
        .expect("add queue");

    // Down: every kind of call reports Unavailable, none hangs.
    cluster.run("halt");
    let e = p.counts().await.expect_err("database down");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = p.produce(vec![item(99)]).await.expect_err("database down");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = p.lease(1, T0).await.expect_err("database down");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = store.open("restart", 1).await.expect_err("database down");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = queues.get("restart").await.expect_err("database down");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");

    // Back: the same handles work again and nothing was lost or half-applied.
    cluster.run("start");
    let c = eventually("counts", || p.counts()).await;
    assert_eq!(c.ready, 10);
    let q = eventually("queue get", || queues.get("restart")).await;
    assert!(q.is_some());
    let leased = eventually("lease", || p.lease(3, T0.add(Duration::from_secs(60)))).await;
    assert_eq!(leased.len(), 3);

    // A restart under an idle pool: stale connections fail at most once each, then calls work.
    cluster.run("restart");
    let c = eventually("counts after restart", || p.counts()).await;
    assert_eq!((c.ready, c.leased), (7, 3));
    let p1 = eventually("open after restart", || store.open("restart", 1)).await;
    assert_eq!(p1.counts().await.expect("counts").ready, 0);
    store.close().await;
    queues.close().await;
}
