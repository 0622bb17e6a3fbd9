//! Adversarial tests of "Payloads on disk" (see the state's module docs): leased, scheduled and dead items of the
//! fjall backend keep payloads above 1 KiB on disk only and read them back where an item gets a new id, for lists,
//! dead items and snapshots. Every item must come back with the exact bytes it was produced with, whatever path it
//! took and however many restarts (clean or not) it met on the way: payloads are compared byte for byte, with sizes
//! around the inline limit, empty ones, long strings and several priorities.
#![cfg(feature = "fjall")]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, Item, ItemId, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};

const T0: Ts = Ts(1_800_000_000_000_000);
const LEASE: Ts = Ts(1_800_000_100_000_000);
const SCHED: Ts = Ts(1_800_000_200_000_000);
const LATER: Ts = Ts(1_800_000_300_000_000);
const FAR: Ts = Ts(1_900_000_000_000_000);
const DLQ: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 0,
    has_dead_queue: true,
    backoff: Backoff::OFF,
};
/// Payload sizes around the codec's inline limit (1024) and well above it.
const SIZES: [usize; 9] = [0, 1, 1023, 1024, 1025, 1026, 4097, 70_000, 300_000];

/// Deterministic bytes for item `tag` (no two tags alike, no byte pattern a truncation or a swap would keep).
fn payload(tag: usize, len: usize) -> Bytes {
    let mut x = (tag as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// What item `tag` was produced with.
#[derive(Clone)]
struct Expected {
    payload: Bytes,
    kind: String,
    encoding: String,
    source_id: String,
}

fn new_item(tag: usize, len: usize, enqueue_at: Ts) -> (NewItem, Expected) {
    // Long strings: they stay resident beside the dropped payload (`Slot::drop_payload` keeps them).
    let kind = format!("kind-{tag}-{}", "k".repeat(500 + tag % 7));
    let encoding = format!("enc-{tag}-{}", "e".repeat(200));
    let source_id = if tag.is_multiple_of(2) {
        format!("src-{tag}-{}", "s".repeat(300))
    } else {
        String::new()
    };
    let e = Expected {
        payload: payload(tag, len),
        kind: kind.clone(),
        encoding: encoding.clone(),
        source_id: source_id.clone(),
    };
    let n = NewItem {
        source_id,
        enqueue_at,
        expire_deadline: FAR,
        created_at: T0,
        reference: format!("{tag}"),
        encoding,
        kind,
        payload: e.payload.clone(),
        priority: [0, 4, 9][tag % 3],
        dedup_id: format!("dedup-{tag}-{}", "d".repeat(100)),
        dedup_until: FAR,
    };
    (n, e)
}

/// The tag of an item and a check that it carries exactly what it was produced with.
fn check(model: &HashMap<usize, Expected>, it: &Item, at: &str) -> usize {
    let tag: usize = it.reference.parse().expect("tag");
    let e = &model[&tag];
    assert!(
        it.payload == e.payload,
        "{at}: item {tag} (id {}, {} bytes produced) came back with {} bytes, {}",
        it.id,
        e.payload.len(),
        it.payload.len(),
        if it.payload.len() == e.payload.len() {
            "other content"
        } else {
            "another length"
        }
    );
    assert_eq!(it.kind, e.kind, "{at}: kind of {tag}");
    assert_eq!(it.encoding, e.encoding, "{at}: encoding of {tag}");
    assert_eq!(it.source_id, e.source_id, "{at}: source id of {tag}");
    tag
}

/// Opens (or re-opens) the store and the partition.
async fn open(dir: &Path) -> (FjallStore, Arc<dyn Partition>) {
    // After an unclean restart the dropped store's threads may hold the lock for a moment.
    for _ in 0..50 {
        match FjallStore::open(dir, Durability::Sync) {
            Ok(store) => {
                let p = store.open("q", 0).await.expect("partition");
                return (store, p);
            }
            Err(e) if e.kind == StorageErrorKind::Locked => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => panic!("open: {e}"),
        }
    }
    panic!("the store stayed locked after its handles were dropped");
}

/// A restart: a clean one closes partition and store, an unclean one drops them as a crash would leave them (every
/// acknowledged write was synced).
async fn restart(
    dir: &Path,
    store: FjallStore,
    p: Arc<dyn Partition>,
    clean: bool,
) -> (FjallStore, Arc<dyn Partition>) {
    if clean {
        p.close().await;
        store.close().await;
    }
    drop(p);
    drop(store);
    open(dir).await
}

/// Every item of the partition's snapshot, checked; their tags by state.
async fn snapshot_tags(
    p: &dyn Partition,
    model: &HashMap<usize, Expected>,
    at: &str,
) -> BTreeMap<&'static str, Vec<usize>> {
    let mut snap = p.snapshot().await.expect("snapshot");
    let mut out: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    loop {
        // A small bound, so that pages cut between a metadata record and its payload record.
        let page = snap.next_within(5, 3_000).await.expect("next");
        if page.is_empty() {
            break;
        }
        for it in &page {
            let tag = check(model, it, at);
            let state = if it.dead {
                "dead"
            } else if it.is_scheduled() {
                "scheduled"
            } else if it.is_leased {
                "leased"
            } else {
                "ready"
            };
            out.entry(state).or_default().push(tag);
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
    }
    out
}

/// Lists (ready and leased, or scheduled) in small byte-bounded pages, checking every item; returns the tags.
async fn list_tags(
    p: &dyn Partition,
    model: &HashMap<usize, Expected>,
    scheduled: bool,
    at: &str,
) -> Vec<usize> {
    let mut pivot = None;
    let mut out = Vec::new();
    loop {
        let (page, _) = p.list_within(pivot, 4, scheduled, 2_500).await.expect("list");
        let Some(last) = page.last() else { break };
        pivot = Some(ItemId(last.id.0 + 1));
        for it in &page {
            out.push(check(model, it, at));
        }
    }
    out.sort_unstable();
    out
}

/// The tags of the items of `role`, one per size.
fn tags_of(role: usize) -> Vec<usize> {
    (0..SIZES.len()).map(|s| s * 10 + role).collect()
}

/// Every role an item can take through the lifecycle, each with every size, restarted between the steps:
/// - 0: leased, expires (after a restart), requeued, leased again;
/// - 1: leased, retried into the ready queue, leased again;
/// - 2: leased, retried into the schedule (keeps its id), restart, due, requeued, leased again;
/// - 3: leased, retried dead (dead-letter queue), restart, read for transfer, removed;
/// - 4: produced scheduled, restart, listed, due, requeued, leased;
/// - 5: leased, extended, restart, listed and snapshotted as leased, completed.
async fn every_path(clean: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut store, mut p) = open(dir.path()).await;
    let mut model = HashMap::new();
    let mut batch = Vec::new();
    for (s, &len) in SIZES.iter().enumerate() {
        for role in 0..6 {
            let tag = s * 10 + role;
            let at = if role == 4 { SCHED } else { Ts::ZERO };
            let (n, e) = new_item(tag, len, at);
            model.insert(tag, e);
            batch.push(n);
        }
    }
    let total = batch.len();
    p.produce(batch).await.expect("produce");
    let mut ids: HashMap<usize, ItemId> = HashMap::new();
    loop {
        let (got, _) = p.lease_within(7, LEASE, 200_000).await.expect("lease");
        if got.is_empty() {
            break;
        }
        for it in &got {
            let tag = check(&model, it, "first lease");
            ids.insert(tag, it.id);
        }
    }
    assert_eq!(ids.len(), total - SIZES.len(), "every ready item leased once");

    (store, p) = restart(dir.path(), store, p, clean).await;
    let leased = list_tags(&*p, &model, false, "list of leased after restart 1").await;
    let mut want: Vec<usize> = ids.keys().copied().collect();
    want.sort_unstable();
    assert_eq!(leased, want, "leased after restart 1");
    assert_eq!(
        list_tags(&*p, &model, true, "list of scheduled after restart 1").await,
        tags_of(4)
    );
    snapshot_tags(&*p, &model, "snapshot after restart 1").await;

    // One retry call, one group per role: several groups in one pass.
    let group = |role: usize, action: RetryAction| -> Vec<RetryOp> {
        tags_of(role)
            .into_iter()
            .map(|t| RetryOp { id: ids[&t], action })
            .collect()
    };
    let out = p
        .retry(
            vec![
                group(1, RetryAction::Requeue),
                group(2, RetryAction::Schedule(SCHED)),
                group(3, RetryAction::Dead),
            ],
            DLQ,
        )
        .await
        .expect("retry");
    assert!(out.iter().all(|o| o.is_ok()), "{out:?}");
    let ext: Vec<ItemId> = tags_of(5).into_iter().map(|t| ids[&t]).collect();
    assert!(p.extend(vec![(ext, FAR)]).await.expect("extend")[0].is_ok());

    (store, p) = restart(dir.path(), store, p, clean).await;
    let snap = snapshot_tags(&*p, &model, "snapshot after restart 2").await;
    assert_eq!(snap.get("dead").cloned().unwrap_or_default(), tags_of(3));
    assert_eq!(snap.get("scheduled").cloned().unwrap_or_default(), {
        let mut v = [tags_of(2), tags_of(4)].concat();
        v.sort_unstable();
        v
    });
    assert_eq!(snap.get("ready").cloned().unwrap_or_default(), tags_of(1));
    let dead = p.dead_items_within(100, 1).await.expect("dead items").0;
    assert_eq!(dead.len(), 1, "a byte bound of 1 still gives one item");
    let (dead, _) = p.dead_items_within(100, u64::MAX).await.expect("dead items");
    let mut dead_tags: Vec<usize> = dead.iter().map(|it| check(&model, it, "dead items")).collect();
    dead_tags.sort_unstable();
    assert_eq!(dead_tags, tags_of(3));

    // Everything due: leases of role 0 expired, schedules of roles 2 and 4 due. A small limit, so passes split.
    let mut passes = 0;
    loop {
        let o = p.lifecycle(LATER, DLQ, 5).await.expect("lifecycle");
        passes += 1;
        if !o.more {
            break;
        }
        assert!(passes < 1_000, "lifecycle passes never end");
    }

    (store, p) = restart(dir.path(), store, p, clean).await;
    let mut again = Vec::new();
    loop {
        let (got, _) = p.lease_within(3, FAR, 100_000).await.expect("lease");
        if got.is_empty() {
            break;
        }
        for it in &got {
            again.push(check(&model, it, "second lease"));
        }
        let done: Vec<ItemId> = got.iter().map(|it| it.id).collect();
        assert!(p.complete(vec![done]).await.expect("complete")[0].is_ok());
    }
    again.sort_unstable();
    let mut want = [tags_of(0), tags_of(1), tags_of(2), tags_of(4)].concat();
    want.sort_unstable();
    assert_eq!(again, want, "every requeued item leased again once");
    assert_eq!(
        list_tags(&*p, &model, false, "leased at the end").await,
        tags_of(5)
    );
    let ext: Vec<ItemId> = tags_of(5).into_iter().map(|t| ids[&t]).collect();
    assert!(p.complete(vec![ext]).await.expect("complete")[0].is_ok());
    let dead_ids: Vec<ItemId> = dead.iter().map(|it| it.id).collect();
    p.remove_dead(dead_ids).await.expect("remove dead");

    (store, p) = restart(dir.path(), store, p, clean).await;
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (0, 0, 0), "{c:?}");
    assert_eq!(p.dead_count().await.expect("dead count"), 0);
    assert_eq!(p.stats(T0).await.expect("stats").payload_bytes, 0);
    assert!(snapshot_tags(&*p, &model, "empty").await.is_empty());
    p.close().await;
    store.close().await;
}

#[tokio::test]
async fn every_path_keeps_exact_payloads_across_clean_restarts() {
    every_path(true).await;
}

#[tokio::test]
async fn every_path_keeps_exact_payloads_across_unclean_restarts() {
    every_path(false).await;
}

/// Items of another store moved in whole (a rebalance, a restore): leased, scheduled and dead ones with large
/// payloads drop them on import and must find them on disk afterwards, across a restart, under their new ids.
#[tokio::test]
async fn imported_items_keep_their_payloads_on_disk() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut store, mut p) = open(dir.path()).await;
    let mut model = HashMap::new();
    let mut items = Vec::new();
    for (s, &len) in SIZES.iter().enumerate() {
        for role in 0..4 {
            let tag = s * 10 + role;
            let (n, e) = new_item(tag, len, Ts::ZERO);
            model.insert(tag, e);
            items.push(Item {
                id: ItemId(1_000 + tag as u64),
                source_id: n.source_id,
                is_leased: role == 1,
                lease_deadline: if role == 1 { LEASE } else { Ts::ZERO },
                expire_deadline: n.expire_deadline,
                enqueue_at: if role == 2 { SCHED } else { Ts::ZERO },
                created_at: n.created_at,
                attempts: 1,
                reference: n.reference,
                encoding: n.encoding,
                kind: n.kind,
                payload: n.payload,
                dead: role == 3,
                priority: n.priority,
                ..Default::default()
            });
        }
    }
    let imported = p.import(items).await.expect("import");
    for it in &imported {
        check(&model, it, "import's answer");
    }
    (store, p) = restart(dir.path(), store, p, false).await;
    let snap = snapshot_tags(&*p, &model, "snapshot after import").await;
    assert_eq!(snap.get("leased").cloned().unwrap_or_default(), tags_of(1));
    assert_eq!(snap.get("scheduled").cloned().unwrap_or_default(), tags_of(2));
    assert_eq!(snap.get("dead").cloned().unwrap_or_default(), tags_of(3));
    let (dead, _) = p.dead_items_within(100, u64::MAX).await.expect("dead");
    assert_eq!(dead.len(), SIZES.len());
    for it in &dead {
        check(&model, it, "imported dead item");
    }
    loop {
        if !p.lifecycle(LATER, DLQ, 3).await.expect("lifecycle").more {
            break;
        }
    }
    (store, p) = restart(dir.path(), store, p, true).await;
    let (got, _) = p.lease_within(1_000, FAR, u64::MAX).await.expect("lease");
    let mut tags: Vec<usize> = got
        .iter()
        .map(|it| check(&model, it, "lease after import"))
        .collect();
    tags.sort_unstable();
    let mut want = [tags_of(0), tags_of(1), tags_of(2)].concat();
    want.sort_unstable();
    assert_eq!(tags, want);
    p.close().await;
    store.close().await;
}

/// A retry naming an item twice, in one group (refused whole) and in two, and groups that fail their check after an
/// earlier group of the same call moved their item: the payload read back for the requeue is the one the item
/// keeps; nothing is requeued twice or lost.
#[tokio::test]
async fn retries_naming_an_item_twice_requeue_it_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut store, mut p) = open(dir.path()).await;
    let mut model = HashMap::new();
    let batch = (0..6)
        .map(|tag| {
            let (n, e) = new_item(tag, 5_000 + tag, Ts::ZERO);
            model.insert(tag, e);
            n
        })
        .collect();
    p.produce(batch).await.expect("produce");
    let leased = p.lease(6, LEASE).await.expect("lease");
    let id = |t: usize| leased[t].id;
    let op = |t: usize, action| RetryOp { id: id(t), action };
    let out = p
        .retry(
            vec![
                vec![op(0, RetryAction::Requeue), op(0, RetryAction::Requeue)],
                vec![op(1, RetryAction::Requeue)],
                vec![op(1, RetryAction::Schedule(SCHED))],
                vec![op(2, RetryAction::Schedule(SCHED))],
                vec![op(2, RetryAction::Requeue)],
                // Item 0 is still leased: its group above was refused whole.
                vec![op(3, RetryAction::Requeue), op(0, RetryAction::Requeue)],
            ],
            DLQ,
        )
        .await
        .expect("retry");
    let ok: Vec<bool> = out.iter().map(|o| o.is_ok()).collect();
    assert_eq!(ok, [false, true, false, true, false, true], "{out:?}");
    (store, p) = restart(dir.path(), store, p, false).await;
    loop {
        if !p.lifecycle(LATER, DLQ, 100).await.expect("lifecycle").more {
            break;
        }
    }
    let got = p.lease(100, FAR).await.expect("lease");
    let mut tags: Vec<usize> = got
        .iter()
        .map(|it| check(&model, it, "lease after retries"))
        .collect();
    tags.sort_unstable();
    assert_eq!(
        tags,
        [0, 1, 2, 3, 4, 5],
        "each once: 4 and 5 expired, 0, 1 and 3 requeued, 2 due"
    );
    p.close().await;
    store.close().await;
}

/// With backoff on, an expired lease is scheduled (it keeps its id and its payload record), so a lifecycle pass
/// needs none of the payloads on disk: it must expire every due lease up to its limit in one pass, not stop at
/// the byte bound of payloads it would read back for requeues (16 MiB) nor read any.
#[tokio::test]
async fn expired_leases_under_backoff_need_no_payload_read() {
    const N: usize = 40;
    const LEN: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("tmp");
    let (store, p) = open(dir.path()).await;
    let mut model = HashMap::new();
    for b in 0..N / 10 {
        let batch = (b * 10..b * 10 + 10)
            .map(|tag| {
                let (n, e) = new_item(tag, LEN, Ts::ZERO);
                model.insert(tag, e);
                n
            })
            .collect();
        p.produce(batch).await.expect("produce");
    }
    loop {
        let (got, _) = p.lease_within(N, LEASE, 16 << 20).await.expect("lease");
        if got.is_empty() {
            break;
        }
    }
    assert_eq!(p.counts().await.expect("counts").leased, N as u64);
    let policy = LifecyclePolicy {
        backoff: Backoff {
            base: std::time::Duration::from_secs(60),
            factor: 2.0,
            max: std::time::Duration::from_secs(600),
            jitter: 0.0,
        },
        ..DLQ
    };
    let o = p
        .lifecycle(Ts(LEASE.0 + 1), policy, 1_000)
        .await
        .expect("lifecycle");
    assert_eq!(
        (o.lease_expired, o.more),
        (N as u64, false),
        "one pass expires all {N} leases of 1 MiB into the schedule"
    );
    assert_eq!(p.counts().await.expect("counts").scheduled, N as u64);
    loop {
        // Due (a minute of backoff) and before the items expire.
        if !p.lifecycle(LATER, policy, 1_000).await.expect("lifecycle").more {
            break;
        }
    }
    let (got, _) = p.lease_within(N, FAR, u64::MAX).await.expect("lease");
    assert_eq!(got.len(), N);
    for it in &got {
        check(&model, it, "after backoff");
    }
    p.close().await;
    store.close().await;
}

/// A retry requeuing more payloads than one write reads back (40 of 1 MiB, the bound is 16 MiB) requeues them in
/// parts before it answers: after an unclean restart every item is ready once, whole, in the retry's order.
#[tokio::test]
async fn a_retry_beyond_the_read_bound_requeues_every_item_whole_in_its_order() {
    const N: usize = 40;
    let dir = tempfile::tempdir().expect("tmp");
    let (mut store, mut p) = open(dir.path()).await;
    let mut model = HashMap::new();
    for b in 0..N / 10 {
        let batch = (b * 10..b * 10 + 10)
            .map(|tag| {
                let (n, e) = new_item(tag, (1 << 20) + tag, Ts::ZERO);
                model.insert(tag, e);
                NewItem { priority: 0, ..n }
            })
            .collect();
        p.produce(batch).await.expect("produce");
    }
    let mut leased = Vec::new();
    loop {
        let (got, _) = p.lease_within(N, LEASE, 16 << 20).await.expect("lease");
        if got.is_empty() {
            break;
        }
        leased.extend(got.iter().map(|it| (check(&model, it, "lease"), it.id)));
    }
    assert_eq!(leased.len(), N);
    let ops: Vec<RetryOp> = leased
        .iter()
        .rev()
        .map(|&(_, id)| RetryOp {
            id,
            action: RetryAction::Requeue,
        })
        .collect();
    let out = p.retry(vec![ops], DLQ).await.expect("retry");
    assert_eq!(out[0].as_ref().map(|o| o.requeued), Ok(N as u64));
    let c = p.counts().await.expect("counts");
    assert_eq!(
        (c.ready, c.scheduled, c.leased),
        (N as u64, 0, 0),
        "all requeued before the answer"
    );
    (store, p) = restart(dir.path(), store, p, false).await;
    let mut got = Vec::new();
    loop {
        let (page, _) = p.lease_within(N, FAR, 16 << 20).await.expect("lease");
        if page.is_empty() {
            break;
        }
        got.extend(page.iter().map(|it| check(&model, it, "after the retry")));
    }
    let want: Vec<usize> = leased.iter().rev().map(|&(t, _)| t).collect();
    assert_eq!(got, want, "every item once, in the retry's order");
    p.close().await;
    store.close().await;
}

/// A release (a lease that reached no one) of more payloads than one write reads back goes through the same parts
/// as a retry: some items are scheduled as due at once first and requeued after. None of them may come out of that
/// with the released lease counted, before or after an unclean restart: with `max_attempts: 1` each must still be
/// leasable once more, and only a plain retry after that kills it.
#[tokio::test]
async fn a_release_beyond_the_read_bound_does_not_count_the_lease_in_any_part() {
    const N: usize = 40;
    let once = LifecyclePolicy {
        max_attempts: 1,
        ..DLQ
    };
    let dir = tempfile::tempdir().expect("tmp");
    let (mut store, mut p) = open(dir.path()).await;
    let mut model = HashMap::new();
    for b in 0..N / 10 {
        let batch = (b * 10..b * 10 + 10)
            .map(|tag| {
                let (n, e) = new_item(tag, (1 << 20) + tag, Ts::ZERO);
                model.insert(tag, e);
                NewItem { priority: 0, ..n }
            })
            .collect();
        p.produce(batch).await.expect("produce");
    }
    let mut leased = Vec::new();
    loop {
        let (got, _) = p.lease_within(N, LEASE, 16 << 20).await.expect("lease");
        if got.is_empty() {
            break;
        }
        for it in &got {
            assert_eq!(it.attempts, 1);
            leased.push((check(&model, it, "lease"), it.id));
        }
    }
    assert_eq!(leased.len(), N);
    let ops: Vec<RetryOp> = leased
        .iter()
        .map(|&(_, id)| RetryOp {
            id,
            action: RetryAction::Release,
        })
        .collect();
    let out = p.retry(vec![ops], once).await.expect("release");
    assert_eq!(out[0].as_ref().map(|o| (o.requeued, o.dead)), Ok((N as u64, 0)));
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.scheduled, c.leased), (N as u64, 0, 0));
    (store, p) = restart(dir.path(), store, p, false).await;
    let mut again = Vec::new();
    loop {
        let (page, _) = p.lease_within(N, FAR, 16 << 20).await.expect("lease");
        if page.is_empty() {
            break;
        }
        for it in &page {
            let tag = check(&model, it, "after the release");
            assert_eq!(
                it.attempts, 1,
                "item {tag}: the released lease is not counted (this lease is its first attempt)"
            );
            again.push(it.id);
        }
    }
    assert_eq!(again.len(), N, "every released item is leasable again");
    let ops: Vec<RetryOp> = again
        .iter()
        .map(|&id| RetryOp {
            id,
            action: RetryAction::Requeue,
        })
        .collect();
    let out = p.retry(vec![ops], once).await.expect("retry");
    assert_eq!(
        out[0].as_ref().map(|o| (o.requeued, o.dead)),
        Ok((0, N as u64)),
        "the attempt now counted is the last"
    );
    p.close().await;
    store.close().await;
}
