//! A lease answer is bounded in payload bytes (`limits.max-lease-bytes`) on every backend: a lease of many large
//! items used to build a reply of their whole size (a lease of 300 items of 3.7 MB on fjall: a 1.48 GB answer and
//! 3.7 GB more resident memory). These tests run a server with a bound of 3,100 bytes and items of 1,000.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lessor_client::{proto as pb, Client};
use lessor_server::Config;

/// Three items of 1,000 payload bytes fit (memory and fjall also count an item's strings, here a few bytes).
const BOUND: u64 = 3100;

async fn server(backend: &str) -> Option<(lessor_server::RunningServer, Client, Guards)> {
    let mut guards = Guards::default();
    let mut config = match backend {
        "memory" => Config::memory(),
        "fjall" => {
            let dir = tempfile::tempdir().expect("temp dir");
            let c = Config::default_persistent(dir.path().to_str().expect("utf-8"));
            guards.dir = Some(dir);
            c
        }
        _ => {
            if std::env::var("LESSOR_TEST_DATABASE_URL").is_err() {
                lessor_testkit::skip_or_fail("lease_bytes on postgres: LESSOR_TEST_DATABASE_URL is not set");
                return None;
            }
            let db = lessor_testkit::TestDatabase::create("lessor_lb").await;
            let c = lessor_testkit::server::postgres_config(db.url());
            guards.db = Some(db);
            c
        }
    };
    config.limits.max_lease_bytes = Some(BOUND);
    let (srv, client) = lessor_testkit::server::start(&config, None).await;
    lessor_testkit::server::create_queue(&client, "big", |_| {}).await;
    Some((srv, client, guards))
}

#[derive(Default)]
struct Guards {
    dir: Option<tempfile::TempDir>,
    db: Option<lessor_testkit::TestDatabase>,
}

async fn produce(c: &Client, tag: &str, sizes: &[usize]) {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: "big".into(),
        request_timeout: "5s".into(),
        items: sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| pb::QueueProduceItem {
                reference: format!("{tag}{i}"),
                bytes: vec![b'a' + (i % 26) as u8; n],
                ..Default::default()
            })
            .collect(),
    })
    .await
    .expect("produce");
}

fn lease_req(n: i32, consumer: &str, timeout: &str) -> pb::QueueLeaseRequest {
    pb::QueueLeaseRequest {
        queue_name: "big".into(),
        batch_size: n,
        client_id: consumer.into(),
        request_timeout: timeout.into(),
    }
}

fn bytes(r: &pb::QueueLeaseResponse) -> usize {
    r.items.iter().map(|i| i.bytes.len()).sum()
}

/// One consumer: each answer stays within the bound, the next lease (short long-poll, nothing produced in between)
/// is served at once from what the bound left, an item above the bound comes alone, and nothing is lost or
/// served twice.
async fn one_consumer_drains_within_the_bound(backend: &str) {
    let Some((_srv, c, _g)) = server(backend).await else {
        return;
    };
    produce(&c, "a", &[1000; 10]).await;
    produce(&c, "b", &[5000, 1000]).await;
    let mut refs = Vec::new();
    let mut answers = Vec::new();
    while refs.len() < 12 {
        let r = c
            .queue_lease(&lease_req(100, "one", "200ms"))
            .await
            .unwrap_or_else(|e| panic!("{backend}: lease after {} items: {e}", refs.len()));
        assert!(!r.items.is_empty());
        answers.push((r.items.len(), bytes(&r)));
        assert!(
            r.items.len() == 1 || bytes(&r) as u64 <= BOUND,
            "{backend}: {answers:?}"
        );
        refs.extend(r.items.iter().map(|i| i.reference.clone()));
    }
    // The bound holds for every answer but the one whose single item is above it.
    assert_eq!(
        answers,
        vec![(3, 3000), (3, 3000), (3, 3000), (1, 1000), (1, 5000), (1, 1000)],
        "{backend}"
    );
    let mut sorted = refs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 12, "{backend}: every item once: {refs:?}");
    // Nothing left, and the server still answers leases.
    let e = c
        .queue_lease(&lease_req(100, "one", "50ms"))
        .await
        .expect_err("empty");
    assert!(
        e.to_string().contains("timeout") || e.to_string().contains("454"),
        "{e}"
    );
}

/// Waiting consumers: one produce of 10 items of 1,000 bytes wakes four long-polling consumers, each answer stays
/// within the bound, and every consumer is answered in that pass (the bound makes the task ask again rather than
/// take the partition for empty).
async fn waiting_consumers_share_within_the_bound(backend: &str) {
    let Some((srv, c, _g)) = server(backend).await else {
        return;
    };
    let waiters: Vec<_> = (0..4)
        .map(|k| {
            let c = c.clone();
            tokio::spawn(async move { c.queue_lease(&lease_req(10, &format!("w{k}"), "10s")).await })
        })
        .collect();
    // The four reach the queue before the items do: the queue task counts them as waiting.
    let waiting = || {
        srv.engine
            .queue_metrics()
            .into_iter()
            .find(|(name, _)| name == "big")
            .map_or(0, |(_, m)| m.lease_waiting.load(Ordering::Relaxed))
    };
    lessor_testkit::eventually::poll_until(Duration::from_secs(5), Duration::from_millis(10), || async {
        match waiting() {
            4 => Ok(()),
            n => Err(format!("{n} leases waiting")),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{backend}: the four consumers never waited on the queue: {e}"));
    produce(&c, "a", &[1000; 10]).await;
    let mut total = 0;
    for w in waiters {
        let r = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("answered well before its long-poll ends")
            .expect("task")
            .expect("lease");
        assert!(!r.items.is_empty(), "{backend}");
        assert!(bytes(&r) as u64 <= BOUND, "{backend}: {} bytes", bytes(&r));
        total += r.items.len();
    }
    assert!(total >= 4, "{backend}: {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_one_consumer() {
    one_consumer_drains_within_the_bound("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_one_consumer() {
    one_consumer_drains_within_the_bound("fjall").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_consumer() {
    one_consumer_drains_within_the_bound("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_waiting_consumers() {
    waiting_consumers_share_within_the_bound("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fjall_waiting_consumers() {
    waiting_consumers_share_within_the_bound("fjall").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_waiting_consumers() {
    waiting_consumers_share_within_the_bound("postgres").await;
}
