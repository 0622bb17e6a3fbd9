//! The storage conformance suite: every rule of the storage contract, written once and run against every backend.
//!
//! A backend's test file calls [`conformance_tests!`](crate::conformance_tests) with an async function that returns
//! a [`TestBackend`]; the macro expands to one `#[tokio::test]` per case, so a failure names its case. Every case uses
//! its own queue name, so backends that share a database between tests stay isolated.
//!
//! Compiled only with the `testsuite` feature (the crate's own tests turn it on through a dev-dependency on
//! itself), so the library that ships carries none of it. A case is a `pub async fn <name>(b: TestBackend)` at the
//! top level of this file; a unit test below fails when one is missing from the macro's list, so a new case cannot
//! silently never run. The auth store's cases live in [`auth`], and the cases of lease extension, priorities, retry
//! backoff and deduplication in [`features`]; both are listed the same way.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::error::{ItemError, StorageErrorKind};
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, QueuesStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{
    Backoff, ClearRequest, Item, ItemId, NewItem, PartitionInfo, QueueInfo, TierFigures, TierStats,
};

pub mod auth;
pub mod features;

/// What a backend hands the suite.
pub struct TestBackend {
    /// The partition store under test.
    pub partitions: Arc<dyn PartitionStore>,
    /// The queue store under test.
    pub queues: Arc<dyn QueuesStore>,
    /// Anything that must live as long as the test (a temp dir, a database handle).
    pub guard: Box<dyn Any + Send>,
    /// A second handle on the same queue store, as another server sharing it would open it (`None` when one
    /// process alone can open the store).
    pub peer: Option<Arc<dyn QueuesStore>>,
    /// Whether this case is the only user of the auth store (not a database shared with other cases), so that
    /// exact generations and the one-time bootstrap can be asserted.
    pub private_auth: bool,
    /// With the offload wrapper: payloads longer than this many bytes go to object storage (`None`: bare store).
    pub offload_threshold: Option<usize>,
    /// A fjall store with paging: at most this many ready items per partition in memory, the rest on disk only.
    pub memory_window: Option<usize>,
}

/// A fixed instant all cases count from.
pub const T0: Ts = Ts(1_800_000_000_000_000);
const SEC: Duration = Duration::from_secs(1);
const NO_DLQ: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 0,
    has_dead_queue: false,
    backoff: Backoff::OFF,
};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A queue name unique to this process and run.
pub fn unique_queue(case: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{case}-{pid}-{n}-{}", t % 1_000_000_000)
}

fn item(payload: &str) -> NewItem {
    NewItem {
        source_id: String::new(),
        enqueue_at: Ts::ZERO,
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        reference: format!("ref-{payload}"),
        encoding: "text/plain".into(),
        kind: "test".into(),
        payload: Bytes::from(payload.to_string()),
        ..Default::default()
    }
}

fn items(n: usize) -> Vec<NewItem> {
    (0..n).map(|i| item(&format!("p{i}"))).collect()
}

fn payloads(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect()
}

async fn open(b: &TestBackend, case: &str) -> Arc<dyn Partition> {
    b.partitions
        .open(&unique_queue(case), 0)
        .await
        .expect("open partition")
}

/// Produced items lease in FIFO order with their fields intact, each with a deadline and one attempt.
pub async fn produce_then_lease_in_fifo_order(b: TestBackend) {
    let p = open(&b, "fifo").await;
    let ids = p.produce(items(5)).await.expect("produce");
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids must grow: {ids:?}");
    let got = p.lease(3, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(payloads(&got), vec!["p0", "p1", "p2"]);
    for it in &got {
        assert!(it.is_leased);
        assert_eq!(it.attempts, 1);
        assert_eq!(it.lease_deadline, T0.add(SEC * 60));
        assert_eq!(it.encoding, "text/plain");
        assert_eq!(it.kind, "test");
        assert_eq!(it.created_at, T0);
        assert_eq!(it.expire_deadline, T0.add(SEC * 3600));
    }
    assert_eq!(got[0].reference, "ref-p0");
    let rest = p.lease(10, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(payloads(&rest), vec!["p3", "p4"]);
    assert!(p.lease(10, T0).await.expect("lease").is_empty());
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (0, 5, 0));
}

/// A lease bounded in bytes stops before the item that would take it over the bound, always takes the first item
/// however large, tells that it stopped with ready items left, and the next lease goes on from there in order
/// (priorities too); a bound that is never met reports nothing left.
pub async fn lease_within_stops_at_the_byte_bound(b: TestBackend) {
    let p = open(&b, "lease-bytes").await;
    // Bytes that do not compress, so that a store that compresses payloads (and counts what it stores) sees
    // about the same sizes.
    let big = |tag: &str, len: usize, priority: u8| {
        let mut x = len as u64 | 1;
        let mut payload = tag.as_bytes().to_vec();
        payload.extend((tag.len()..len).map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        }));
        NewItem {
            payload: Bytes::from(payload),
            priority,
            ..item(tag)
        }
    };
    p.produce(vec![
        big("a", 4000, 0),
        big("b", 4000, 0),
        big("c", 10_000, 0),
        big("d", 100, 0),
        big("h", 3000, 5),
        big("i", 3000, 5),
    ])
    .await
    .expect("produce");
    let at = T0.add(SEC * 60);
    let tags = |v: &[Item]| -> Vec<String> {
        v.iter()
            .map(|i| String::from_utf8_lossy(&i.payload[..1]).into_owned())
            .collect()
    };
    if b.offload_threshold.is_some_and(|t| t < 100) {
        // Offloaded payloads count by the reference the store keeps (docs/operations.md): the bound does not see
        // their size; the serving order holds.
        let (got, _) = p.lease_within(10, at, 9000).await.expect("lease");
        assert_eq!(tags(&got), vec!["h", "i", "a", "b", "c", "d"]);
        return;
    }
    // Priority 5 first (6,000 bytes), then "a" would make 10,000 > 9,000.
    let (got, capped) = p.lease_within(10, at, 9000).await.expect("lease");
    assert_eq!(tags(&got), vec!["h", "i"]);
    assert!(capped, "ready items were left at the bound");
    let (got, capped) = p.lease_within(10, at, 9000).await.expect("lease");
    assert_eq!(tags(&got), vec!["a", "b"]);
    assert!(capped);
    // "c" alone is over the bound: it is still served, by itself.
    let (got, capped) = p.lease_within(10, at, 9000).await.expect("lease");
    assert_eq!(tags(&got), vec!["c"]);
    assert!(capped);
    let (got, capped) = p.lease_within(10, at, 9000).await.expect("lease");
    assert_eq!(tags(&got), vec!["d"]);
    assert!(!capped, "nothing left to serve");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 6));
    // The count bound still applies, and is not reported as the byte bound.
    p.produce(items(3)).await.expect("produce");
    let (got, capped) = p.lease_within(2, at, 9000).await.expect("lease");
    assert_eq!(payloads(&got), vec!["p0", "p1"]);
    assert!(!capped);
}

/// Completing removes leased items; a request with any bad id changes nothing.
pub async fn complete_is_all_or_nothing(b: TestBackend) {
    let p = open(&b, "complete").await;
    p.produce(items(4)).await.expect("produce");
    let leased = p.lease(3, T0.add(SEC)).await.expect("lease");
    let ready_id = p.list(None, 10, false).await.expect("list")[3].id;
    let res = p
        .complete(vec![
            vec![leased[0].id, ready_id],     // not leased -> nothing
            vec![leased[1].id, ItemId(1)],    // missing -> nothing
            vec![leased[2].id, leased[2].id], // duplicate -> nothing
            vec![leased[0].id],               // fine
        ])
        .await
        .expect("complete");
    assert_eq!(res[0], Err(ItemError::NotLeased(ready_id.to_string())));
    assert_eq!(res[1], Err(ItemError::NotFound(ItemId(1).to_string())));
    assert_eq!(res[2], Err(ItemError::Duplicate(leased[2].id.to_string())));
    assert_eq!(res[3], Ok(()));
    let left: Vec<ItemId> = p
        .list(None, 10, false)
        .await
        .expect("list")
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(left, vec![leased[1].id, leased[2].id, ready_id]);
    assert_eq!(
        p.complete(vec![vec![leased[0].id]]).await.expect("complete")[0],
        Err(ItemError::NotFound(leased[0].id.to_string()))
    );
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (1, 2));
}

/// An immediate retry puts the item at the tail under a new id; the old id is gone (fencing).
pub async fn retry_requeues_at_tail_with_new_id(b: TestBackend) {
    let p = open(&b, "retry-tail").await;
    p.produce(items(3)).await.expect("produce");
    let first = p.lease(1, T0.add(SEC)).await.expect("lease").remove(0);
    let res = p
        .retry(
            vec![vec![RetryOp {
                id: first.id,
                action: RetryAction::Requeue,
            }]],
            NO_DLQ,
        )
        .await
        .expect("retry");
    assert_eq!(res[0].as_ref().map(|o| o.requeued), Ok(1));
    let all = p.lease(10, T0.add(SEC)).await.expect("lease");
    assert_eq!(payloads(&all), vec!["p1", "p2", "p0"]);
    assert_ne!(all[2].id, first.id);
    assert!(all[2].id > all[1].id);
    assert_eq!(all[2].attempts, 2, "attempts count every lease");
    let stale = p.complete(vec![vec![first.id]]).await.expect("complete");
    assert_eq!(stale[0], Err(ItemError::NotFound(first.id.to_string())));
}

/// A retry with a later time schedules the item; it is listed as scheduled and becomes ready when due.
pub async fn retry_schedules_and_lifecycle_enqueues(b: TestBackend) {
    let p = open(&b, "retry-sched").await;
    p.produce(items(1)).await.expect("produce");
    let it = p.lease(1, T0.add(SEC)).await.expect("lease").remove(0);
    let at = T0.add(SEC * 30);
    let res = p
        .retry(
            vec![vec![RetryOp {
                id: it.id,
                action: RetryAction::Schedule(at),
            }]],
            NO_DLQ,
        )
        .await
        .expect("retry");
    assert_eq!(res[0].as_ref().map(|o| o.scheduled), Ok(1));
    assert!(p.lease(1, T0.add(SEC)).await.expect("lease").is_empty());
    let sched = p.list(None, 10, true).await.expect("list");
    assert_eq!(sched.len(), 1);
    assert_eq!(sched[0].enqueue_at, at);
    assert!(!sched[0].is_leased);
    assert_eq!(p.counts().await.expect("counts").scheduled, 1);
    assert_eq!(p.next_deadline().await.expect("deadline"), Some(at));
    let early = p
        .lifecycle(T0.add(SEC * 29), NO_DLQ, 100)
        .await
        .expect("lifecycle");
    assert_eq!(early.enqueued, 0);
    let o = p.lifecycle(at, NO_DLQ, 100).await.expect("lifecycle");
    assert_eq!(o.enqueued, 1);
    let again = p.lease(1, at.add(SEC)).await.expect("lease");
    assert_eq!(payloads(&again), vec!["p0"]);
    assert_eq!(again[0].attempts, 2);
    assert!(p.list(None, 10, true).await.expect("list").is_empty());
}

/// `dead` deletes without a dead-letter queue and keeps the item for transfer with one.
pub async fn retry_dead_follows_policy(b: TestBackend) {
    let p = open(&b, "retry-dead").await;
    p.produce(items(2)).await.expect("produce");
    let l = p.lease(2, T0.add(SEC)).await.expect("lease");
    let r = p
        .retry(
            vec![vec![RetryOp {
                id: l[0].id,
                action: RetryAction::Dead,
            }]],
            NO_DLQ,
        )
        .await
        .expect("retry");
    assert_eq!(r[0].as_ref().map(|o| o.dead), Ok(1));
    assert!(p.dead_items(10).await.expect("dead").is_empty());
    let dlq = LifecyclePolicy {
        max_attempts: 0,
        has_dead_queue: true,
        backoff: Backoff::OFF,
    };
    p.retry(
        vec![vec![RetryOp {
            id: l[1].id,
            action: RetryAction::Dead,
        }]],
        dlq,
    )
    .await
    .expect("retry");
    let dead = p.dead_items(10).await.expect("dead");
    assert_eq!(payloads(&dead), vec!["p1"]);
    assert_eq!(
        p.next_deadline().await.expect("deadline"),
        Some(Ts::ZERO),
        "dead items want transfer now"
    );
    assert!(
        p.list(None, 10, false).await.expect("list").is_empty(),
        "dead items are hidden"
    );
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (0, 0, 0));
    p.remove_dead(vec![dead[0].id, ItemId(7)])
        .await
        .expect("remove dead");
    assert!(p.dead_items(10).await.expect("dead").is_empty());
    assert_eq!(p.next_deadline().await.expect("deadline"), None);
}

/// A retry of an item that used all its attempts makes it dead instead of re-queueing it.
pub async fn retry_with_exhausted_attempts_dies(b: TestBackend) {
    let p = open(&b, "retry-exhausted").await;
    p.produce(items(1)).await.expect("produce");
    let it = p.lease(1, T0.add(SEC)).await.expect("lease").remove(0);
    let policy = LifecyclePolicy {
        max_attempts: 1,
        has_dead_queue: true,
        backoff: Backoff::OFF,
    };
    let r = p
        .retry(
            vec![vec![RetryOp {
                id: it.id,
                action: RetryAction::Requeue,
            }]],
            policy,
        )
        .await
        .expect("retry");
    assert_eq!(r[0].as_ref().map(|o| (o.requeued, o.dead)), Ok((0, 1)));
    assert_eq!(p.dead_items(10).await.expect("dead").len(), 1);
}

/// A release (a lease that reached no one) makes the item ready again without counting the lease as an attempt,
/// so it cannot kill the item even when that attempt was the last; a release of an id not leased changes nothing.
pub async fn retry_release_does_not_count_the_attempt(b: TestBackend) {
    let p = open(&b, "retry-release").await;
    p.produce(items(2)).await.expect("produce");
    let it = p.lease(1, T0.add(SEC)).await.expect("lease").remove(0);
    assert_eq!(it.attempts, 1);
    let policy = LifecyclePolicy {
        max_attempts: 1,
        has_dead_queue: true,
        backoff: Backoff::OFF,
    };
    let release = |id| {
        vec![vec![RetryOp {
            id,
            action: RetryAction::Release,
        }]]
    };
    let r = p.retry(release(it.id), policy).await.expect("retry");
    assert_eq!(
        r[0].as_ref().map(|o| (o.requeued, o.scheduled, o.dead)),
        Ok((1, 0, 0))
    );
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (2, 0));
    assert!(p.dead_items(10).await.expect("dead").is_empty());
    let again = p.lease(10, T0.add(SEC)).await.expect("lease");
    let mut got = payloads(&again);
    got.sort();
    assert_eq!(got, vec!["p0", "p1"]);
    let released = again
        .iter()
        .find(|i| i.payload == it.payload)
        .expect("the released item");
    assert_eq!(
        released.attempts, 1,
        "the lease that reached no one is not counted"
    );
    // Now used up: a plain retry kills it, as before.
    let r = p
        .retry(
            vec![vec![RetryOp {
                id: released.id,
                action: RetryAction::Requeue,
            }]],
            policy,
        )
        .await
        .expect("retry");
    assert_eq!(r[0].as_ref().map(|o| o.dead), Ok(1));
    // Not leased any more: a release of it is refused and moves nothing.
    let r = p.retry(release(released.id), policy).await.expect("retry");
    assert!(r[0].is_err(), "{r:?}");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 1));
}

/// An expired lease goes back to the tail under a new id; the stale id can neither complete nor retry.
pub async fn lease_expiry_requeues_and_fences(b: TestBackend) {
    let p = open(&b, "expiry").await;
    p.produce(items(2)).await.expect("produce");
    let a = p.lease(1, T0.add(SEC * 10)).await.expect("lease").remove(0);
    assert_eq!(p.next_deadline().await.expect("deadline"), Some(T0.add(SEC * 10)));
    let o = p
        .lifecycle(T0.add(SEC * 10), NO_DLQ, 100)
        .await
        .expect("lifecycle");
    assert_eq!(o.lease_expired, 1);
    let next = p.lease(10, T0.add(SEC * 20)).await.expect("lease");
    assert_eq!(
        payloads(&next),
        vec!["p1", "p0"],
        "the expired item goes to the tail"
    );
    assert_eq!(next[1].attempts, 2);
    assert_ne!(next[1].id, a.id);
    let c = p.complete(vec![vec![a.id]]).await.expect("complete");
    assert_eq!(c[0], Err(ItemError::NotFound(a.id.to_string())));
    let r = p
        .retry(
            vec![vec![RetryOp {
                id: a.id,
                action: RetryAction::Requeue,
            }]],
            NO_DLQ,
        )
        .await
        .expect("retry");
    assert!(r[0].is_err());
    assert_eq!(
        p.complete(vec![vec![next[1].id]]).await.expect("complete")[0],
        Ok(())
    );
}

/// When the last allowed lease expires, the item dies: deleted without a DLQ, kept for transfer with one.
pub async fn lease_expiry_at_max_attempts_dies(b: TestBackend) {
    let p = open(&b, "max-attempts").await;
    p.produce(items(2)).await.expect("produce");
    let policy = LifecyclePolicy {
        max_attempts: 2,
        has_dead_queue: true,
        backoff: Backoff::OFF,
    };
    for round in 0..2u32 {
        let l = p.lease(10, T0.add(SEC)).await.expect("lease");
        assert_eq!(l.len(), 2, "round {round}");
        assert!(l.iter().all(|i| i.attempts == round + 1));
        let o = p.lifecycle(T0.add(SEC), policy, 100).await.expect("lifecycle");
        if round == 0 {
            assert_eq!((o.lease_expired, o.dead), (2, 0));
        } else {
            assert_eq!((o.lease_expired, o.dead), (0, 2));
        }
    }
    assert_eq!(p.dead_items(10).await.expect("dead").len(), 2);
    assert_eq!(p.counts().await.expect("counts").ready, 0);
}

/// Items past their expire deadline die, leased or not; scheduled items wait for their schedule.
pub async fn expire_deadline_kills_items(b: TestBackend) {
    let p = open(&b, "expire").await;
    let mut batch = items(3);
    batch[0].expire_deadline = T0.add(SEC * 5);
    batch[1].expire_deadline = T0.add(SEC * 5);
    p.produce(batch).await.expect("produce");
    p.lease(1, T0.add(SEC * 100)).await.expect("lease");
    assert_eq!(p.next_deadline().await.expect("deadline"), Some(T0.add(SEC * 5)));
    let o = p
        .lifecycle(T0.add(SEC * 5), NO_DLQ, 100)
        .await
        .expect("lifecycle");
    assert_eq!(o.dead, 2);
    let left = p.list(None, 10, false).await.expect("list");
    assert_eq!(payloads(&left), vec!["p2"]);
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (1, 0));
}

/// Scheduled items stay out of leases and lists until due, then join the tail in schedule order (FIFO among
/// equal times), whatever order they were produced in.
pub async fn scheduled_items_come_due_in_order(b: TestBackend) {
    let p = open(&b, "scheduled").await;
    let mut batch = items(4);
    batch[0].enqueue_at = T0.add(SEC * 20);
    batch[1].enqueue_at = T0.add(SEC * 10);
    batch[2].enqueue_at = T0.add(SEC * 10);
    p.produce(batch).await.expect("produce");
    assert_eq!(
        payloads(&p.list(None, 10, false).await.expect("list")),
        vec!["p3"]
    );
    assert_eq!(
        payloads(&p.list(None, 10, true).await.expect("list")),
        vec!["p0", "p1", "p2"]
    );
    assert_eq!(p.counts().await.expect("counts").scheduled, 3);
    assert_eq!(p.next_deadline().await.expect("deadline"), Some(T0.add(SEC * 10)));
    let o = p
        .lifecycle(T0.add(SEC * 10), NO_DLQ, 100)
        .await
        .expect("lifecycle");
    assert_eq!(o.enqueued, 2);
    assert_eq!(
        p.next_deadline()
            .await
            .expect("deadline")
            .map(|d| d <= T0.add(SEC * 20)),
        Some(true)
    );
    p.lifecycle(T0.add(SEC * 25), NO_DLQ, 100)
        .await
        .expect("lifecycle");
    let l = p.lease(10, T0.add(SEC * 100)).await.expect("lease");
    assert_eq!(payloads(&l), vec!["p3", "p1", "p2", "p0"]);
}

/// The lifecycle limit bounds one pass and says there is more.
pub async fn lifecycle_respects_limit(b: TestBackend) {
    let p = open(&b, "lifecycle-limit").await;
    p.produce(items(5)).await.expect("produce");
    p.lease(5, T0.add(SEC)).await.expect("lease");
    let o = p.lifecycle(T0.add(SEC), NO_DLQ, 2).await.expect("lifecycle");
    assert_eq!(o.lease_expired, 2);
    assert!(o.more);
    let o = p.lifecycle(T0.add(SEC), NO_DLQ, 100).await.expect("lifecycle");
    assert_eq!(o.lease_expired, 3);
    assert!(!o.more);
    assert_eq!(p.counts().await.expect("counts").ready, 5);
}

/// Items carrying a source id already present are skipped, on produce and import: dead-letter moves are idempotent.
pub async fn source_id_makes_moves_idempotent(b: TestBackend) {
    let p = open(&b, "source-id").await;
    let mut a = item("a");
    a.source_id = "src-1".into();
    let first = p.produce(vec![a.clone()]).await.expect("produce");
    let again = p.produce(vec![a.clone(), item("b")]).await.expect("produce");
    assert_eq!(again[0], first[0]);
    assert_eq!(p.counts().await.expect("counts").ready, 2);
    let imported = p
        .import(vec![Item {
            source_id: "src-1".into(),
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        }])
        .await
        .expect("import");
    assert!(imported.is_empty());
    // Once the item is gone its source id may be used again.
    let l = p.lease(1, T0.add(SEC)).await.expect("lease");
    assert_eq!(l[0].source_id, "src-1");
    p.complete(vec![vec![l[0].id]]).await.expect("complete");
    assert_eq!(p.produce(vec![a]).await.expect("produce").len(), 1);
    assert_eq!(p.counts().await.expect("counts").ready, 2);
}

/// Lists run in id order from an inclusive pivot, or from the next id when the pivot is gone.
pub async fn list_pages_from_pivot(b: TestBackend) {
    let p = open(&b, "list").await;
    let ids = p.produce(items(10)).await.expect("produce");
    let page = p.list(Some(ids[3]), 3, false).await.expect("list");
    assert_eq!(page.iter().map(|i| i.id).collect::<Vec<_>>(), ids[3..6].to_vec());
    p.delete(vec![ids[6]]).await.expect("delete");
    let page = p.list(Some(ids[6]), 2, false).await.expect("list");
    assert_eq!(page.iter().map(|i| i.id).collect::<Vec<_>>(), ids[7..9].to_vec());
    assert!(p
        .list(Some(ItemId(u64::MAX)), 5, false)
        .await
        .expect("list")
        .is_empty());
}

/// A byte-bounded list stops before the item that would take its page over the bound (always one item), and paging
/// from the last id + 1 returns every item once, in id order: on a paging store with items of several priorities
/// on disk too, and with an item larger than the bound alone on its page.
pub async fn list_within_pages_at_the_byte_bound(b: TestBackend) {
    let p = open(&b, "list-bytes").await;
    let sized = |i: usize, len: usize| NewItem {
        payload: Bytes::from(vec![b'a' + (i % 26) as u8; len]),
        priority: (i % 3 * 4) as u8,
        reference: format!("r{i}"),
        ..item("x")
    };
    let mut batch: Vec<NewItem> = (0..12).map(|i| sized(i, 1000)).collect();
    batch[5] = sized(5, 9000);
    p.produce(batch).await.expect("produce");
    let all: Vec<ItemId> = p
        .list(None, 100, false)
        .await
        .expect("list")
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(all.len(), 12);
    const BOUND: u64 = 2500;
    let mut seen = Vec::new();
    let mut pivot = None;
    for _ in 0..100 {
        let (page, _) = p
            .list_within(pivot, 100, false, BOUND)
            .await
            .expect("list_within");
        let Some(last) = page.last() else { break };
        let bytes: u64 = page.iter().map(lessor_core::storage::item_bytes).sum();
        assert!(
            page.len() == 1 || bytes <= BOUND,
            "{} items, {bytes} bytes",
            page.len()
        );
        pivot = Some(ItemId(last.id.0 + 1));
        seen.extend(page.iter().map(|i| i.id));
    }
    assert_eq!(seen, all, "every item once, in id order");
}

/// Import assigns new ids and keeps every other field, leased state included.
pub async fn import_keeps_fields(b: TestBackend) {
    let p = open(&b, "import").await;
    let src = Item {
        id: ItemId(42),
        source_id: "s-9".into(),
        is_leased: true,
        lease_deadline: T0.add(SEC * 7),
        expire_deadline: T0.add(SEC * 70),
        enqueue_at: Ts::ZERO,
        created_at: T0,
        attempts: 3,
        max_attempts: 5,
        reference: "r".into(),
        encoding: "e".into(),
        kind: "k".into(),
        payload: Bytes::from_static(b"payload"),
        dead: false,
        priority: 0,
    };
    let out = p.import(vec![src.clone()]).await.expect("import");
    assert_eq!(out.len(), 1);
    let got = &p.list(None, 10, false).await.expect("list")[0];
    assert_eq!(got.id, out[0].id);
    assert_eq!(
        Item {
            id: src.id,
            ..got.clone()
        },
        src
    );
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 1));
    assert_eq!(p.next_deadline().await.expect("deadline"), Some(T0.add(SEC * 7)));
}

/// Delete removes items in any state and ignores unknown ids.
pub async fn delete_ignores_missing(b: TestBackend) {
    let p = open(&b, "delete").await;
    let mut batch = items(3);
    batch[2].enqueue_at = T0.add(SEC * 100);
    let ids = p.produce(batch).await.expect("produce");
    p.lease(1, T0.add(SEC)).await.expect("lease");
    p.delete(vec![ids[0], ids[2], ItemId(3)]).await.expect("delete");
    p.delete(vec![ids[0]]).await.expect("delete again");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (1, 0, 0));
}

/// Clear: ready only, then destructive (leased too), then scheduled.
pub async fn clear_modes(b: TestBackend) {
    let p = open(&b, "clear").await;
    let mut batch = items(4);
    batch[3].enqueue_at = T0.add(SEC * 100);
    p.produce(batch).await.expect("produce");
    p.lease(1, T0.add(SEC)).await.expect("lease");
    p.clear(ClearRequest {
        queue: true,
        scheduled: false,
        destructive: false,
    })
    .await
    .expect("clear");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (0, 1, 1));
    p.clear(ClearRequest {
        queue: true,
        scheduled: false,
        destructive: true,
    })
    .await
    .expect("clear");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (0, 0, 1));
    p.clear(ClearRequest {
        queue: false,
        scheduled: true,
        destructive: false,
    })
    .await
    .expect("clear");
    assert_eq!(p.counts().await.expect("counts").scheduled, 0);
    assert_eq!(p.next_deadline().await.expect("deadline"), None);
}

/// Stats report counts and mean ages.
pub async fn stats_report_ages(b: TestBackend) {
    let p = open(&b, "stats").await;
    p.produce(items(4)).await.expect("produce");
    p.lease(2, T0.add(SEC * 60)).await.expect("lease");
    let s = p.stats(T0.add(SEC * 10)).await.expect("stats");
    assert_eq!((s.counts.ready, s.counts.leased), (2, 2));
    assert_eq!(s.average_age, SEC * 10);
    assert_eq!(s.average_leased_age, SEC * 50);
    assert!(s.payload_bytes >= 8);
}

/// Stats report the age of the oldest item next in line (the heads of the ready queue, every priority), not
/// counting leased or scheduled items; the figure survives a reopen.
pub async fn stats_report_oldest_ready_age(b: TestBackend) {
    let q = unique_queue("oldest");
    let p = b.partitions.open(&q, 0).await.expect("open");
    let at = T0.add(SEC * 10);
    let empty = p.stats(at).await.expect("stats");
    assert_eq!(empty.oldest_ready_age, Duration::ZERO, "no ready item");
    let created = |payload: &str, secs: u32, priority: u8| NewItem {
        created_at: T0.add(SEC * secs),
        priority,
        ..item(payload)
    };
    let mut batch = vec![created("a", 0, 0), created("b", 5, 0), created("urgent", 8, 5)];
    // Scheduled items are not in line yet: an old one does not count.
    let mut later = created("scheduled", 0, 0);
    later.created_at = Ts(T0.0 - 100_000_000);
    later.enqueue_at = T0.add(SEC * 1000);
    batch.push(later);
    let ids = p.produce(batch).await.expect("produce");
    let s = p.stats(at).await.expect("stats");
    assert_eq!(
        s.oldest_ready_age,
        SEC * 10,
        "a (created at T0) is first in line at priority 0"
    );
    // The priority-5 item goes first; a is still waiting.
    let got = p.lease(1, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(payloads(&got), vec!["urgent"]);
    assert_eq!(p.stats(at).await.expect("stats").oldest_ready_age, SEC * 10);
    let got = p.lease(1, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(payloads(&got), vec!["a"]);
    assert_eq!(
        p.stats(at).await.expect("stats").oldest_ready_age,
        SEC * 5,
        "a leased item is not ready"
    );
    // Removing the head leaves nothing ready: zero, though a scheduled item is older.
    p.delete(vec![ids[1]]).await.expect("delete");
    assert_eq!(p.stats(at).await.expect("stats").oldest_ready_age, Duration::ZERO);
    // Priorities compete: the oldest head wins, whichever priority it has.
    p.produce(vec![created("c", 7, 0), created("d", 3, 9), created("e", 1, 0)])
        .await
        .expect("produce");
    assert_eq!(p.stats(at).await.expect("stats").oldest_ready_age, SEC * 7);
    p.close().await;
    drop(p);
    let p = b.partitions.open(&q, 0).await.expect("reopen");
    assert_eq!(p.stats(at).await.expect("stats").oldest_ready_age, SEC * 7);
    b.partitions.destroy(&q, 0).await.expect("destroy");
}

/// Stats count items and payload bytes per tier, kept exact by produce, lease, complete, schedule, delete and a
/// reopen. Where the record of an item is held depends on the backend (memory: in memory; fjall: in memory and on
/// disk; PostgreSQL: in the database, reported as disk); an offloaded payload counts in the object tier with its
/// original length, and not in the bytes of the tier holding its item's record.
pub async fn stats_report_tiers(b: TestBackend) {
    let q = unique_queue("tiers");
    let p = b.partitions.open(&q, 0).await.expect("open");
    let driver = b.partitions.driver();
    let offloaded = |payload: &str| b.offload_threshold.is_some_and(|t| payload.len() > t);
    // The figures expected for a set of payloads held.
    let expect = |held: &[&str]| -> TierStats {
        let (mut record, mut object) = (TierFigures::default(), TierFigures::default());
        for &h in held {
            record.items += 1;
            if offloaded(h) {
                object.items += 1;
                object.bytes += h.len() as u64;
            } else {
                record.bytes += h.len() as u64;
            }
        }
        match driver {
            "memory" => TierStats {
                memory: record,
                object,
                ..Default::default()
            },
            // The log store holds every item in memory and in its log.
            "fjall" | "log" => TierStats {
                memory: record,
                disk: record,
                object,
            },
            "postgres" => TierStats {
                disk: record,
                object,
                ..Default::default()
            },
            other => panic!("no tier expectations for driver {other}"),
        }
    };
    // With a memory window, which items are resident depends on when pages are read back (in the background), and
    // fjall keeps the large payloads of leased and scheduled items on disk only, so there the memory tier is only
    // checked to be part of the disk tier; the disk and object tiers stay exact.
    let window = b.memory_window.is_some() || driver == "fjall";
    let tiers = |p: Arc<dyn Partition>| async move {
        let mut t = p.stats(T0).await.expect("stats").tiers;
        if window {
            assert!(
                t.memory.items <= t.disk.items && t.memory.bytes <= t.disk.bytes,
                "memory is part of disk: {t:?}"
            );
            t.memory = t.disk;
        }
        t
    };
    assert_eq!(tiers(p.clone()).await, TierStats::default(), "empty");
    // Large payloads are not one byte repeated, so compression cannot hide a miscount.
    let big = |n: usize, seed: u64| -> String {
        (0..n as u64)
            .map(|i| char::from(b'a' + ((i * 7 + seed * 13 + i / 5) % 26) as u8))
            .collect()
    };
    let (big1, big2, big3) = (big(4000, 1), big(3000, 2), big(2500, 3));
    p.produce(vec![item("s1"), item(&big1), item("s2-ab"), item(&big2)])
        .await
        .expect("produce");
    assert_eq!(
        tiers(p.clone()).await,
        expect(&["s1", &big1, "s2-ab", &big2]),
        "produced"
    );
    if b.offload_threshold.is_some() {
        let t = tiers(p.clone()).await;
        assert_eq!(
            (t.object.items, t.object.bytes),
            (2, 7000),
            "offloaded payloads in the object tier"
        );
    }
    // Leased items are still held.
    let got = p.lease(2, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(payloads(&got), vec!["s1".to_string(), big1.clone()]);
    assert_eq!(
        tiers(p.clone()).await,
        expect(&["s1", &big1, "s2-ab", &big2]),
        "leased"
    );
    p.complete(vec![got.iter().map(|i| i.id).collect()])
        .await
        .expect("complete")
        .into_iter()
        .for_each(|r| r.expect("completed"));
    assert_eq!(tiers(p.clone()).await, expect(&["s2-ab", &big2]), "completed");
    // A scheduled item counts; a retry that schedules keeps the item in its tiers.
    let mut later = item(&big3);
    later.enqueue_at = T0.add(SEC * 600);
    p.produce(vec![later]).await.expect("produce scheduled");
    let got = p.lease(1, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(payloads(&got), vec!["s2-ab"]);
    let r = p
        .retry(
            vec![vec![RetryOp {
                id: got[0].id,
                action: RetryAction::Schedule(T0.add(SEC * 300)),
            }]],
            NO_DLQ,
        )
        .await
        .expect("retry");
    assert!(r[0].is_ok(), "{r:?}");
    let s = p.stats(T0).await.expect("stats");
    assert_eq!(s.counts.scheduled, 2);
    assert_eq!(
        tiers(p.clone()).await,
        expect(&["s2-ab", &big2, &big3]),
        "scheduled"
    );
    // Delete and reopen.
    let ready = p.list(None, 10, false).await.expect("list");
    let id2 = ready
        .iter()
        .find(|i| i.payload.len() == big2.len())
        .expect("big2")
        .id;
    p.delete(vec![id2]).await.expect("delete");
    assert_eq!(tiers(p.clone()).await, expect(&["s2-ab", &big3]), "deleted");
    p.close().await;
    drop(p);
    let p = b.partitions.open(&q, 0).await.expect("reopen");
    assert_eq!(tiers(p.clone()).await, expect(&["s2-ab", &big3]), "reopened");
    p.clear(ClearRequest {
        queue: true,
        scheduled: true,
        destructive: true,
    })
    .await
    .expect("clear");
    assert_eq!(tiers(p.clone()).await, TierStats::default(), "cleared");
    b.partitions.destroy(&q, 0).await.expect("destroy");
}

/// Reopening a partition finds its items, and new ids keep growing.
pub async fn reopen_keeps_items_and_id_order(b: TestBackend) {
    let q = unique_queue("reopen");
    let p = b.partitions.open(&q, 3).await.expect("open");
    let ids = p.produce(items(3)).await.expect("produce");
    p.lease(1, T0.add(SEC)).await.expect("lease");
    p.close().await;
    drop(p);
    let p = b.partitions.open(&q, 3).await.expect("reopen");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (2, 1));
    let more = p.produce(items(1)).await.expect("produce");
    assert!(more[0] > ids[2]);
    b.partitions.destroy(&q, 3).await.expect("destroy");
    // Made again by a create (a queue created anew under the name): a shared store refuses to open a destroyed
    // partition without one.
    b.partitions.create(&q, &[3]).await.expect("create after destroy");
    let p = b.partitions.open(&q, 3).await.expect("open after destroy");
    assert_eq!(
        p.counts().await.expect("counts").ready,
        0,
        "destroy removes the items"
    );
}

/// Partitions of one queue, and equal partition numbers of two queues, are independent.
pub async fn partitions_are_independent(b: TestBackend) {
    let q1 = unique_queue("indep");
    let q2 = unique_queue("indep");
    let a = b.partitions.open(&q1, 0).await.expect("open");
    let c = b.partitions.open(&q1, 1).await.expect("open");
    let d = b.partitions.open(&q2, 0).await.expect("open");
    a.produce(items(2)).await.expect("produce");
    assert_eq!(c.counts().await.expect("counts").ready, 0);
    assert_eq!(d.counts().await.expect("counts").ready, 0);
}

/// A large batch keeps order and counts exact.
pub async fn large_batches_keep_order(b: TestBackend) {
    let p = open(&b, "large").await;
    for _ in 0..5 {
        p.produce(items(1000)).await.expect("produce");
    }
    let mut seen = 0;
    let mut last = ItemId(0);
    loop {
        let l = p.lease(700, T0.add(SEC)).await.expect("lease");
        if l.is_empty() {
            break;
        }
        for it in &l {
            assert!(it.id > last);
            last = it.id;
        }
        seen += l.len();
        let ids = l.iter().map(|i| i.id).collect();
        assert_eq!(p.complete(vec![ids]).await.expect("complete")[0], Ok(()));
    }
    assert_eq!(seen, 5000);
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 0));
}

/// Queue definitions: add, duplicate, get, update, list from a pivot, delete.
pub async fn queues_store_crud(b: TestBackend) {
    let prefix = unique_queue("qs");
    let mk = |n: &str| QueueInfo {
        name: format!("{prefix}-{n}"),
        namespace: "_system".into(),
        created_at: T0,
        updated_at: T0,
        lease_timeout: SEC * 60,
        expire_timeout: SEC * 3600,
        requested_partitions: 2,
        partitions: vec![
            PartitionInfo {
                partition: 0,
                storage_name: "a".into(),
                read_only: false,
            },
            PartitionInfo {
                partition: 1,
                storage_name: "b".into(),
                read_only: false,
            },
        ],
        ..Default::default()
    };
    for n in ["c", "a", "b"] {
        b.queues.add(&mk(n)).await.expect("add");
    }
    let dup = b.queues.add(&mk("a")).await.expect_err("duplicate");
    assert_eq!(dup.kind, StorageErrorKind::AlreadyExists);
    let got = b
        .queues
        .get(&format!("{prefix}-a"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got, mk("a"));
    let mut upd = mk("a");
    upd.max_attempts = 9;
    upd.dead_queue = "x".into();
    b.queues.update(&upd).await.expect("update");
    assert_eq!(b.queues.get(&upd.name).await.expect("get"), Some(upd.clone()));
    let page = b.queues.list(&format!("{prefix}-b"), 10).await.expect("list");
    let names: Vec<_> = page
        .iter()
        .map(|q| q.name.clone())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert_eq!(names, vec![format!("{prefix}-b"), format!("{prefix}-c")]);
    b.queues.delete(&format!("{prefix}-b")).await.expect("delete");
    b.queues
        .delete(&format!("{prefix}-b"))
        .await
        .expect("delete missing is ok");
    assert_eq!(b.queues.get(&format!("{prefix}-b")).await.expect("get"), None);
    b.queues.ping().await.expect("ping");
}

/// Reads a whole snapshot in pages of `page` items.
async fn read_snapshot(p: &Arc<dyn Partition>, page: usize) -> Vec<Item> {
    let mut snap = p.snapshot().await.expect("snapshot");
    let mut out = Vec::new();
    loop {
        let got = snap.next(page).await.expect("snapshot page");
        if got.is_empty() {
            return out;
        }
        assert!(got.len() <= page, "a page holds at most the limit");
        out.extend(got);
    }
}

/// A snapshot reads every item in every state (ready, leased, scheduled, dead), in id order, with every field.
pub async fn snapshot_reads_every_state_in_id_order(b: TestBackend) {
    let p = open(&b, "snap-states").await;
    let mut batch = items(5);
    batch[3].enqueue_at = T0.add(SEC * 600);
    batch[4].priority = 7;
    p.produce(batch).await.expect("produce");
    // Leases serve priority 7 first, then p0: two leased items.
    let leased = p.lease(2, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(payloads(&leased), vec!["p4", "p0"]);
    // One of them dies and waits for its dead-letter queue.
    let policy = LifecyclePolicy {
        has_dead_queue: true,
        ..NO_DLQ
    };
    let dead_op = RetryOp {
        id: leased[1].id,
        action: RetryAction::Dead,
    };
    p.retry(vec![vec![dead_op]], policy).await.expect("retry");
    let all = read_snapshot(&p, 2).await;
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "id order");
    let by_payload = |s: &str| {
        all.iter()
            .find(|i| i.payload.as_ref() == s.as_bytes())
            .cloned()
            .unwrap_or_else(|| panic!("{s} missing from the snapshot"))
    };
    assert_eq!(all.len(), 5);
    assert!(by_payload("p0").dead);
    let p4 = by_payload("p4");
    assert!(p4.is_leased && p4.priority == 7 && p4.attempts == 1);
    assert_eq!(p4.lease_deadline, T0.add(SEC * 60));
    assert_eq!(by_payload("p3").enqueue_at, T0.add(SEC * 600));
    let p1 = by_payload("p1");
    assert!(!p1.is_leased && !p1.dead && p1.attempts == 0);
    assert_eq!(p1.reference, "ref-p1");
    assert_eq!((p1.encoding.as_str(), p1.kind.as_str()), ("text/plain", "test"));
    assert_eq!(p1.created_at, T0);
    assert_eq!(p1.expire_deadline, T0.add(SEC * 3600));
    // An empty partition gives an empty snapshot.
    let empty = open(&b, "snap-empty").await;
    assert!(read_snapshot(&empty, 10).await.is_empty());
}

/// A snapshot is one instant: writes made after it was taken do not show in it, even while it is being read.
pub async fn snapshot_is_point_in_time(b: TestBackend) {
    let p = open(&b, "snap-instant").await;
    p.produce(items(300)).await.expect("produce");
    let mut snap = p.snapshot().await.expect("snapshot");
    let first = snap.next(100).await.expect("page");
    // Change the partition in every way while the snapshot is half read.
    let leased = p.lease(150, T0.add(SEC * 60)).await.expect("lease");
    let ids: Vec<ItemId> = leased.iter().map(|i| i.id).collect();
    assert_eq!(p.complete(vec![ids]).await.expect("complete")[0], Ok(()));
    p.produce(items(50)).await.expect("produce more");
    let mut all = first;
    loop {
        let page = snap.next(100).await.expect("page");
        if page.is_empty() {
            break;
        }
        all.extend(page);
    }
    assert_eq!(
        all.len(),
        300,
        "the snapshot holds what the partition held when it was taken"
    );
    assert!(all.iter().all(|i| !i.is_leased));
    let expected: Vec<String> = (0..300).map(|i| format!("p{i}")).collect();
    assert_eq!(payloads(&all), expected);
}

/// A byte-bounded snapshot read stops before the item that would take its page over the bound (always one item:
/// an item larger than the bound is a page alone), and the pages together are the whole snapshot: every item
/// once, in id order, in every state and priority (paging stores keep some on disk), from the instant it was
/// taken even though the partition changes between pages.
pub async fn snapshot_pages_at_the_byte_bound(b: TestBackend) {
    let p = open(&b, "snap-bytes").await;
    let sized = |i: usize, len: usize| NewItem {
        payload: Bytes::from(vec![b'a' + (i % 26) as u8; len]),
        priority: (i % 3 * 4) as u8,
        reference: format!("r{i}"),
        ..item("x")
    };
    // Small items first, then large ones, one larger than the bound, one scheduled.
    let mut batch: Vec<NewItem> = (0..20).map(|i| sized(i, 10)).collect();
    batch.extend((20..32).map(|i| sized(i, 1000)));
    batch[25] = sized(25, 9000);
    batch[27].enqueue_at = T0.add(SEC * 600);
    p.produce(batch).await.expect("produce");
    let leased = p.lease(3, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!(leased.len(), 3);
    let whole = read_snapshot(&p, 1000).await;
    assert_eq!(whole.len(), 32);
    const BOUND: u64 = 2500;
    let mut snap = p.snapshot().await.expect("snapshot");
    let mut seen: Vec<Item> = Vec::new();
    for round in 0..100 {
        let page = snap.next_within(100, BOUND).await.expect("snapshot page");
        if page.is_empty() {
            break;
        }
        let bytes: u64 = page.iter().map(lessor_core::storage::item_bytes).sum();
        assert!(
            page.len() == 1 || bytes <= BOUND,
            "{} items, {bytes} bytes",
            page.len()
        );
        if round == 0 {
            // Changed between pages: the snapshot still reads the instant it was taken. (Leases, not completes: an
            // offloaded payload's object goes with its completed item, snapshot or not.)
            assert_eq!(p.lease(3, T0.add(SEC * 60)).await.expect("lease").len(), 3);
            p.produce(vec![sized(40, 1000)]).await.expect("produce more");
        }
        seen.extend(page);
    }
    assert_eq!(
        seen, whole,
        "every item once, in id order, as when the snapshot was taken"
    );
    // The limit still holds within the bound.
    let mut snap = p.snapshot().await.expect("snapshot");
    let page = snap.next_within(2, u64::MAX).await.expect("snapshot page");
    assert_eq!(page.len(), 2);
}

/// Import keeps items dead (restoring a backup taken while dead items waited for their dead-letter queue), and
/// the imported order is the input order.
pub async fn import_keeps_dead_items_and_order(b: TestBackend) {
    let p = open(&b, "import-dead").await;
    let mk = |s: &str, dead: bool| Item {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        payload: Bytes::from(s.to_string()),
        dead,
        ..Default::default()
    };
    let out = p
        .import(vec![mk("a", false), mk("b", true), mk("c", false)])
        .await
        .expect("import");
    assert_eq!(out.len(), 3);
    assert!(out.windows(2).all(|w| w[0].id < w[1].id));
    let dead = p.dead_items(10).await.expect("dead items");
    assert_eq!(payloads(&dead), vec!["b"]);
    let c = p.counts().await.expect("counts");
    assert_eq!(c.ready, 2);
    assert_eq!(payloads(&read_snapshot(&p, 10).await), vec!["a", "b", "c"]);
}

/// The restoring flag of a queue definition is stored and read back, and cleared by an update.
pub async fn queue_restoring_flag_round_trips(b: TestBackend) {
    let mut q = QueueInfo {
        name: unique_queue("restoring"),
        namespace: "_system".into(),
        created_at: T0,
        updated_at: T0,
        lease_timeout: SEC * 60,
        expire_timeout: SEC * 3600,
        requested_partitions: 1,
        partitions: vec![PartitionInfo {
            partition: 0,
            storage_name: "a".into(),
            read_only: false,
        }],
        restoring: true,
        ..Default::default()
    };
    b.queues.add(&q).await.expect("add");
    assert_eq!(b.queues.get(&q.name).await.expect("get"), Some(q.clone()));
    q.restoring = false;
    b.queues.update(&q).await.expect("update");
    assert_eq!(b.queues.get(&q.name).await.expect("get"), Some(q.clone()));
    b.queues.delete(&q.name).await.expect("delete");
}

/// Expands to one `#[tokio::test]` per conformance case for the backend `$make` (an async fn returning
/// `Option<TestBackend>`; `None` skips, e.g. when no database is configured).
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@cases $make;
            produce_then_lease_in_fifo_order,
            lease_within_stops_at_the_byte_bound,
            complete_is_all_or_nothing,
            retry_requeues_at_tail_with_new_id,
            retry_schedules_and_lifecycle_enqueues,
            retry_dead_follows_policy,
            retry_with_exhausted_attempts_dies,
            retry_release_does_not_count_the_attempt,
            lease_expiry_requeues_and_fences,
            lease_expiry_at_max_attempts_dies,
            expire_deadline_kills_items,
            scheduled_items_come_due_in_order,
            lifecycle_respects_limit,
            source_id_makes_moves_idempotent,
            list_pages_from_pivot,
            list_within_pages_at_the_byte_bound,
            import_keeps_fields,
            delete_ignores_missing,
            clear_modes,
            stats_report_ages,
            stats_report_oldest_ready_age,
            stats_report_tiers,
            reopen_keeps_items_and_id_order,
            partitions_are_independent,
            large_batches_keep_order,
            queues_store_crud,
            snapshot_reads_every_state_in_id_order,
            snapshot_is_point_in_time,
            snapshot_pages_at_the_byte_bound,
            import_keeps_dead_items_and_order,
            queue_restoring_flag_round_trips
        );
        $crate::conformance_tests!(@auth_cases $make;
            auth_kv_get_put_delete,
            auth_kv_scan_order_and_bounds,
            auth_kv_commit_is_atomic,
            auth_kv_generation_is_shared,
            auth_kv_concurrent_absent_race,
            auth_service_bootstrap,
            auth_service_user_delete_cascades,
            auth_service_key_expiry_and_revocation,
            auth_service_roles,
            auth_service_namespaces,
            auth_service_authorize_scopes,
            auth_service_binding_list_filter,
            auth_service_cross_server_revocation,
            auth_service_key_use_is_recorded_sparingly,
            auth_kv_silent_commit_keeps_the_generation
        );
        $crate::conformance_tests!(@feature_cases $make;
            extend_moves_the_lease_deadline,
            extend_is_all_or_nothing,
            priority_serves_highest_first_fifo_within,
            priority_survives_requeue_expiry_and_schedule,
            priority_kept_by_list_import_and_dead_items,
            backoff_on_lease_expiry_schedules,
            backoff_retry_schedules_or_requeues,
            dedup_skips_within_call_and_window,
            dedup_key_accepted_again_after_until,
            dedup_records_lists_live_records,
            dedup_record_outlives_its_item,
            dedup_expired_records_are_pruned,
            queue_info_round_trips_new_fields
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                match $make().await {
                    Some(backend) => $crate::testsuite::$case(backend).await,
                    None => eprintln!("skipped: backend not configured"),
                }
            }
        )*
    };
    (@auth_cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                match $make().await {
                    Some(backend) => $crate::testsuite::auth::$case(backend).await,
                    None => eprintln!("skipped: backend not configured"),
                }
            }
        )*
    };
    (@feature_cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                match $make().await {
                    Some(backend) => $crate::testsuite::features::$case(backend).await,
                    None => eprintln!("skipped: backend not configured"),
                }
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    /// The top-level `pub async fn <name>(b: TestBackend)` cases of this file, in order.
    fn cases_defined(src: &str) -> Vec<String> {
        src.lines()
            .filter_map(|l| l.strip_prefix("pub async fn "))
            .filter(|rest| rest.contains("(b: TestBackend)"))
            .filter_map(|rest| rest.split('(').next())
            .map(|name| name.trim().to_string())
            .collect()
    }

    /// The names the macro expands to tests, from its `<list> $make;` list (`@cases`, `@auth_cases` or
    /// `@feature_cases`).
    fn cases_listed(src: &str, list: &str) -> Vec<String> {
        let start = src
            .find(&format!("({list} $make;\n"))
            .expect("the macro's case list");
        let list = &src[start..];
        let end = list.find(");").expect("the end of the macro's case list");
        list[..end]
            .lines()
            .skip(1)
            .map(|l| l.trim().trim_end_matches(','))
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_case_is_in_the_macros_list() {
        let src = include_str!("testsuite.rs");
        let defined = cases_defined(src);
        let listed = cases_listed(src, "@cases");
        assert!(
            defined.len() >= 20,
            "found only {} cases: {defined:?}",
            defined.len()
        );
        let missing: Vec<&String> = defined.iter().filter(|c| !listed.contains(c)).collect();
        let unknown: Vec<&String> = listed.iter().filter(|c| !defined.contains(c)).collect();
        assert!(
            missing.is_empty(),
            "conformance cases defined but not listed in conformance_tests! (they would never run): {missing:?}"
        );
        assert!(unknown.is_empty(), "listed but not defined: {unknown:?}");
    }

    #[test]
    fn every_auth_case_is_in_the_macros_list() {
        let defined = cases_defined(include_str!("testsuite/auth.rs"));
        let listed = cases_listed(include_str!("testsuite.rs"), "@auth_cases");
        assert!(
            defined.len() >= 10,
            "found only {} auth cases: {defined:?}",
            defined.len()
        );
        assert_eq!(
            defined, listed,
            "auth cases defined (left) and listed in conformance_tests! (right)"
        );
    }

    #[test]
    fn every_feature_case_is_in_the_macros_list() {
        let defined = cases_defined(include_str!("testsuite/features.rs"));
        let listed = cases_listed(include_str!("testsuite.rs"), "@feature_cases");
        assert!(
            defined.len() >= 10,
            "found only {} feature cases: {defined:?}",
            defined.len()
        );
        assert_eq!(
            defined, listed,
            "feature cases defined (left) and listed in conformance_tests! (right)"
        );
    }

    #[test]
    fn the_list_parser_sees_a_missing_case() {
        let src = "pub async fn a(b: TestBackend) {}\npub async fn c(b: TestBackend) {}\n\
                   $crate::conformance_tests!(@cases $make;\n    a,\n    z\n);\n";
        assert_eq!(cases_defined(src), ["a", "c"]);
        assert_eq!(cases_listed(src, "@cases"), ["a", "z"]);
    }
}
