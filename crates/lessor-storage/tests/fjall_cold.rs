//! Cold backlog segments of the fjall backend (`cold-segments`) against a real S3-compatible server
//! (`LESSOR_TEST_S3_ENDPOINT`, from `scripts/s3-test-server.sh`), with a tiny window, depth and segment size: the
//! backlog goes to segments and comes back in exact priority and FIFO order, across a restart, without loss or
//! duplicates; a segment deleted behind Lessor's back makes the lease fail as unavailable (454) naming the
//! segment, never serve other bytes; orphans are swept and live segments are not.
#![cfg(all(feature = "s3", feature = "fjall"))]
#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, ItemId, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};
use lessor_storage::offload::{self, ObjectStoreConfig};
use lessor_storage::registry::ColdSettings;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

const BUCKET: &str = "lessor-cold";
const T0: Ts = Ts(1_800_000_000_000_000);
const LEASE: Ts = Ts(1_800_000_100_000_000);
const FAR: Ts = Ts(1_900_000_000_000_000);
const POLICY: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 0,
    has_dead_queue: false,
    backoff: Backoff::OFF,
};

struct Env {
    cfg: ObjectStoreConfig,
    client: Arc<dyn ObjectStore>,
}

async fn env(test: &str) -> Option<Env> {
    let endpoint = lessor_testkit::s3::bucket(BUCKET).await?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let cfg = ObjectStoreConfig {
        name: "s3-0".into(),
        endpoint,
        bucket: BUCKET.into(),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        path_style: true,
        prefix: format!("{test}-{nanos}/"),
        ..Default::default()
    };
    let client = offload::client(&cfg).unwrap();
    Some(Env { cfg, client })
}

impl Env {
    fn open(&self, dir: &std::path::Path) -> FjallStore {
        let store = FjallStore::open(dir, Durability::None).unwrap();
        store.set_memory_window(5);
        store
            .set_cold(
                ColdSettings {
                    object_store: self.cfg.clone(),
                    after_depth: 10,
                    segment_items: 20,
                    segment_bytes: 1 << 20,
                    prefetch_items: 5,
                },
                "disk-0",
            )
            .unwrap();
        store
    }

    async fn segments(&self) -> Vec<String> {
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
}

/// Produces `n` items over priorities 0, 2 and 5; returns the model of the ready queue (priority first, then id).
async fn produce(p: &Arc<dyn Partition>, n: usize) -> BTreeMap<(Reverse<u8>, ItemId), Bytes> {
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

/// Runs lifecycle calls (which start and finish the background spills) until `want` segments exist.
async fn spill(env: &Env, p: &Arc<dyn Partition>, want: usize) {
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

/// Leases everything, `batch` at a time with lifecycle calls between (which prefetch segments), checking each
/// lease against the model; returns how many were leased.
async fn drain(
    p: &Arc<dyn Partition>,
    model: &mut BTreeMap<(Reverse<u8>, ItemId), Bytes>,
    batch: usize,
) -> usize {
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

#[tokio::test]
async fn backlog_goes_cold_and_comes_back_in_order() {
    let Some(env) = env("order").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 0).await.unwrap();
    let mut model = produce(&p, 400).await;
    spill(&env, &p, 6).await;
    let stats = p.stats(T0).await.unwrap();
    assert_eq!(stats.counts.ready, 400);
    assert!(stats.tiers.object.items >= 100, "{:?}", stats.tiers);
    // Every item is on disk or in a segment (the resident ones are on disk too).
    assert_eq!(
        stats.tiers.object.items + stats.tiers.disk.items,
        400,
        "{:?}",
        stats.tiers
    );
    let (written, _, failed) = store.segment_counters();
    assert!(written >= 6 && failed == 0);
    assert_eq!(drain(&p, &mut model, 7).await, 400);
    let (_, loaded, failed) = store.segment_counters();
    assert!(loaded >= 6 && failed == 0, "loaded {loaded}");
    // Every segment came back and its object was deleted.
    let gone = lessor_testkit::eventually::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let left = env.segments().await;
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

/// The payload sweeper's snapshot reads what is on disk and leaves the segments cold (no segment item references
/// an offloaded payload); a full snapshot (backups) loads them back and reads every item.
#[tokio::test]
async fn the_reference_snapshot_leaves_segments_cold() {
    let Some(env) = env("refsnap").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 3).await.unwrap();
    let model = produce(&p, 400).await;
    spill(&env, &p, 6).await;
    let cold = p.stats(T0).await.unwrap().tiers.object.items;
    assert!(cold >= 100, "{cold} items in segments");
    let segments = env.segments().await;
    let (_, loaded_before, _) = store.segment_counters();
    let read_all = |mut snap: Box<dyn lessor_core::storage::PartitionSnapshot>| async move {
        let mut ids = Vec::new();
        loop {
            let page = snap.next(64).await.unwrap();
            if page.is_empty() {
                return ids;
            }
            ids.extend(page.into_iter().map(|it| it.id));
        }
    };
    let on_disk = read_all(p.reference_snapshot().await.unwrap()).await;
    // A spill started by the last lifecycle call may commit meanwhile (the partition's ticker): segments only
    // grow here, since nothing loads them.
    let cold_after = p.stats(T0).await.unwrap().tiers.object.items;
    assert!(cold_after >= cold, "{cold_after} < {cold}");
    let n = on_disk.len() as u64;
    assert!(
        (400 - cold_after..=400 - cold).contains(&n),
        "reads the items on disk only: {n}, with {cold}..{cold_after} in segments"
    );
    assert!(on_disk.windows(2).all(|w| w[0] < w[1]), "in id order");
    assert_eq!(store.segment_counters().1, loaded_before, "no segment loaded");
    let now = env.segments().await;
    assert!(
        segments.iter().all(|k| now.contains(k)),
        "the segments are still there: {segments:?} then {now:?}"
    );
    // A full snapshot sees every item.
    let all = read_all(p.snapshot().await.unwrap()).await;
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

#[tokio::test]
async fn a_restart_reads_the_manifest_and_keeps_order() {
    let Some(env) = env("restart").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut model;
    {
        let store = env.open(dir.path());
        let p = store.open("q", 1).await.unwrap();
        model = produce(&p, 300).await;
        spill(&env, &p, 4).await;
        // Part of the backlog is leased and completed before the restart.
        let got = p.lease(30, LEASE).await.unwrap();
        let expect: Vec<ItemId> = model.keys().take(30).map(|k| k.1).collect();
        assert_eq!(got.iter().map(|it| it.id).collect::<Vec<_>>(), expect);
        for it in &got {
            model.remove(&(Reverse(it.priority), it.id));
        }
        let ids: Vec<ItemId> = got.iter().map(|it| it.id).collect();
        assert!(p.complete(vec![ids]).await.unwrap()[0].is_ok());
        p.close().await;
        store.close().await;
    }
    let store = env.open(dir.path());
    let p = store.open("q", 1).await.unwrap();
    let stats = p.stats(T0).await.unwrap();
    assert_eq!(stats.counts.ready, 270);
    assert!(stats.tiers.object.items > 0, "{:?}", stats.tiers);
    // Browsing sees the items in segments too (it loads the segments its page reaches), in id order.
    let listed = p.list(None, 1000, false).await.unwrap();
    let mut want: Vec<ItemId> = model.keys().map(|k| k.1).collect();
    want.sort();
    assert_eq!(listed.iter().map(|it| it.id).collect::<Vec<_>>(), want);
    assert_eq!(drain(&p, &mut model, 11).await, 270);
}

#[tokio::test]
async fn a_missing_segment_is_unavailable_and_named_never_skipped() {
    let Some(env) = env("missing").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 2).await.unwrap();
    let model = produce(&p, 200).await;
    spill(&env, &p, 2).await;
    let segs = env.segments().await;
    let victim = segs[0].clone();
    env.client.delete(&ObjPath::from(victim.as_str())).await.unwrap();
    // Leases serve in order until the head reaches the missing segment; then they fail, naming it, and never
    // serve an item from beyond it.
    let mut expect = model.keys().map(|k| k.1);
    let mut failed = None;
    for _ in 0..200 {
        match p.lease(3, LEASE).await {
            Ok(got) => {
                assert!(!got.is_empty(), "ran dry before the missing segment");
                for it in got {
                    assert_eq!(
                        Some(it.id),
                        expect.next(),
                        "out of order next to a missing segment"
                    );
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("a lease fails at the missing segment");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(e.message.contains(&victim), "{e}");
    // It keeps failing the same way (the items stay), and the failure is counted.
    let again = p.lease(3, LEASE).await.expect_err("still missing");
    assert_eq!(again.kind, StorageErrorKind::Unavailable);
    assert!(store.segment_counters().2 >= 2);
}

#[tokio::test]
async fn a_damaged_segment_is_refused() {
    let Some(env) = env("damaged").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 3).await.unwrap();
    let _ = produce(&p, 150).await;
    spill(&env, &p, 1).await;
    let victim = env.segments().await[0].clone();
    let path = ObjPath::from(victim.as_str());
    let mut body = env
        .client
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let at = body.len() - 3;
    body[at] ^= 0xff;
    env.client.put(&path, PutPayload::from(body)).await.unwrap();
    let mut err = None;
    for _ in 0..200 {
        if let Err(e) = p.lease(5, LEASE).await {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("the damaged segment is refused");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(
        e.message.contains("corrupt") && e.message.contains(&victim),
        "{e}"
    );
}

#[tokio::test]
async fn the_sweeper_deletes_orphans_not_live_segments() {
    let Some(env) = env("sweep").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 4).await.unwrap();
    let mut model = produce(&p, 150).await;
    spill(&env, &p, 2).await;
    let live = env.segments().await;
    // An orphan as a crash between an object write and its batch leaves it.
    let orphan = format!(
        "{}disk-0/segments/q/4/0/00000000000000000001-00000000000000ff",
        env.cfg.prefix
    );
    env.client
        .put(&ObjPath::from(orphan.as_str()), PutPayload::from(vec![1u8, 2, 3]))
        .await
        .unwrap();
    let fp = store.live_partition("q", 4).unwrap();
    // Younger than the grace: kept.
    assert_eq!(fp.sweep_segments(Duration::from_secs(3600)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let swept = fp.sweep_segments(Duration::ZERO).await.unwrap();
    let after = env.segments().await;
    assert!(!after.contains(&orphan), "orphan left: {after:?}");
    for k in &live {
        assert!(after.contains(k), "live segment {k} swept (swept {swept})");
    }
    assert_eq!(drain(&p, &mut model, 9).await, 150);
}

#[tokio::test]
async fn object_storage_down_leaves_the_queue_working() {
    // An endpoint where nothing listens: every spill fails, and is retried by later steps.
    let cfg = ObjectStoreConfig {
        name: "s3-0".into(),
        endpoint: "http://127.0.0.1:9".into(),
        bucket: BUCKET.into(),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        path_style: true,
        prefix: "down/".into(),
        ..Default::default()
    };
    let env = Env {
        client: offload::client(&cfg).unwrap(),
        cfg,
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 5).await.unwrap();
    let mut model = produce(&p, 200).await;
    for _ in 0..20 {
        p.lifecycle(T0, POLICY, 100).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (written, _, _) = store.segment_counters();
    assert_eq!(written, 0);
    let stats = p.stats(T0).await.unwrap();
    assert_eq!((stats.counts.ready, stats.tiers.object.items), (200, 0));
    // Produce and lease go on in order; the backlog stays on disk.
    assert_eq!(drain(&p, &mut model, 13).await, 200);
}

#[tokio::test]
async fn destroying_a_partition_deletes_its_segments() {
    let Some(env) = env("destroy").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 6).await.unwrap();
    let _ = produce(&p, 150).await;
    spill(&env, &p, 2).await;
    // Destroyed while open (as a queue deletion does): a spill in flight is ended first, its object goes too.
    store.destroy("q", 6).await.unwrap();
    drop(p);
    let gone = lessor_testkit::eventually::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let left = env.segments().await;
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
