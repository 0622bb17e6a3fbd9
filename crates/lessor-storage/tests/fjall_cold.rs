//! Cold backlog segments of the fjall backend (`cold-segments`) against a real S3-compatible server
//! (`LESSOR_TEST_S3_ENDPOINT`, from `scripts/s3-test-server.sh`), with a tiny window, depth and segment size: the
//! backlog goes to segments and comes back in exact priority and FIFO order, across a restart, without loss or
//! duplicates; a segment deleted behind Lessor's back makes the lease fail as unavailable (454) naming the
//! segment, never serve other bytes; orphans are swept and live segments are not; browsing pages through segments
//! without bringing them back; a delete or an expiry does not wait for a spill in flight, and brings no removed item
//! back through it.
#![cfg(all(feature = "s3", feature = "fjall"))]
#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use lessor_core::error::StorageErrorKind;
use lessor_core::storage::PartitionStore;
use lessor_core::time::{ManualClock, SharedClock, Ts};
use lessor_core::types::ItemId;
use lessor_storage::fjall::{Durability, FjallStore};
use lessor_storage::registry::ColdSettings;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};

#[path = "support/cold.rs"]
mod support;

use support::*;

const BUCKET: &str = "lessor-cold";
impl Env {
    fn open(&self, dir: &std::path::Path) -> FjallStore {
        self.open_clock(dir, Arc::new(ManualClock::new(T0)))
    }

    /// A store whose segment retry pauses are timed by `clock`.
    fn open_clock(&self, dir: &std::path::Path, clock: SharedClock) -> FjallStore {
        let store = FjallStore::open(dir, Durability::None).unwrap();
        store.set_memory_window(5);
        store
            .set_cold_clock(
                ColdSettings {
                    object_store: self.cfg.clone(),
                    after_depth: 10,
                    segment_items: 20,
                    segment_bytes: 1 << 20,
                    prefetch_items: 5,
                },
                "disk-0",
                clock,
            )
            .unwrap();
        store
    }
}

#[tokio::test]
async fn backlog_goes_cold_and_comes_back_in_order() {
    let Some(env) = env(BUCKET, "order").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 0).await.unwrap();
    let mut model = produce(&p, 400).await;
    spill_committed(&env, &p, 6, || store.segment_counters().0).await;
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
    assert!(written >= 6 && failed == 0, "written {written}, failed {failed}");
    assert_eq!(drain(&p, &mut model, 7).await, 400);
    let (_, loaded, failed) = store.segment_counters();
    assert!(loaded >= 6 && failed == 0, "loaded {loaded}");
    // Every segment came back and its object was deleted.
    env.segments_gone().await;
}

/// The payload sweeper's snapshot reads what is on disk and leaves the segments cold (no segment item references
/// an offloaded payload); a full snapshot (backups) loads them back and reads every item.
#[tokio::test]
async fn the_reference_snapshot_leaves_segments_cold() {
    let Some(env) = env(BUCKET, "refsnap").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 3).await.unwrap();
    let model = produce(&p, 400).await;
    spill(&env, &p, 6).await;
    check_reference_snapshot(&env, &p, &model, || store.segment_counters().1).await;
}

#[tokio::test]
async fn a_restart_reads_the_manifest_and_keeps_order() {
    let Some(env) = env(BUCKET, "restart").await else {
        return;
    };
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
    // Browsing sees the items in segments too (it reads the segments its page reaches), in id order.
    let listed = p.list(None, 1000, false).await.unwrap();
    let mut want: Vec<ItemId> = model.keys().map(|k| k.1).collect();
    want.sort();
    assert_eq!(listed.iter().map(|it| it.id).collect::<Vec<_>>(), want);
    assert_eq!(drain(&p, &mut model, 11).await, 270);
}

/// Browsing a deep cold backlog page by page (a dashboard) reads the segments each page reaches and leaves them
/// in object storage: the segments loaded, the manifest and the items on disk are what they were before, and the
/// pages together are every item, once each, in id order, as when nothing was cold. A page cut by its byte bound is
/// the same prefix.
#[tokio::test]
async fn a_list_paging_through_segments_keeps_them_cold() {
    let Some(env) = env(BUCKET, "list").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 7).await.unwrap();
    let fp = store.live_partition("q", 7).unwrap();
    let mut model = produce(&p, 1000).await;
    spill(&env, &p, 30).await;
    settle(&env, &p).await;
    let (keys, _) = fp.segment_keys().await.unwrap();
    let objects = env.segments().await;
    let loaded = store.segment_counters().1;
    let tiers = p.stats(T0).await.unwrap().tiers;
    let mut want: Vec<ItemId> = model.keys().map(|k| k.1).collect();
    want.sort();

    let took = std::time::Instant::now();
    let (listed, pages) = list_pages(&p, 25).await;
    let took = took.elapsed();
    let tiers_after = p.stats(T0).await.unwrap().tiers;
    eprintln!(
        "paging through {} segments in {pages} pages of 25 ({took:?}): {} items on disk and {} in segments before, {} and {} \
         after",
        keys.len(),
        tiers.disk.items,
        tiers.object.items,
        tiers_after.disk.items,
        tiers_after.object.items
    );
    assert_eq!(listed, want, "the pages are every item once, in id order");
    assert_eq!(store.segment_counters().1, loaded, "a list loaded segments");
    // A spill the ticker committed meanwhile may add a segment; none may be gone.
    let (keys_after, _) = fp.segment_keys().await.unwrap();
    assert!(keys.iter().all(|k| keys_after.contains(k)), "manifest changed");
    let objects_after = env.segments().await;
    assert!(
        objects.iter().all(|k| objects_after.contains(k)),
        "objects deleted"
    );
    assert!(tiers_after.object.items >= tiers.object.items, "{tiers_after:?}");
    assert!(tiers_after.disk.items <= tiers.disk.items, "{tiers_after:?}");

    // One page over everything, one from a pivot, and one cut by its byte bound: the same items.
    check_single_pages(&p, &want, 567, &model).await;
    assert_eq!(store.segment_counters().1, loaded, "a list loaded segments");
    assert_eq!(drain(&p, &mut model, 50).await, 1000);
    env.segments_gone().await;
}

/// A list whose page reaches a segment that cannot be read fails as unavailable naming it (as a lease does),
/// rather than leave the segment's items out of the page.
#[tokio::test]
async fn a_list_reaching_a_missing_segment_fails_naming_it() {
    let Some(env) = env(BUCKET, "list-missing").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 8).await.unwrap();
    let _ = produce(&p, 200).await;
    spill(&env, &p, 2).await;
    let victim = env.segments().await[0].clone();
    env.client.delete(&ObjPath::from(victim.as_str())).await.unwrap();
    let e = p.list(None, 1000, false).await.expect_err("a segment is missing");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(e.message.contains(&victim), "{e}");
    assert_eq!(p.counts().await.unwrap().ready, 200);
}

#[tokio::test]
async fn a_missing_segment_is_unavailable_and_named_never_skipped() {
    let Some(env) = env(BUCKET, "missing").await else {
        return;
    };
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
    // It keeps failing the same way (the items stay; the segment is in its retry pause), and the failure is
    // counted.
    let again = p.lease(3, LEASE).await.expect_err("still missing");
    assert_eq!(again.kind, StorageErrorKind::Unavailable);
    assert!(again.message.contains(&victim), "{again}");
    assert!(store.segment_counters().2 >= 1);
}

#[tokio::test]
async fn a_damaged_segment_is_refused() {
    let Some(env) = env(BUCKET, "damaged").await else {
        return;
    };
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
    let Some(env) = env(BUCKET, "sweep").await else {
        return;
    };
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
    let env = down_env(BUCKET);
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
    let Some(env) = env(BUCKET, "destroy").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 6).await.unwrap();
    let _ = produce(&p, 150).await;
    spill(&env, &p, 2).await;
    // Destroyed while open (as a queue deletion does): a spill in flight is ended first, its object goes too.
    store.destroy("q", 6).await.unwrap();
    drop(p);
    env.segments_gone().await;
}

/// Review finding: a store whose `payload-offload` and `cold-segments` name the same object-storage entry (the
/// natural configuration) puts offloaded payloads under `{prefix}{store}/{queue}/{partition}/` and cold segments
/// under `{prefix}{store}/segments/{queue}/{partition}/...`. Destroying partition N of a queue named `segments`
/// makes the offload wrapper delete everything under `{prefix}{store}/segments/N/`: every cold segment of the
/// queue named `N`, whose manifest still names them. Their items are lost.
#[tokio::test]
async fn destroying_queue_segments_spares_the_cold_segments_of_queue_0() {
    let Some(env) = env(BUCKET, "collide").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let fjall = std::sync::Arc::new(env.open(dir.path()));
    let store = lessor_storage::offload::OffloadStore::new(
        fjall.clone(),
        "disk-0",
        lessor_storage::offload::OffloadSettings {
            object_store: Some(env.cfg.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let p = store.open("0", 0).await.unwrap();
    let mut model = produce(&p, 400).await;
    spill(&env, &p, 6).await;
    let before = env.segments().await;
    assert!(before.len() >= 6, "{before:?}");
    // Another queue, named `segments`, is created and deleted.
    store.create("segments", &[0]).await.unwrap();
    let other = store.open("segments", 0).await.unwrap();
    other.close().await;
    store.destroy("segments", 0).await.unwrap();
    // Deletes run in the background: give them time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Queue 0's ticker may have spilled one more segment meanwhile; none of those before may be gone.
    let after = env.segments().await;
    let gone: Vec<_> = before.iter().filter(|k| !after.contains(k)).collect();
    assert!(
        gone.is_empty(),
        "deleting queue 'segments' deleted cold segments of queue '0': {gone:?}"
    );
    assert_eq!(drain(&p, &mut model, 7).await, 400);
}

/// In the modes that do not fsync each write (these tests run with `none`), a loaded segment's object is deleted
/// only after an fsync made its records in the journal durable: otherwise a power loss would lose the journal's
/// copy and leave the manifest naming an object that is gone.
#[tokio::test]
async fn a_loaded_segment_is_deleted_only_after_its_load_is_durable() {
    let Some(env) = env(BUCKET, "durable-load").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 0).await.unwrap();
    let mut model = produce(&p, 200).await;
    spill(&env, &p, 4).await;
    let fsyncs = store.fsyncs();
    let (_, loaded_before, _) = store.segment_counters();
    assert_eq!(drain(&p, &mut model, 7).await, 200);
    env.segments_gone().await;
    let (_, loaded, failed) = store.segment_counters();
    assert!(loaded - loaded_before >= 4 && failed == 0, "loaded {loaded}");
    assert!(
        store.fsyncs() - fsyncs >= loaded - loaded_before,
        "{} fsyncs for {} segment loads",
        store.fsyncs() - fsyncs,
        loaded - loaded_before
    );
}

/// A priority whose backlog already went to segments, with fewer than a segment's worth of records after its last
/// one but more than that before its first (a cold depth above the segment size, as configured in practice), must
/// not keep the other priorities from spilling: every cold step used to start a spill of that priority that found
/// nothing to move, and never looked further.
#[tokio::test]
async fn a_priority_with_segments_and_a_short_tail_does_not_stop_the_others_from_spilling() {
    let Some(env) = env(BUCKET, "short-tail").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = FjallStore::open(dir.path(), Durability::None).unwrap();
    store.set_memory_window(5);
    store
        .set_cold(
            ColdSettings {
                object_store: env.cfg.clone(),
                after_depth: 20,
                segment_items: 10,
                segment_bytes: 1 << 20,
                prefetch_items: 5,
            },
            "disk-0",
        )
        .unwrap();
    let p = store.open("q", 0).await.unwrap();
    let batch = |prio: u8, n: usize, base: usize| -> Vec<lessor_core::types::NewItem> {
        (0..n)
            .map(|i| lessor_core::types::NewItem {
                expire_deadline: FAR,
                created_at: T0,
                payload: bytes::Bytes::from(format!("item-{:06}", base + i)),
                priority: prio,
                ..Default::default()
            })
            .collect()
    };
    // Priority 0: 45 paged records, two segments past the depth of 20 and a tail of 5.
    p.produce(batch(0, 50, 0)).await.unwrap();
    spill(&env, &p, 2).await;
    for _ in 0..20 {
        p.lifecycle(T0, POLICY, 100).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(env.segments().await.len(), 2, "{:?}", env.segments().await);
    // Priority 1: 100 paged records, room for several segments past the depth.
    p.produce(batch(1, 100, 1000)).await.unwrap();
    let mut prio1 = 0;
    for _ in 0..400 {
        p.lifecycle(T0, POLICY, 100).await.unwrap();
        prio1 = env
            .segments()
            .await
            .iter()
            .filter(|k| k.contains("/segments/q/0/1/"))
            .count();
        if prio1 >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(prio1 >= 1, "priority 1 never spilled: {:?}", env.segments().await);
    store.close().await;
}

/// A queue name holding characters object_store percent-encodes in a key: the listing names its segments in the
/// encoded form while the manifest holds the keys as built. The sweeper must keep every live segment and delete the
/// orphan, and destroying the partition must delete its segments, or they stay in the bucket for good.
#[tokio::test]
async fn segments_of_queues_with_encoded_names_are_swept_and_destroyed() {
    let Some(env) = env(BUCKET, "encoded").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let queue = "orders#eu";
    let p = store.open(queue, 4).await.unwrap();
    let mut model = produce(&p, 150).await;
    spill(&env, &p, 2).await;
    let live = env.segments().await;
    // An orphan where a crash between a segment's write and its batch leaves it: beside the live ones, named as
    // the listing names them.
    let dir = &live[0][..live[0].rfind('/').unwrap()];
    let orphan = format!("{dir}/00000000000000000001-00000000000000ff");
    env.client
        .put(
            &ObjPath::parse(orphan.as_str()).unwrap(),
            PutPayload::from(vec![1u8, 2, 3]),
        )
        .await
        .unwrap();
    let fp = store.live_partition(queue, 4).unwrap();
    // The grace is in whole seconds of the object's time: sweep until the orphan is old enough.
    let r = lessor_testkit::eventually::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            fp.sweep_segments(Duration::ZERO).await.unwrap();
            let after = env.segments().await;
            if after.contains(&orphan) {
                Err(format!("orphan left: {after:?}"))
            } else {
                Ok(after)
            }
        },
    )
    .await;
    let after = r.unwrap();
    for k in &live {
        assert!(after.contains(k), "live segment {k} swept");
    }
    assert_eq!(drain(&p, &mut model, 9).await, 150);
    let _ = produce(&p, 150).await;
    spill(&env, &p, 2).await;
    store.destroy(queue, 4).await.unwrap();
    drop(p);
    env.segments_gone().await;
}

/// S3 keys are at most 1,024 bytes, and segment keys hold the queue name percent-encoded twice (`#` becomes
/// `%2523` in the key sent): the longest queue name of such characters gave keys of about 2,600 bytes, and every
/// spill failed and was retried for good. Its segments must be written, read back, swept and destroyed.
#[tokio::test]
async fn the_longest_queue_name_of_encoded_characters_spills_to_keys_s3_accepts() {
    let Some(env) = env(BUCKET, "long-name").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let queue = "#".repeat(lessor_core::validate::MAX_QUEUE_NAME);
    let p = store.open(&queue, 65_535).await.unwrap();
    let mut model = produce(&p, 150).await;
    spill(&env, &p, 2).await;
    let live = env.segments().await;
    for k in &live {
        assert!(k.len() <= 1024, "a {}-byte key: {k}", k.len());
    }
    let fp = store.live_partition(&queue, 65_535).unwrap();
    fp.sweep_segments(Duration::ZERO).await.unwrap();
    let after = env.segments().await;
    for k in &live {
        assert!(after.contains(k), "live segment {k} swept");
    }
    assert_eq!(drain(&p, &mut model, 9).await, 150);
    let _ = produce(&p, 150).await;
    spill(&env, &p, 2).await;
    store.destroy(&queue, 65_535).await.unwrap();
    drop(p);
    env.segments_gone().await;
}

/// Review finding: a destroyed partition's segment objects were deleted in a background task, best effort, after
/// the destroy had reported success. With object storage failing they stay in the bucket for good: nothing lists
/// a destroyed partition's directory again (the sweeper judges open partitions only). The destroy must fail as
/// retryable instead, and destroying again once object storage answers must delete them.
#[tokio::test]
async fn destroy_while_object_storage_is_down_fails_instead_of_leaking_the_segments() {
    let Some(env) = env(BUCKET, "destroy-down").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    {
        let store = env.open(dir.path());
        let p = store.open("q", 7).await.unwrap();
        let _ = produce(&p, 150).await;
        spill(&env, &p, 2).await;
        drop(p);
        store.close().await;
    }
    let before = env.segments().await;
    assert!(before.len() >= 2, "{before:?}");
    // The same store opened again over an object store that does not answer.
    let down = Env {
        cfg: lessor_storage::offload::ObjectStoreConfig {
            endpoint: "http://127.0.0.1:9".into(),
            ..env.cfg.clone()
        },
        client: env.client.clone(),
    };
    {
        let store = down.open(dir.path());
        let e = store
            .destroy("q", 7)
            .await
            .expect_err("the segments of the destroyed partition are still in the bucket");
        assert!(e.is_transient(), "{e}");
        store.close().await;
    }
    assert_eq!(env.segments().await, before, "nothing could be deleted");
    // Destroyed again (the queue is still defined) once object storage answers: the segments are gone when the
    // destroy returns.
    let store = env.open(dir.path());
    store.destroy("q", 7).await.unwrap();
    let left = env.segments().await;
    assert!(left.is_empty(), "segments left: {left:?}");
    store.close().await;
}

/// A segment of a low priority that cannot be read holds up only what comes after it: produce goes on, ready items
/// of a higher priority come before it in serving order, and a lease asking for more than them gets them rather
/// than fail as unavailable (which took the whole partition out of service in the engine, its high-priority items
/// with it, for as long as the segment stayed unreadable). The memory store's
/// `memory_cold::a_missing_low_priority_segment_does_not_hold_up_higher_priorities`, on fjall.
#[tokio::test]
async fn a_missing_low_priority_segment_does_not_hold_up_higher_priorities() {
    let Some(env) = env(BUCKET, "missing-prio").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 9).await.unwrap();
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
    // Items of a higher priority are produced, and come before every priority-0 item: a lease of more than them
    // serves them.
    let mut high = Vec::new();
    for i in 0..3 {
        let item = lessor_core::types::NewItem {
            expire_deadline: FAR,
            created_at: T0,
            payload: bytes::Bytes::from(format!("p9-{i}")),
            priority: 9,
            ..Default::default()
        };
        high.extend(p.produce(vec![item]).await.expect("produce goes on"));
    }
    let got = p.lease(10, LEASE).await.expect("the priority-9 items are served");
    assert_eq!(got.iter().map(|it| it.id).collect::<Vec<_>>(), high);
    // The priority-0 items behind the missing segment are still not served, and still queued.
    let e = p.lease(10, LEASE).await.expect_err("still missing");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(e.message.contains(&victim), "{e}");
    assert_eq!(p.counts().await.unwrap().ready, 300 - served as u64);
}

/// An expiry due in a segment that cannot be read postpones that segment's expiry, not the rest of the lifecycle:
/// an expired lease still goes back to the queue, the items on disk and in memory still expire, and the next
/// deadline is the retry, not a deadline already passed (the engine runs the lifecycle again at once while it is
/// due). Failing the whole pass left the lease held for as long as the segment stayed unreadable, and the engine
/// took the partition out of service at every pass. The memory store's
/// `memory_cold::an_unreadable_segment_due_to_expire_does_not_stop_the_lifecycle`, on fjall.
#[tokio::test]
async fn an_unreadable_segment_due_to_expire_does_not_stop_the_lifecycle() {
    let Some(env) = env(BUCKET, "expiry-missing").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 10).await.unwrap();
    let victim = check_unreadable_due_segment(&env, &p).await;
    // The unreadable segment is still named by the manifest: its items wait for it, nothing is lost.
    let fp = store.live_partition("q", 10).unwrap();
    assert!(fp.segment_keys().await.unwrap().0.contains(&victim));
}

/// A delete by id of an item held in memory (here leased) does not fetch the segment of another priority whose id
/// range happens to hold its id (ids are handed out in blocks per priority, so a segment of one priority spans the
/// blocks of others): it is answered without it, and does not fail when that segment cannot be read. The memory
/// store's `memory_cold::a_delete_of_an_item_in_ram_fetches_no_segment`, on fjall.
#[tokio::test]
async fn a_delete_of_an_item_in_memory_fetches_no_segment() {
    let Some(env) = env(BUCKET, "delete-ram").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 11).await.unwrap();
    let (high, victim) = lease_an_item_inside_a_lost_segment(&env, &p, 40).await;
    let fp = store.live_partition("q", 11).unwrap();
    let (_, _, failed) = store.segment_counters();
    p.delete(vec![high])
        .await
        .expect("a delete of a leased item needs no segment");
    assert_eq!(store.segment_counters().2, failed, "a segment was fetched");
    assert_eq!(p.counts().await.unwrap().leased, 0);
    assert!(fp.segment_keys().await.unwrap().0.contains(&victim));
}

/// A segment that could not be fetched is not fetched again by every lease and lifecycle pass: it waits for a
/// retry pause (1 s, doubling at each failure) on the store's clock, and its items come back in order once the
/// object is there again and the pause has passed. Fetched at every call, a lost object (or object storage down)
/// cost every lease of the partition a GET (and, with the store down, its timeout). The memory store's
/// `memory_cold::an_unreadable_segment_is_not_fetched_again_before_its_pause`, on fjall.
#[tokio::test]
async fn an_unreadable_segment_is_not_fetched_again_before_its_pause() {
    let Some(env) = env(BUCKET, "paused").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let store = env.open_clock(dir.path(), clock.clone());
    let p = store.open("q", 12).await.unwrap();
    check_paused_segment(&env, &p, &clock, || store.segment_counters().2).await;
}

/// A delete by id and an expiry pass that meet a spill in flight (its object being written, held here for as long
/// as the test wants) do not wait for its upload, and neither do the produce and lease of the partition behind
/// them. Both used to wait for the spill and commit it first while holding the partition's lock, so every call of
/// the partition (the queue's produces and leases) waited for an object-store PUT, for as long as the object store
/// took to answer (its timeout when it was down). The spill, holding none of the items removed, then commits its
/// own upload.
#[tokio::test]
async fn a_delete_or_an_expiry_does_not_hold_the_partition_for_a_spill_in_flight() {
    let Some(env) = env(BUCKET, "spill-held").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 13).await.unwrap();
    let fp = store.live_partition("q", 13).unwrap();
    store.hold_cold_spills(true);
    // Priority 0: 5 items resident, 40 paged, a segment's worth (20) beyond the depth (10): the spill takes
    // ids[15..35]. Then 5 paged priority-2 items due at T0 + 1 s.
    let ids = produce_prio(&p, 45, 0, FAR).await;
    let due = Ts(T0.0 + 1_000_000);
    let _ = produce_prio(&p, 5, 2, due).await;
    p.lifecycle(T0, POLICY, 100).await.unwrap();
    store.cold_spills_held(1).await;
    let tag = fp.segment_keys().await.unwrap().1.expect("a spill in flight");
    // A delete of an item after the spill's range, and a produce behind it.
    let del = tokio::spawn({
        let (p, last) = (p.clone(), ids[44]);
        async move { p.delete(vec![last]).await }
    });
    tokio::task::yield_now().await;
    let more = within(
        "the produce waited for the spill's upload (behind a delete)",
        produce_prio(&p, 1, 0, FAR),
    )
    .await;
    within("the delete waited for the spill's upload", del)
        .await
        .unwrap()
        .unwrap();
    // An expiry pass of priority 2, and a lease behind it.
    let pass = tokio::spawn({
        let p = p.clone();
        async move { p.lifecycle(Ts(due.0 + 1), POLICY, 100).await }
    });
    tokio::task::yield_now().await;
    let got = within(
        "the lease waited for the spill's upload (behind an expiry)",
        p.lease(1, LEASE),
    )
    .await
    .unwrap();
    assert_eq!(got.iter().map(|it| it.id).collect::<Vec<_>>(), [ids[0]]);
    let o = within("the expiry waited for the spill's upload", pass)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.dead, 5, "{o:?}");
    assert_eq!(store.segment_counters().0, 0, "the spill is still held");
    // Its upload ends: that spill commits (not one started again), and nothing is lost or doubled.
    store.hold_cold_spills(false);
    spill_committed(&env, &p, 1, || store.segment_counters().0).await;
    let segs = fp.segment_keys().await.unwrap().0;
    assert!(segs.len() == 1 && segs[0].ends_with(&tag), "{segs:?}, held {tag}");
    let mut want: Vec<ItemId> = ids[1..44].to_vec();
    want.extend(more);
    assert_eq!(lease_all(&p, 9).await, want);
}

/// A spill in flight holding an item that a delete removes meanwhile is abandoned when its upload ends, its object
/// deleted: the item does not come back from its segment, and the next spill takes the rest.
#[tokio::test]
async fn a_spill_in_flight_holding_a_deleted_item_is_abandoned() {
    check_spill_across_a_removal("spill-deleted", 14, false).await;
}

/// [`a_spill_in_flight_holding_a_deleted_item_is_abandoned`] for an item expired by a lifecycle pass.
#[tokio::test]
async fn a_spill_in_flight_holding_an_expired_item_is_abandoned() {
    check_spill_across_a_removal("spill-expired", 15, true).await;
}

/// 45 priority-0 items in partition `part`, ids[20] due at T0 + 1 s; the spill of ids[15..35] is held while
/// ids[20] expires (`expire`) or is deleted, then its upload ends.
async fn check_spill_across_a_removal(test: &str, part: u32, expire: bool) {
    let Some(env) = env(BUCKET, test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", part).await.unwrap();
    let fp = store.live_partition("q", part).unwrap();
    store.hold_cold_spills(true);
    let due = Ts(T0.0 + 1_000_000);
    let mut ids = produce_prio(&p, 20, 0, FAR).await;
    ids.extend(produce_prio(&p, 1, 0, due).await);
    ids.extend(produce_prio(&p, 24, 0, FAR).await);
    p.lifecycle(T0, POLICY, 100).await.unwrap();
    store.cold_spills_held(1).await;
    let tag = fp.segment_keys().await.unwrap().1.expect("a spill in flight");
    if expire {
        let o = within(
            "the expiry waited for the spill's upload",
            p.lifecycle(Ts(due.0 + 1), POLICY, 100),
        )
        .await
        .unwrap();
        assert_eq!(o.dead, 1, "{o:?}");
    } else {
        within(
            "the delete waited for the spill's upload",
            p.delete(vec![ids[20]]),
        )
        .await
        .unwrap();
    }
    store.hold_cold_spills(false);
    spill_committed(&env, &p, 1, || store.segment_counters().0).await;
    let segs = fp.segment_keys().await.unwrap().0;
    assert!(
        segs.len() == 1 && !segs[0].ends_with(&tag),
        "the spill holding the removed item was committed: {segs:?}"
    );
    let want: Vec<ItemId> = ids.iter().copied().filter(|&id| id != ids[20]).collect();
    let ready = p.counts().await.unwrap().ready;
    assert_eq!(lease_all(&p, 9).await, want, "the removed item came back");
    assert_eq!(ready, want.len() as u64);
    // The abandoned spill's object is deleted.
    let gone = lessor_testkit::eventually::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let left: Vec<String> = env
                .segments()
                .await
                .into_iter()
                .filter(|k| k.ends_with(&tag))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("left: {left:?}"))
            }
        },
    )
    .await;
    assert!(gone.is_ok(), "{gone:?}");
}

/// A delete naming an item of a committed segment and one of the spill in flight loads that segment without
/// waiting for the spill's upload (the load used to wait for any job in flight, a spill's PUT included, under the
/// partition's lock); neither deleted item comes back, and the spill is abandoned.
#[tokio::test]
async fn a_delete_reaching_a_segment_does_not_wait_for_the_spill_in_flight() {
    let Some(env) = env(BUCKET, "spill-load").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = env.open(dir.path());
    let p = store.open("q", 16).await.unwrap();
    let fp = store.live_partition("q", 16).unwrap();
    // A first segment (ids[15..35]), then 25 more items: the next spill takes ids[35..55].
    let mut ids = produce_prio(&p, 45, 0, FAR).await;
    spill_committed(&env, &p, 1, || store.segment_counters().0).await;
    store.hold_cold_spills(true);
    ids.extend(produce_prio(&p, 25, 0, FAR).await);
    p.lifecycle(T0, POLICY, 100).await.unwrap();
    store.cold_spills_held(1).await;
    let tag = fp
        .segment_keys()
        .await
        .unwrap()
        .1
        .expect("a second spill in flight");
    within(
        "the delete's segment load waited for the spill's upload",
        p.delete(vec![ids[25], ids[40]]),
    )
    .await
    .unwrap();
    assert_eq!(store.segment_counters().1, 1, "the segment was loaded");
    store.hold_cold_spills(false);
    spill_committed(&env, &p, 2, || store.segment_counters().0).await;
    let segs = fp.segment_keys().await.unwrap().0;
    assert!(
        segs.iter().all(|k| !k.ends_with(&tag)),
        "the spill holding a deleted item was committed: {segs:?}"
    );
    let want: Vec<ItemId> = ids
        .iter()
        .copied()
        .filter(|&id| id != ids[25] && id != ids[40])
        .collect();
    assert_eq!(lease_all(&p, 9).await, want, "a deleted item came back");
}
