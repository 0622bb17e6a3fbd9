//! Partitions over two PostgreSQL databases (two private clusters), served by two servers: one database down makes
//! only its partitions fail on both servers (454 for requests that name them), the others keep serving produce and
//! lease, and when it comes back everything it held is served again, nothing lost and nothing served twice.
#![cfg(feature = "postgres")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lessor_client::{proto as pb, Client, ClientError};
use lessor_server::Config;
use lessor_testkit::{connect, postgres_installed, skip_or_fail, Cluster};

fn yaml(url: &str) -> String {
    format!("'{}'", url.replace('\'', "''"))
}

/// The partitions of `queue` whose table is in the database at `url`.
async fn partitions_in(url: &str, queue: &str) -> BTreeSet<u32> {
    let c = connect(url).await;
    c.query(
        "SELECT partition FROM lessor_partitions WHERE queue = $1",
        &[&queue],
    )
    .await
    .expect("partition registry")
    .iter()
    .map(|r| u32::try_from(r.get::<_, i64>(0)).expect("partition"))
    .collect()
}

async fn produce(c: &Client, queue: &str, first: usize, n: usize) -> Result<(), ClientError> {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "10s".into(),
        items: (first..first + n)
            .map(|i| pb::QueueProduceItem {
                bytes: format!("item-{i}").into_bytes(),
                ..Default::default()
            })
            .collect(),
    })
    .await
}

/// Leases up to 100 items (waiting at most 200 ms) and completes them; returns them by partition.
async fn lease_and_complete(c: &Client, queue: &str) -> BTreeMap<u32, Vec<String>> {
    let mut out = BTreeMap::new();
    let Ok(r) = c
        .queue_lease(&pb::QueueLeaseRequest {
            queue_name: queue.into(),
            batch_size: 100,
            client_id: "drain".into(),
            request_timeout: "200ms".into(),
        })
        .await
    else {
        return out;
    };
    if r.items.is_empty() {
        return out;
    }
    c.queue_complete(&pb::QueueCompleteRequest {
        queue_name: queue.into(),
        partition: r.partition,
        request_timeout: "5s".into(),
        ids: r.items.iter().map(|i| i.id.clone()).collect(),
    })
    .await
    .expect("complete what was just leased");
    out.insert(
        u32::try_from(r.partition).expect("partition"),
        r.items
            .iter()
            .map(|i| String::from_utf8_lossy(&i.bytes).into_owned())
            .collect(),
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_database_down_fails_only_its_partitions() {
    if !postgres_installed() {
        skip_or_fail("PostgreSQL is not installed; skipping the two-database test");
        return;
    }
    let (_a, url_a) = Cluster::start("db-a", 63482, "lessor_a");
    let (b, url_b) = Cluster::start("db-b", 63484, "lessor_b");
    let config = Config::from_yaml(&format!(
        "queue-storage:\n  driver: postgres\n  config:\n    connection-string: {qa}\n\
         partition-storage:\n\
         \x20 - name: pg-a\n    driver: postgres\n    affinity: 1\n    config:\n      connection-string: {qa}\n\
         \x20 - name: pg-b\n    driver: postgres\n    affinity: 1\n    config:\n      connection-string: {qb}\n\
         limits:\n  shared-refresh: 200ms\n",
        qa = yaml(&url_a),
        qb = yaml(&url_b),
    ))
    .expect("config");
    let (_srv, c) = lessor_testkit::server::start(&config, None).await;
    c.queues_create(&pb::QueueInfo {
        queue_name: "spread".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 4,
        ..Default::default()
    })
    .await
    .expect("create");
    // A second server over the same two databases: both serve the queue.
    let (_srv2, c2) = lessor_testkit::server::start(&config, None).await;
    let servers = [&c, &c2];
    for i in 0..4 {
        produce(servers[i % 2], "spread", i * 10, 10)
            .await
            .expect("produce");
    }
    let on_a = partitions_in(&url_a, "spread").await;
    let on_b = partitions_in(&url_b, "spread").await;
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "both databases hold partitions: {on_a:?} / {on_b:?}"
    );
    assert_eq!(on_a.len() + on_b.len(), 4);

    // Database B stops.
    b.run("halt");
    // Produce keeps working: requests that meet a partition of B move to one of A.
    for i in 0..10 {
        produce(servers[i % 2], "spread", 100 + i * 10, 10)
            .await
            .expect("produce while B is down");
    }
    // Leases keep working from A's partitions, and only from them.
    let mut served: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for round in 0..20 {
        for (p, items) in lease_and_complete(servers[round % 2], "spread").await {
            assert!(on_a.contains(&p), "partition {p} is on the stopped database");
            served.entry(p).or_default().extend(items);
        }
    }
    let during: usize = served.values().map(Vec::len).sum();
    assert!(during >= 100, "A's partitions served: {during} items");
    // A request that names a partition of B gets 454 (retry later), not a 500.
    let p_b = *on_b.iter().next().expect("a partition on B");
    for server in servers {
        let e = server
            .storage_items_list(&pb::StorageItemsListRequest {
                queue_name: "spread".into(),
                partition: i32::try_from(p_b).expect("partition"),
                ..Default::default()
            })
            .await
            .expect_err("B is down");
        assert_eq!(e.code(), Some(454), "{e}");
    }

    // B comes back: its items are served again, nothing lost, nothing twice.
    b.run("start");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for round in 0.. {
        for (p, items) in lease_and_complete(servers[round % 2], "spread").await {
            served.entry(p).or_default().extend(items);
        }
        let n: usize = served.values().map(Vec::len).sum();
        if n >= 140 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} of 140 items served a minute after B came back"
        );
    }
    let all = served;
    let mut seen = BTreeSet::new();
    for items in all.values() {
        for i in items {
            assert!(seen.insert(i.clone()), "{i} served twice");
        }
    }
    assert_eq!(seen.len(), 140, "every acknowledged item, once");
}
