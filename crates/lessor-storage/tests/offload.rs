//! Payload offload against a real S3-compatible server (`LESSOR_TEST_S3_ENDPOINT`, from
//! `scripts/s3-test-server.sh`): round trips, object lifetimes (complete, dead letters, delete, clear, sweeper) and
//! faults (object storage down, objects missing or damaged behind Lessor's back).
#![cfg(all(feature = "s3", feature = "fjall"))]
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{LifecyclePolicy, PartitionStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{ClearRequest, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};
use lessor_storage::memory::MemoryStore;
use lessor_storage::offload::{self, Compression, ObjectStoreConfig, OffloadSettings, OffloadStore};
use lessor_testkit::hooked::{Gate, HookedStore, Op};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

const BUCKET: &str = "lessor-offload";
const T0: Ts = Ts(1_800_000_000_000_000);
const MIB: usize = 1 << 20;

struct Env {
    cfg: ObjectStoreConfig,
    client: Arc<dyn ObjectStore>,
}

/// A bucket on the test server and a prefix no other test uses.
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
    fn settings(&self) -> OffloadSettings {
        OffloadSettings {
            object_store: Some(self.cfg.clone()),
            threshold: 64 * 1024,
            compression: Compression::Lz4,
            // The tests run sweeps themselves.
            sweep_interval: Duration::from_secs(3600),
            grace: Duration::ZERO,
        }
    }

    /// Every object under the test's prefix.
    async fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .client
            .list(Some(&ObjPath::from(self.cfg.prefix.as_str())))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    /// Waits for the background deletes of a complete or clear.
    async fn keys_become(&self, n: usize) -> Vec<String> {
        lessor_testkit::eventually::poll_until(Duration::from_secs(10), Duration::from_millis(20), || async {
            let k = self.keys().await;
            if k.len() == n {
                Ok(k)
            } else {
                Err(format!("{} objects: {k:?}", k.len()))
            }
        })
        .await
        .unwrap()
    }
}

/// `n` bytes of JSON-like text, different for each seed.
fn payload(n: usize, seed: u64) -> Bytes {
    let mut s = String::with_capacity(n + 64);
    let mut i = seed;
    while s.len() < n {
        i = i
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(&format!(
            "{{\"order\":{},\"sku\":\"S{}\",\"qty\":{}}},",
            i >> 40,
            i % 997,
            i % 13
        ));
    }
    s.truncate(n);
    Bytes::from(s)
}

fn item(p: Bytes) -> NewItem {
    NewItem {
        expire_deadline: T0.add(Duration::from_secs(86_400)),
        created_at: T0,
        payload: p,
        ..Default::default()
    }
}

async fn memory_store(env: &Env, settings: OffloadSettings) -> Arc<OffloadStore> {
    let _ = env;
    OffloadStore::new(Arc::new(MemoryStore::new()), "ram-0", settings).unwrap()
}

const DLQ: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 0,
    has_dead_queue: true,
    backoff: lessor_core::types::Backoff::OFF,
};

async fn round_trip(env: &Env, store: Arc<OffloadStore>) {
    let p = store.open("q", 0).await.unwrap();
    let big = payload(MIB, 1);
    let small = payload(100, 2);
    p.produce(vec![item(big.clone()), item(small.clone())])
        .await
        .unwrap();
    let keys = env.keys().await;
    assert_eq!(keys.len(), 1, "one object for the one large payload: {keys:?}");
    assert!(
        keys[0].contains("/q/0/"),
        "keys name the queue and partition: {keys:?}"
    );
    let leased = p.lease(10, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(leased.len(), 2);
    assert_eq!(
        leased[0].payload, big,
        "the 1 MiB payload comes back byte for byte"
    );
    assert_eq!(leased[1].payload, small);
    let listed = p.list(None, 10, false).await.unwrap();
    assert_eq!(listed[0].payload, big, "list resolves references too");
    let r = p.complete(vec![vec![leased[0].id, leased[1].id]]).await.unwrap();
    assert!(r[0].is_ok());
    env.keys_become(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_round_trip_memory_and_object_deleted_after_complete() {
    let Some(env) = env("rt-mem").await else { return };
    let store = memory_store(&env, env.settings()).await;
    round_trip(&env, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_round_trip_fjall_and_object_deleted_after_complete() {
    let Some(env) = env("rt-fjall").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let inner = FjallStore::open(dir.path(), Durability::Sync).unwrap();
    let store = OffloadStore::new(Arc::new(inner), "disk-0", env.settings()).unwrap();
    round_trip(&env, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_keeps_the_payload_until_removed() {
    let Some(env) = env("dlq").await else { return };
    let store = memory_store(&env, env.settings()).await;
    let p = store.open("q", 0).await.unwrap();
    let big = payload(200_000, 3);
    p.produce(vec![item(big.clone())]).await.unwrap();
    let leased = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
    let r = p
        .retry(
            vec![vec![RetryOp {
                id: leased[0].id,
                action: RetryAction::Dead,
            }]],
            DLQ,
        )
        .await
        .unwrap();
    assert_eq!(r[0].as_ref().unwrap().dead, 1);
    assert_eq!(
        env.keys().await.len(),
        1,
        "a dead item waiting for transfer keeps its object"
    );
    let dead = p.dead_items(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].payload, big,
        "the dead-letter transfer reads the whole payload"
    );
    // The dead-letter queue's store writes its own copy (here: the same store, another queue).
    let dlq = store.open("q-dead", 0).await.unwrap();
    dlq.produce(vec![item(dead[0].payload.clone())]).await.unwrap();
    assert_eq!(env.keys().await.len(), 2);
    p.remove_dead(vec![dead[0].id]).await.unwrap();
    let left = env.keys_become(1).await;
    assert!(left[0].contains("/q-dead/0/"), "{left:?}");
    let got = dlq.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(got[0].payload, big, "the dead-letter queue serves the payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_clear_remove_objects() {
    let Some(env) = env("clear").await else { return };
    let store = memory_store(&env, env.settings()).await;
    let p = store.open("q", 0).await.unwrap();
    let mut scheduled = item(payload(100_000, 9));
    scheduled.enqueue_at = T0.add(Duration::from_secs(3600));
    let ids = p
        .produce(vec![
            item(payload(100_000, 4)),
            item(payload(100_000, 5)),
            item(payload(100_000, 6)),
            scheduled,
        ])
        .await
        .unwrap();
    assert_eq!(env.keys().await.len(), 4);
    p.delete(vec![ids[0]]).await.unwrap();
    env.keys_become(3).await;
    // A leased item survives a non-destructive clear, and keeps its object.
    let leased = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(leased[0].id, ids[1]);
    p.clear(ClearRequest {
        queue: true,
        scheduled: false,
        destructive: false,
    })
    .await
    .unwrap();
    env.keys_become(2).await;
    p.clear(ClearRequest {
        queue: true,
        scheduled: true,
        destructive: true,
    })
    .await
    .unwrap();
    env.keys_become(0).await;
    assert_eq!(p.counts().await.unwrap().ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_removes_orphans_but_never_a_referenced_object() {
    let Some(env) = env("sweep").await else { return };
    let store = memory_store(&env, env.settings()).await;
    let p = store.open("q", 0).await.unwrap();
    let big = payload(300_000, 7);
    p.produce(vec![item(big.clone())]).await.unwrap();
    let referenced = env.keys().await;
    assert_eq!(referenced.len(), 1);
    // What a crash between writing an object and storing its item leaves behind.
    let orphan = format!("{}ram-0/q/0/00000000000000000000000000000000", env.cfg.prefix);
    env.client
        .put(&ObjPath::from(orphan.as_str()), PutPayload::from(vec![1u8; 10]))
        .await
        .unwrap();
    // An object of a partition not open in this process is left alone (it may belong to a partition that has not
    // been opened yet).
    let elsewhere = format!("{}ram-0/other/0/11111111111111111111111111111111", env.cfg.prefix);
    env.client
        .put(
            &ObjPath::from(elsewhere.as_str()),
            PutPayload::from(vec![1u8; 10]),
        )
        .await
        .unwrap();
    let before = offload::metrics().orphans_swept.load(Ordering::Relaxed);
    let out = store.sweep().await.unwrap();
    assert_eq!((out.listed, out.swept, out.skipped), (3, 1, 1), "{out:?}");
    let mut want = vec![elsewhere.clone(), referenced[0].clone()];
    want.sort();
    assert_eq!(env.keys().await, want);
    assert!(offload::metrics().orphans_swept.load(Ordering::Relaxed) > before);
    // A leased item is still referenced; a requeued one too (new id, same reference).
    let leased = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(store.sweep().await.unwrap().swept, 0);
    p.retry(
        vec![vec![RetryOp {
            id: leased[0].id,
            action: RetryAction::Requeue,
        }]],
        LifecyclePolicy::default(),
    )
    .await
    .unwrap();
    assert_eq!(store.sweep().await.unwrap().swept, 0);
    let again = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(again[0].payload, big);
    // Young unreferenced objects are kept for the grace period (a produce may be writing them).
    let young = OffloadStore::new(
        Arc::new(MemoryStore::new()),
        "ram-0",
        OffloadSettings {
            grace: Duration::from_secs(3600),
            ..env.settings()
        },
    )
    .unwrap();
    let _other = young.open("q", 0).await.unwrap();
    let out = young.sweep().await.unwrap();
    assert_eq!(out.swept, 0, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_storage_down_fails_large_produce_with_unavailable_small_items_still_work() {
    let Some(env) = env("down").await else { return };
    // Nothing listens on port 9 of the loopback (discard, never run in test machines).
    let mut cfg = env.cfg.clone();
    cfg.endpoint = "http://127.0.0.1:9".into();
    let store = memory_store(
        &env,
        OffloadSettings {
            object_store: Some(cfg),
            ..env.settings()
        },
    )
    .await;
    let p = store.open("q", 0).await.unwrap();
    let e = p
        .produce(vec![item(payload(100, 1)), item(payload(MIB, 1))])
        .await
        .unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::PayloadUnavailable, "{e}");
    assert!(
        e.is_transient(),
        "a produce that could not write its object is retryable (454)"
    );
    assert!(e.partition_healthy(), "the engine keeps the partition in service");
    assert_eq!(p.counts().await.unwrap().ready, 0, "nothing partial is stored");
    let small = payload(1000, 2);
    p.produce(vec![item(small.clone())]).await.unwrap();
    let got = p.lease(10, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_while_object_storage_is_down_fails_and_the_item_stays_leasable() {
    let Some(env) = env("lease-down").await else {
        return;
    };
    let inner: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
    let good = OffloadStore::new(inner.clone(), "ram-0", env.settings()).unwrap();
    let big = payload(MIB, 5);
    good.open("q", 0)
        .await
        .unwrap()
        .produce(vec![item(big.clone())])
        .await
        .unwrap();
    // The same partition seen through a wrapper whose object storage cannot be reached.
    let mut cfg = env.cfg.clone();
    cfg.endpoint = "http://127.0.0.1:9".into();
    let down = OffloadStore::new(
        inner.clone(),
        "ram-0",
        OffloadSettings {
            object_store: Some(cfg),
            ..env.settings()
        },
    )
    .unwrap();
    let p = down.open("q", 0).await.unwrap();
    let e = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(
        e.message.contains("payload of item"),
        "the error names the item: {e}"
    );
    let c = p.counts().await.unwrap();
    assert_eq!((c.ready, c.leased), (1, 0), "the item was put back: {c:?}");
    let got = good
        .open("q", 0)
        .await
        .unwrap()
        .lease(1, T0.add(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        got[0].payload, big,
        "once object storage answers, the item is served whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_corrupt_objects_are_reported_never_served() {
    let Some(env) = env("damage").await else { return };
    let store = memory_store(&env, env.settings()).await;
    let p = store.open("q", 0).await.unwrap();
    let ids = p.produce(vec![item(payload(100_000, 1))]).await.unwrap();
    let key = env.keys().await.remove(0);
    // Damaged: other bytes under the key.
    env.client
        .put(&ObjPath::from(key.as_str()), PutPayload::from(vec![7u8; 100]))
        .await
        .unwrap();
    let corrupt_before = offload::metrics().fetch_corrupt.load(Ordering::Relaxed);
    let e = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap_err();
    assert_eq!(e.kind, StorageErrorKind::Corrupt, "{e}");
    assert!(
        e.message.contains(&format!("item '{}'", ids[0])),
        "the error names the item: {e}"
    );
    assert!(e.message.contains("corrupt"), "{e}");
    assert!(offload::metrics().fetch_corrupt.load(Ordering::Relaxed) > corrupt_before);
    assert_eq!(
        p.counts().await.unwrap().ready,
        1,
        "the item is put back, not lost"
    );
    // Missing: deleted behind Lessor's back.
    env.client.delete(&ObjPath::from(key.as_str())).await.unwrap();
    let missing_before = offload::metrics().fetch_missing.load(Ordering::Relaxed);
    let e = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap_err();
    assert!(
        e.message.contains("is missing") && e.message.contains(&key),
        "{e}"
    );
    assert!(offload::metrics().fetch_missing.load(Ordering::Relaxed) > missing_before);
    // Browsing reports it the same way instead of showing other bytes.
    let e = p.list(None, 10, false).await.unwrap_err();
    assert!(e.message.contains("is missing"), "{e}");
    // The operator can still delete the item by the id the error names; its key goes with it.
    let id = e.message.split('\'').nth(1).unwrap();
    let id = lessor_core::types::ItemId(u64::from_str_radix(id, 16).unwrap());
    p.delete(vec![id]).await.unwrap();
    assert_eq!(p.counts().await.unwrap().ready, 0);
    assert!(p
        .lease(1, T0.add(Duration::from_secs(60)))
        .await
        .unwrap()
        .is_empty());
}

/// Over a fjall store that pages (window of 2), the objects of paged items are referenced too: the sweeper reads
/// them through the partition's snapshot, keeps every one, and the items come back with their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_keeps_the_objects_of_paged_items() {
    let Some(env) = env("sweep-paged").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let inner = FjallStore::open(dir.path(), Durability::Sync).unwrap();
    inner.set_memory_window(2);
    let inner = Arc::new(inner);
    let store = OffloadStore::new(inner.clone(), "disk-0", env.settings()).unwrap();
    let p = store.open("q", 0).await.unwrap();
    let bigs: Vec<Bytes> = (0..6).map(|i| payload(70_000, 100 + i)).collect();
    p.produce(bigs.iter().cloned().map(item).collect()).await.unwrap();
    let counts = inner.paging_counts("q", 0).await.unwrap();
    assert_eq!((counts.resident_ready, counts.paged_ready), (2, 4), "{counts:?}");
    assert_eq!(env.keys().await.len(), 6);
    let out = store.sweep().await.unwrap();
    assert_eq!((out.listed, out.swept), (6, 0), "{out:?}");
    assert_eq!(env.keys().await.len(), 6);
    let mut got = Vec::new();
    while got.len() < 6 {
        let l = p.lease(6, T0.add(Duration::from_secs(60))).await.unwrap();
        assert!(!l.is_empty());
        got.extend(l.into_iter().map(|i| i.payload));
    }
    assert_eq!(got, bigs);
}

/// Queue names may hold characters object_store percent-encodes in a key (`#`, `[`, `%`, `*`, a name that is `.`
/// or `..`): the listing then names the objects in the encoded form while items hold the key as it was built. The
/// sweeper must still tell the orphan from the referenced object, and destroying the partition must delete its
/// objects, or they stay in the bucket for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_queues_with_encoded_names_are_swept_and_destroyed() {
    let Some(env) = env("encoded").await else {
        return;
    };
    for queue in ["orders#eu", "[a]%2E*", ".."] {
        let store = memory_store(&env, env.settings()).await;
        let p = store.open(queue, 0).await.unwrap();
        let big = payload(100_000, 11);
        p.produce(vec![item(big.clone())]).await.unwrap();
        // An orphan: the object of a produce whose item was never stored (a crash between the two writes).
        let orphan = format!("{}ram-0/{queue}/0/{}", env.cfg.prefix, "0".repeat(32));
        env.client
            .put(&ObjPath::from(orphan.as_str()), PutPayload::from(vec![1u8; 10]))
            .await
            .unwrap();
        assert_eq!(env.keys().await.len(), 2, "{queue}");
        let out = store.sweep().await.unwrap();
        assert_eq!(
            (out.listed, out.swept, out.skipped),
            (2, 1, 0),
            "{queue}: {out:?}"
        );
        env.keys_become(1).await;
        let got = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
        assert_eq!(got[0].payload, big, "{queue}: the referenced object is kept");
        // Destroying the partition deletes the object of its item.
        store.destroy(queue, 0).await.unwrap();
        env.keys_become(0).await;
    }
}

/// A queue deleted while object storage fails: its partition's objects cannot be deleted, and nothing deletes them
/// later (the sweeper only judges the directories of open partitions, and the partition is gone). The destroy must
/// fail as retryable (the queue stays defined and the operator deletes it again) instead of reporting success and
/// leaving the objects in the bucket for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_while_object_storage_is_down_fails_instead_of_leaking_the_objects() {
    let Some(env) = env("destroy-down").await else {
        return;
    };
    let inner: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
    let good = OffloadStore::new(inner.clone(), "ram-0", env.settings()).unwrap();
    good.open("q", 0)
        .await
        .unwrap()
        .produce(vec![item(payload(100_000, 21)), item(payload(100_000, 22))])
        .await
        .unwrap();
    assert_eq!(env.keys().await.len(), 2);
    let mut cfg = env.cfg.clone();
    cfg.endpoint = "http://127.0.0.1:9".into();
    let down = OffloadStore::new(
        inner.clone(),
        "ram-0",
        OffloadSettings {
            object_store: Some(cfg),
            ..env.settings()
        },
    )
    .unwrap();
    let r = down.destroy("q", 0).await;
    // Whatever the outcome, the sweeper of a store that has the partition no more never deletes the objects.
    let out = good.sweep().await.unwrap();
    assert_eq!(out.swept, 0, "{out:?}");
    let e = r.expect_err("the objects of the destroyed partition are still there");
    assert!(e.is_transient(), "{e}");
    // Deleted again once object storage answers: the objects go.
    good.destroy("q", 0).await.unwrap();
    env.keys_become(0).await;
}

/// Two servers over one shared partition (a PostgreSQL store; modelled here by two wrappers over one memory store):
/// server A leases an item, its lease expires and server B's lifecycle puts it back under a new id, with the same
/// object. An operator's delete of the old id on server A deletes nothing in the partition (the id is gone), so it
/// must not delete the object either: the item under its new id still needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_an_id_that_moved_keeps_the_object_of_the_moved_item() {
    let Some(env) = env("delete-moved").await else {
        return;
    };
    let inner: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
    let a = OffloadStore::new(inner.clone(), "ram-0", env.settings()).unwrap();
    let b = OffloadStore::new(inner.clone(), "ram-0", env.settings()).unwrap();
    let (pa, pb) = (a.open("q", 0).await.unwrap(), b.open("q", 0).await.unwrap());
    let big = payload(100_000, 31);
    pa.produce(vec![item(big.clone())]).await.unwrap();
    let deadline = T0.add(Duration::from_secs(60));
    let leased = pa.lease(1, deadline).await.unwrap();
    let old = leased[0].id;
    // Server B expires the lease: the item is back, under a new id, referencing the same object.
    let out = pb
        .lifecycle(
            deadline.add(Duration::from_secs(1)),
            LifecyclePolicy::default(),
            100,
        )
        .await
        .unwrap();
    assert_eq!(out.lease_expired, 1, "{out:?}");
    // On server A, the old id is deleted: nothing in the partition has it.
    pa.delete(vec![old]).await.unwrap();
    assert_eq!(pa.counts().await.unwrap().ready, 1);
    // A marker: a complete's background delete, started after the delete's, is waited for.
    let marker = payload(100_000, 32);
    pa.produce(vec![item(marker.clone())]).await.unwrap();
    assert_eq!(env.keys().await.len(), 2);
    let got = pa.lease(2, deadline).await.unwrap();
    assert_eq!(got.len(), 2, "both items are served");
    let (moved, m) = if got[0].payload == marker {
        (&got[1], &got[0])
    } else {
        (&got[0], &got[1])
    };
    assert_eq!(moved.payload, big, "the moved item is served whole");
    assert!(pa.complete(vec![vec![m.id]]).await.unwrap()[0].is_ok());
    env.keys_become(1).await;
    assert!(pa.complete(vec![vec![moved.id]]).await.unwrap()[0].is_ok());
    env.keys_become(0).await;
    // The delete of an item leased here (and still leased) deletes its object.
    pa.produce(vec![item(payload(100_000, 33))]).await.unwrap();
    let got = pa.lease(1, deadline).await.unwrap();
    assert_eq!(env.keys().await.len(), 1);
    pa.delete(vec![got[0].id]).await.unwrap();
    env.keys_become(0).await;
}

/// S3 keys are at most 1,024 bytes. A queue name may be 512 bytes of characters object_store percent-encodes
/// (`#` becomes `%23`): its object keys would be over 1,536 bytes, every large produce would fail (454) for good.
/// Keys of such a name must fit, and everything that finds objects by key (lease, sweeper, destroy) must still find
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_queue_name_of_encoded_characters_gets_keys_s3_accepts() {
    let Some(env) = env("long-name").await else {
        return;
    };
    let queue = "#".repeat(lessor_core::validate::MAX_QUEUE_NAME);
    lessor_core::validate::queue_name("name", &queue).unwrap();
    let store = memory_store(&env, env.settings()).await;
    let p = store.open(&queue, 65_535).await.unwrap();
    let big = payload(100_000, 31);
    p.produce(vec![item(big.clone()), item(payload(100_000, 32))])
        .await
        .expect("a large produce to a queue with the longest name is stored");
    let keys = env.keys().await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for k in &keys {
        assert!(k.len() <= 1024, "a {}-byte key: {k}", k.len());
    }
    // The sweeper finds the partition's objects referenced, and the lease reads them back.
    let out = store.sweep().await.unwrap();
    assert_eq!((out.listed, out.swept), (2, 0), "{out:?}");
    let got = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(got[0].payload, big);
    // Destroying the partition deletes its objects.
    store.destroy(&queue, 65_535).await.unwrap();
    env.keys_become(0).await;
}

/// An online backup (a snapshot read page by page) of offloaded items while consumers complete them: the object of
/// an item completed after the snapshot was taken stays until the snapshot is done, so the snapshot reads every
/// item it holds, whole; the sweeper does not run while a snapshot is open, and the held objects go once it is
/// dropped. Before, a completion between two pages failed the backup with "payload ... is missing".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_during_a_snapshot_keep_its_objects_until_it_is_done() {
    let Some(env) = env("snapshot-completes").await else {
        return;
    };
    let store = memory_store(&env, env.settings()).await;
    let p = store.open("q", 0).await.unwrap();
    let payloads: Vec<Bytes> = (0..4).map(|i| payload(100_000, 20 + i)).collect();
    p.produce(payloads.iter().cloned().map(item).collect())
        .await
        .unwrap();
    assert_eq!(env.keys().await.len(), 4);
    let mut snap = p.snapshot().await.unwrap();
    let first = snap.next(1).await.unwrap();
    assert_eq!(first[0].payload, payloads[0]);
    // Consumers complete every item meanwhile.
    let leased = p.lease(10, T0.add(Duration::from_secs(60))).await.unwrap();
    assert_eq!(leased.len(), 4);
    let r = p
        .complete(vec![leased.iter().map(|it| it.id).collect()])
        .await
        .unwrap();
    assert!(r[0].is_ok());
    // Completions delete objects in the background: give them time to (they take milliseconds when not held), so
    // that reading on cannot pass by winning a race.
    let deleted =
        lessor_testkit::eventually::poll_until(Duration::from_secs(1), Duration::from_millis(20), || async {
            let n = env.keys().await.len();
            if n < 4 {
                Ok(n)
            } else {
                Err(format!("{n} objects"))
            }
        })
        .await;
    assert!(
        deleted.is_err(),
        "objects deleted under an open snapshot: {deleted:?}"
    );
    // The sweeper would find the objects unreferenced: it waits for the snapshot.
    assert_eq!(store.sweep().await.unwrap().swept, 0);
    let mut rest = Vec::new();
    loop {
        let page = snap
            .next(1)
            .await
            .expect("the snapshot reads items completed since it was taken");
        if page.is_empty() {
            break;
        }
        rest.extend(page.into_iter().map(|it| it.payload));
    }
    assert_eq!(
        rest,
        payloads[1..].to_vec(),
        "every item whole, as of the snapshot"
    );
    assert_eq!(env.keys().await.len(), 4, "objects held while the snapshot lives");
    drop(snap);
    env.keys_become(0).await;
}

/// A sweep already past its check for open snapshots when a backup opens one: the backup's snapshot holds an item
/// a consumer completes before the sweep takes its reference snapshot, so the item's object looks unreferenced
/// there. The sweep looks again before deleting and stops; the object goes once the snapshot is done. Before, the
/// sweep deleted it and the backup failed with "payload ... is missing".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_already_running_when_a_snapshot_opens_deletes_what_it_reads() {
    let Some(env) = env("sweep-snapshot-race").await else {
        return;
    };
    // Stops the sweep's reference snapshot (the first snapshot of the inner partition).
    let gate = Gate::on(|c| c.op == Op::Snapshot);
    let inner = Arc::new(HookedStore::new(Arc::new(MemoryStore::new()), gate.clone()));
    let store = OffloadStore::new(inner, "ram-0", env.settings()).unwrap();
    store.create("q", &[0]).await.unwrap();
    let p = store.open("q", 0).await.unwrap();
    let big = payload(100_000, 40);
    p.produce(vec![item(big.clone())]).await.unwrap();
    // Older than the grace to the second listed times have.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gate.arm(0);
    let s2 = store.clone();
    let sweep = tokio::spawn(async move { s2.sweep().await });
    gate.reached().await;
    // The sweep has listed the object and waits for its reference snapshot: a backup opens its snapshot, and a
    // consumer completes the item (the object's deletion is held for the snapshot).
    let mut snap = p.snapshot().await.unwrap();
    let leased = p.lease(1, T0.add(Duration::from_secs(60))).await.unwrap();
    let r = p.complete(vec![vec![leased[0].id]]).await.unwrap();
    assert!(r[0].is_ok());
    gate.release();
    let o = sweep.await.unwrap().unwrap();
    assert_eq!(o.swept, 0, "{o:?}");
    let page = snap
        .next(10)
        .await
        .expect("the snapshot reads the item completed since it was taken");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].payload, big);
    drop(snap);
    env.keys_become(0).await;
}

/// A rebalance destroys its source partition while a paced backup still reads a snapshot of it taken before: the
/// partition's items go at once, its objects once the snapshot is done, so the backup reads every item whole.
/// Before, the destroy deleted every object of the partition at once and the backup failed with "payload ... is
/// missing".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_during_an_open_snapshot_deletes_what_it_reads() {
    let Some(env) = env("destroy-snapshot").await else {
        return;
    };
    let store = memory_store(&env, env.settings()).await;
    store.create("q", &[0]).await.unwrap();
    let p = store.open("q", 0).await.unwrap();
    let payloads: Vec<Bytes> = (0..2).map(|i| payload(100_000, 50 + i)).collect();
    let ids = p
        .produce(payloads.iter().cloned().map(item).collect())
        .await
        .unwrap();
    let mut snap = p.snapshot().await.unwrap();
    // The rebalance moves the items away (their deletions are held for the snapshot), then destroys the partition.
    p.delete(ids).await.unwrap();
    drop(p);
    store.destroy("q", 0).await.unwrap();
    assert!(
        store
            .open("q", 0)
            .await
            .unwrap()
            .list(None, 10, false)
            .await
            .unwrap()
            .is_empty(),
        "the partition's items are gone at once"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(env.keys().await.len(), 2, "objects held while the snapshot lives");
    let page = snap
        .next(10)
        .await
        .expect("the snapshot reads the items of the destroyed partition");
    assert_eq!(
        page.into_iter().map(|it| it.payload).collect::<Vec<_>>(),
        payloads
    );
    drop(snap);
    env.keys_become(0).await;
}

/// A store that refuses a produce for want of room (`Full`: its memory budget) stored nothing, so the objects the
/// produce uploaded first are nobody's: they are deleted at once instead of waiting for the sweeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_refused_as_full_leaves_no_object_behind() {
    let Some(env) = env("full").await else { return };
    let inner = Arc::new(MemoryStore::with_max_memory(MIB as u64));
    let store = OffloadStore::new(inner, "ram-0", env.settings()).unwrap();
    let p = store.open("q", 0).await.unwrap();
    // Small items (inline, counted whole) until the budget refuses one more: less than one is left.
    let mut seed = 0;
    for size in [100, 1] {
        loop {
            seed += 1;
            let batch = (0..size).map(|i| item(payload(10_000, seed * 100 + i))).collect();
            match p.produce(batch).await {
                Ok(_) => assert!(seed < 1000, "a budget of 1 MiB took {seed} batches"),
                Err(e) => {
                    assert_eq!(e.kind, StorageErrorKind::Full, "{e}");
                    break;
                }
            }
        }
    }
    assert!(env.keys().await.is_empty(), "inline items wrote no object");
    // The large payloads go to object storage first; then the store refuses the batch for its inline item (60 kB
    // that do not compress, below the offload threshold).
    let noise = lessor_testkit::rng::Rng::new(7).bytes(60_000);
    let produced = p
        .produce(vec![
            item(payload(MIB, 7)),
            item(payload(MIB, 8)),
            item(Bytes::from(noise.clone())),
        ])
        .await
        .map(|_| ());
    refused_without_objects(&env, produced, "produce").await;
    // The same for an import (a restore).
    let imported = p
        .import(
            [payload(MIB, 10), Bytes::from(noise)]
                .into_iter()
                .map(|payload| lessor_core::types::Item {
                    payload,
                    ..Default::default()
                })
                .collect(),
        )
        .await
        .map(|_| ());
    refused_without_objects(&env, imported, "import").await;
}

/// `r`, the answer of a call that wrote objects first, is a refusal for want of room, and no object is left.
async fn refused_without_objects(env: &Env, r: Result<(), lessor_core::error::StorageError>, what: &str) {
    let e = r.expect_err("the store is full");
    assert_eq!(e.kind, StorageErrorKind::Full, "{what}: {e}");
    assert_eq!(
        env.keys().await,
        Vec::<String>::new(),
        "the refused {what}'s objects were deleted"
    );
}
