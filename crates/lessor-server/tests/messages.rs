//! Querator's check order and constant message parts on the queue routes, in JSON and protobuf: clients split
//! messages on `;` and match the part before it, so what is checked first decides what they see.

use lessor_client::proto as pb;
use lessor_client::{Client, ClientError, Encoding};

/// The code and the constant part (before the `;`) of a refusal.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (i32, String) {
    match r {
        Err(ClientError::Api { code, message, .. }) => {
            let constant = message.split(';').next().unwrap_or_default().to_string();
            (code, constant)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn queue(name: &str, partitions: i32) -> pb::QueueInfo {
    pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: partitions,
        ..Default::default()
    }
}

fn complete(queue: &str, partition: i32, id: &str) -> pb::QueueCompleteRequest {
    pb::QueueCompleteRequest {
        queue_name: queue.into(),
        partition,
        request_timeout: "5s".into(),
        ids: vec![id.into()],
    }
}

fn retry(queue: &str, partition: i32, id: &str) -> pb::QueueRetryRequest {
    pb::QueueRetryRequest {
        queue_name: queue.into(),
        partition,
        items: vec![pb::QueueRetryItem {
            id: id.into(),
            ..Default::default()
        }],
    }
}

fn delete(queue: &str, partition: i32, id: &str) -> pb::StorageItemsDeleteRequest {
    pb::StorageItemsDeleteRequest {
        queue_name: queue.into(),
        partition,
        ids: vec![id.into()],
    }
}

async fn check_order(enc: Encoding) {
    let (srv, c) = lessor_testkit::server::memory().await;
    let c: Client = c.with_encoding(enc);
    c.queues_create(&queue("q", 1)).await.expect("create");

    const MISSING: (i32, &str) = (400, "queue does not exist");
    const PARTITION: (i32, &str) = (400, "partition is invalid");
    const GOOD_ID: &str = "0000000000000001";
    // (queue, partition, id) -> expected constant part, the same for complete, retry and storage delete.
    let cases: [(&str, i32, &str, (i32, &str)); 7] = [
        ("nope", 0, "garbage", MISSING),
        ("nope", 7, "garbage", MISSING),
        ("nope", -1, GOOD_ID, MISSING),
        ("q", 2, "garbage", PARTITION),
        ("q", -1, "garbage", PARTITION),
        ("q", 0, "garbage", (400, "invalid storage id")),
        ("q", 0, GOOD_ID, (400, "invalid storage id")),
    ];
    for (q, p, id, (code, constant)) in cases {
        let want = (code, constant.to_string());
        assert_eq!(
            refusal(c.queue_complete(&complete(q, p, id)).await),
            want,
            "complete {q} {p} {id}"
        );
        assert_eq!(
            refusal(c.queue_retry(&retry(q, p, id)).await),
            want,
            "retry {q} {p} {id}"
        );
        if id != GOOD_ID || q != "q" {
            assert_eq!(
                refusal(c.storage_items_delete(&delete(q, p, id)).await),
                want,
                "storage delete {q} {p} {id}"
            );
        }
    }
    let msg = match c.queue_complete(&complete("q", 2, "garbage")).await {
        Err(ClientError::Api { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    assert_eq!(msg, "partition is invalid; '2' is not a valid partition");

    // requested_partitions: at least 1, as Querator.
    for n in [0, -1] {
        let (code, constant) = refusal(c.queues_create(&queue("zero", n)).await);
        assert_eq!(
            (code, constant.as_str()),
            (400, "requested_partitions is invalid"),
            "{n}"
        );
    }
    c.queues_create(&queue("one", 1)).await.expect("one partition");
    srv.stop().await;
}

#[tokio::test]
async fn check_order_json() {
    check_order(Encoding::Json).await;
}

#[tokio::test]
async fn check_order_protobuf() {
    check_order(Encoding::Protobuf).await;
}
