//! Black-box tests of the v1 API: the real server on port 0, driven through the client over protobuf and JSON,
//! with an injected clock so leases, schedules and expiry never wait on wall time. The scenarios port Querator's
//! functional suites (queue, queues, retry, partitions, storage, shutdown) and add Lessor's deliberate fixes.
//!
//! Every scenario runs over protobuf and JSON on memory storage, and over protobuf on fjall (feature `fjall`) and on
//! PostgreSQL (feature `postgres`, when `LESSOR_TEST_DATABASE_URL` is set; skipped with a message otherwise, failed
//! when `CI` is set). Each PostgreSQL run gets a database of its own, created from that URL and dropped afterwards,
//! because every scenario reuses the same queue names.

use std::time::Duration;

use lessor_client::{proto as pb, Client, ClientError, Encoding};
use lessor_core::time::{Clock, ManualClock};
use lessor_proto::Timestamp;
use lessor_server::RunningServer;

struct Env {
    srv: Option<RunningServer>,
    c: Client,
    clock: ManualClock,
    /// What keeps the server's storage alive (a temporary directory, a database), dropped after the server.
    _storage: lessor_testkit::server::BackendServer,
}

impl Env {
    async fn new(enc: Encoding) -> Env {
        let mut b = lessor_testkit::server::on_backend(enc).await;
        Env {
            srv: b.server.take(),
            c: b.client.clone(),
            clock: b.clock.clone(),
            _storage: b,
        }
    }

    async fn create(&self, name: &str, f: impl FnOnce(&mut pb::QueueInfo)) {
        lessor_testkit::server::create_queue(&self.c, name, f).await;
    }

    async fn produce(&self, q: &str, payloads: &[&str]) {
        self.c
            .queue_produce(&produce_req(q, payloads))
            .await
            .expect("produce");
    }

    async fn lease(&self, q: &str, n: i32, client: &str) -> Result<pb::QueueLeaseResponse, ClientError> {
        lessor_testkit::server::lease(&self.c, q, n, client).await
    }

    async fn complete(&self, q: &str, partition: i32, ids: Vec<String>) -> Result<(), ClientError> {
        self.c
            .queue_complete(&pb::QueueCompleteRequest {
                queue_name: q.into(),
                partition,
                request_timeout: "5s".into(),
                ids,
            })
            .await
    }

    async fn retry(
        &self,
        q: &str,
        partition: i32,
        items: Vec<pb::QueueRetryItem>,
    ) -> Result<(), ClientError> {
        self.c
            .queue_retry(&pb::QueueRetryRequest {
                queue_name: q.into(),
                partition,
                items,
            })
            .await
    }

    async fn list(&self, q: &str, partition: i32, scheduled: bool) -> Vec<pb::StorageItem> {
        let r = pb::StorageItemsListRequest {
            queue_name: q.into(),
            partition,
            ..Default::default()
        };
        let res = if scheduled {
            self.c.storage_scheduled_list(&r).await
        } else {
            self.c.storage_items_list(&r).await
        };
        res.expect("list").items
    }

    async fn stats(&self, q: &str) -> pb::QueueLogicalStats {
        self.c
            .queue_stats(&pb::QueueStatsRequest {
                queue_name: q.into(),
                ..Default::default()
            })
            .await
            .expect("stats")
            .logical_queues
            .remove(0)
    }

    /// Advances the clock and waits (bounded) until the server's queue loop has seen it.
    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    }

    fn now_plus(&self, d: Duration) -> Timestamp {
        Timestamp::from_unix_nanos(i128::from(self.clock.now().add(d).0) * 1000)
    }
}

fn produce_req(q: &str, payloads: &[&str]) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: q.into(),
        request_timeout: "5s".into(),
        items: payloads
            .iter()
            .map(|p| pb::QueueProduceItem {
                encoding: "text/plain".into(),
                kind: "k".into(),
                reference: format!("ref-{p}"),
                bytes: p.as_bytes().to_vec(),
                ..Default::default()
            })
            .collect(),
    }
}

fn texts(items: &[pb::QueueLeaseItem]) -> Vec<String> {
    items
        .iter()
        .map(|i| String::from_utf8_lossy(&i.bytes).into_owned())
        .collect()
}

fn ids(items: &[pb::QueueLeaseItem]) -> Vec<String> {
    items.iter().map(|i| i.id.clone()).collect()
}

fn assert_api(e: ClientError, code: i32, contains: &str) {
    assert_eq!(e.code(), Some(code), "{e:?}");
    let msg = e.message().unwrap_or_default().to_string();
    assert!(
        msg.contains(contains),
        "message {msg:?} should contain {contains:?}"
    );
}

/// Polls (bounded, 1 s) until `f` holds, for effects of a clock advance that the server applies asynchronously.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let probe = || {
        let holds = f();
        async move {
            if holds.await {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        }
    };
    if let Err(t) = lessor_testkit::poll_until(Duration::from_secs(1), Duration::from_millis(5), probe).await
    {
        panic!("timed out waiting for: {what} ({t})");
    }
}

lessor_testkit::every_backend!(
    produce_lease_complete_round_trip,
    lease_long_poll_wakes_on_produce,
    lease_times_out_on_the_clock,
    duplicate_client_id_is_rejected,
    waiting_consumers_share_round_robin,
    complete_errors_and_all_or_nothing,
    retry_immediate_scheduled_and_dead,
    retry_dead_goes_to_dead_letter_queue,
    lease_expiry_requeues_wakes_waiters_and_fences,
    max_attempts_dead_letters_once,
    expire_timeout_removes_items,
    scheduled_items_are_never_stranded,
    clear_modes,
    queues_crud_and_validation,
    update_changes_only_given_fields,
    delete_removes_items,
    partitions_spread_produce_and_lease_from_fullest,
    storage_import_list_delete,
    stats_and_metrics,
    shutdown_answers_waiting_leases,
);

async fn produce_lease_complete_round_trip(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.produce("q", &["a", "b"]).await;
    let l = e.lease("q", 10, "c1").await.expect("lease");
    assert_eq!(l.partition, 0);
    assert_eq!(texts(&l.items), vec!["a", "b"]);
    let it = &l.items[0];
    assert_eq!(
        (
            it.encoding.as_str(),
            it.kind.as_str(),
            it.reference.as_str(),
            it.attempts
        ),
        ("text/plain", "k", "ref-a", 1)
    );
    let deadline = it.lease_deadline.expect("deadline");
    assert_eq!(deadline, e.now_plus(Duration::from_secs(60)));
    let stored = e.list("q", 0, false).await;
    assert!(stored.iter().all(|s| s.is_leased));
    assert!(stored[0].expire_deadline.is_some());
    e.complete("q", 0, ids(&l.items)).await.expect("complete");
    assert!(e.list("q", 0, false).await.is_empty());
    // utf8 payloads are accepted too.
    let mut r = produce_req("q", &[]);
    r.items.push(pb::QueueProduceItem {
        utf8: "text".into(),
        ..Default::default()
    });
    e.c.queue_produce(&r).await.expect("produce utf8");
    assert_eq!(
        texts(&e.lease("q", 1, "c1").await.expect("lease").items),
        vec!["text"]
    );
}

async fn lease_long_poll_wakes_on_produce(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let c = e.c.clone();
    let waiter = tokio::spawn(async move {
        c.queue_lease(&pb::QueueLeaseRequest {
            queue_name: "q".into(),
            batch_size: 5,
            client_id: "w".into(),
            request_timeout: "1m".into(),
        })
        .await
    });
    eventually("lease is waiting", || async {
        e.stats("q").await.lease_waiting == 1
    })
    .await;
    e.produce("q", &["x"]).await;
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woke")
        .expect("join")
        .expect("lease");
    assert_eq!(texts(&got.items), vec!["x"]);
}

async fn lease_times_out_on_the_clock(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let c = e.c.clone();
    let waiter = tokio::spawn(async move {
        c.queue_lease(&pb::QueueLeaseRequest {
            queue_name: "q".into(),
            batch_size: 1,
            client_id: "w".into(),
            request_timeout: "10s".into(),
        })
        .await
    });
    eventually("lease is waiting", || async {
        e.stats("q").await.lease_waiting == 1
    })
    .await;
    e.advance(Duration::from_secs(10)).await;
    let err = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("answered")
        .expect("join")
        .expect_err("timeout");
    assert_api(err, 454, "request timeout; no items are in the queue");
}

async fn duplicate_client_id_is_rejected(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let c = e.c.clone();
    let first = tokio::spawn(async move {
        c.queue_lease(&pb::QueueLeaseRequest {
            queue_name: "q".into(),
            batch_size: 1,
            client_id: "same".into(),
            request_timeout: "10s".into(),
        })
        .await
    });
    eventually("lease is waiting", || async {
        e.stats("q").await.lease_waiting == 1
    })
    .await;
    assert_api(
        e.lease("q", 1, "same").await.expect_err("duplicate"),
        400,
        "duplicate client id",
    );
    e.advance(Duration::from_secs(10)).await;
    assert_api(
        first.await.expect("join").expect_err("times out"),
        454,
        "request timeout",
    );
}

async fn waiting_consumers_share_round_robin(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let mut waiters = Vec::new();
    for i in 0..3 {
        let c = e.c.clone();
        waiters.push(tokio::spawn(async move {
            c.queue_lease(&pb::QueueLeaseRequest {
                queue_name: "q".into(),
                batch_size: 4,
                client_id: format!("w{i}"),
                request_timeout: "1m".into(),
            })
            .await
        }));
    }
    eventually("3 leases waiting", || async {
        e.stats("q").await.lease_waiting == 3
    })
    .await;
    e.produce("q", &["0", "1", "2", "3", "4", "5"]).await;
    let mut sizes = Vec::new();
    let mut all = Vec::new();
    for w in waiters {
        let r = w.await.expect("join").expect("lease");
        sizes.push(r.items.len());
        all.extend(texts(&r.items));
    }
    assert_eq!(
        sizes,
        vec![2, 2, 2],
        "six items dealt one at a time to three consumers"
    );
    all.sort();
    assert_eq!(all, vec!["0", "1", "2", "3", "4", "5"]);
}

async fn complete_errors_and_all_or_nothing(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.produce("q", &["a", "b", "c"]).await;
    let l = e.lease("q", 2, "c").await.expect("lease");
    let ready = e
        .list("q", 0, false)
        .await
        .into_iter()
        .find(|i| !i.is_leased)
        .expect("ready item");
    assert_api(
        e.complete("q", 0, vec![]).await.expect_err("empty"),
        400,
        "ids is invalid",
    );
    assert_api(
        e.complete("q", 0, vec!["nope".into()]).await.expect_err("bad id"),
        400,
        "invalid storage id; 'nope'",
    );
    assert_api(
        e.complete("q", 7, ids(&l.items)).await.expect_err("partition"),
        400,
        "partition is invalid; '7'",
    );
    let err = e
        .complete("q", 0, vec![l.items[0].id.clone(), ready.id.clone()])
        .await
        .expect_err("not leased");
    assert_api(err, 400, "is not marked as leased");
    // Nothing of the failed request was applied: the first id is still leased and completes now.
    assert_eq!(e.list("q", 0, false).await.len(), 3);
    e.complete("q", 0, ids(&l.items)).await.expect("complete");
    let err = e
        .complete("q", 0, vec![l.items[0].id.clone()])
        .await
        .expect_err("gone");
    assert_api(err, 400, "does not exist");
    let mut req = produce_req("q", &[]);
    req.request_timeout = String::new();
    let _ = e.c.queue_produce(&req).await.expect_err("no timeout");
    let err =
        e.c.queue_complete(&pb::QueueCompleteRequest {
            queue_name: "q".into(),
            partition: 0,
            request_timeout: String::new(),
            ids: vec![ready.id],
        })
        .await
        .expect_err("timeout required");
    assert_api(err, 400, "request timeout is required");
}

async fn retry_immediate_scheduled_and_dead(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.produce("q", &["a", "b", "c"]).await;
    let l = e.lease("q", 3, "c").await.expect("lease");
    let item = |id: &str, retry_at: Option<Timestamp>, dead: bool| pb::QueueRetryItem {
        id: id.into(),
        retry_at,
        dead,
    };
    e.retry("q", 0, vec![item(&l.items[0].id, None, false)])
        .await
        .expect("retry now");
    e.retry(
        "q",
        0,
        vec![item(
            &l.items[1].id,
            Some(e.now_plus(Duration::from_secs(30))),
            false,
        )],
    )
    .await
    .expect("retry later");
    e.retry("q", 0, vec![item(&l.items[2].id, None, true)])
        .await
        .expect("retry dead");
    let again = e.lease("q", 10, "c").await.expect("lease");
    assert_eq!(texts(&again.items), vec!["a"]);
    assert_eq!(again.items[0].attempts, 2);
    assert_eq!(e.list("q", 0, true).await.len(), 1, "b is scheduled");
    e.advance(Duration::from_secs(30)).await;
    let later = e.lease("q", 10, "c").await.expect("lease after schedule");
    assert_eq!(texts(&later.items), vec!["b"]);
    assert_api(
        e.retry("q", 0, vec![]).await.expect_err("empty"),
        400,
        "items is invalid",
    );
    assert_api(
        e.retry("q", 0, vec![item(&l.items[2].id, None, false)])
            .await
            .expect_err("gone"),
        400,
        "does not exist",
    );
}

async fn retry_dead_goes_to_dead_letter_queue(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("dlq", |_| {}).await;
    e.create("q", |q| q.dead_queue = "dlq".into()).await;
    e.produce("q", &["doomed"]).await;
    let l = e.lease("q", 1, "c").await.expect("lease");
    e.retry(
        "q",
        0,
        vec![pb::QueueRetryItem {
            id: l.items[0].id.clone(),
            retry_at: None,
            dead: true,
        }],
    )
    .await
    .expect("dead");
    let d = e.lease("dlq", 1, "c").await.expect("item in dead-letter queue");
    assert_eq!(texts(&d.items), vec!["doomed"]);
    assert_eq!(d.items[0].reference, "ref-doomed");
    assert_eq!(
        d.items[0].attempts, 1,
        "attempts restart in the dead-letter queue"
    );
    let stored = e.list("dlq", 0, false).await;
    assert!(
        stored[0].source_id.contains(&l.items[0].id),
        "source id names the original item"
    );
    assert!(e.list("q", 0, false).await.is_empty());
}

async fn lease_expiry_requeues_wakes_waiters_and_fences(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| q.lease_timeout = "10s".into()).await;
    e.produce("q", &["a", "b"]).await;
    let stale = e.lease("q", 1, "slow").await.expect("lease");
    let c = e.c.clone();
    let _ = e.lease("q", 1, "other").await.expect("b");
    let waiter = tokio::spawn(async move {
        c.queue_lease(&pb::QueueLeaseRequest {
            queue_name: "q".into(),
            batch_size: 1,
            client_id: "waiter".into(),
            request_timeout: "1m".into(),
        })
        .await
    });
    eventually("lease is waiting", || async {
        e.stats("q").await.lease_waiting == 1
    })
    .await;
    // The lease of "a" expires; the waiting consumer gets it at once, without any other request arriving.
    e.advance(Duration::from_secs(10)).await;
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken")
        .expect("join")
        .expect("lease");
    assert_eq!(texts(&got.items), vec!["a"]);
    assert_eq!(got.items[0].attempts, 2);
    assert_ne!(got.items[0].id, stale.items[0].id);
    // The first consumer's lease is fenced off: its id no longer exists, and the item stays with the new holder.
    assert_api(
        e.complete("q", 0, ids(&stale.items)).await.expect_err("stale"),
        400,
        "does not exist",
    );
    let retry = pb::QueueRetryItem {
        id: stale.items[0].id.clone(),
        retry_at: None,
        dead: false,
    };
    assert_api(
        e.retry("q", 0, vec![retry]).await.expect_err("stale"),
        400,
        "does not exist",
    );
    e.complete("q", 0, ids(&got.items))
        .await
        .expect("new holder completes");
}

async fn max_attempts_dead_letters_once(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("dlq", |_| {}).await;
    e.create("q", |q| {
        q.lease_timeout = "10s".into();
        q.max_attempts = 2;
        q.dead_queue = "dlq".into();
    })
    .await;
    e.produce("q", &["x"]).await;
    for attempt in 1..=2 {
        let l = e.lease("q", 1, "c").await.expect("lease");
        assert_eq!(l.items[0].attempts, attempt);
        e.advance(Duration::from_secs(10)).await;
    }
    eventually("item reaches the dead-letter queue", || async {
        e.list("dlq", 0, false).await.len() == 1 && e.list("q", 0, false).await.is_empty()
    })
    .await;
    assert_eq!(e.list("dlq", 0, false).await.len(), 1, "moved exactly once");
}

async fn expire_timeout_removes_items(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| {
        q.lease_timeout = "1m".into();
        q.expire_timeout = "2m".into();
    })
    .await;
    e.produce("q", &["x", "y"]).await;
    let _ = e.lease("q", 1, "c").await.expect("lease");
    e.advance(Duration::from_secs(120)).await;
    eventually("items expire", || async {
        e.list("q", 0, false).await.is_empty()
    })
    .await;
}

async fn scheduled_items_are_never_stranded(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let mut req = produce_req("q", &["late", "early", "now"]);
    req.items[0].enqueue_at = Some(e.now_plus(Duration::from_secs(20)));
    req.items[1].enqueue_at = Some(e.now_plus(Duration::from_secs(10)));
    req.items[2].enqueue_at = Some(e.now_plus(Duration::from_millis(50))); // under the threshold: immediate
    e.c.queue_produce(&req).await.expect("produce");
    assert_eq!(e.list("q", 0, true).await.len(), 2);
    assert_eq!(e.list("q", 0, false).await.len(), 1);
    assert!(
        e.list("q", 0, true).await[0].enqueue_at.is_some(),
        "scheduled items list their enqueue time"
    );
    e.advance(Duration::from_secs(10)).await;
    eventually("early enqueued", || async {
        e.list("q", 0, true).await.len() == 1
    })
    .await;
    e.advance(Duration::from_secs(10)).await;
    eventually("late enqueued too", || async {
        e.list("q", 0, true).await.is_empty()
    })
    .await;
    let l = e.lease("q", 10, "c").await.expect("lease");
    assert_eq!(texts(&l.items), vec!["now", "early", "late"]);
}

async fn clear_modes(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let mut req = produce_req("q", &["a", "b", "s"]);
    req.items[2].enqueue_at = Some(e.now_plus(Duration::from_secs(60)));
    e.c.queue_produce(&req).await.expect("produce");
    let _ = e.lease("q", 1, "c").await.expect("lease");
    let clear = |queue, scheduled, destructive| pb::QueueClearRequest {
        queue_name: "q".into(),
        queue,
        scheduled,
        destructive,
    };
    assert_api(
        e.c.queue_clear(&clear(false, false, false))
            .await
            .expect_err("nothing"),
        400,
        "one of 'queue', 'scheduled'",
    );
    // As in Querator, the queue is looked up before the flags are read: a request wrong twice names the queue.
    assert_api(
        e.c.queue_clear(&pb::QueueClearRequest {
            queue_name: "no-such-queue".into(),
            ..Default::default()
        })
        .await
        .expect_err("no queue"),
        400,
        "queue does not exist; ",
    );
    e.c.queue_clear(&clear(true, false, false))
        .await
        .expect("clear ready");
    assert_eq!(e.list("q", 0, false).await.len(), 1, "leased item kept");
    e.c.queue_clear(&clear(true, false, true))
        .await
        .expect("destructive");
    assert!(e.list("q", 0, false).await.is_empty());
    assert_eq!(e.list("q", 0, true).await.len(), 1);
    e.c.queue_clear(&clear(false, true, false))
        .await
        .expect("scheduled");
    assert!(e.list("q", 0, true).await.is_empty());
}

async fn queues_crud_and_validation(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("b", |_| {}).await;
    e.create("a", |_| {}).await;
    e.create("c", |q| q.dead_queue = "a".into()).await;
    let dup = pb::QueueInfo {
        queue_name: "a".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    };
    assert_api(
        e.c.queues_create(&dup).await.expect_err("dup"),
        400,
        "'a' already exists",
    );
    let bad = |f: fn(&mut pb::QueueInfo)| {
        let mut q = pb::QueueInfo {
            queue_name: "z".into(),
            lease_timeout: "1m".into(),
            expire_timeout: "1h".into(),
            requested_partitions: 1,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    for (q, msg) in [
        (
            bad(|q| q.queue_name = "has space".into()),
            "cannot contain whitespace",
        ),
        (bad(|q| q.queue_name = "ti~lde".into()), "'~'"),
        (
            bad(|q| q.lease_timeout = String::new()),
            "lease_timeout is required",
        ),
        (
            bad(|q| q.lease_timeout = "2h".into()),
            "lease_timeout cannot be greater than the expire_timeout",
        ),
        (
            bad(|q| q.lease_timeout = "abc".into()),
            "lease_timeout is invalid",
        ),
        (bad(|q| q.max_attempts = -1), "max_attempts is invalid"),
        (
            bad(|q| q.dead_queue = "missing".into()),
            "dead_queue does not exist",
        ),
        (
            bad(|q| q.dead_queue = "z".into()),
            "dead_queue cannot reference itself",
        ),
        (
            bad(|q| q.dead_queue = "c".into()),
            "already has its own dead_queue",
        ),
    ] {
        assert_api(e.c.queues_create(&q).await.expect_err(msg), 400, msg);
    }
    let list =
        e.c.queues_list(&pb::QueuesListRequest::default())
            .await
            .expect("list");
    let names: Vec<_> = list.items.iter().map(|q| q.queue_name.as_str()).collect();
    assert_eq!(names, vec!["a", "b", "c"]);
    let page =
        e.c.queues_list(&pb::QueuesListRequest {
            pivot: "b".into(),
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("page");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].queue_name, "b", "pivot is inclusive");
    let info =
        e.c.queues_info(&pb::QueuesInfoRequest {
            queue_name: "c".into(),
        })
        .await
        .expect("info");
    assert_eq!(
        (
            info.dead_queue.as_str(),
            info.lease_timeout.as_str(),
            info.expire_timeout.as_str()
        ),
        ("a", "1m0s", "24h0m0s")
    );
    assert_eq!(info.namespace, "_system");
    assert_api(
        e.c.queues_info(&pb::QueuesInfoRequest {
            queue_name: "nope".into(),
        })
        .await
        .expect_err("missing"),
        400,
        "queue does not exist",
    );
    assert_api(
        e.c.queues_delete(&pb::QueuesDeleteRequest {
            queue_name: "nope".into(),
            force: false,
        })
        .await
        .expect_err("missing"),
        400,
        "queue does not exist",
    );
    assert_api(
        e.lease("nope", 1, "c").await.expect_err("missing"),
        400,
        "no such queue named 'nope'",
    );
}

async fn update_changes_only_given_fields(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("dlq", |_| {}).await;
    e.create("q", |q| {
        q.max_attempts = 5;
        q.reference = "keep".into();
        q.dead_queue = "dlq".into();
    })
    .await;
    e.c.queues_update(&pb::QueueInfo {
        queue_name: "q".into(),
        lease_timeout: "30s".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("update");
    let info =
        e.c.queues_info(&pb::QueuesInfoRequest {
            queue_name: "q".into(),
        })
        .await
        .expect("info");
    assert_eq!(info.lease_timeout, "30s");
    assert_eq!(
        (
            info.max_attempts,
            info.reference.as_str(),
            info.dead_queue.as_str()
        ),
        (5, "keep", "dlq")
    );
    // New leases use the new timeout.
    e.produce("q", &["x"]).await;
    let l = e.lease("q", 1, "c").await.expect("lease");
    assert_eq!(
        l.items[0].lease_deadline,
        Some(e.now_plus(Duration::from_secs(30)))
    );
    // Partitions can grow.
    e.c.queues_update(&pb::QueueInfo {
        queue_name: "q".into(),
        requested_partitions: 3,
        ..Default::default()
    })
    .await
    .expect("grow");
    let s = e.stats("q").await;
    assert_eq!(s.partitions.len(), 3);
    let shrink = pb::QueueInfo {
        queue_name: "q".into(),
        requested_partitions: 1,
        ..Default::default()
    };
    assert_api(
        e.c.queues_update(&shrink).await.expect_err("shrink"),
        400,
        "cannot shrink",
    );
}

async fn delete_removes_items(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.produce("q", &["old"]).await;
    e.c.queues_delete(&pb::QueuesDeleteRequest {
        queue_name: "q".into(),
        force: false,
    })
    .await
    .expect("delete");
    e.create("q", |_| {}).await;
    assert!(
        e.list("q", 0, false).await.is_empty(),
        "a re-created queue does not bring old items back"
    );
}

async fn partitions_spread_produce_and_lease_from_fullest(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| q.requested_partitions = 2).await;
    let batch: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
    e.produce("q", &refs).await; // whole request -> one partition
    e.produce("q", &refs[..4]).await; // the other (least loaded)
    let s = e.stats("q").await;
    let mut totals: Vec<i32> = s.partitions.iter().map(|p| p.total).collect();
    totals.sort();
    assert_eq!(totals, vec![4, 10]);
    let l = e.lease("q", 3, "c").await.expect("lease");
    let fullest = s
        .partitions
        .iter()
        .max_by_key(|p| p.total)
        .expect("partition")
        .partition;
    assert_eq!(l.partition, fullest, "lease takes from the fullest partition");
    e.complete("q", l.partition, ids(&l.items))
        .await
        .expect("complete on the lease's partition");
}

async fn storage_import_list_delete(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let item = pb::StorageItem {
        source_id: "src-1".into(),
        attempts: 2,
        reference: "r".into(),
        encoding: "e".into(),
        kind: "k".into(),
        payload: b"imported".to_vec(),
        ..Default::default()
    };
    let out =
        e.c.storage_items_import(&pb::StorageItemsImportRequest {
            queue_name: "q".into(),
            partition: 0,
            items: vec![item.clone(), item],
        })
        .await
        .expect("import");
    assert_eq!(out.items.len(), 1, "the duplicate source id is skipped");
    let listed = e.list("q", 0, false).await;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].attempts, listed[0].source_id.as_str()), (2, "src-1"));
    assert!(
        listed[0].expire_deadline.is_some(),
        "an omitted expire deadline gets the queue's"
    );
    // Imported items are counted at once (no reload needed) and leasable.
    assert_eq!(e.stats("q").await.partitions[0].total, 1);
    let l = e.lease("q", 1, "c").await.expect("lease imported");
    assert_eq!(l.items[0].attempts, 3);
    e.c.storage_items_delete(&pb::StorageItemsDeleteRequest {
        queue_name: "q".into(),
        partition: 0,
        ids: vec![l.items[0].id.clone(), "00000000000000ff".into()],
    })
    .await
    .expect("delete ignores unknown ids");
    assert!(e.list("q", 0, false).await.is_empty());
    let err =
        e.c.storage_items_delete(&pb::StorageItemsDeleteRequest {
            queue_name: "q".into(),
            partition: 0,
            ids: vec![],
        })
        .await;
    assert_api(err.expect_err("empty"), 400, "ids is invalid");
    let err =
        e.c.storage_items_list(&pb::StorageItemsListRequest {
            queue_name: "q".into(),
            partition: 9,
            ..Default::default()
        })
        .await;
    assert_api(err.expect_err("partition"), 400, "partition is invalid");
    e.c.queue_reload(&pb::QueueReloadRequest {
        queue_name: "q".into(),
    })
    .await
    .expect("reload");
}

async fn stats_and_metrics(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.produce("q", &["a", "b", "c", "d"]).await;
    let _ = e.lease("q", 1, "c").await.expect("lease");
    e.advance(Duration::from_secs(5)).await;
    let s = e.stats("q").await;
    let p = &s.partitions[0];
    assert_eq!((p.total, p.total_leased, p.scheduled, p.failures), (4, 1, 0, 0));
    assert_eq!(p.average_age, "5s");
    assert_eq!(p.average_leased_age, "55s");
    let m = e.c.metrics().await.expect("metrics");
    assert!(m.contains("lessor_queue_ready_items{queue=\"q\"} 3"), "{m}");
    assert!(m.contains("lessor_queue_produced_total{queue=\"q\"} 4"), "{m}");
    assert!(m.contains("lessor_http_request_duration_seconds_bucket"), "{m}");
    let h = e.c.health().await.expect("health");
    assert_eq!(h["status"], "pass");
    assert_eq!(h["checks"]["queues:storage"][0]["componentType"], "datastore");
}

async fn shutdown_answers_waiting_leases(enc: Encoding) {
    let mut e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    let c = e.c.clone();
    let waiter = tokio::spawn(async move {
        c.queue_lease(&pb::QueueLeaseRequest {
            queue_name: "q".into(),
            batch_size: 1,
            client_id: "w".into(),
            request_timeout: "1m".into(),
        })
        .await
    });
    eventually("lease is waiting", || async {
        e.stats("q").await.lease_waiting == 1
    })
    .await;
    let srv = e.srv.take().expect("server");
    let stopping = tokio::spawn(srv.stop());
    let err = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("answered")
        .expect("join")
        .expect_err("shutdown");
    assert_api(err, 453, "shutting down");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stops")
        .expect("join");
}
