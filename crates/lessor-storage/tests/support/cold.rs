//! What the cold-segment tests of the fjall and memory backends share (`fjall_cold.rs`, `memory_cold.rs`): the
//! object-store environment on the S3 test server, a model of the ready queue to produce against and drain against,
//! and the checks both stores must pass (the payload sweeper's snapshot, an unreadable segment). Each test file opens
//! its own store on the environment.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionSnapshot};
use lessor_core::time::{ManualClock, Ts};
use lessor_core::types::{Backoff, ItemId, NewItem};
use lessor_storage::offload::{self, ObjectStoreConfig};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

pub const T0: Ts = Ts(1_800_000_000_000_000);
pub const LEASE: Ts = Ts(1_800_000_100_000_000);
pub const FAR: Ts = Ts(1_900_000_000_000_000);
pub const POLICY: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 0,
    has_dead_queue: false,
    backoff: Backoff::OFF,
};

/// The ready queue as the tests expect it: priority first (highest first), then id.
pub type Model = BTreeMap<(Reverse<u8>, ItemId), Bytes>;

/// An object store on the S3 test server, under a prefix of its own.
pub struct Env {
    pub cfg: ObjectStoreConfig,
    pub client: Arc<dyn ObjectStore>,
}

/// The environment of test `test` in `bucket`; `None` (the test returns) when no S3 test server is configured.
pub async fn env(bucket: &str, test: &str) -> Option<Env> {
    let endpoint = lessor_testkit::s3::bucket(bucket).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let cfg = ObjectStoreConfig {
        name: "s3-0".into(),
        endpoint,
        bucket: bucket.into(),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        path_style: true,
        prefix: format!("{test}-{nanos}/"),
        ..Default::default()
    };
    let client = offload::client(&cfg).unwrap();
    Some(Env { cfg, client })
}

/// An environment whose endpoint nobody listens on: every object request fails (object storage down).
pub fn down_env(bucket: &str) -> Env {
    let cfg = ObjectStoreConfig {
        name: "s3-0".into(),
        endpoint: "http://127.0.0.1:9".into(),
        bucket: bucket.into(),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        path_style: true,
        prefix: "down/".into(),
        ..Default::default()
    };
    let client = offload::client(&cfg).unwrap();
    Env { cfg, client }
}

impl Env {
    /// The segment objects under the prefix, sorted.
    pub async fn segments(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .client
            .list(Some(&ObjPath::from(self.cfg.prefix.as_str())))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.retain(|k| k.contains("/segments/"));
        keys.sort();
        keys
    }

    /// Waits until no segment object is left (their deletion runs after the commit that forgets them).
    pub async fn segments_gone(&self) {
        let gone = lessor_testkit::eventually::poll_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let left = self.segments().await;
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("segments left: {left:?}"))
                }
            },
        )
        .await;
        assert!(gone.is_ok(), "{gone:?}");
    }
}

/// Produces `n` items over priorities 0, 2 and 5; returns the model of the ready queue.
pub async fn produce(p: &Arc<dyn Partition>, n: usize) -> Model {
    let mut model = BTreeMap::new();
    for chunk in 0..n / 50 {
        let batch: Vec<NewItem> = (0..50)
            .map(|i| {
                let k = chunk * 50 + i;
                NewItem {
                    expire_deadline: FAR,
                    created_at: T0,
                    payload: Bytes::from(format!("item-{k:06}-{}", "x".repeat(k % 17))),
                    priority: [0, 2, 5, 0, 2][k % 5],
                    ..Default::default()
                }
            })
            .collect();
        let prios: Vec<(u8, Bytes)> = batch.iter().map(|b| (b.priority, b.payload.clone())).collect();
        let ids = p.produce(batch).await.unwrap();
        for (id, (prio, payload)) in ids.into_iter().zip(prios) {
            model.insert((Reverse(prio), id), payload);
        }
    }
    model
}

/// Produces `n` items of priority `prio` (expiring at `expire`) in batches of 50; returns their ids in order.
pub async fn produce_prio(p: &Arc<dyn Partition>, n: usize, prio: u8, expire: Ts) -> Vec<ItemId> {
    let mut ids = Vec::new();
    for chunk in 0..n.div_ceil(50) {
        let batch: Vec<NewItem> = (chunk * 50..n.min(chunk * 50 + 50))
            .map(|i| NewItem {
                expire_deadline: expire,
                created_at: T0,
                payload: Bytes::from(format!("p{prio}-{i}")),
                priority: prio,
                ..Default::default()
            })
            .collect();
        ids.extend(p.produce(batch).await.unwrap());
    }
    ids
}

/// Runs lifecycle calls (which start and finish the background spills) until `want` segments exist.
pub async fn spill(env: &Env, p: &Arc<dyn Partition>, want: usize) {
    for _ in 0..2000 {
        p.lifecycle(T0, POLICY, 100).await.unwrap();
        if env.segments().await.len() >= want {
            // One more call commits the last job.
            p.lifecycle(T0, POLICY, 100).await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("fewer than {want} segments: {:?}", env.segments().await);
}

/// Like `spill`, then runs lifecycle calls until the store counts `want` segments written (`written` reads its
/// counter). A segment's object is listed as soon as its upload ends, before the background job has handed its
/// result back, so the call after `spill` may still find the last job running and not commit it.
pub async fn spill_committed(env: &Env, p: &Arc<dyn Partition>, want: usize, written: impl Fn() -> u64) {
    spill(env, p, want).await;
    for _ in 0..2000 {
        if written() >= want as u64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        p.lifecycle(T0, POLICY, 100).await.unwrap();
    }
    panic!("fewer than {want} segments committed: {}", written());
}

/// Runs lifecycle calls until no new segment appears for a while (every full segment's worth is spilled).
pub async fn settle(env: &Env, p: &Arc<dyn Partition>) {
    let (mut last, mut quiet) = (usize::MAX, 0);
    while quiet < 10 {
        p.lifecycle(T0, POLICY, 100).await.unwrap();
        let n = env.segments().await.len();
        quiet = if n == last { quiet + 1 } else { 0 };
        last = n;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Lists every ready item, `limit` at a time as a dashboard pages (each page starts after the last id of the one
/// before); returns the ids in the order listed and the number of pages.
pub async fn list_pages(p: &Arc<dyn Partition>, limit: usize) -> (Vec<ItemId>, usize) {
    let (mut ids, mut pages, mut pivot) = (Vec::new(), 0, None);
    loop {
        let page = p.list(pivot, limit, false).await.unwrap();
        let Some(last) = page.last() else {
            return (ids, pages);
        };
        pivot = Some(ItemId(last.id.0 + 1));
        pages += 1;
        ids.extend(page.iter().map(|it| it.id));
    }
}

/// Checks single lists of a partition whose ready items are `want` (in id order) with the payloads of `model`: one
/// page over everything, one of 300 from the pivot `want[at]`, one cut by its byte bound (a prefix), and one of no
/// items (empty: the walk over segments stops at once).
pub async fn check_single_pages(p: &Arc<dyn Partition>, want: &[ItemId], at: usize, model: &Model) {
    let all = p.list(None, 5000, false).await.unwrap();
    assert_eq!(all.iter().map(|it| it.id).collect::<Vec<_>>(), want);
    let from: Vec<ItemId> = p
        .list(Some(want[at]), 300, false)
        .await
        .unwrap()
        .iter()
        .map(|it| it.id)
        .collect();
    assert_eq!(from, want[at..at + 300]);
    let (cut, capped) = p.list_within(None, 1000, false, 2000).await.unwrap();
    assert!(
        capped && !cut.is_empty() && cut.len() < 1000,
        "{} items",
        cut.len()
    );
    assert_eq!(cut.iter().map(|it| it.id).collect::<Vec<_>>(), want[..cut.len()]);
    assert!(p.list(None, 0, false).await.unwrap().is_empty());
    // The payloads listed are the items' own.
    for it in &all {
        assert_eq!(Some(&it.payload), model.get(&(Reverse(it.priority), it.id)));
    }
}

/// Leases everything, `batch` at a time with lifecycle calls between (which prefetch segments), checking each
/// lease against the model; returns how many were leased.
pub async fn drain(p: &Arc<dyn Partition>, model: &mut Model, batch: usize) -> usize {
    let mut seen = HashSet::new();
    let mut n = 0;
    while !model.is_empty() {
        let got = p.lease(batch, LEASE).await.unwrap();
        let expect: Vec<(ItemId, Bytes)> = model.iter().take(batch).map(|(k, v)| (k.1, v.clone())).collect();
        let got_pairs: Vec<(ItemId, Bytes)> = got.iter().map(|it| (it.id, it.payload.clone())).collect();
        assert_eq!(got_pairs, expect, "after {n} leased");
        for it in &got {
            assert!(seen.insert(it.id), "{} leased twice", it.id.0);
            model.remove(&(Reverse(it.priority), it.id));
        }
        n += got.len();
        let ids: Vec<ItemId> = got.iter().map(|it| it.id).collect();
        assert!(p.complete(vec![ids]).await.unwrap()[0].is_ok());
        p.lifecycle(T0, POLICY, 100).await.unwrap();
    }
    assert!(p.lease(10, LEASE).await.unwrap().is_empty());
    n
}

/// The ids a snapshot reads, in its order.
async fn read_ids(mut snap: Box<dyn PartitionSnapshot>) -> Vec<ItemId> {
    let mut ids = Vec::new();
    loop {
        let page = snap.next(64).await.unwrap();
        if page.is_empty() {
            return ids;
        }
        ids.extend(page.into_iter().map(|it| it.id));
    }
}

/// With part of `model` (every ready item of `p`) in segments: the payload sweeper's snapshot reads the rest, in id
/// order, without loading a segment (`loaded` counts the loads of the store), and a full snapshot (backups) reads
/// every item.
pub async fn check_reference_snapshot(
    env: &Env,
    p: &Arc<dyn Partition>,
    model: &Model,
    loaded: impl Fn() -> u64,
) {
    let total = model.len() as u64;
    let cold = p.stats(T0).await.unwrap().tiers.object.items;
    assert!(cold >= 100, "{cold} items in segments");
    let segments = env.segments().await;
    let loaded_before = loaded();
    let warm = read_ids(p.reference_snapshot().await.unwrap()).await;
    // A spill started by the last lifecycle call may commit meanwhile (the partition's ticker): segments only
    // grow here, since nothing loads them.
    let cold_after = p.stats(T0).await.unwrap().tiers.object.items;
    assert!(cold_after >= cold, "{cold_after} < {cold}");
    let n = warm.len() as u64;
    assert!(
        (total - cold_after..=total - cold).contains(&n),
        "reads the items outside segments only: {n}, with {cold}..{cold_after} in segments"
    );
    assert!(warm.windows(2).all(|w| w[0] < w[1]), "in id order");
    assert_eq!(loaded(), loaded_before, "no segment loaded");
    let now = env.segments().await;
    assert!(
        segments.iter().all(|k| now.contains(k)),
        "the segments are still there: {segments:?} then {now:?}"
    );
    // A full snapshot sees every item, also when a spill was in flight as it started.
    let all = read_ids(p.snapshot().await.unwrap()).await;
    let mut want: Vec<ItemId> = model.keys().map(|k| k.1).collect();
    want.sort();
    let missing: Vec<ItemId> = want.iter().filter(|id| !all.contains(id)).copied().collect();
    assert!(
        missing.is_empty() && all.len() == want.len(),
        "missing {} items: {missing:?}",
        missing.len()
    );
    assert_eq!(all, want);
}

/// The lifecycle of a partition whose first due segment (of a 300-item priority-0 backlog due at T0 + 1 s) cannot be
/// read: an expired lease still goes back, the items outside segments still expire, and the next deadline is a
/// retry after now, not one already passed. Returns the unreadable segment's key.
pub async fn check_unreadable_due_segment(env: &Env, p: &Arc<dyn Partition>) -> String {
    let due = Ts(T0.0 + 1_000_000);
    let backlog = produce_prio(p, 300, 0, due).await;
    spill(env, p, 3).await;
    let victim = env.segments().await[0].clone();
    env.client.delete(&ObjPath::from(victim.as_str())).await.unwrap();
    // A priority-9 item, leased until T0 + 0.5 s.
    let held = produce_prio(p, 1, 9, FAR).await[0];
    let got = p.lease(1, Ts(T0.0 + 500_000)).await.unwrap();
    assert_eq!(got[0].id, held);
    let later = Ts(T0.0 + 2_000_000);
    let o = p
        .lifecycle(later, POLICY, 1000)
        .await
        .expect("the lifecycle goes on");
    assert_eq!(o.lease_expired, 1, "{o:?}");
    // The lease went back: the item is served again, ahead of every priority-0 item.
    let again = p.lease(1, LEASE).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|it| (it.priority, it.attempts, &it.payload[..]))
            .collect::<Vec<_>>(),
        vec![(9, 2, &b"p9-0"[..])]
    );
    // The due items outside segments expired; those in segments did not, and are retried later, not at once.
    let next = p.next_deadline().await.unwrap().unwrap();
    assert!(next > later, "next deadline {next:?} is not after {later:?}");
    let stats = p.stats(later).await.unwrap();
    assert!(
        stats.counts.ready > 0 && stats.counts.ready < backlog.len() as u64,
        "{} ready",
        stats.counts.ready
    );
    assert_eq!(
        stats.counts.ready, stats.tiers.object.items,
        "only the segments' items are left: {:?}",
        stats.tiers
    );
    victim
}

/// Leases a priority-9 item whose id lies inside the id range of a priority-0 segment (ids are handed out in blocks
/// of 1,024 per priority, so a segment of one priority spans the blocks of others), after spilling `want` segments,
/// then deletes that segment's object behind the store's back. Returns the leased id and the deleted key.
pub async fn lease_an_item_inside_a_lost_segment(
    env: &Env,
    p: &Arc<dyn Partition>,
    want: usize,
) -> (ItemId, String) {
    // Priority 0 fills its first block, priority 9 opens one after it, priority 0 goes on in a block after that.
    let _ = produce_prio(p, 1020, 0, FAR).await;
    let high = produce_prio(p, 1, 9, FAR).await[0];
    let _ = produce_prio(p, 40, 0, FAR).await;
    spill(env, p, want).await;
    settle(env, p).await;
    let got = p.lease(1, LEASE).await.unwrap();
    assert_eq!(got[0].id, high);
    // The priority-0 segment whose id range holds the leased item's id goes.
    let spanning: Vec<String> = env
        .segments()
        .await
        .into_iter()
        .filter(|k| {
            let name = k.rsplit('/').next().unwrap();
            let first: u64 = name.split('-').next().unwrap().parse().unwrap();
            first < high.0
        })
        .collect();
    let victim = spanning.last().expect("a segment below the leased id").clone();
    env.client.delete(&ObjPath::from(victim.as_str())).await.unwrap();
    (high, victim)
}

/// Leases every ready item, `batch` at a time with lifecycle calls between (which prefetch segments), without
/// completing them; returns their ids in the order leased.
pub async fn lease_all(p: &Arc<dyn Partition>, batch: usize) -> Vec<ItemId> {
    let mut ids = Vec::new();
    loop {
        let got = p.lease(batch, LEASE).await.unwrap();
        if got.is_empty() {
            return ids;
        }
        ids.extend(got.iter().map(|it| it.id));
        p.lifecycle(T0, POLICY, 100).await.unwrap();
    }
}

/// A segment whose fetch failed is not fetched again before its retry pause passes, timed by the store's `clock`:
/// leases, lifecycle passes and a list meanwhile get the failure at once, naming the segment and the pause, and no
/// request (`failed` reads the store's count of failed segment fetches); the pause doubles at each failure; once it
/// has passed with the object back, the segment's items are served, in order. With a 300-item priority-0 backlog
/// in segments whose first object goes missing.
pub async fn check_paused_segment(
    env: &Env,
    p: &Arc<dyn Partition>,
    clock: &ManualClock,
    failed: impl Fn() -> u64,
) {
    let low = produce_prio(p, 300, 0, FAR).await;
    spill(env, p, 3).await;
    let victim = env.segments().await[0].clone();
    let path = ObjPath::from(victim.as_str());
    let body = env.client.get(&path).await.unwrap().bytes().await.unwrap();
    env.client.delete(&path).await.unwrap();
    // Serve the items before the missing segment, until a lease needs it.
    let mut served = 0;
    let e = loop {
        match p.lease(1, LEASE).await {
            Ok(got) => {
                assert_eq!(got.len(), 1, "ran dry before the missing segment");
                assert_eq!(got[0].id, low[served]);
                served += 1;
            }
            Err(e) => break e,
        }
        assert!(served < 300, "the missing segment was never needed");
    };
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(e.message.contains(&victim), "{e}");
    let fetched = failed();
    assert!(fetched >= 1, "the failed fetch is counted");
    // During the pause: no fetch, whatever needs the segment; the answer names it and says it is paused.
    for i in 0..20 {
        let e = p.lease(5, LEASE).await.expect_err("still missing");
        assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
        assert!(e.message.contains(&victim), "{e}");
        p.lifecycle(T0, POLICY, 100).await.expect("the lifecycle goes on");
        assert_eq!(
            failed(),
            fetched,
            "lease and lifecycle {i} fetched the segment again during its pause"
        );
        assert!(e.message.contains("not fetched again"), "{e}");
    }
    let e = p
        .list(None, 1000, false)
        .await
        .expect_err("a list reaching the segment");
    assert!(e.message.contains(&victim), "{e}");
    assert_eq!(
        failed(),
        fetched,
        "the segment was fetched again during its pause"
    );
    // The pause (1 s) passes: one more fetch, which fails and doubles the pause.
    clock.advance(Duration::from_secs(1));
    let e = p.lease(5, LEASE).await.expect_err("still missing");
    assert!(e.message.contains(&victim), "{e}");
    assert_eq!(failed(), fetched + 1, "one fetch once the pause passed");
    clock.advance(Duration::from_secs(1));
    let e = p.lease(5, LEASE).await.expect_err("still paused");
    assert!(e.message.contains("not fetched again"), "{e}");
    assert_eq!(failed(), fetched + 1, "the second pause is 2 s");
    // The object is back and the pause over: every item left comes back, in order.
    env.client.put(&path, PutPayload::from(body)).await.unwrap();
    clock.advance(Duration::from_secs(1));
    assert_eq!(lease_all(p, 7).await, low[served..]);
    assert_eq!(failed(), fetched + 1);
}

/// Waits up to 10 s for `f`, else fails saying `what`: the calls of the held-spill tests are answered at once when
/// nothing holds them up, and without the bound a call stuck behind a held spill would hang the test instead of
/// failing it.
pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}"),
    }
}
