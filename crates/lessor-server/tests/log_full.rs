//! A log store at its `max-memory`, through the real server on port 0: a produce that would pass the budget gets
//! 454 (try again) naming the setting, and the partition is not taken out of service for it: consumers lease at
//! once (on a manual clock that never moves, a partition marked failing would stay so), and what they complete
//! makes room for the next produce. A full store whose items all died still moves them to their dead-letter queue
//! (a review's finding: the move was refused as new items, and the store stayed full for good).
#![cfg(feature = "fjall")]

use std::time::Duration;

use lessor_client::proto as pb;
use lessor_client::Client;
use lessor_core::time::ManualClock;
use lessor_server::Config;

fn batch(tag: &str) -> Vec<pb::QueueProduceItem> {
    (0..100)
        .map(|i| pb::QueueProduceItem {
            reference: format!("{tag}-{i}"),
            bytes: vec![b'x'; 1000],
            ..Default::default()
        })
        .collect()
}

async fn produce(c: &Client, tag: &str) -> Result<(), lessor_client::ClientError> {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: "q".into(),
        request_timeout: "10s".into(),
        items: batch(tag),
    })
    .await
}

/// Creates queue `name` of one partition (dead-letter queue `dead`, none when empty).
async fn create(c: &Client, name: &str, dead: &str) {
    c.queues_create(&pb::QueueInfo {
        queue_name: name.into(),
        dead_queue: dead.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

/// A fjall queue store and one log store with `max-memory: 1MiB` under `dir`.
fn config(dir: &std::path::Path) -> Config {
    let yaml = format!(
        "queue-storage: {{ driver: fjall, config: {{ storage-dir: {dir} }} }}\n\
         partition-storage:\n  - {{ name: log-0, driver: log, affinity: 1, config: {{ storage-dir: {dir}, \
         durability: none, max-memory: 1MiB }} }}\n",
        dir = dir.display()
    );
    Config::from_yaml(&yaml).expect("config")
}

/// `name`'s value for the store `store` in a `/metrics` text.
fn store_metric(metrics: &str, name: &str, store: &str) -> u64 {
    let line = format!("{name}{{store=\"{store}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .unwrap_or_else(|| panic!("{name} for {store} in /metrics:\n{metrics}"))
        .parse()
        .expect("a number")
}

/// Two stores that hold their items in RAM, neither with `max-memory`, share the default budget: each used to take
/// half of the memory, so together they could fill the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_in_ram_without_a_budget_share_the_default() {
    let Some(half) = lessor_storage::registry::default_max_memory() else {
        return; // Not Linux: no default budget.
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "queue-storage: {{ driver: fjall, config: {{ storage-dir: {dir} }} }}\n\
         partition-storage:\n  - {{ name: log-0, driver: log, affinity: 1, config: {{ storage-dir: {dir}, \
         durability: none }} }}\n  - {{ name: mem-0, driver: memory, affinity: 1 }}\n",
        dir = tmp.path().display()
    );
    let config = Config::from_yaml(&yaml).expect("config");
    let (srv, c) = lessor_testkit::server::start(&config, None).await;
    let metrics = c.metrics().await.expect("metrics");
    for store in ["log-0", "mem-0"] {
        assert_eq!(
            store_metric(&metrics, "lessor_store_memory_max_bytes", store),
            half / 2,
            "{store}"
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_store_answers_454_and_keeps_serving_consumers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config(tmp.path());
    let clock = ManualClock::starting_now();
    let (srv, c) = lessor_testkit::server::start(&config, Some(std::sync::Arc::new(clock))).await;
    create(&c, "q", "").await;

    let mut stored = 0;
    let refused = loop {
        match produce(&c, &format!("p{stored}")).await {
            Ok(()) => stored += 100,
            Err(e) => break e,
        }
        assert!(stored < 10_000, "1 MiB took {stored} items of 1,000 bytes");
    };
    assert!(stored >= 500, "only {stored} items fit in 1 MiB");
    // The budget shows in /metrics, nearly full.
    let metrics = c.metrics().await.expect("metrics");
    let value = |name: &str| store_metric(&metrics, name, "log-0");
    assert_eq!(value("lessor_store_memory_max_bytes"), 1 << 20);
    let held = value("lessor_store_memory_bytes");
    assert!(
        held <= 1 << 20 && held > (1 << 20) - 100 * 1200,
        "{held} of 1 MiB held"
    );
    assert!(
        refused.is_retryable(),
        "a full store asks to try again: {refused}"
    );
    let msg = refused.message().expect("an API error").to_string();
    assert!(
        msg.starts_with("internal error, try your request again; ") && msg.contains("max-memory"),
        "{msg}"
    );

    // Consumers are served at once: the partition was not marked failing.
    let req = pb::QueueLeaseRequest {
        queue_name: "q".into(),
        batch_size: 300,
        client_id: "w".into(),
        request_timeout: "5s".into(),
    };
    let lease = c.queue_lease(&req);
    let leased = tokio::time::timeout(Duration::from_secs(5), lease)
        .await
        .expect("a lease on a full store is served at once")
        .expect("lease");
    assert_eq!(leased.items.len(), 300);
    c.queue_complete(&pb::QueueCompleteRequest {
        queue_name: "q".into(),
        partition: leased.partition,
        request_timeout: "10s".into(),
        ids: leased.items.iter().map(|i| i.id.clone()).collect(),
    })
    .await
    .expect("complete");
    produce(&c, "after")
        .await
        .expect("room again once items were completed");
    srv.stop().await;
}

/// Every item of a full store fails and is retried as dead: the dead-letter transfer must not be refused as new
/// items (it moves items the store holds already), or the store stays full for good: nothing is left for
/// consumers of the queue, the dead-letter queue gets nothing to serve, and every produce is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_whose_items_all_died_moves_them_to_the_dead_letter_queue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config(tmp.path());
    let (srv, c) = lessor_testkit::server::start(&config, None).await;
    create(&c, "q-dead", "").await;
    create(&c, "q", "q-dead").await;
    let mut stored = 0;
    while produce(&c, &format!("p{stored}")).await.is_ok() {
        stored += 100;
        assert!(stored < 10_000, "1 MiB took {stored} items of 1,000 bytes");
    }
    // Every item fails.
    let mut dead = 0;
    while dead < stored {
        let leased = c
            .queue_lease(&pb::QueueLeaseRequest {
                queue_name: "q".into(),
                batch_size: 100,
                client_id: "w".into(),
                request_timeout: "5s".into(),
            })
            .await
            .expect("lease");
        assert!(!leased.items.is_empty(), "{dead} of {stored} leased");
        dead += leased.items.len();
        c.queue_retry(&pb::QueueRetryRequest {
            queue_name: "q".into(),
            partition: leased.partition,
            items: leased
                .items
                .iter()
                .map(|i| pb::QueueRetryItem {
                    id: i.id.clone(),
                    dead: true,
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .expect("retry as dead");
    }
    // The dead-letter queue's consumers get them, and what they complete makes room.
    let mut taken = 0;
    while taken < stored {
        let leased = tokio::time::timeout(
            Duration::from_secs(15),
            c.queue_lease(&pb::QueueLeaseRequest {
                queue_name: "q-dead".into(),
                batch_size: 100,
                client_id: "d".into(),
                request_timeout: "10s".into(),
            }),
        )
        .await
        .expect("lease in time")
        .expect("the dead items reach the dead-letter queue");
        taken += leased.items.len();
        c.queue_complete(&pb::QueueCompleteRequest {
            queue_name: "q-dead".into(),
            partition: leased.partition,
            request_timeout: "10s".into(),
            ids: leased.items.iter().map(|i| i.id.clone()).collect(),
        })
        .await
        .expect("complete");
    }
    produce(&c, "after").await.expect("room again");
    srv.stop().await;
}
