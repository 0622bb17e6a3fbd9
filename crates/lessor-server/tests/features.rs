//! Black-box tests of Lessor's extensions to Querator's API (issue 10): lease extension, priorities, idempotent
//! produce, pause and resume, browse, retry backoff and dead-letter redrive, through the real server on port 0 and
//! the client, with an injected clock so leases, backoff and windows never wait on wall time.
//!
//! Each scenario runs over protobuf and JSON on memory storage, and over protobuf on fjall (feature `fjall`) and on
//! PostgreSQL (feature `postgres`, when `LESSOR_TEST_DATABASE_URL` is set), like `api.rs`. Every new 400 is checked
//! for the field it names and the rule it states, and the queue definition is checked to carry the stored values
//! (unset extensions absent from JSON, so Querator's strict clients still read it).

use std::time::Duration;

use lessor_client::{proto as pb, Client, ClientError, Encoding};
use lessor_core::time::{Clock, ManualClock};
use lessor_proto::Timestamp;

tokio::task_local! {
    /// Which backend the current test runs on ("memory", "fjall" or "postgres").
    static BACKEND: &'static str;
}

struct Env {
    c: Client,
    clock: ManualClock,
    /// The server and what keeps its storage alive.
    _srv: lessor_testkit::server::BackendServer,
}

impl Env {
    async fn new(enc: Encoding) -> Env {
        let b = lessor_testkit::server::on_backend(enc).await;
        Env {
            c: b.client.clone(),
            clock: b.clock.clone(),
            _srv: b,
        }
    }

    /// Restarts the server on the same storage (a memory server starts empty: callers skip it there).
    async fn restart(&mut self) {
        self._srv.restart().await;
        self.c = self._srv.client.clone();
    }

    async fn create(&self, name: &str, f: impl FnOnce(&mut pb::QueueInfo)) {
        lessor_testkit::server::create_queue(&self.c, name, f).await;
    }

    async fn produce(&self, q: &str, items: Vec<pb::QueueProduceItem>) -> Result<(), ClientError> {
        self.c
            .queue_produce(&pb::QueueProduceRequest {
                queue_name: q.into(),
                request_timeout: "5s".into(),
                items,
            })
            .await
    }

    async fn lease(&self, q: &str, n: i32, client: &str) -> Result<pb::QueueLeaseResponse, ClientError> {
        lessor_testkit::server::lease(&self.c, q, n, client).await
    }

    /// A lease request that long-polls for up to a minute, run in the background.
    fn lease_later(
        &self,
        q: &str,
        client: &str,
    ) -> tokio::task::JoinHandle<Result<pb::QueueLeaseResponse, ClientError>> {
        let c = self.c.clone();
        let req = pb::QueueLeaseRequest {
            queue_name: q.into(),
            batch_size: 1,
            client_id: client.into(),
            request_timeout: "1m".into(),
        };
        tokio::spawn(async move { c.queue_lease(&req).await })
    }

    async fn extend(
        &self,
        q: &str,
        partition: i32,
        ids: Vec<String>,
        lease: &str,
    ) -> Result<(), ClientError> {
        self.c
            .queue_extend(&pb::QueueExtendRequest {
                queue_name: q.into(),
                partition,
                ids,
                lease_timeout: lease.into(),
                request_timeout: "5s".into(),
            })
            .await
    }

    async fn browse(
        &self,
        q: &str,
        f: impl FnOnce(&mut pb::QueueBrowseRequest),
    ) -> Result<pb::QueueBrowseResponse, ClientError> {
        let mut r = pb::QueueBrowseRequest {
            queue_name: q.into(),
            ..Default::default()
        };
        f(&mut r);
        self.c.queue_browse(&r).await
    }

    async fn list(&self, q: &str) -> Vec<pb::StorageItem> {
        self.c
            .storage_items_list(&pb::StorageItemsListRequest {
                queue_name: q.into(),
                ..Default::default()
            })
            .await
            .expect("list")
            .items
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

    /// Ready + leased items, and scheduled items, over every partition.
    async fn totals(&self, q: &str) -> (i32, i32) {
        let s = self.stats(q).await;
        (
            s.partitions.iter().map(|p| p.total).sum(),
            s.partitions.iter().map(|p| p.scheduled).sum(),
        )
    }

    async fn info(&self, q: &str) -> pb::QueueInfo {
        self.c
            .queues_info(&pb::QueuesInfoRequest { queue_name: q.into() })
            .await
            .expect("info")
    }

    /// `queues.info` as raw JSON, as a Querator client reads it.
    async fn info_json(&self, q: &str) -> serde_json::Value {
        let body = format!(r#"{{"queue_name":"{q}"}}"#);
        let (status, _, bytes) = self
            .c
            .raw(
                "/v1/queues.info",
                Some("application/json"),
                Some("application/json"),
                body,
            )
            .await
            .expect("info");
        assert_eq!(status.as_u16(), 200, "{}", String::from_utf8_lossy(&bytes));
        serde_json::from_slice(&bytes).expect("json")
    }

    /// Advances the clock and lets the server's queue tasks see it.
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

fn item(text: &str) -> pb::QueueProduceItem {
    pb::QueueProduceItem {
        bytes: text.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn with_priority(text: &str, priority: i32) -> pb::QueueProduceItem {
    pb::QueueProduceItem {
        priority,
        ..item(text)
    }
}

fn with_key(text: &str, key: &str) -> pb::QueueProduceItem {
    pb::QueueProduceItem {
        dedup_id: key.into(),
        ..item(text)
    }
}

fn backoff(base: &str, max: &str, factor: f64, jitter: f64) -> pb::RetryBackoff {
    pb::RetryBackoff {
        base: base.into(),
        max: max.into(),
        factor,
        jitter,
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

/// Asserts a refusal: its code, and that its message contains `contains`.
fn assert_api<T: std::fmt::Debug>(r: Result<T, ClientError>, code: i32, contains: &str) {
    let e = r.expect_err("the request should be refused");
    assert_eq!(e.code(), Some(code), "{e:?}");
    let msg = e.message().unwrap_or_default().to_string();
    assert!(
        msg.contains(contains),
        "message {msg:?} should contain {contains:?}"
    );
}

/// Polls (bounded) until `probe` returns `Ok`, for effects the server applies asynchronously after a clock move.
async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    lessor_testkit::eventually(what, Duration::from_secs(5), probe).await
}

/// The value of a per-queue metric in `/metrics`.
async fn metric(e: &Env, name: &str, queue: &str) -> f64 {
    let text = e.c.metrics().await.expect("metrics");
    let prefix = format!("{name}{{queue=\"{queue}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
}

use lessor_proto::querator_keys::QUEUE_INFO as QUERATOR_QUEUE_INFO;

lessor_testkit::every_backend!(
    extend_keeps_an_item_past_its_original_lease,
    extend_of_a_stale_id_changes_nothing,
    extend_past_the_max_lease_and_bad_extends_are_refused,
    priorities_are_served_highest_first,
    dedup_stores_a_key_once_within_its_window,
    dedup_keys_survive_consumption_and_restart,
    pause_holds_leases_until_resume,
    browse_by_state_with_paging_and_holders,
    backoff_schedules_retries,
    queue_info_carries_the_stored_extension_fields,
    redrive_moves_dead_items_back,
);

// ---- lease extension -----------------------------------------------------------------------------------------

/// A worker with a 10 s lease keeps its item for 18 s by extending; an item leased at the same time and not extended
/// goes back to the queue at the original deadline.
async fn extend_keeps_an_item_past_its_original_lease(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| q.lease_timeout = "10s".into()).await;
    e.produce("q", vec![item("kept"), item("dropped")])
        .await
        .expect("produce");
    let l = e.lease("q", 2, "w").await.expect("lease");
    assert_eq!(texts(&l.items), ["kept", "dropped"]);
    let (kept, dropped) = (l.items[0].id.clone(), l.items[1].id.clone());

    e.advance(Duration::from_secs(8)).await;
    e.extend("q", l.partition, vec![kept.clone()], "30s")
        .await
        .expect("extend");
    let deadline = e.now_plus(Duration::from_secs(30));
    let stored = e.list("q").await;
    let k = stored.iter().find(|i| i.id == kept).expect("kept item");
    assert_eq!(
        k.lease_deadline,
        Some(deadline),
        "the deadline is now + lease_timeout"
    );

    // Past the original deadline: the lifecycle pass that requeues "dropped" leaves "kept" leased, same id.
    e.advance(Duration::from_secs(10)).await;
    eventually("the item not extended is requeued", || async {
        let items = e.list("q").await;
        if items.iter().any(|i| i.id == dropped) {
            Err(format!("{items:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    let stored = e.list("q").await;
    let k = stored
        .iter()
        .find(|i| i.id == kept)
        .expect("kept item is still there");
    assert!(k.is_leased, "{k:?}");
    assert_eq!(k.lease_deadline, Some(deadline));
    // An extension with no lease_timeout uses the queue's.
    e.extend("q", l.partition, vec![kept.clone()], "")
        .await
        .expect("extend by the queue's lease_timeout");
    let k = e
        .list("q")
        .await
        .into_iter()
        .find(|i| i.id == kept)
        .expect("kept");
    assert_eq!(k.lease_deadline, Some(e.now_plus(Duration::from_secs(10))));
    e.c.queue_complete(&pb::QueueCompleteRequest {
        queue_name: "q".into(),
        partition: l.partition,
        request_timeout: "5s".into(),
        ids: vec![kept],
    })
    .await
    .expect("the holder completes after 18 s");
    assert_eq!(metric(&e, "lessor_queue_extended_total", "q").await, 2.0);
}

/// An extend naming an id whose lease already ended (the item moved on under a new id) is refused naming that id,
/// and the other ids of the request keep their deadlines.
async fn extend_of_a_stale_id_changes_nothing(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| q.lease_timeout = "10s".into()).await;
    e.produce("q", vec![item("a"), item("b")]).await.expect("produce");
    let a = e.lease("q", 1, "w1").await.expect("lease a");
    e.advance(Duration::from_secs(5)).await;
    let b = e.lease("q", 1, "w2").await.expect("lease b");
    let (a_id, b_id) = (a.items[0].id.clone(), b.items[0].id.clone());
    let b_deadline = b.items[0].lease_deadline;
    e.advance(Duration::from_secs(6)).await;
    eventually("a's lease expires and a moves on", || async {
        let items = e.list("q").await;
        if items.iter().any(|i| i.id == a_id) {
            Err(format!("{items:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    assert_api(
        e.extend("q", 0, vec![b_id.clone(), a_id.clone()], "1m").await,
        400,
        &a_id,
    );
    let stored = e.list("q").await;
    let bi = stored.iter().find(|i| i.id == b_id).expect("b");
    assert_eq!(bi.lease_deadline, b_deadline, "b's lease was not extended");
    // A ready item cannot be extended either.
    let ready = stored.iter().find(|i| !i.is_leased).expect("a, requeued");
    assert_api(
        e.extend("q", 0, vec![ready.id.clone()], "1m").await,
        400,
        "cannot be extended",
    );
}

async fn extend_past_the_max_lease_and_bad_extends_are_refused(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| {
        q.lease_timeout = "30s".into();
        q.max_lease_timeout = "10m".into();
    })
    .await;
    e.produce("q", vec![item("x")]).await.expect("produce");
    let l = e.lease("q", 1, "w").await.expect("lease");
    let id = l.items[0].id.clone();
    let before = e.list("q").await[0].lease_deadline;
    assert_api(
        e.extend("q", 0, vec![id.clone()], "11m").await,
        400,
        "lease_timeout is invalid; cannot be greater than the queue's max_lease_timeout",
    );
    assert_eq!(e.list("q").await[0].lease_deadline, before, "nothing changed");
    e.extend("q", 0, vec![id.clone()], "10m")
        .await
        .expect("up to the max");
    assert_api(
        e.extend("q", 0, vec![], "1m").await,
        400,
        "ids is invalid; list of ids cannot be empty",
    );
    assert_api(
        e.extend("q", 0, vec![id.clone()], "soon").await,
        400,
        "lease_timeout is invalid; invalid duration 'soon'",
    );
    assert_api(
        e.extend("q", 0, vec![id.clone()], "0s").await,
        400,
        "lease_timeout is invalid; must be greater than 0",
    );
    assert_api(
        e.extend("q", 0, vec!["zz".into()], "1m").await,
        400,
        "invalid storage id; 'zz'",
    );
    assert_api(
        e.extend("q", 7, vec![id.clone()], "1m").await,
        400,
        "partition is invalid; '7' is not a valid partition",
    );
    assert_api(
        e.extend("nope", 0, vec![id], "1m").await,
        400,
        "queue does not exist",
    );
    // Without max_lease_timeout, the expire_timeout bounds an extension.
    e.create("q2", |q| q.expire_timeout = "1h".into()).await;
    e.produce("q2", vec![item("y")]).await.expect("produce");
    let l = e.lease("q2", 1, "w").await.expect("lease");
    assert_api(
        e.extend("q2", 0, ids(&l.items), "2h").await,
        400,
        "lease_timeout is invalid; cannot be greater than the queue's max_lease_timeout",
    );
}

// ---- priorities ----------------------------------------------------------------------------------------------

async fn priorities_are_served_highest_first(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.produce(
        "q",
        vec![
            with_priority("low-1", 0),
            with_priority("mid-1", 5),
            with_priority("top", 9),
            with_priority("mid-2", 5),
            with_priority("low-2", 0),
        ],
    )
    .await
    .expect("produce");
    let l = e.lease("q", 5, "w").await.expect("lease");
    assert_eq!(texts(&l.items), ["top", "mid-1", "mid-2", "low-1", "low-2"]);
    let prios: Vec<i32> = l.items.iter().map(|i| i.priority).collect();
    assert_eq!(prios, [9, 5, 5, 0, 0], "lease items carry their priority");
    // A later high-priority item overtakes earlier low ones.
    e.produce("q", vec![with_priority("a", 1), with_priority("b", 1)])
        .await
        .expect("produce");
    e.produce("q", vec![with_priority("urgent", 8)])
        .await
        .expect("produce");
    assert_eq!(
        texts(&e.lease("q", 1, "w").await.expect("lease").items),
        ["urgent"]
    );

    assert_api(
        e.produce("q", vec![item("ok"), with_priority("neg", -1)]).await,
        400,
        "items[1].priority is invalid; must be between 0 and 9, got '-1'",
    );
    assert_api(
        e.produce("q", vec![with_priority("big", 10)]).await,
        400,
        "items[0].priority is invalid; must be between 0 and 9, got '10'",
    );
    assert_eq!(
        e.totals("q").await.0,
        8,
        "refused requests stored nothing (5 + 3 produced)"
    );
    // Storage lists carry the priority, and an import keeps it.
    let listed = e.list("q").await;
    assert!(listed.iter().any(|i| i.priority == 9) && listed.iter().any(|i| i.priority == 0));
    let import = |priority: i32| pb::StorageItemsImportRequest {
        queue_name: "q".into(),
        partition: 0,
        items: vec![pb::StorageItem {
            payload: b"imported".to_vec(),
            priority,
            ..Default::default()
        }],
    };
    assert_api(
        e.c.storage_items_import(&import(12)).await,
        400,
        "items[0].priority is invalid; must be between 0 and 9, got '12'",
    );
    let out = e.c.storage_items_import(&import(6)).await.expect("import");
    assert_eq!(out.items[0].priority, 6);
    let back = e.list("q").await;
    assert!(
        back.iter().any(|i| i.payload == b"imported" && i.priority == 6),
        "{back:?}"
    );
}

// ---- idempotent produce ----------------------------------------------------------------------------------------

async fn dedup_stores_a_key_once_within_its_window(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| q.requested_partitions = 3).await;
    // The same key in one request, in later requests, and (with three partitions) wherever they land.
    e.produce(
        "q",
        vec![with_key("first", "order-1"), with_key("again", "order-1")],
    )
    .await
    .expect("produce");
    for n in 0..5 {
        e.produce("q", vec![with_key(&format!("retry-{n}"), "order-1")])
            .await
            .expect("a duplicate is acknowledged");
    }
    e.produce(
        "q",
        vec![with_key("other", "order-2"), item("no key"), item("no key")],
    )
    .await
    .expect("produce");
    assert_eq!(
        e.totals("q").await.0,
        4,
        "order-1 once, order-2 once, two items without a key"
    );
    // One lease answers from one partition: lease until the four items are out (the manual clock never lets a
    // lease on an empty queue time out, so never ask for more than is there).
    let mut got = Vec::new();
    while got.len() < 4 {
        got.extend(texts(&e.lease("q", 10, "w").await.expect("lease").items));
    }
    got.sort();
    assert_eq!(got, ["first", "no key", "no key", "other"]);
    assert!(metric(&e, "lessor_queue_deduplicated_total", "q").await >= 6.0);
    assert!(metric(&e, "lessor_queue_dedup_keys", "q").await >= 1.0);

    // Consuming the item does not end the window; the window's end does.
    e.produce("q", vec![with_key("late", "order-1")])
        .await
        .expect("produce");
    assert_eq!(e.totals("q").await.0, 4, "still within the window");
    e.advance(Duration::from_secs(5 * 60 + 1)).await;
    e.produce("q", vec![with_key("next window", "order-1")])
        .await
        .expect("produce");
    assert_eq!(e.totals("q").await.0, 5, "a new window stores the key again");

    // Bad keys. An empty key is "no key" (proto3 cannot tell it from an absent one).
    assert_api(
        e.produce("q", vec![with_key("x", &"k".repeat(129))]).await,
        400,
        "items[0].dedup_id is invalid; cannot be longer than 128 bytes, got 129",
    );
    assert_api(
        e.produce("q", vec![item("ok"), with_key("x", "a\u{7}b")]).await,
        400,
        "items[1].dedup_id is invalid; cannot contain control characters",
    );
    assert_api(
        e.produce("q", vec![with_key("x", "   ")]).await,
        400,
        "items[0].dedup_id is invalid; cannot be only white space",
    );
    e.produce("q", vec![with_key("max", &"k".repeat(128))])
        .await
        .expect("128 bytes is allowed");
}

/// Keys of items consumed, leased or waiting, spread over several partitions, are still refused after a restart
/// (persistent backends): the queue-wide index is rebuilt from the partitions' records, which the partitions keep
/// without checking them.
async fn dedup_keys_survive_consumption_and_restart(enc: Encoding) {
    let mut e = Env::new(enc).await;
    e.create("q", |q| q.requested_partitions = 3).await;
    for n in 0..12 {
        e.produce("q", vec![with_key(&format!("item-{n}"), &format!("key-{n}"))])
            .await
            .expect("produce");
    }
    let per_partition: Vec<i32> = e.stats("q").await.partitions.iter().map(|p| p.total).collect();
    assert!(
        per_partition.iter().filter(|n| **n > 0).count() >= 2,
        "the keys are spread over partitions: {per_partition:?}"
    );
    // Consume half of them: leased items are completed per partition.
    let mut consumed = 0;
    while consumed < 6 {
        let l = e.lease("q", 1, "w").await.expect("lease");
        for it in l.items {
            e.c.queue_complete(&pb::QueueCompleteRequest {
                queue_name: "q".into(),
                partition: l.partition,
                request_timeout: "5s".into(),
                ids: vec![it.id],
            })
            .await
            .expect("complete");
            consumed += 1;
        }
    }
    assert_eq!(e.totals("q").await.0, 6);
    if e._srv.backend() != "memory" {
        e.restart().await;
        assert_eq!(e.totals("q").await.0, 6, "nothing lost in the restart");
    }
    let again: Vec<pb::QueueProduceItem> = (0..12)
        .map(|n| with_key(&format!("again-{n}"), &format!("key-{n}")))
        .chain([with_key("fresh", "key-new")])
        .collect();
    e.produce("q", again).await.expect("produce");
    assert_eq!(
        e.totals("q").await.0,
        7,
        "every old key refused (consumed or not), the new one stored"
    );
    e.advance(Duration::from_secs(5 * 60 + 1)).await;
    e.produce("q", vec![with_key("next window", "key-0")])
        .await
        .expect("produce");
    assert_eq!(e.totals("q").await.0, 8, "a new window stores the key again");
}

// ---- pause and resume ------------------------------------------------------------------------------------------

async fn pause_holds_leases_until_resume(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.c.queue_pause(&pb::QueuePauseRequest {
        queue_name: "q".into(),
    })
    .await
    .expect("pause");
    assert!(e.info("q").await.paused);
    assert_eq!(e.info_json("q").await["paused"], true);
    let waiter = e.lease_later("q", "w");
    eventually("the lease waits", || async {
        let n = e.stats("q").await.lease_waiting;
        if n == 1 {
            Ok(())
        } else {
            Err(format!("{n} waiting"))
        }
    })
    .await;
    e.produce("q", vec![item("held")])
        .await
        .expect("produce is accepted while paused");
    // The item is stored and the lease still waits for it.
    assert_eq!(e.totals("q").await.0, 1);
    assert_eq!(e.stats("q").await.lease_waiting, 1);
    assert!(!waiter.is_finished(), "a paused queue serves no lease");
    // Pausing twice is fine; a short lease on a paused queue times out on the clock.
    e.c.queue_pause(&pb::QueuePauseRequest {
        queue_name: "q".into(),
    })
    .await
    .expect("pause again");

    e.c.queue_resume(&pb::QueueResumeRequest {
        queue_name: "q".into(),
    })
    .await
    .expect("resume");
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiting lease is served on resume")
        .expect("join")
        .expect("lease");
    assert_eq!(texts(&got.items), ["held"]);
    assert!(!e.info("q").await.paused);
    assert!(e.info_json("q").await.get("paused").is_none(), "false is omitted");

    assert_api(
        e.c.queue_pause(&pb::QueuePauseRequest {
            queue_name: "nope".into(),
        })
        .await,
        400,
        "queue does not exist",
    );
    assert_api(
        e.c.queue_resume(&pb::QueueResumeRequest {
            queue_name: String::new(),
        })
        .await,
        400,
        "queue_name is invalid; cannot be empty",
    );
    // A queue created paused starts paused; an update does not unpause it.
    e.create("p", |q| q.paused = true).await;
    e.c.queues_update(&pb::QueueInfo {
        queue_name: "p".into(),
        reference: "r".into(),
        ..Default::default()
    })
    .await
    .expect("update");
    assert!(e.info("p").await.paused);
}

// ---- browse ----------------------------------------------------------------------------------------------------

async fn browse_by_state_with_paging_and_holders(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |_| {}).await;
    e.produce(
        "q",
        vec![
            item("0"),
            with_priority("1", 3),
            item("2"),
            with_priority("3", 3),
            item("4"),
        ],
    )
    .await
    .expect("produce");
    let later = pb::QueueProduceItem {
        enqueue_at: Some(e.now_plus(Duration::from_secs(3600))),
        ..item("later")
    };
    e.produce("q", vec![later]).await.expect("produce scheduled");
    let l = e.lease("q", 2, "worker-7").await.expect("lease");
    assert_eq!(texts(&l.items), ["1", "3"], "priority 3 first");

    // Everything queued (ready and leased), two at a time.
    let mut seen = Vec::new();
    let mut pivot = String::new();
    for _ in 0..10 {
        let page = e
            .browse("q", |r| {
                r.limit = 2;
                r.pivot = pivot.clone();
            })
            .await
            .expect("browse");
        assert!(page.items.len() <= 2);
        seen.extend(
            page.items
                .iter()
                .map(|i| String::from_utf8_lossy(&i.payload).into_owned()),
        );
        if page.next_pivot.is_empty() {
            break;
        }
        pivot = page.next_pivot;
    }
    // Id order: production order within each priority (memory and fjall give each priority ids from blocks of its
    // own, so the priorities' items need not interleave as they were produced).
    let mut all = seen.clone();
    all.sort();
    assert_eq!(all, ["0", "1", "2", "3", "4"], "every queued item once");
    let of = |want: &[&str]| -> Vec<String> {
        seen.iter()
            .filter(|s| want.contains(&s.as_str()))
            .cloned()
            .collect()
    };
    assert_eq!(
        of(&["0", "2", "4"]),
        ["0", "2", "4"],
        "priority 0 in production order"
    );
    assert_eq!(of(&["1", "3"]), ["1", "3"], "priority 3 in production order");

    let leased = e
        .browse("q", |r| r.state = "leased".into())
        .await
        .expect("browse");
    assert_eq!(leased.items.len(), 2);
    for it in &leased.items {
        assert_eq!((it.state.as_str(), it.holder.as_str()), ("leased", "worker-7"));
        assert_eq!(it.lease_deadline, Some(e.now_plus(Duration::from_secs(60))));
        assert_eq!((it.priority, it.attempts), (3, 1));
    }
    let ready = e.browse("q", |r| r.state = "ready".into()).await.expect("browse");
    let ready_texts: Vec<_> = ready
        .items
        .iter()
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect();
    assert_eq!(ready_texts, ["0", "2", "4"]);
    assert!(ready
        .items
        .iter()
        .all(|i| i.state == "ready" && i.holder.is_empty() && i.lease_deadline.is_none()));
    let scheduled = e
        .browse("q", |r| r.state = "scheduled".into())
        .await
        .expect("browse");
    assert_eq!(scheduled.items.len(), 1);
    assert_eq!(scheduled.items[0].state, "scheduled");
    assert_eq!(
        scheduled.items[0].enqueue_at,
        Some(e.now_plus(Duration::from_secs(3600)))
    );
    // The priority filter: 0 is a filter, not "any".
    let p0 = e.browse("q", |r| r.priority = Some(0)).await.expect("browse");
    assert_eq!(p0.items.len(), 3);
    let p3 = e
        .browse("q", |r| {
            r.priority = Some(3);
            r.state = "leased".into();
        })
        .await
        .expect("browse");
    assert_eq!(p3.items.len(), 2);
    // Browsing leased nothing: the lease is untouched and nothing else was leased.
    let s = e.stats("q").await;
    assert_eq!((s.partitions[0].total, s.partitions[0].total_leased), (5, 2));

    assert_api(
        e.browse("q", |r| r.state = "dead".into()).await,
        400,
        "state is invalid; must be one of 'ready', 'leased', 'scheduled' or empty, got 'dead'",
    );
    assert_api(
        e.browse("q", |r| r.limit = 1001).await,
        400,
        "limit is invalid; must be between 1 and 1000",
    );
    assert_api(
        e.browse("q", |r| r.limit = -1).await,
        400,
        "limit is invalid; must be between 1 and 1000",
    );
    assert_api(
        e.browse("q", |r| r.priority = Some(-1)).await,
        400,
        "priority is invalid; must be between 0 and 9, got '-1'",
    );
    assert_api(
        e.browse("q", |r| r.pivot = "xyz".into()).await,
        400,
        "invalid storage id; 'xyz'",
    );
    assert_api(
        e.browse("q", |r| r.partition = 3).await,
        400,
        "partition is invalid; '3' is not a valid partition",
    );
    assert_api(e.browse("nope", |_| {}).await, 400, "queue does not exist");
}

// ---- retry backoff ---------------------------------------------------------------------------------------------

async fn backoff_schedules_retries(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| {
        q.lease_timeout = "30s".into();
        q.retry_backoff = Some(pb::RetryBackoff {
            base: "10s".into(),
            max: "1m".into(),
            factor: 2.0,
            jitter: 0.0,
        });
    })
    .await;
    e.produce("q", vec![item("flaky")]).await.expect("produce");
    let l = e.lease("q", 1, "w").await.expect("lease");
    // A retry without retry_at waits base × factor^0 = 10 s in the schedule.
    e.c.queue_retry(&pb::QueueRetryRequest {
        queue_name: "q".into(),
        partition: l.partition,
        items: vec![pb::QueueRetryItem {
            id: l.items[0].id.clone(),
            retry_at: None,
            dead: false,
        }],
    })
    .await
    .expect("retry");
    let scheduled = e
        .browse("q", |r| r.state = "scheduled".into())
        .await
        .expect("browse");
    assert_eq!(scheduled.items.len(), 1, "{scheduled:?}");
    assert_eq!(
        scheduled.items[0].enqueue_at,
        Some(e.now_plus(Duration::from_secs(10)))
    );
    assert_eq!(e.totals("q").await, (0, 1));
    // A lease waits for it (the manual clock stands still, so the wait ends only when the item is due).
    let waiter = e.lease_later("q", "w");
    e.advance(Duration::from_secs(9)).await;
    assert_eq!(e.totals("q").await, (0, 1), "not due after 9 s");
    assert!(!waiter.is_finished());
    e.advance(Duration::from_secs(1)).await;
    let again = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the item is due after 10 s")
        .expect("join")
        .expect("lease");
    assert_eq!(texts(&again.items), ["flaky"]);
    assert_eq!(again.items[0].attempts, 2);
    // Its lease expires: the second backoff is 10 s × 2 = 20 s.
    e.advance(Duration::from_secs(30)).await;
    let s = eventually("the expired lease is scheduled", || async {
        let page = e
            .browse("q", |r| r.state = "scheduled".into())
            .await
            .map_err(|e| e.to_string())?;
        if page.items.len() == 1 {
            Ok(page)
        } else {
            Err(format!("{page:?}"))
        }
    })
    .await;
    assert_eq!(s.items[0].enqueue_at, Some(e.now_plus(Duration::from_secs(20))));
}

// ---- queue definitions -------------------------------------------------------------------------------------------

async fn queue_info_carries_the_stored_extension_fields(enc: Encoding) {
    let e = Env::new(enc).await;
    // Unset extensions stay unset: zero on the wire, absent from JSON (never the 5m dedup default).
    e.create("plain", |_| {}).await;
    let info = e.info("plain").await;
    assert_eq!(
        (
            info.dedup_window.as_str(),
            info.retry_backoff.is_none(),
            info.paused,
            info.max_lease_timeout.as_str()
        ),
        ("", true, false, "")
    );
    let json = e.info_json("plain").await;
    for k in json.as_object().expect("object").keys() {
        assert!(QUERATOR_QUEUE_INFO.contains(&k.as_str()), "'{k}' in {json}");
    }
    // The lease reply of a priority-0 item has Querator's fields only.
    e.produce("plain", vec![item("x")]).await.expect("produce");
    let (_, _, body) =
        e.c.raw(
            "/v1/queue.lease",
            Some("application/json"),
            Some("application/json"),
            r#"{"queue_name":"plain","batch_size":1,"client_id":"c","request_timeout":"5s"}"#,
        )
        .await
        .expect("lease");
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert!(v["items"][0].get("priority").is_none(), "{v}");

    e.create("full", |q| {
        q.dedup_window = "10m".into();
        q.max_lease_timeout = "2h".into();
        q.retry_backoff = Some(pb::RetryBackoff {
            base: "1s".into(),
            max: "5m".into(),
            factor: 3.0,
            jitter: 0.25,
        });
    })
    .await;
    let info = e.info("full").await;
    assert_eq!(info.dedup_window, "10m0s");
    assert_eq!(info.max_lease_timeout, "2h0m0s");
    assert_eq!(
        info.retry_backoff,
        Some(pb::RetryBackoff {
            base: "1s".into(),
            max: "5m0s".into(),
            factor: 3.0,
            jitter: 0.25,
        })
    );
    // An update changes only what it sets.
    e.c.queues_update(&pb::QueueInfo {
        queue_name: "full".into(),
        dedup_window: "1m".into(),
        ..Default::default()
    })
    .await
    .expect("update");
    let info = e.info("full").await;
    assert_eq!(
        (info.dedup_window.as_str(), info.max_lease_timeout.as_str()),
        ("1m0s", "2h0m0s")
    );
    assert!(info.retry_backoff.is_some());
    // An empty backoff turns it off; "0s" resets max_lease_timeout to "the expire timeout".
    e.c.queues_update(&pb::QueueInfo {
        queue_name: "full".into(),
        retry_backoff: Some(pb::RetryBackoff::default()),
        max_lease_timeout: "0s".into(),
        ..Default::default()
    })
    .await
    .expect("update");
    let info = e.info("full").await;
    assert_eq!(
        (info.retry_backoff.is_none(), info.max_lease_timeout.as_str()),
        (true, "")
    );
    assert_eq!(info.dedup_window, "1m0s");

    // Bad values name the field and the rule.
    let bad = |f: fn(&mut pb::QueueInfo)| {
        let mut q = pb::QueueInfo {
            queue_name: "bad".into(),
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
            bad(|q| q.dedup_window = "often".into()),
            "dedup_window is invalid; invalid duration 'often'",
        ),
        (
            bad(|q| q.dedup_window = "169h".into()),
            "dedup_window is invalid; cannot be greater than '168h'",
        ),
        (
            bad(|q| q.max_lease_timeout = "2h".into()),
            "max_lease_timeout is invalid; cannot be greater than the expire_timeout",
        ),
        (
            bad(|q| q.max_lease_timeout = "30s".into()),
            "max_lease_timeout is invalid; cannot be less than the lease_timeout",
        ),
        (
            bad(|q| q.retry_backoff = Some(backoff("x", "", 0.0, 0.0))),
            "retry_backoff.base is invalid; invalid duration 'x'",
        ),
        (
            bad(|q| q.retry_backoff = Some(backoff("1m", "1s", 0.0, 0.0))),
            "retry_backoff.max is invalid; cannot be less than retry_backoff.base",
        ),
        (
            bad(|q| q.retry_backoff = Some(backoff("1s", "", 0.5, 0.0))),
            "retry_backoff.factor is invalid; must be between 1 and 100 (0 means 2), got '0.5'",
        ),
        (
            bad(|q| q.retry_backoff = Some(backoff("1s", "", 2.0, 1.5))),
            "retry_backoff.jitter is invalid; must be between 0 and 1, got '1.5'",
        ),
    ] {
        assert_api(e.c.queues_create(&q).await, 400, msg);
    }
    assert_api(
        e.c.queues_update(&pb::QueueInfo {
            queue_name: "full".into(),
            retry_backoff: Some(backoff("1s", "", f64::NAN, 0.0)),
            ..Default::default()
        })
        .await,
        400,
        "retry_backoff.factor is invalid",
    );
}

// ---- redrive -----------------------------------------------------------------------------------------------------

async fn redrive_moves_dead_items_back(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("dlq", |_| {}).await;
    e.create("src", |q| {
        q.dead_queue = "dlq".into();
        q.max_attempts = 1;
    })
    .await;
    e.create("elsewhere", |_| {}).await;
    e.produce("src", vec![item("a"), item("b"), item("c")])
        .await
        .expect("produce");
    let l = e.lease("src", 3, "w").await.expect("lease");
    e.c.queue_retry(&pb::QueueRetryRequest {
        queue_name: "src".into(),
        partition: l.partition,
        items: l
            .items
            .iter()
            .map(|i| pb::QueueRetryItem {
                id: i.id.clone(),
                retry_at: None,
                dead: true,
            })
            .collect(),
    })
    .await
    .expect("dead");
    eventually("three items in the dead-letter queue", || async {
        let t = e.totals("dlq").await;
        if t.0 == 3 {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;

    let task =
        e.c.queue_redrive(&pb::QueueRedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("redrive");
    assert_eq!(
        (task.dead_queue.as_str(), task.status.as_str()),
        ("dlq", "running")
    );
    assert!(!task.task_id.is_empty());
    let done = eventually("the redrive completes", || async {
        let t =
            e.c.redrive_get(&pb::RedriveTaskRequest {
                task_id: task.task_id.clone(),
                dead_queue: String::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
        if t.status == "completed" {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await;
    assert_eq!(done.moved, 3);
    assert_eq!(e.totals("dlq").await.0, 0);
    let back = e.lease("src", 3, "w").await.expect("the items are back");
    let mut got = texts(&back.items);
    got.sort();
    assert_eq!(got, ["a", "b", "c"]);
    assert!(
        back.items.iter().all(|i| i.attempts == 1),
        "attempts reset: {back:?}"
    );

    let listed =
        e.c.redrive_list(&pb::RedriveListRequest {
            dead_queue: "dlq".into(),
        })
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].task_id, task.task_id);
    assert!(e
        .c
        .redrive_list(&pb::RedriveListRequest {
            dead_queue: "src".into()
        })
        .await
        .expect("list")
        .items
        .is_empty());
    // A finished task cancels to itself; a task asked for under another queue does not exist.
    let c =
        e.c.redrive_cancel(&pb::RedriveTaskRequest {
            task_id: task.task_id.clone(),
            dead_queue: "dlq".into(),
        })
        .await
        .expect("cancel");
    assert_eq!(c.status, "completed");
    let wrong = pb::RedriveTaskRequest {
        task_id: task.task_id.clone(),
        dead_queue: "elsewhere".into(),
    };
    let msg = format!("task_id is invalid; no redrive task '{}'", task.task_id);
    assert_api(e.c.redrive_get(&wrong).await, 400, &msg);
    assert_api(e.c.redrive_cancel(&wrong).await, 400, &msg);
    assert_api(
        e.c.redrive_get(&pb::RedriveTaskRequest {
            task_id: "rd-nope".into(),
            dead_queue: String::new(),
        })
        .await,
        400,
        "task_id is invalid; no redrive task 'rd-nope'",
    );

    // Bad requests.
    let r = |f: fn(&mut pb::QueueRedriveRequest)| {
        let mut r = pb::QueueRedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (req, msg) in [
        (
            r(|r| r.dead_queue = "elsewhere".into()),
            "dead_queue is invalid; 'elsewhere' is not the dead_queue of any queue",
        ),
        (r(|r| r.dead_queue = "nope".into()), "queue does not exist"),
        (
            r(|r| r.rate_per_sec = -1),
            "rate_per_sec is invalid; cannot be negative",
        ),
        (
            r(|r| r.max_items = -5),
            "max_items is invalid; cannot be negative",
        ),
        (
            r(|r| r.target_queue = "dlq".into()),
            "target_queue is invalid; cannot be the dead-letter queue itself",
        ),
        (
            r(|r| r.target_queue = "missing".into()),
            "target_queue is invalid; queue 'missing' does not exist",
        ),
    ] {
        assert_api(e.c.queue_redrive(&req).await, 400, msg);
    }
}

// ---- permissions -------------------------------------------------------------------------------------------------

/// With auth on, the extension routes need the permissions docs/security.md lists: a key allowed only
/// `queue.stats` in its namespace may browse but not pause or extend, and a redrive into another namespace's queue
/// needs `queue.produce` there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_routes_check_their_permissions() {
    let (_srv, c, admin) = lessor_testkit::server::with_auth(&["team-a", "team-b"]).await;
    let queue = |name: &str, ns: &str, dead: &str| pb::QueueInfo {
        queue_name: name.into(),
        namespace: ns.into(),
        dead_queue: dead.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    };
    admin
        .queues_create(&queue("a-dlq", "team-a", ""))
        .await
        .expect("queue");
    admin
        .queues_create(&queue("a-src", "team-a", "a-dlq"))
        .await
        .expect("queue");
    admin
        .queues_create(&queue("a-other", "team-a", ""))
        .await
        .expect("queue");
    admin
        .queues_create(&queue("b-q", "team-b", ""))
        .await
        .expect("queue");

    // A user who may operate team-a's queues but not produce anywhere, and a viewer who may only read them.
    let key_for = |user: &'static str, perms: &'static [&'static str]| {
        lessor_testkit::server::user_with_role(&admin, &c, user, "team-a", user, perms)
    };
    let operator = key_for("operator", &["queue.update", "queue.stats", "queue.produce"]).await;
    let viewer = key_for("viewer", &["queue.stats"]).await;

    let browse = pb::QueueBrowseRequest {
        queue_name: "a-src".into(),
        ..Default::default()
    };
    viewer
        .queue_browse(&browse)
        .await
        .expect("queue.stats may browse");
    let pause = pb::QueuePauseRequest {
        queue_name: "a-src".into(),
    };
    assert_api(viewer.queue_pause(&pause).await, 403, "access denied");
    operator
        .queue_pause(&pause)
        .await
        .expect("queue.update may pause");
    operator
        .queue_resume(&pb::QueueResumeRequest {
            queue_name: "a-src".into(),
        })
        .await
        .expect("and resume");
    assert_api(
        viewer
            .queue_extend(&pb::QueueExtendRequest {
                queue_name: "a-src".into(),
                ids: vec!["0000000000000001".into()],
                request_timeout: "5s".into(),
                ..Default::default()
            })
            .await,
        403,
        "access denied",
    );
    // Another namespace's queue is out of reach, and looks like a missing one.
    let b_browse = pb::QueueBrowseRequest {
        queue_name: "b-q".into(),
        ..Default::default()
    };
    assert_api(viewer.queue_browse(&b_browse).await, 403, "access denied");

    // Redrive: queue.update on the dead-letter queue, plus queue.produce on a named target.
    let redrive = |target: &str| pb::QueueRedriveRequest {
        dead_queue: "a-dlq".into(),
        target_queue: target.into(),
        ..Default::default()
    };
    assert_api(viewer.queue_redrive(&redrive("")).await, 403, "access denied");
    assert_api(
        operator.queue_redrive(&redrive("b-q")).await,
        403,
        "access denied",
    );
    let task = operator
        .queue_redrive(&redrive("a-other"))
        .await
        .expect("a redrive within team-a");
    let get = |dead_queue: &str| pb::RedriveTaskRequest {
        task_id: task.task_id.clone(),
        dead_queue: dead_queue.into(),
    };
    viewer
        .redrive_get(&get("a-dlq"))
        .await
        .expect("queue.stats reads the task");
    viewer
        .redrive_list(&pb::RedriveListRequest {
            dead_queue: "a-dlq".into(),
        })
        .await
        .expect("and lists its queue's tasks");
    // A bare task id or list is a `_system` request: administrators only.
    assert_api(viewer.redrive_get(&get("")).await, 403, "access denied");
    assert_api(
        viewer.redrive_list(&pb::RedriveListRequest::default()).await,
        403,
        "access denied",
    );
    admin
        .redrive_get(&get(""))
        .await
        .expect("the admin reads any task");
    assert_api(viewer.redrive_cancel(&get("a-dlq")).await, 403, "access denied");
    operator
        .redrive_cancel(&get("a-dlq"))
        .await
        .expect("queue.update cancels");
    // Sweeping object storage is server-wide (`queue.clear` in `_system`): not for a namespace's users; the admin
    // gets through to the handler, which says this server has no object storage.
    let sweep = pb::OffloadSweepRequest::default();
    assert_api(viewer.offload_sweep(&sweep).await, 403, "access denied");
    assert_api(operator.offload_sweep(&sweep).await, 403, "access denied");
    assert_api(admin.offload_sweep(&sweep).await, 400, "no object storage; ");
}
