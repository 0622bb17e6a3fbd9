//! The lease lifecycle at its edges: black-box tests through the real server on port 0 with an injected clock, each
//! reproducing a bug a review found (a shortened lease expiring late, ids shared between partitions, a deleted
//! dead-letter queue's name reused by another namespace), and what `queues.delete` with `force` does instead. Run over protobuf and JSON on memory, protobuf on fjall
//! (feature `fjall`) and on PostgreSQL (feature `postgres`, when `LESSOR_TEST_DATABASE_URL` is set).

use std::time::Duration;

use lessor_client::{proto as pb, Client, ClientError, Encoding};
use lessor_core::time::ManualClock;

struct Env {
    c: Client,
    clock: ManualClock,
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

    async fn create(&self, name: &str, f: impl FnOnce(&mut pb::QueueInfo)) {
        lessor_testkit::server::create_queue(&self.c, name, f).await;
    }

    async fn produce(&self, q: &str, texts: &[&str]) {
        self.c
            .queue_produce(&pb::QueueProduceRequest {
                queue_name: q.into(),
                request_timeout: "5s".into(),
                items: texts
                    .iter()
                    .map(|t| pb::QueueProduceItem {
                        bytes: t.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .expect("produce");
    }

    async fn lease(&self, q: &str, n: i32, client: &str) -> pb::QueueLeaseResponse {
        lessor_testkit::server::lease(&self.c, q, n, client)
            .await
            .expect("lease")
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

    /// Advances the clock and lets the server's queue tasks see it.
    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
    }
}

async fn eventually<T, F, Fut>(what: &str, probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    lessor_testkit::eventually(what, Duration::from_secs(5), probe).await
}

lessor_testkit::every_backend!(
    an_extend_that_shortens_a_lease_expires_it_at_the_new_deadline,
    a_complete_naming_the_wrong_partition_cannot_take_another_consumers_item,
);

/// A worker extends its lease to a deadline *earlier* than the one the lease gave (queue lease_timeout 1m, extend
/// by 5 s: a heartbeat shorter than the queue's lease, or a worker handing an item back early). Once the new
/// deadline has passed the lease is over: the item must go back to the queue under a new id, not stay leased until
/// the original minute is up.
///
/// Bug: the queue task only runs a partition's lifecycle when its cached `next_deadline` is due; `extend` never
/// lowers it (lease, retry and produce call `pull_deadline`, extend does not), so the shortened lease is only seen
/// when the original deadline (1 minute) comes.
async fn an_extend_that_shortens_a_lease_expires_it_at_the_new_deadline(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| q.lease_timeout = "1m".into()).await;
    e.produce("q", &["x"]).await;
    let l = e.lease("q", 1, "w1").await;
    let id = l.items[0].id.clone();
    e.extend("q", l.partition, vec![id.clone()], "5s")
        .await
        .expect("extend to 5 s");
    e.advance(Duration::from_secs(6)).await;
    eventually("the shortened lease expires and the item is requeued", || async {
        let items = e.list("q").await;
        if items.len() == 1 && items[0].id != id && !items[0].is_leased {
            Ok(())
        } else {
            // Poke the queue so a pass runs at the new clock.
            e.advance(Duration::from_millis(1)).await;
            Err(format!("{items:?}"))
        }
    })
    .await;
    let again = e.lease("q", 1, "w2").await;
    assert_eq!(again.items.len(), 1, "another worker gets the item");
    assert_eq!(again.items[0].attempts, 2);
}

/// Two consumers hold one item each, in partitions 0 and 1 of the same queue. A complete that names the id of the
/// first with the *other* partition (a client mixing up partitions) must be refused as an unknown id, as in
/// Querator, whose KSUIDs never collide between partitions; it must not complete the second consumer's item.
///
/// Bug: every partition starts its ids at the wall clock in microseconds ([`ItemId::floor_now`]), and memory and
/// fjall round that up to a block of 1,024: partitions opened within the same millisecond hand out the *same* ids,
/// so the first item of partition 0 and the first item of partition 1 have one id, and the wrong-partition complete
/// deletes the other consumer's item.
async fn a_complete_naming_the_wrong_partition_cannot_take_another_consumers_item(enc: Encoding) {
    let e = Env::new(enc).await;
    e.create("q", |q| q.requested_partitions = 2).await;
    // Produce goes to the least-loaded partition: one item each.
    e.produce("q", &["first"]).await;
    e.produce("q", &["second"]).await;
    let a = e.lease("q", 1, "a").await;
    let b = e.lease("q", 1, "b").await;
    assert_ne!(a.partition, b.partition, "one item in each partition");
    let (a_id, b_id) = (a.items[0].id.clone(), b.items[0].id.clone());
    let wrong =
        e.c.queue_complete(&pb::QueueCompleteRequest {
            queue_name: "q".into(),
            partition: b.partition,
            request_timeout: "5s".into(),
            ids: vec![a_id.clone()],
        })
        .await;
    let err = wrong.expect_err(&format!(
        "a's id {a_id} completed in b's partition {} (b holds {b_id} there)",
        b.partition
    ));
    assert_eq!(err.code(), Some(400), "{err:?}");
    assert!(
        err.message()
            .unwrap_or_default()
            .starts_with("invalid storage id;"),
        "{err:?}"
    );
    // b still holds its item and completes it.
    e.c.queue_complete(&pb::QueueCompleteRequest {
        queue_name: "q".into(),
        partition: b.partition,
        request_timeout: "5s".into(),
        ids: vec![b_id],
    })
    .await
    .expect("b completes its own item");
}

/// Team B's queue `b-q` dead-letters into `b-dead` (both in namespace team-b). Team B deletes `b-dead` while `b-q`
/// still names it; team A (queue.create in team-a only) then creates a queue named `b-dead` in team-a. An item of
/// `b-q` dies: its payload must not land in team A's queue. Naming a dead-letter queue needs `queue.produce` in its
/// namespace (docs/security.md), and team A never got that in team-b.
///
/// Bug: `queues.delete` accepts deleting a queue that another queue names as its `dead_queue`, the dangling name is
/// never re-checked, and the dead-letter move writes into whatever queue holds the name now. (Until the name is taken
/// again, the dead items are held invisibly in `b-q`: stats, browse and lists show nothing, and a dead_queue cannot
/// be cleared by `queues.update`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dead_letter_queue_name_taken_by_another_namespace_gets_no_dead_items() {
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
        .queues_create(&queue("b-dead", "team-b", ""))
        .await
        .expect("b-dead");
    admin
        .queues_create(&queue("b-q", "team-b", "b-dead"))
        .await
        .expect("b-q");
    // Team A: a user who may create and read queues in team-a only.
    let attacker = lessor_testkit::server::user_with_role(
        &admin,
        &c,
        "mallory",
        "team-a",
        "owner",
        &["queue.create", "queue.stats", "queue.lease"],
    )
    .await;

    // Team B deletes its dead-letter queue (refusing that is one way to keep the promise), and team A takes the name.
    let refused = admin
        .queues_delete(&pb::QueuesDeleteRequest {
            queue_name: "b-dead".into(),
            ..Default::default()
        })
        .await;
    assert!(
        matches!(&refused, Err(ClientError::Api { code: 400, .. })),
        "deleting a dead-letter queue in use: {refused:?}"
    );
    let _ = attacker.queues_create(&queue("b-dead", "team-a", "")).await;

    // An item of b-q dies.
    admin
        .queue_produce(&pb::QueueProduceRequest {
            queue_name: "b-q".into(),
            request_timeout: "5s".into(),
            items: vec![pb::QueueProduceItem {
                bytes: b"victim".to_vec(),
                ..Default::default()
            }],
        })
        .await
        .expect("produce into b-q");
    let l = lessor_testkit::server::lease(&admin, "b-q", 1, "w")
        .await
        .expect("lease");
    admin
        .queue_retry(&pb::QueueRetryRequest {
            queue_name: "b-q".into(),
            partition: l.partition,
            items: vec![pb::QueueRetryItem {
                id: l.items[0].id.clone(),
                dead: true,
                ..Default::default()
            }],
        })
        .await
        .expect("retry dead");
    // The name stayed team B's, and the dead item reaches team B's queue (polled: the move runs on a later pass).
    let info = admin
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "b-dead".into(),
        })
        .await
        .expect("b-dead exists");
    assert_eq!(
        info.namespace, "team-b",
        "team A took the name of team B's dead-letter queue"
    );
    let payloads =
        lessor_testkit::eventually::poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let admin = admin.clone();
            async move {
                let items = admin
                    .storage_items_list(&pb::StorageItemsListRequest {
                        queue_name: "b-dead".into(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .items;
                if items.is_empty() {
                    return Err("no dead item in b-dead yet".to_string());
                }
                Ok(items.into_iter().map(|i| i.payload).collect::<Vec<_>>())
            }
        })
        .await
        .expect("the dead item reaches team B's dead-letter queue");
    assert_eq!(payloads, vec![b"victim".to_vec()]);
}

/// A dead-letter queue in use: `queues.delete` refuses it (400 naming the rule), and with `force` deletes it after
/// clearing the `dead_queue` of the queue naming it, whose definition then shows none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_dead_letter_queue_in_use_needs_force_and_clears_the_reference() {
    let env = Env::new(Encoding::Protobuf).await;
    env.create("dlq", |_| {}).await;
    env.create("jobs", |q| q.dead_queue = "dlq".into()).await;
    let delete = |force| pb::QueuesDeleteRequest {
        queue_name: "dlq".into(),
        force,
    };
    match env.c.queues_delete(&delete(false)).await {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(code, 400, "{message}");
            assert!(
                message.starts_with("queue_name is invalid; 'dlq' is the dead_queue of another queue"),
                "{message}"
            );
        }
        other => panic!("deleting a dead-letter queue in use: {other:?}"),
    }
    let info = |name: &'static str| {
        let c = env.c.clone();
        async move {
            c.queues_info(&pb::QueuesInfoRequest {
                queue_name: name.into(),
            })
            .await
        }
    };
    assert!(info("dlq").await.is_ok(), "refused delete removed the queue");
    env.c.queues_delete(&delete(true)).await.expect("forced delete");
    assert!(info("dlq").await.is_err(), "dlq still there");
    assert_eq!(info("jobs").await.expect("jobs").dead_queue, "");
}
