//! The typed calls of Lessor's extension routes (extend, pause, resume, browse, redrive) and the extension fields of
//! Querator's messages, against the real server in this process (memory storage, a manual clock), in protobuf and in
//! JSON: each call reaches its route, its request arrives whole and its reply decodes.

use std::sync::Arc;
use std::time::Duration;

use lessor_client::{proto as pb, Client, ClientError, Encoding};
use lessor_core::time::ManualClock;
use lessor_server::{Config, RunningServer};

async fn server(enc: Encoding) -> (RunningServer, Client) {
    let clock = ManualClock::starting_now();
    let srv = lessor_server::start(&Config::memory(), "127.0.0.1:0", Some(Arc::new(clock)))
        .await
        .expect("server starts");
    let c = Client::new(&srv.endpoint()).expect("client").with_encoding(enc);
    (srv, c)
}

fn queue(name: &str) -> pb::QueueInfo {
    pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 1,
        ..Default::default()
    }
}

async fn produce(c: &Client, q: &str, items: Vec<pb::QueueProduceItem>) -> Result<(), ClientError> {
    c.queue_produce(&pb::QueueProduceRequest {
        queue_name: q.into(),
        request_timeout: "5s".into(),
        items,
    })
    .await
}

async fn lease(c: &Client, q: &str, n: i32) -> pb::QueueLeaseResponse {
    c.queue_lease(&pb::QueueLeaseRequest {
        queue_name: q.into(),
        batch_size: n,
        client_id: "client-test".into(),
        request_timeout: "5s".into(),
    })
    .await
    .expect("lease")
}

fn refused<T: std::fmt::Debug>(r: Result<T, ClientError>, contains: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), Some(400), "{e:?}");
    assert!(e.message().unwrap_or_default().contains(contains), "{e:?}");
}

async fn every_extension_call(enc: Encoding) {
    let (srv, c) = server(enc).await;
    // QueueInfo extension fields go out with create and come back from info as stored.
    c.queues_create(&pb::QueueInfo {
        dedup_window: "2m".into(),
        max_lease_timeout: "1h".into(),
        retry_backoff: Some(pb::RetryBackoff {
            base: "5s".into(),
            max: "1m".into(),
            factor: 2.0,
            jitter: 0.5,
        }),
        ..queue("q")
    })
    .await
    .expect("create");
    let info = c
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "q".into(),
        })
        .await
        .expect("info");
    assert_eq!(
        (info.dedup_window.as_str(), info.max_lease_timeout.as_str()),
        ("2m0s", "1h0m0s")
    );
    assert_eq!(
        info.retry_backoff.map(|b| (b.base, b.factor, b.jitter)),
        Some(("5s".to_string(), 2.0, 0.5))
    );

    // Produce with a priority and a dedup key; the duplicate is acknowledged and not stored.
    let keyed = |text: &str| pb::QueueProduceItem {
        utf8: text.into(),
        priority: 4,
        dedup_id: "once".into(),
        ..Default::default()
    };
    produce(&c, "q", vec![keyed("first")]).await.expect("produce");
    produce(&c, "q", vec![keyed("second")])
        .await
        .expect("a duplicate is acknowledged");
    refused(
        produce(
            &c,
            "q",
            vec![pb::QueueProduceItem {
                priority: -3,
                ..keyed("x")
            }],
        )
        .await,
        "items[0].priority is invalid",
    );

    // Browse shows it without leasing it.
    let page = c
        .queue_browse(&pb::QueueBrowseRequest {
            queue_name: "q".into(),
            state: "ready".into(),
            priority: Some(4),
            ..Default::default()
        })
        .await
        .expect("browse");
    assert_eq!(page.items.len(), 1, "{page:?}");
    assert_eq!(
        (page.items[0].payload.as_slice(), page.items[0].priority),
        (&b"first"[..], 4)
    );
    assert!(page.next_pivot.is_empty());

    // Lease, extend, complete.
    let l = lease(&c, "q", 10).await;
    assert_eq!(l.items.len(), 1);
    assert_eq!(l.items[0].priority, 4);
    let ext = |lease_timeout: &str| pb::QueueExtendRequest {
        queue_name: "q".into(),
        partition: l.partition,
        ids: vec![l.items[0].id.clone()],
        lease_timeout: lease_timeout.into(),
        request_timeout: "5s".into(),
    };
    c.queue_extend(&ext("30m")).await.expect("extend");
    refused(c.queue_extend(&ext("2h")).await, "lease_timeout is invalid");
    let leased = c
        .queue_browse(&pb::QueueBrowseRequest {
            queue_name: "q".into(),
            state: "leased".into(),
            ..Default::default()
        })
        .await
        .expect("browse");
    assert_eq!(leased.items[0].holder, "client-test");
    c.queue_complete(&pb::QueueCompleteRequest {
        queue_name: "q".into(),
        partition: l.partition,
        request_timeout: "5s".into(),
        ids: vec![l.items[0].id.clone()],
    })
    .await
    .expect("complete");

    // Pause and resume.
    c.queue_pause(&pb::QueuePauseRequest {
        queue_name: "q".into(),
    })
    .await
    .expect("pause");
    let info = c
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "q".into(),
        })
        .await
        .expect("info");
    assert!(info.paused);
    c.queue_resume(&pb::QueueResumeRequest {
        queue_name: "q".into(),
    })
    .await
    .expect("resume");

    // Redrive: one dead item back to its queue.
    c.queues_create(&queue("dlq")).await.expect("dlq");
    c.queues_create(&pb::QueueInfo {
        dead_queue: "dlq".into(),
        ..queue("src")
    })
    .await
    .expect("src");
    produce(
        &c,
        "src",
        vec![pb::QueueProduceItem {
            utf8: "poison".into(),
            ..Default::default()
        }],
    )
    .await
    .expect("produce");
    let l = lease(&c, "src", 1).await;
    c.queue_retry(&pb::QueueRetryRequest {
        queue_name: "src".into(),
        partition: l.partition,
        items: vec![pb::QueueRetryItem {
            id: l.items[0].id.clone(),
            retry_at: None,
            dead: true,
        }],
    })
    .await
    .expect("dead");
    let dead_count = || async {
        c.queue_stats(&pb::QueueStatsRequest {
            queue_name: "dlq".into(),
            ..Default::default()
        })
        .await
        .map(|s| {
            s.logical_queues[0]
                .partitions
                .iter()
                .map(|p| p.total)
                .sum::<i32>()
        })
        .map_err(|e| e.to_string())
    };
    lessor_testkit::eventually(
        "the item reaches the dead-letter queue",
        Duration::from_secs(5),
        || async {
            match dead_count().await? {
                1 => Ok(()),
                n => Err(format!("{n} dead")),
            }
        },
    )
    .await;
    let task = c
        .queue_redrive(&pb::QueueRedriveRequest {
            dead_queue: "dlq".into(),
            max_items: 10,
            ..Default::default()
        })
        .await
        .expect("redrive");
    assert_eq!((task.dead_queue.as_str(), task.max_items), ("dlq", 10));
    let get = pb::RedriveTaskRequest {
        task_id: task.task_id.clone(),
        dead_queue: "dlq".into(),
    };
    let done = lessor_testkit::eventually("the redrive completes", Duration::from_secs(5), || async {
        let t = c.redrive_get(&get).await.map_err(|e| e.to_string())?;
        if t.status == "completed" {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
    assert_eq!(done.moved, 1);
    let listed = c
        .redrive_list(&pb::RedriveListRequest {
            dead_queue: "dlq".into(),
        })
        .await
        .expect("list");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|t| t.task_id.as_str())
            .collect::<Vec<_>>(),
        [task.task_id.as_str()]
    );
    assert_eq!(c.redrive_cancel(&get).await.expect("cancel").status, "completed");
    refused(
        c.queue_redrive(&pb::QueueRedriveRequest {
            dead_queue: "q".into(),
            ..Default::default()
        })
        .await,
        "dead_queue is invalid",
    );
    assert_eq!(lease(&c, "src", 1).await.items[0].bytes, b"poison");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_extension_call_over_protobuf() {
    every_extension_call(Encoding::Protobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_extension_call_over_json() {
    every_extension_call(Encoding::Json).await;
}

/// A Querator server has none of these routes: the call fails with its 501, which the client reports as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_route_is_a_501_api_error() {
    let (srv, c) = server(Encoding::Json).await;
    let (status, _, body) = c
        .raw("/v1/queue.heartbeat", Some("application/json"), None, "{}")
        .await
        .expect("raw");
    assert_eq!(status.as_u16(), 501, "{}", String::from_utf8_lossy(&body));
    srv.stop().await;
}
