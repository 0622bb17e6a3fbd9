//! Review of the log store's memory budget through the real server on port 0: a store at its `max-memory` whose
//! items all died must still move them to their dead-letter queue, where consumers take them and make room.
#![cfg(feature = "fjall")]

use std::time::Duration;

use lessor_client::proto as pb;
use lessor_client::Client;
use lessor_server::Config;

async fn produce(c: &Client, tag: &str) -> Result<(), lessor_client::ClientError> {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: "q".into(),
        request_timeout: "10s".into(),
        items: (0..100)
            .map(|i| pb::QueueProduceItem {
                reference: format!("{tag}-{i}"),
                bytes: vec![b'x'; 1000],
                ..Default::default()
            })
            .collect(),
    })
    .await
}

/// Every item of a full store fails and is retried as dead: the dead-letter transfer must not be refused as new
/// items (it moves items the store holds already), or the store stays full for good: nothing is left for
/// consumers of the queue, the dead-letter queue gets nothing to serve, and every produce is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_whose_items_all_died_moves_them_to_the_dead_letter_queue() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "queue-storage: {{ driver: fjall, config: {{ storage-dir: {dir} }} }}\n\
         partition-storage:\n  - {{ name: log-0, driver: log, affinity: 1, config: {{ storage-dir: {dir}, \
         durability: none, max-memory: 1MiB }} }}\n",
        dir = tmp.path().display()
    );
    let config = Config::from_yaml(&yaml).expect("config");
    let (srv, c) = lessor_testkit::server::start(&config, None).await;
    for (name, dead) in [("q-dead", ""), ("q", "q-dead")] {
        c.queues_create(&pb::QueueInfo {
            queue_name: name.into(),
            dead_queue: dead.into(),
            lease_timeout: "1m".into(),
            expire_timeout: "1h".into(),
            requested_partitions: 1,
            ..Default::default()
        })
        .await
        .expect("create");
    }
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
