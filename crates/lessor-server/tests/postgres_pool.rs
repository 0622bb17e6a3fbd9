//! A small pool (`max-conns: 2`) against many queues: 40 queues with a consumer long-polling on each, one queue
//! kept busy by four producers, and a quiet queue whose produce + lease + complete round trips are timed. Long-polls
//! hold no connection (they wait in the queue's task), and the pool hands connections out in arrival order, so one
//! busy queue delays the others by a few queued calls, not by their request timeouts.
//!
//! Needs feature `postgres` and `LESSOR_TEST_DATABASE_URL` (skipped with a message without it, failed when `CI` is
//! set); the test creates a database of its own and drops it at the end.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lessor_client::{proto as pb, Client};
use lessor_server::Config;
use lessor_testkit::TestDatabase;

fn config(url: &str) -> Config {
    let url = format!("'{}'", url.replace('\'', "''"));
    Config::from_yaml(&format!(
        "queue-storage:\n  driver: postgres\n  config:\n    connection-string: {url}\n    max-conns: 2\n\
         partition-storage:\n  - name: pg-0\n    driver: postgres\n    affinity: 1\n    \
         config:\n      connection-string: {url}\n      max-conns: 2\n"
    ))
    .expect("config")
}

/// A one-partition queue (the shared test helper's defaults).
async fn create(c: &Client, queue: &str) {
    lessor_testkit::server::create_queue(c, queue, |_| {}).await;
}

fn produce_req(queue: &str, n: usize) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "5s".into(),
        items: (0..n)
            .map(|i| pb::QueueProduceItem {
                bytes: format!("item-{i}").into_bytes(),
                ..Default::default()
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_queue_does_not_starve_the_others_on_a_small_pool() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = TestDatabase::create("lessor_pool").await;
    let (_server, c) = lessor_testkit::server::start(&config(db.url()), None).await;
    for q in 0..40 {
        create(&c, &format!("idle-{q}")).await;
    }
    create(&c, "busy").await;
    create(&c, "quiet").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for q in 0..40 {
        let (c, stop) = (c.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .queue_lease(&pb::QueueLeaseRequest {
                        queue_name: format!("idle-{q}"),
                        batch_size: 10,
                        client_id: "idle".into(),
                        request_timeout: "5s".into(),
                    })
                    .await;
                // An empty long-poll ends with 454.
                if let Err(e) = r {
                    if e.code() != Some(454) {
                        errors += 1;
                    }
                }
            }
            errors
        }));
    }
    let busy_items = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..4 {
        let (c, stop, n) = (c.clone(), stop.clone(), busy_items.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c.queue_produce(&produce_req("busy", 100)).await {
                    Ok(_) => {
                        n.fetch_add(100, Ordering::Relaxed);
                    }
                    Err(_) => errors += 1,
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut rounds = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        c.queue_produce(&produce_req("quiet", 1))
            .await
            .expect("produce on the quiet queue");
        let r = c
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: "quiet".into(),
                batch_size: 1,
                client_id: "quiet".into(),
                request_timeout: "5s".into(),
            })
            .await
            .expect("lease on the quiet queue");
        c.queue_complete(&pb::QueueCompleteRequest {
            queue_name: "quiet".into(),
            partition: r.partition,
            request_timeout: "5s".into(),
            ids: r.items.iter().map(|it| it.id.clone()).collect(),
        })
        .await
        .expect("complete on the quiet queue");
        rounds.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for t in tasks {
        errors += t.await.expect("task");
    }
    rounds.sort();
    let pct = |p: f64| rounds[((rounds.len() - 1) as f64 * p) as usize];
    println!(
        "quiet queue: {} rounds of produce + lease + complete in 5 s, p50 {:?}, p99 {:?}, max {:?}; busy queue: {} \
         items produced; errors on the others: {errors}",
        rounds.len(),
        pct(0.5),
        pct(0.99),
        rounds[rounds.len() - 1],
        busy_items.load(Ordering::Relaxed)
    );
    assert_eq!(errors, 0, "answers other than 200 and an empty long-poll's 454");
    assert!(pct(0.99) < Duration::from_secs(1), "the quiet queue is starved");
}
