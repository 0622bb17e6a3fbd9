//! A PostgreSQL table locked by someone else (an operator's `LOCK TABLE`, a `VACUUM FULL`, a long migration): the
//! requests of the queue whose partition table is locked answer within their `request_timeout` (plus the 1 s
//! `lock_timeout`) with a 454 ("retry") instead of waiting for the lock, other queues keep serving meanwhile, and
//! once the lock is gone the queue serves again with nothing lost. A stalled database (its processes stopped, the
//! connections open) is bounded the same way by the engine, where no lock timeout applies.
//!
//! Needs feature `postgres` and `LESSOR_TEST_DATABASE_URL` (skipped with a message without it, failed when `CI` is
//! set); the tests create a database of their own and drop it at the end. The stall test starts a cluster of its own
//! with `scripts/pg-test-cluster.sh` (skipped without PostgreSQL installed).
#![cfg(feature = "postgres")]

use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client, ClientError};
use lessor_testkit::server::postgres_config;
use lessor_testkit::{connect, postgres_installed, skip_or_fail, Cluster, TestDatabase};

/// A one-partition queue (the shared test helper's defaults).
async fn create(c: &Client, queue: &str) {
    lessor_testkit::server::create_queue(c, queue, |_| {}).await;
}

fn produce_req(queue: &str, payload: &str, timeout: &str) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: timeout.into(),
        items: vec![pb::QueueProduceItem {
            bytes: payload.as_bytes().to_vec(),
            ..Default::default()
        }],
    }
}

fn lease_req(queue: &str, timeout: &str) -> pb::QueueLeaseRequest {
    pb::QueueLeaseRequest {
        queue_name: queue.into(),
        batch_size: 10,
        client_id: "locks".into(),
        request_timeout: timeout.into(),
    }
}

/// How a call ended (its error code, `None` for a 200 or no answer, and a description) and after how long; a call
/// that has not answered after `limit` is given up.
async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, ClientError>>,
) -> (Duration, Option<i32>, String) {
    let t0 = Instant::now();
    let r = tokio::time::timeout(limit, f).await;
    let d = t0.elapsed();
    match r {
        Err(_) => (d, None, format!("no answer after {d:?}")),
        Ok(Ok(_)) => (d, None, format!("200 after {d:?}")),
        Ok(Err(e)) => (d, e.code(), format!("{e} after {d:?}")),
    }
}

/// Produces three items (`before-0..2`, with a 5 s timeout, before anything is locked) and leases one of them.
async fn three_produced_one_leased(c: &Client, queue: &str) -> pb::QueueLeaseResponse {
    for i in 0..3 {
        c.queue_produce(&produce_req(queue, &format!("before-{i}"), "5s"))
            .await
            .expect("produce");
    }
    let leased = c
        .queue_lease(&pb::QueueLeaseRequest {
            batch_size: 1,
            ..lease_req(queue, "5s")
        })
        .await
        .expect("lease");
    assert_eq!(leased.items.len(), 1);
    leased
}

/// A complete of the one leased item, with a 1 s request timeout.
fn complete_req(leased: &pb::QueueLeaseResponse) -> pb::QueueCompleteRequest {
    pb::QueueCompleteRequest {
        queue_name: leased.queue_name.clone(),
        partition: leased.partition,
        request_timeout: "1s".into(),
        ids: vec![leased.items[0].id.clone()],
    }
}

/// A lock held on one queue's partition table makes that queue's produce, lease and complete answer 454 within
/// their 1 s request timeout (not wait for the lock), while another queue keeps serving; after the lock is gone,
/// every produced item is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_partition_table_answers_454_within_the_request_timeout() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_locks").await;
    let (_server, c) = lessor_testkit::server::start(&postgres_config(db.url()), None).await;
    create(&c, "locked").await;
    create(&c, "other").await;
    let leased = three_produced_one_leased(&c, "locked").await;

    // The operator's session: holds an exclusive lock on the partition table until it rolls back.
    let admin = connect(db.url()).await;
    // The registered table: its name also carries the queue's incarnation.
    let table: String = admin
        .query_one(
            "SELECT table_name FROM lessor_partitions WHERE queue = 'locked' AND partition = 0",
            &[],
        )
        .await
        .expect("the partition's table")
        .get(0);
    admin
        .batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .await
        .expect("lock");

    let limit = Duration::from_secs(8);
    let (p_req, l_req) = (produce_req("locked", "during", "1s"), lease_req("locked", "1s"));
    let c_req = complete_req(&leased);
    let (produce, lease, complete) = tokio::join!(
        timed(limit, c.queue_produce(&p_req)),
        timed(limit, c.queue_lease(&l_req)),
        timed(limit, c.queue_complete(&c_req)),
    );
    // Meanwhile another queue on the same pool serves as usual.
    let t0 = Instant::now();
    for i in 0..20 {
        c.queue_produce(&produce_req("other", &format!("o-{i}"), "5s"))
            .await
            .expect("produce on the other queue");
    }
    let other = t0.elapsed();
    let report = format!(
        "produce: {}; lease: {}; complete: {}; 20 produces on the other queue: {other:?}",
        produce.2, lease.2, complete.2
    );
    println!("{report}");
    admin.batch_execute("ROLLBACK").await.expect("unlock");

    for (what, (d, code, _)) in [("produce", produce), ("lease", lease), ("complete", complete)] {
        assert_eq!(
            code,
            Some(454),
            "{what} answers 454 while the table is locked ({report})"
        );
        assert!(
            d < Duration::from_secs(4),
            "{what} answers within its request timeout and the lock wait bound ({report})"
        );
    }
    assert!(
        other < Duration::from_secs(4),
        "the other queue keeps serving ({report})"
    );

    // After the lock: the queue serves again, and the items produced before it are all there.
    served_after(&c, "locked", Duration::from_secs(20), "lock", Vec::new()).await;
}

/// The `queues` table locked (a `VACUUM FULL queues`, an `ALTER TABLE` waiting behind a long transaction): every
/// queue re-reads its definition from it on shared stores, so every queue is affected; produce, lease and complete
/// still answer 454 within their 1 s request timeout, and the queue serves again once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_queues_table_answers_454_within_the_request_timeout() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_locks").await;
    let (_server, c) = lessor_testkit::server::start(&postgres_config(db.url()), None).await;
    create(&c, "jobs").await;
    let leased = three_produced_one_leased(&c, "jobs").await;

    let admin = connect(db.url()).await;
    admin
        .batch_execute("BEGIN; LOCK TABLE queues IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    // Past the shared refresh (500 ms): the queue's task has tried to re-read its definition.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let limit = Duration::from_secs(8);
    let (p_req, l_req) = (produce_req("jobs", "during", "1s"), lease_req("jobs", "1s"));
    let c_req = complete_req(&leased);
    let (produce, lease, complete) = tokio::join!(
        timed(limit, c.queue_produce(&p_req)),
        async {
            let t0 = Instant::now();
            let r = tokio::time::timeout(limit, c.queue_lease(&l_req)).await;
            let d = t0.elapsed();
            match r {
                Err(_) => ((d, None, format!("no answer after {d:?}")), Vec::new()),
                Ok(Ok(r)) => ((d, None, format!("200 after {d:?}")), payloads(r)),
                Ok(Err(e)) => ((d, e.code(), format!("{e} after {d:?}")), Vec::new()),
            }
        },
        timed(limit, c.queue_complete(&c_req)),
    );
    let (lease, served) = lease;
    let report = format!(
        "produce: {}; lease: {}; complete: {}",
        produce.2, lease.2, complete.2
    );
    println!("{report}");
    admin.batch_execute("ROLLBACK").await.expect("unlock");
    for (what, (d, code, _)) in [("produce", produce), ("lease", lease), ("complete", complete)] {
        assert!(
            d < Duration::from_secs(4),
            "{what} answers within its request timeout and the lock wait bound ({report})"
        );
        assert!(
            code.is_none() || code == Some(454),
            "{what} answers 200 or 454 ({report})"
        );
    }
    // The items produced before the lock are served (during it or after), none is lost.
    served_after(&c, "jobs", Duration::from_secs(20), "lock", served).await;
}

fn payloads(r: pb::QueueLeaseResponse) -> Vec<String> {
    r.items
        .into_iter()
        .map(|it| String::from_utf8_lossy(&it.bytes).into_owned())
        .collect()
}

/// Leases `queue` until `before-1` and `before-2` (produced before the `what`) were both served, counting those in
/// `served` already, retrying 454s; fails when `within` passes first (items lost) or on any other error.
async fn served_after(c: &Client, queue: &str, within: Duration, what: &str, mut served: Vec<String>) {
    let deadline = Instant::now() + within;
    while !["before-1", "before-2"]
        .iter()
        .all(|p| served.iter().any(|x| x == p))
    {
        assert!(
            Instant::now() < deadline,
            "items lost across the {what}: served {served:?}"
        );
        match c.queue_lease(&lease_req(queue, "500ms")).await {
            Ok(r) => served.extend(payloads(r)),
            Err(e) if e.code() == Some(454) => {}
            Err(e) => panic!("lease after the {what}: {e}"),
        }
    }
}

/// The database stalls (every PostgreSQL process stopped with SIGSTOP for 8 s: a disk that stopped answering, a
/// frozen host whose kernel still acknowledges): the connections stay open and no lock is waited for, so nothing
/// on the database side bounds the wait; lease and complete still answer within their 1 s request timeout (plus a
/// grace) with a 454, retry and stats (no request timeout of their own) within `limits.default-request-timeout`,
/// and nothing acknowledged is lost. The queue leases for a minute, longer than the drain below waits: items a
/// lease took for a caller that had given up must be given back, not wait out that minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_answers_454_within_the_request_timeout() {
    if !postgres_installed() {
        skip_or_fail("PostgreSQL is not installed; skipping the stall test");
        return;
    }
    let (cluster, url) = Cluster::start("stall-timeout", 63490, "lessor_stall_timeout");
    let mut config = postgres_config(&url);
    config.limits.default_request_timeout = Some("1s".into());
    let (_server, c) = lessor_testkit::server::start(&config, None).await;
    lessor_testkit::server::create_queue(&c, "jobs", |q| q.lease_timeout = "1m".into()).await;
    let leased = three_produced_one_leased(&c, "jobs").await;
    let to_retry = c
        .queue_lease(&pb::QueueLeaseRequest {
            batch_size: 1,
            ..lease_req("jobs", "5s")
        })
        .await
        .expect("lease");
    assert_eq!(to_retry.items.len(), 1);

    cluster.signal("STOP");
    let stall = Duration::from_secs(8);
    let (p_req, l_req) = (produce_req("jobs", "during", "1s"), lease_req("jobs", "1s"));
    let c_req = complete_req(&leased);
    let r_req = pb::QueueRetryRequest {
        queue_name: "jobs".into(),
        partition: to_retry.partition,
        items: vec![pb::QueueRetryItem {
            id: to_retry.items[0].id.clone(),
            ..Default::default()
        }],
    };
    let s_req = pb::QueueStatsRequest {
        queue_name: "jobs".into(),
        ..Default::default()
    };
    let limit = stall - Duration::from_millis(500);
    let (((produce, lease, complete), (retry, stats)), ()) = tokio::join!(
        async {
            tokio::join!(
                async {
                    tokio::join!(
                        timed(limit, c.queue_produce(&p_req)),
                        timed(limit, c.queue_lease(&l_req)),
                        timed(limit, c.queue_complete(&c_req)),
                    )
                },
                async {
                    // Behind the others in the queue's inbox, so that they find the task stuck.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    tokio::join!(
                        timed(limit, c.queue_retry(&r_req)),
                        timed(limit, c.queue_stats(&s_req)),
                    )
                }
            )
        },
        async {
            tokio::time::sleep(stall).await;
            cluster.signal("CONT");
        }
    );
    let report = format!(
        "produce: {}; lease: {}; complete: {}; retry: {}; stats: {}",
        produce.2, lease.2, complete.2, retry.2, stats.2
    );
    println!("{report}");
    for (what, (d, code, _)) in [
        ("produce", produce),
        ("lease", lease),
        ("complete", complete),
        ("retry", retry),
        ("stats", stats),
    ] {
        assert!(
            d < Duration::from_secs(4),
            "{what} answers within its request timeout and a grace ({report})"
        );
        assert_eq!(code, Some(454), "{what} answers 454 ({report})");
    }
    served_after(&c, "jobs", Duration::from_secs(30), "stall", Vec::new()).await;
}
