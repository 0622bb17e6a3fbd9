//! Cold backlog segments of the memory backend (`cold-segments` on a memory store) against a real S3-compatible
//! server (`LESSOR_TEST_S3_ENDPOINT`, from `scripts/s3-test-server.sh`), with a tiny depth and segment size: the
//! backlog goes to segments (RAM holds a bounded part) and comes back in exact priority and FIFO order without
//! loss or duplicates; a segment deleted or damaged behind Lessor's back makes the lease fail as unavailable (454)
//! naming it, never serve other bytes; object storage down leaves the queue working; a new store deletes the
//! segments of the previous run; destroying a partition deletes its segments. Browsing pages through segments
//! without bringing them back, and a delete or expiry whose segment write-back fails loses and doubles nothing.
#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::error::StorageErrorKind;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::{ManualClock, SharedClock, Ts};
use lessor_core::types::{ItemId, NewItem};
use lessor_storage::memory::MemoryStore;
use lessor_storage::registry::ColdSettings;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

#[path = "support/cold.rs"]
mod support;

use support::*;

const BUCKET: &str = "lessor-memcold";
/// Cold depth (and window) of the stores here.
const DEPTH: u64 = 10;
/// Items per segment.
const SEG: u32 = 20;

impl Env {
    async fn open(&self) -> MemoryStore {
        self.open_clock(Arc::new(ManualClock::new(T0))).await
    }

    /// A store whose segment retry pauses are timed by `clock`.
    async fn open_clock(&self, clock: SharedClock) -> MemoryStore {
        MemoryStore::with_cold_clock(
            ColdSettings {
                object_store: self.cfg.clone(),
                after_depth: DEPTH,
                segment_items: SEG,
                segment_bytes: 1 << 20,
                prefetch_items: 5,
            },
            "mem-0",
            clock,
        )
        .await
        .unwrap()
    }
}

// On the server's runtime flavour: moving a segment's records in and out of RAM hands the worker's other tasks
// away first (`block_in_place`), which only a multi-thread runtime allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_goes_cold_ram_stays_bounded_and_drains_in_order() {
    let Some(env) = env(BUCKET, "order").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 0).await.unwrap();
    let mut model = produce(&p, 1000).await;
    spill(&env, &p, 30).await;
    settle(&env, &p).await;
    let stats = p.stats(T0).await.unwrap();
    assert_eq!(stats.counts.ready, 1000);
    assert!(stats.tiers.object.items >= 600, "{:?}", stats.tiers);
    // Every item is in memory or in a segment, once.
    assert_eq!(
        stats.tiers.object.items + stats.tiers.memory.items,
        1000,
        "{:?}",
        stats.tiers
    );
    // RAM holds the window, the depth ahead of the first segment and less than a segment per priority behind the
    // last one (three priorities here), whatever the backlog.
    let cp = store.cold_partition("q", 0).unwrap();
    let (records, resident) = cp.ram_counts().await;
    assert!(resident <= DEPTH, "resident {resident}");
    assert!(records < 3 * (DEPTH + u64::from(SEG)), "records in RAM {records}");
    let (written, _, failed) = store.segment_counters();
    assert!(written >= 30 && failed == 0);
    // Listing reaches into segments, in id order.
    let listed = p.list(None, 2000, false).await.unwrap();
    let mut want: Vec<ItemId> = model.keys().map(|k| k.1).collect();
    want.sort();
    assert_eq!(listed.iter().map(|it| it.id).collect::<Vec<_>>(), want);
    assert_eq!(drain(&p, &mut model, 7).await, 1000);
    let (_, loaded, failed) = store.segment_counters();
    assert!(loaded >= 30 && failed == 0, "loaded {loaded}");
    env.segments_gone().await;
    let stats = p.stats(T0).await.unwrap();
    assert_eq!((stats.counts.ready, stats.tiers.object.items), (0, 0));
}

/// The payload sweeper's snapshot reads what is in RAM and leaves the segments cold (no segment item references an
/// offloaded payload); a full snapshot (backups) loads them back and reads every item, also with a spill in flight.
#[tokio::test]
async fn the_reference_snapshot_leaves_segments_cold() {
    let Some(env) = env(BUCKET, "refsnap").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 3).await.unwrap();
    let model = produce(&p, 600).await;
    spill(&env, &p, 10).await;
    check_reference_snapshot(&env, &p, &model, || store.segment_counters().1).await;
}

/// A producer faster than object storage is slowed to the pace of the spills: with no lifecycle call at all (only
/// the produces and the partition's ticker), the records a priority keeps in RAM stay within the cold depth and a
/// few segments, however many items are produced, and every item still comes back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_faster_than_the_spills_are_slowed_not_buffered() {
    let Some(env) = env(BUCKET, "throttle").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 6).await.unwrap();
    let mut model = produce(&p, 3000).await;
    let cp = store.cold_partition("q", 6).unwrap();
    let (records, _) = cp.ram_counts().await;
    // Three priorities, each within the depth, four segments and one produce call's items.
    let bound = 3 * (DEPTH + 4 * u64::from(SEG) + 50);
    assert!(records <= bound, "{records} records in RAM, bound {bound}");
    assert!(store.throttled_produces() > 0, "no produce waited for a spill");
    assert_eq!(drain(&p, &mut model, 50).await, 3000);
}

#[tokio::test]
async fn delete_expiry_and_clear_reach_into_segments() {
    let Some(env) = env(BUCKET, "ops").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 1).await.unwrap();
    let mut model = produce(&p, 400).await;
    spill(&env, &p, 6).await;
    // Delete items that are in segments: they go, the rest keeps its order.
    let victims: Vec<ItemId> = model.keys().rev().step_by(7).take(20).map(|k| k.1).collect();
    p.delete(victims.clone()).await.unwrap();
    model.retain(|k, _| !victims.contains(&k.1));
    assert_eq!(p.counts().await.unwrap().ready, 380);
    spill(&env, &p, 6).await;
    assert_eq!(drain(&p, &mut model, 11).await, 380);
    // Expiry: a backlog in segments expires whole.
    let batch: Vec<NewItem> = (0..300)
        .map(|i| NewItem {
            expire_deadline: Ts(T0.0 + 1_000_000),
            created_at: T0,
            payload: Bytes::from(format!("e{i}")),
            ..Default::default()
        })
        .collect();
    p.produce(batch).await.unwrap();
    spill(&env, &p, 5).await;
    let later = Ts(T0.0 + 2_000_000);
    for _ in 0..100 {
        if !p.lifecycle(later, POLICY, 1000).await.unwrap().more && p.counts().await.unwrap().ready == 0 {
            break;
        }
    }
    assert_eq!(p.counts().await.unwrap().ready, 0);
    // Clear: segments and records go.
    let _ = produce(&p, 300).await;
    spill(&env, &p, 4).await;
    p.clear(lessor_core::types::ClearRequest {
        queue: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let stats = p.stats(T0).await.unwrap();
    assert_eq!((stats.counts.ready, stats.tiers.object.items), (0, 0));
    assert!(p.lease(10, LEASE).await.unwrap().is_empty());
    env.segments_gone().await;
}

/// A delete naming one id in each of many segments, and an expiry sweep over segments each holding a due item,
/// leave in RAM what they left before: the cold depth and less than a segment per priority, not the segments they
/// reached (what the partition keeps must not grow with the ids named or the segments touched). What stays is
/// served in order afterwards, and no segment object is left behind.
#[tokio::test]
async fn a_delete_or_expiry_touching_every_segment_keeps_ram_bounded() {
    let Some(env) = env(BUCKET, "touch").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 7).await.unwrap();
    let cp = store.cold_partition("q", 7).unwrap();
    let mut model = produce(&p, 2000).await;
    spill(&env, &p, 80).await;
    settle(&env, &p).await;
    let segs = cp.segment_keys().await.len();
    // Every tenth item of each priority in id order: at least one id in every segment (20 items each).
    let victims: Vec<ItemId> = model.keys().step_by(10).map(|k| k.1).collect();
    p.delete(victims.clone()).await.unwrap();
    let (records, _) = cp.ram_counts().await;
    let bound = 3 * (DEPTH + u64::from(SEG));
    assert!(
        records <= bound,
        "a delete of {} ids over {segs} segments left {records} records in RAM (bound {bound})",
        victims.len()
    );
    model.retain(|k, _| !victims.contains(&k.1));
    assert_eq!(p.counts().await.unwrap().ready, model.len() as u64);
    assert_eq!(drain(&p, &mut model, 50).await, 1800);

    // Expiry: every other item is due, so every segment holds due items and items that stay.
    // The items that stay, for the drain below: the rewritten segments serve them in order.
    let mut model = produce_half_due(&p, 1000).await;
    spill(&env, &p, 40).await;
    settle(&env, &p).await;
    let segs = cp.segment_keys().await.len();
    p.lifecycle(Ts(T0.0 + 2_000_000), POLICY, 100).await.unwrap();
    let (records, _) = cp.ram_counts().await;
    let bound = DEPTH + u64::from(SEG);
    assert!(
        records <= bound,
        "an expiry over {segs} segments left {records} records in RAM (bound {bound})"
    );
    assert_eq!(p.counts().await.unwrap().ready, 500);
    assert_eq!(drain(&p, &mut model, 50).await, 500);
    // No object is left behind: every segment a delete or expiry replaced was deleted.
    env.segments_gone().await;
}

/// Browsing a deep cold backlog page by page (a dashboard) reads the segments each page reaches and leaves them
/// in object storage: the records in RAM, the segments loaded and the manifest are what they were before, and
/// the pages together are every item, once each, in id order, as when nothing was cold. A page cut by its byte
/// bound is the same prefix.
#[tokio::test]
async fn a_list_paging_through_segments_keeps_them_cold() {
    let Some(env) = env(BUCKET, "list").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 8).await.unwrap();
    let cp = store.cold_partition("q", 8).unwrap();
    let mut model = produce(&p, 2000).await;
    spill(&env, &p, 80).await;
    settle(&env, &p).await;
    let keys = cp.segment_keys().await;
    let objects = env.segments().await;
    let (records, _) = cp.ram_counts().await;
    let loaded = store.segment_counters().1;
    let cold = p.stats(T0).await.unwrap().tiers.object.items;
    let mut want: Vec<ItemId> = model.keys().map(|k| k.1).collect();
    want.sort();

    let took = std::time::Instant::now();
    let (listed, pages) = list_pages(&p, 25).await;
    let took = took.elapsed();
    let (records_after, _) = cp.ram_counts().await;
    eprintln!(
        "paging through {} segments ({cold} items) in {pages} pages of 25 ({took:?}): {records} records in RAM before, \
         {records_after} after",
        keys.len()
    );
    assert_eq!(listed, want, "the pages are every item once, in id order");
    assert!(
        records_after <= records,
        "a list over {} segments left {records_after} records in RAM ({records} before)",
        keys.len()
    );
    assert_eq!(store.segment_counters().1, loaded, "a list loaded segments");
    // A spill the ticker committed meanwhile may add a segment; none may be gone.
    let keys_after = cp.segment_keys().await;
    assert!(keys.iter().all(|k| keys_after.contains(k)), "manifest changed");
    let objects_after = env.segments().await;
    assert!(
        objects.iter().all(|k| objects_after.contains(k)),
        "objects deleted"
    );
    assert!(p.stats(T0).await.unwrap().tiers.object.items >= cold);

    // One page over everything, one from a pivot, and one cut by its byte bound: the same items.
    check_single_pages(&p, &want, 1234, &model).await;
    assert_eq!(store.segment_counters().1, loaded, "a list loaded segments");
    assert_eq!(drain(&p, &mut model, 50).await, 2000);
    env.segments_gone().await;
}

/// A list whose page reaches a segment that cannot be read fails as unavailable naming it (as a lease does),
/// rather than leave the segment's items out of the page.
#[tokio::test]
async fn a_list_reaching_a_missing_segment_fails_naming_it() {
    let Some(env) = env(BUCKET, "list-missing").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 9).await.unwrap();
    let _ = produce(&p, 300).await;
    spill(&env, &p, 3).await;
    let victim = env.segments().await[0].clone();
    env.client.delete(&ObjPath::from(victim.as_str())).await.unwrap();
    let e = p.list(None, 1000, false).await.expect_err("a segment is missing");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(e.message.contains(&victim), "{e}");
    assert_eq!(p.counts().await.unwrap().ready, 300);
}

/// Produces `n` items of priority 0, every other one (the first, the third, ...) expiring at `T0` + 1 s and the
/// rest never, so that every segment they spill to holds items that expire and items that stay. Returns the model
/// of the items that stay.
async fn produce_half_due(p: &Arc<dyn Partition>, n: usize) -> Model {
    let batch: Vec<NewItem> = (0..n)
        .map(|i| NewItem {
            expire_deadline: if i % 2 == 0 { Ts(T0.0 + 1_000_000) } else { FAR },
            created_at: T0,
            payload: Bytes::from(format!("x{i}")),
            ..Default::default()
        })
        .collect();
    let payloads: Vec<Bytes> = batch.iter().map(|b| b.payload.clone()).collect();
    let ids = p.produce(batch).await.unwrap();
    ids.into_iter()
        .zip(payloads)
        .skip(1)
        .step_by(2)
        .map(|(id, payload)| ((std::cmp::Reverse(0), id), payload))
        .collect()
}

/// Waits until the manifest of `cp` and the segment objects are the same set: no entry names a deleted object, and
/// no object is left that no entry names (the old object of a replaced segment is deleted in the background).
async fn manifest_matches_objects(env: &Env, cp: &lessor_storage::memory::cold::ColdPartition) {
    let same = lessor_testkit::eventually::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let mut keys = cp.segment_keys().await;
            keys.sort();
            let objects = env.segments().await;
            if keys == objects {
                Ok(())
            } else {
                Err(format!("manifest {keys:?}\nobjects {objects:?}"))
            }
        },
    )
    .await;
    assert!(same.is_ok(), "{same:?}");
}

/// After an operation that took items out of segments: the ready count is the model's, listing pages through every
/// item of the model once each in id order with its payload, and the segments and records together hold each of
/// them once (`stats` tiers).
async fn holds_exactly(p: &Arc<dyn Partition>, model: &Model) {
    let stats = p.stats(T0).await.unwrap();
    assert_eq!(stats.counts.ready, model.len() as u64);
    assert_eq!(
        stats.tiers.object.items + stats.tiers.memory.items,
        model.len() as u64,
        "{:?}",
        stats.tiers
    );
    let mut want: Vec<ItemId> = model.keys().map(|k| k.1).collect();
    want.sort();
    let (listed, _) = list_pages(p, 25).await;
    assert_eq!(listed, want, "every item once, in id order");
    let all = p.list(None, 10_000, false).await.unwrap();
    for it in &all {
        assert_eq!(
            Some(&it.payload),
            model.get(&(std::cmp::Reverse(it.priority), it.id))
        );
    }
}

/// A delete by id over segments whose write-back fails (the PUT of the segment's remaining items, after its
/// download): each such segment is loaded into RAM instead, as documented, and the delete goes on. The named
/// items are gone, every other one is there exactly once (listed, counted, leased in order), the segments
/// rewritten after the failures are in place, and the manifest names exactly the objects in the bucket.
#[tokio::test]
async fn a_delete_whose_segment_rewrite_fails_loses_and_doubles_nothing() {
    let Some(env) = env(BUCKET, "rewrite-delete").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 10).await.unwrap();
    let cp = store.cold_partition("q", 10).unwrap();
    let mut model = produce(&p, 600).await;
    spill(&env, &p, 20).await;
    settle(&env, &p).await;
    let segs = cp.segment_keys().await.len();
    let (_, loaded, failed) = store.segment_counters();
    // Every tenth item: at least one id in every segment (20 items each). The first three rewrites fail.
    let victims: Vec<ItemId> = model.keys().step_by(10).map(|k| k.1).collect();
    store.fail_segment_rewrites(3);
    p.delete(victims.clone()).await.unwrap();
    store.fail_segment_rewrites(0);
    model.retain(|k, _| !victims.contains(&k.1));
    // The three segments whose rewrite failed were loaded into RAM (counted as loads, not as failures).
    let (_, loaded_after, failed_after) = store.segment_counters();
    assert_eq!((loaded_after - loaded, failed_after), (3, failed));
    let left = cp.segment_keys().await.len();
    assert!(left <= segs - 3, "{left} segments left of {segs}");
    holds_exactly(&p, &model).await;
    manifest_matches_objects(&env, &cp).await;
    // Deleting them again finds nothing; the rest is untouched.
    p.delete(victims.clone()).await.unwrap();
    holds_exactly(&p, &model).await;
    assert_eq!(drain(&p, &mut model, 30).await, 540);
    env.segments_gone().await;
}

/// An expiry pass over segments whose write-backs all fail: each segment holding due items is loaded into RAM
/// instead and its due items expire from there. The due items are gone, every other one is there exactly once,
/// and the manifest names exactly the objects in the bucket.
#[tokio::test]
async fn an_expiry_whose_segment_rewrites_fail_loses_and_doubles_nothing() {
    let Some(env) = env(BUCKET, "rewrite-expiry").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 11).await.unwrap();
    let cp = store.cold_partition("q", 11).unwrap();
    // Every other item is due: every segment holds due items and items that stay.
    let mut model = produce_half_due(&p, 600).await;
    spill(&env, &p, 20).await;
    settle(&env, &p).await;
    let segs = cp.segment_keys().await.len();
    let (_, loaded, _) = store.segment_counters();
    store.fail_segment_rewrites(u64::MAX);
    let later = Ts(T0.0 + 2_000_000);
    let mut dead = 0;
    for _ in 0..100 {
        let o = p.lifecycle(later, POLICY, 1000).await.unwrap();
        dead += o.dead;
        if !o.more && p.counts().await.unwrap().ready == 300 {
            break;
        }
    }
    store.fail_segment_rewrites(0);
    assert_eq!(p.counts().await.unwrap().ready, 300);
    assert_eq!(dead, 300, "expired");
    // Every segment held due items: each was loaded into RAM when its rewrite failed.
    let (_, loaded_after, _) = store.segment_counters();
    assert!(
        loaded_after - loaded >= segs as u64,
        "{} loads for {segs} segments",
        loaded_after - loaded
    );
    holds_exactly(&p, &model).await;
    manifest_matches_objects(&env, &cp).await;
    // A later pass finds nothing more due.
    assert_eq!(p.lifecycle(later, POLICY, 1000).await.unwrap().dead, 0);
    holds_exactly(&p, &model).await;
    assert_eq!(drain(&p, &mut model, 30).await, 300);
    env.segments_gone().await;
}

#[tokio::test]
async fn a_missing_segment_is_unavailable_and_named_never_skipped() {
    let Some(env) = env(BUCKET, "missing").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 2).await.unwrap();
    let model = produce(&p, 300).await;
    spill(&env, &p, 3).await;
    let segs = env.segments().await;
    let victim = segs[0].clone();
    env.client.delete(&ObjPath::from(victim.as_str())).await.unwrap();
    let mut expect = model.keys().map(|k| k.1);
    let mut failed = None;
    for _ in 0..300 {
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
    // It keeps failing the same way (the items stay queued; the segment is in its retry pause), and the failure
    // is counted.
    let again = p.lease(3, LEASE).await.expect_err("still missing");
    assert_eq!(again.kind, StorageErrorKind::Unavailable);
    assert!(again.message.contains(&victim), "{again}");
    assert!(store.segment_counters().2 >= 1);
    assert!(p.counts().await.unwrap().ready > 0);
}

#[tokio::test]
async fn a_damaged_segment_is_refused_never_served() {
    let Some(env) = env(BUCKET, "damaged").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 3).await.unwrap();
    let model = produce(&p, 150).await;
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
    let mut expect = model.iter().map(|(k, v)| (k.1, v.clone()));
    let mut err = None;
    for _ in 0..200 {
        match p.lease(5, LEASE).await {
            Ok(got) => {
                for it in got {
                    // Whatever is served is exactly the item expected next, bytes included.
                    assert_eq!(Some((it.id, it.payload.clone())), expect.next());
                }
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("the damaged segment is refused");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(
        e.message.contains("corrupt") && e.message.contains(&victim),
        "{e}"
    );
    assert!(store.segment_counters().2 >= 1);
}

#[tokio::test]
async fn object_storage_down_leaves_the_queue_working() {
    // An endpoint where nothing listens: every spill fails, and is retried later; the store still opens.
    let env = down_env(BUCKET);
    let store = env.open().await;
    let p = store.open("q", 5).await.unwrap();
    let mut model = produce(&p, 300).await;
    for _ in 0..20 {
        p.lifecycle(T0, POLICY, 100).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (written, _, _) = store.segment_counters();
    assert_eq!(written, 0);
    let stats = p.stats(T0).await.unwrap();
    assert_eq!((stats.counts.ready, stats.tiers.object.items), (300, 0));
    assert_eq!(stats.tiers.memory.items, 300);
    // Produce and lease go on in order; the backlog stays in RAM.
    assert_eq!(drain(&p, &mut model, 13).await, 300);
}

#[tokio::test]
async fn a_new_store_deletes_the_previous_runs_segments() {
    let Some(env) = env(BUCKET, "restart").await else {
        return;
    };
    {
        let store = env.open().await;
        let p = store.open("q", 4).await.unwrap();
        let _ = produce(&p, 200).await;
        spill(&env, &p, 2).await;
    }
    // Another store of the same prefix but another name is not touched.
    let other = format!(
        "{}mem-1/memory/segments/q/0/0/00000000000000000001-1-00000000000000ff",
        env.cfg.prefix
    );
    env.client
        .put(&ObjPath::from(other.as_str()), PutPayload::from(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert!(env.segments().await.len() >= 3);
    // The previous run's store is gone (a restart): the next one finds its segments orphaned and deletes them.
    let store = env.open().await;
    assert_eq!(env.segments().await, vec![other]);
    let p = store.open("q", 4).await.unwrap();
    assert_eq!(p.counts().await.unwrap().ready, 0);
}

#[tokio::test]
async fn destroying_a_partition_deletes_its_segments() {
    let Some(env) = env(BUCKET, "destroy").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 6).await.unwrap();
    let _ = produce(&p, 200).await;
    spill(&env, &p, 2).await;
    store.destroy("q", 6).await.unwrap();
    drop(p);
    env.segments_gone().await;
    // A queue created again under the name starts empty.
    let p = store.open("q", 6).await.unwrap();
    assert_eq!(p.counts().await.unwrap().ready, 0);
}

/// A queue name holding characters object_store percent-encodes in a key: the listing names its segments in the
/// encoded form, and deleting them by that name must reach them (destroy, and a new store's sweep of the previous
/// run), or they stay in the bucket for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_of_queues_with_encoded_names_are_deleted() {
    let Some(env) = env(BUCKET, "encoded").await else {
        return;
    };
    {
        let store = env.open().await;
        let p = store.open("orders#eu", 1).await.unwrap();
        let _ = produce(&p, 200).await;
        spill(&env, &p, 2).await;
        store.destroy("orders#eu", 1).await.unwrap();
        drop(p);
        env.segments_gone().await;
        let p = store.open("[eu]", 2).await.unwrap();
        let _ = produce(&p, 200).await;
        spill(&env, &p, 2).await;
    }
    // A restart: the new store deletes the previous run's segments.
    let _store = env.open().await;
    env.segments_gone().await;
}

/// S3 keys are at most 1,024 bytes: the longest queue name of characters object_store percent-encodes gave
/// segment keys of about 2,600 bytes, and every spill failed for good. Its segments must be written, read back
/// and deleted with the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_queue_name_of_encoded_characters_spills_to_keys_s3_accepts() {
    let Some(env) = env(BUCKET, "long-name").await else {
        return;
    };
    let store = env.open().await;
    let queue = "#".repeat(lessor_core::validate::MAX_QUEUE_NAME);
    let p = store.open(&queue, 65_535).await.unwrap();
    let mut model = produce(&p, 200).await;
    spill(&env, &p, 2).await;
    for k in env.segments().await {
        assert!(k.len() <= 1024, "a {}-byte key: {k}", k.len());
    }
    assert_eq!(drain(&p, &mut model, 9).await, 200);
    let _ = produce(&p, 200).await;
    spill(&env, &p, 2).await;
    store.destroy(&queue, 65_535).await.unwrap();
    drop(p);
    env.segments_gone().await;
}

/// A segment of a low priority that cannot be read holds up only what comes after it: ready items of a higher
/// priority come before it in serving order, and a lease asking for more than them gets them rather than fail as
/// unavailable (which took the whole partition out of service in the engine, its high-priority items with it, for
/// as long as the segment stayed unreadable).
#[tokio::test]
async fn a_missing_low_priority_segment_does_not_hold_up_higher_priorities() {
    let Some(env) = env(BUCKET, "missing-prio").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 12).await.unwrap();
    let low = produce_prio(&p, 300, 0, FAR).await;
    spill(&env, &p, 3).await;
    let victim = env.segments().await[0].clone();
    env.client.delete(&ObjPath::from(victim.as_str())).await.unwrap();
    // Serve the priority-0 items before the missing segment, until a lease needs it.
    let mut served = 0;
    loop {
        match p.lease(1, LEASE).await {
            Ok(got) => {
                assert_eq!(got.len(), 1, "ran dry before the missing segment");
                assert_eq!(got[0].id, low[served]);
                served += 1;
            }
            Err(e) => {
                assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
                break;
            }
        }
        assert!(served < 300, "the missing segment was never needed");
    }
    // Items of a higher priority come before every priority-0 item: a lease of more than them serves them.
    let high = produce_prio(&p, 3, 9, FAR).await;
    let got = p.lease(10, LEASE).await.expect("the priority-9 items are served");
    assert_eq!(got.iter().map(|it| it.id).collect::<Vec<_>>(), high);
    // The priority-0 items behind the missing segment are still not served, and still queued.
    let e = p.lease(10, LEASE).await.expect_err("still missing");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(e.message.contains(&victim), "{e}");
    assert_eq!(p.counts().await.unwrap().ready, 300 - served as u64);
}

/// An expiry due in a segment that cannot be read postpones that segment's expiry, not the rest of the lifecycle:
/// an expired lease still goes back to the queue, the items in RAM still expire, and the next deadline is the retry,
/// not a deadline already passed (the engine runs the lifecycle again at once while it is due). Failing the whole
/// pass left the lease held for as long as the segment stayed unreadable, and the engine took the partition out of
/// service at every pass.
#[tokio::test]
async fn an_unreadable_segment_due_to_expire_does_not_stop_the_lifecycle() {
    let Some(env) = env(BUCKET, "expiry-missing").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 13).await.unwrap();
    check_unreadable_due_segment(&env, &p).await;
}

/// A delete by id of an item held in RAM (here leased) does not fetch the segment of another priority whose id
/// range happens to hold its id (ids are handed out in blocks of 1,024 per priority, so a segment of one priority
/// spans the blocks of others): it is answered from RAM, and does not fail when that segment cannot be read.
#[tokio::test]
async fn a_delete_of_an_item_in_ram_fetches_no_segment() {
    let Some(env) = env(BUCKET, "delete-ram").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 14).await.unwrap();
    let (high, victim) = lease_an_item_inside_a_lost_segment(&env, &p, 50).await;
    let cp = store.cold_partition("q", 14).unwrap();
    let (_, _, failed) = store.segment_counters();
    p.delete(vec![high])
        .await
        .expect("a delete of a leased item needs no segment");
    assert_eq!(store.segment_counters().2, failed, "a segment was fetched");
    assert_eq!(p.counts().await.unwrap().leased, 0);
    assert!(cp.segment_keys().await.contains(&victim));
}

/// A segment that could not be fetched is not fetched again by every lease and lifecycle pass: it waits for a
/// retry pause (1 s, doubling at each failure) on the store's clock, and its items come back in order once the
/// object is there again and the pause has passed. Fetched at every call, a lost object (or object storage down)
/// cost every lease of the partition a GET (and, with the store down, its timeout).
#[tokio::test]
async fn an_unreadable_segment_is_not_fetched_again_before_its_pause() {
    let Some(env) = env(BUCKET, "paused").await else {
        return;
    };
    let clock = Arc::new(ManualClock::new(T0));
    let store = env.open_clock(clock.clone()).await;
    let p = store.open("q", 15).await.unwrap();
    check_paused_segment(&env, &p, &clock, || store.segment_counters().2).await;
}

/// A spill in flight (its object being written) survives an expiry and a delete of items it does not hold: it
/// commits, its upload not wasted. Both used to abandon whatever spill was in flight (and have it redone), so under
/// steady expiries or deletes a spill might never land.
#[tokio::test]
async fn a_spill_in_flight_survives_a_delete_and_an_expiry_of_other_items() {
    let Some(env) = env(BUCKET, "spill-survives").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 16).await.unwrap();
    let cp = store.cold_partition("q", 16).unwrap();
    // Priority 0: the window's 10 items resident, 35 records, a segment's worth (20) beyond the depth (10). Then
    // 5 priority-2 records due at T0 + 1 s.
    let ids = produce_prio(&p, 45, 0, FAR).await;
    let due = Ts(T0.0 + 1_000_000);
    let _ = produce_prio(&p, 5, 2, due).await;
    // This call starts the spill of priority 0's ids[20..40]; the calls below run while it is in flight (a
    // current-thread runtime: its task runs only when this one waits).
    p.lifecycle(T0, POLICY, 100).await.unwrap();
    assert!(cp.spill_in_flight().await, "a spill started");
    let o = p.lifecycle(Ts(due.0 + 1), POLICY, 100).await.unwrap();
    assert_eq!(o.dead, 5, "{o:?}");
    p.delete(vec![ids[44]]).await.unwrap();
    assert!(cp.spill_in_flight().await, "the spill was in flight across both");
    spill_committed(&env, &p, 1, || store.segment_counters().0).await;
    assert_eq!(store.abandoned_spills(), 0, "the spill was abandoned");
    assert_eq!(env.segments().await.len(), 1);
    assert_eq!(lease_all(&p, 9).await, ids[..44]);
}

/// A spill in flight holding an item that a delete removes is abandoned when its upload ends, also when the delete
/// fetches a segment meanwhile (it no longer waits for the spill there): the deleted item does not come back from
/// its segment.
#[tokio::test]
async fn a_spill_in_flight_across_a_delete_of_its_item_does_not_bring_it_back() {
    let Some(env) = env(BUCKET, "spill-doomed").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 17).await.unwrap();
    let cp = store.cold_partition("q", 17).unwrap();
    // A first segment (ids[20..40]), then 25 more items: the records beyond it make the next spill (ids[40..60]).
    let mut ids = produce_prio(&p, 45, 0, FAR).await;
    spill_committed(&env, &p, 1, || store.segment_counters().0).await;
    ids.extend(produce_prio(&p, 25, 0, FAR).await);
    p.lifecycle(T0, POLICY, 100).await.unwrap();
    assert!(cp.spill_in_flight().await, "a second spill started");
    // One item of the segment, one of the spill in flight.
    p.delete(vec![ids[25], ids[50]]).await.unwrap();
    spill_committed(&env, &p, 2, || store.segment_counters().0).await;
    let want: Vec<ItemId> = ids
        .iter()
        .copied()
        .filter(|&id| id != ids[25] && id != ids[50])
        .collect();
    let ready = p.counts().await.unwrap().ready;
    assert_eq!(lease_all(&p, 9).await, want, "a deleted item came back");
    assert_eq!(ready, want.len() as u64);
    assert_eq!(
        store.abandoned_spills(),
        1,
        "the spill holding a deleted item is abandoned"
    );
}

/// A delete, a lease and a snapshot that need a committed segment while a spill is in flight (its object being
/// written, held here for as long as the test wants) fetch that segment without waiting for the spill's upload,
/// and neither does the produce behind each of them. The segment load (and a delete's or an expiry's take from a
/// segment) used to wait for whatever job was in flight, a spill's PUT included, under the partition's lock: every
/// call of the partition, and the queue's task that makes them one after the other, waited for the upload, up to
/// the object store's timeout when it hung. The spill, holding none of the items removed, then commits its own
/// upload, and every item is served once.
#[tokio::test]
async fn a_delete_a_lease_or_a_snapshot_reaching_a_segment_does_not_wait_for_the_spill_in_flight() {
    let Some(env) = env(BUCKET, "spill-held").await else {
        return;
    };
    let store = env.open().await;
    let p = store.open("q", 18).await.unwrap();
    // A first segment (ids[20..40]), then 25 more items: the next spill takes ids[40..60], held before its PUT.
    let mut ids = produce_prio(&p, 45, 0, FAR).await;
    spill_committed(&env, &p, 1, || store.segment_counters().0).await;
    store.hold_cold_spills(true);
    ids.extend(produce_prio(&p, 25, 0, FAR).await);
    p.lifecycle(T0, POLICY, 100).await.unwrap();
    store.cold_spills_held(1).await;
    let mut more = Vec::new();
    // A delete of an item of the committed segment (fetched, the rest written back), and a produce behind it.
    let del = tokio::spawn({
        let (p, id) = (p.clone(), ids[25]);
        async move { p.delete(vec![id]).await }
    });
    tokio::task::yield_now().await;
    more.extend(
        within(
            "the produce waited for the spill's upload (behind a delete)",
            produce_prio(&p, 1, 0, FAR),
        )
        .await,
    );
    within("the delete waited for the spill's upload", del)
        .await
        .unwrap()
        .unwrap();
    // A lease reaching into that segment (10 records stand before it), and a produce behind it. It reads 25
    // records, up to ids[35]: one reading past ids[40] would take records of the spill, which is then abandoned.
    let lease = tokio::spawn({
        let p = p.clone();
        async move { p.lease(20, LEASE).await }
    });
    tokio::task::yield_now().await;
    more.extend(
        within(
            "the produce waited for the spill's upload (behind a lease)",
            produce_prio(&p, 1, 0, FAR),
        )
        .await,
    );
    let got = within("the lease waited for the spill's upload", lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.iter().map(|it| it.id).collect::<Vec<_>>(), ids[..20]);
    // A snapshot (every segment loaded back), and a produce behind it. The held spill's records are still in RAM,
    // so the snapshot has them without it.
    let snap = tokio::spawn({
        let p = p.clone();
        async move {
            let mut s = p.snapshot().await?;
            let mut all = Vec::new();
            loop {
                let page = s.next(1000).await?;
                if page.is_empty() {
                    return Ok::<_, lessor_core::error::StorageError>(all);
                }
                all.extend(page.into_iter().map(|it| it.id));
            }
        }
    });
    tokio::task::yield_now().await;
    more.extend(
        within(
            "the produce waited for the spill's upload (behind a snapshot)",
            produce_prio(&p, 1, 0, FAR),
        )
        .await,
    );
    let copied = within("the snapshot waited for the spill's upload", snap)
        .await
        .unwrap()
        .unwrap();
    let mut want: Vec<ItemId> = ids.iter().copied().filter(|&id| id != ids[25]).collect();
    want.extend(&more[..2]);
    assert_eq!(copied, want, "the snapshot holds every item once");
    assert_eq!(store.segment_counters().0, 1, "the spill is still held");
    // Its upload ends: that spill commits (not abandoned and redone), and nothing is lost or doubled.
    store.hold_cold_spills(false);
    // Lifecycle calls commit it once its upload ends (`spill_committed` counts objects, and the snapshot loaded the
    // first segment back, deleting its object).
    let committed = lessor_testkit::eventually::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            p.lifecycle(T0, POLICY, 100).await.unwrap();
            match store.segment_counters().0 {
                2.. => Ok(()),
                n => Err(format!("{n} segments committed")),
            }
        },
    )
    .await;
    assert!(committed.is_ok(), "{committed:?}");
    assert_eq!(store.abandoned_spills(), 0, "the held spill was abandoned");
    let rest: Vec<ItemId> = ids[20..]
        .iter()
        .chain(&more)
        .copied()
        .filter(|&id| id != ids[25])
        .collect();
    assert_eq!(lease_all(&p, 9).await, rest, "an item lost or served twice");
}
