//! Paging of the fjall backend (`memory-window-items`, see `lessor_storage::state::paging`): with a tiny window the
//! order of leases holds across page boundaries and priorities, a restart reads the window and not the backlog,
//! and the operations that reach items by id (delete, list, clear, expiry) find the paged ones too.
#![cfg(feature = "fjall")]

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::storage::{LifecyclePolicy, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, ClearRequest, ItemId, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};

const T0: Ts = Ts(1_800_000_000_000_000);
const LEASE: Ts = Ts(1_800_000_100_000_000);
const FAR: Ts = Ts(1_900_000_000_000_000);
const DLQ: LifecyclePolicy = LifecyclePolicy {
    max_attempts: 0,
    has_dead_queue: true,
    backoff: Backoff::OFF,
};

fn item(i: usize, prio: u8, expire: Ts) -> NewItem {
    NewItem {
        expire_deadline: expire,
        created_at: T0,
        payload: Bytes::from(format!("item-{i:06}")),
        priority: prio,
        ..Default::default()
    }
}

/// A small deterministic generator (the test must fail the same way twice).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Produce and lease interleaved, three priorities, a window of 10: every lease returns exactly what a model of
/// the ready queue (priority first, then id) says, counts and payload bytes stay exact, and memory holds a bounded
/// part of the backlog.
#[tokio::test]
async fn order_holds_across_page_boundaries_and_priorities() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    store.set_memory_window(10);
    let p = store.open("order", 0).await.expect("partition");
    let mut model: BTreeMap<(Reverse<u8>, ItemId), usize> = BTreeMap::new();
    let mut rng = Lcg(7);
    let mut produced = 0usize;
    let mut most_resident = 0;
    for round in 0..60 {
        let n = 1 + rng.next(60) as usize;
        let batch: Vec<NewItem> = (0..n)
            .map(|i| item(produced + i, [0, 0, 3, 7][rng.next(4) as usize], FAR))
            .collect();
        let prios: Vec<u8> = batch.iter().map(|b| b.priority).collect();
        let lens: Vec<usize> = batch.iter().map(|b| b.payload.len()).collect();
        let ids = p.produce(batch).await.expect("produce");
        for ((id, prio), len) in ids.into_iter().zip(prios).zip(lens) {
            model.insert((Reverse(prio), id), len);
        }
        produced += n;
        let want = rng.next(if round < 40 { 30 } else { 120 }) as usize;
        let got = p.lease(want, LEASE).await.expect("lease");
        let expect: Vec<ItemId> = model.keys().take(want).map(|k| k.1).collect();
        assert_eq!(
            got.iter().map(|it| it.id).collect::<Vec<_>>(),
            expect,
            "round {round}: lease of {want}"
        );
        for it in &got {
            model.remove(&(Reverse(it.priority), it.id));
        }
        let done: Vec<ItemId> = got.iter().map(|it| it.id).collect();
        assert!(p.complete(vec![done]).await.expect("complete")[0].is_ok());
        let stats = p.stats(T0).await.expect("stats");
        assert_eq!(stats.counts.ready, model.len() as u64, "round {round}");
        assert_eq!(
            stats.payload_bytes,
            model.values().sum::<usize>() as u64,
            "round {round}"
        );
        most_resident = most_resident.max(store.resident_ready("order", 0).await.expect("open"));
    }
    assert!(produced > 1000, "{produced}");
    assert!(store.items_paged_in() > 0, "paging happened");
    // At most a window plus a page-in per priority (and a lease's worth), far below the backlog.
    assert!(most_resident <= 10 + 4 * (5 + 120), "resident {most_resident}");
    let rest = p.lease(100_000, LEASE).await.expect("drain");
    assert_eq!(
        rest.iter().map(|it| it.id).collect::<Vec<_>>(),
        model.keys().map(|k| k.1).collect::<Vec<_>>()
    );
    assert_eq!(p.counts().await.expect("counts").ready, 0);
}

/// A restart with 20,000 ready items behind a window of 100 reads about the window (plus the leased items), not
/// the backlog, and the backlog comes back whole and in order.
#[tokio::test]
async fn restart_with_a_deep_backlog_reads_only_the_window() {
    let dir = tempfile::tempdir().expect("tmp");
    const N: usize = 20_000;
    let (expected, leased, bytes) = {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        store.set_memory_window(100);
        let p = store.open("deep", 0).await.expect("partition");
        let mut ids = Vec::new();
        for b in 0..N / 1000 {
            ids.extend(
                p.produce((0..1000).map(|i| item(b * 1000 + i, 0, FAR)).collect())
                    .await
                    .expect("produce"),
            );
        }
        let leased = p.lease(30, LEASE).await.expect("lease");
        assert_eq!(
            leased.iter().map(|i| i.id).collect::<Vec<_>>(),
            ids[..30].to_vec()
        );
        assert!(store.resident_ready("deep", 0).await.expect("open") <= 200);
        let bytes = p.stats(T0).await.expect("stats").payload_bytes;
        p.close().await;
        store.close().await;
        (ids[30..].to_vec(), leased.len() as u64, bytes)
    };
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window(100);
    let p = store.open("deep", 0).await.expect("partition");
    let loaded = store.items_loaded();
    assert!(loaded <= 100 + 50 + leased, "an open read {loaded} items");
    let stats = p.stats(T0).await.expect("stats");
    assert_eq!(stats.counts.ready, (N as u64) - leased);
    assert_eq!(stats.counts.leased, leased);
    assert_eq!(stats.payload_bytes, bytes);
    // Tiers: every item on disk, only the window (and the leased ones) in memory.
    assert_eq!(stats.tiers.disk.items, N as u64);
    assert_eq!(stats.tiers.disk.bytes, bytes);
    assert!(
        stats.tiers.memory.items <= 100 + 50 + leased && stats.tiers.memory.items >= leased,
        "{:?}",
        stats.tiers
    );
    let mut got = Vec::new();
    loop {
        let l = p.lease(777, LEASE).await.expect("lease");
        if l.is_empty() {
            break;
        }
        got.extend(l.iter().map(|i| i.id));
    }
    assert_eq!(got, expected);
}

/// Delete, list, expiry and clear reach items that are on disk only, and the counters follow them across a restart.
#[tokio::test]
async fn delete_list_expiry_and_clear_reach_paged_items() {
    let dir = tempfile::tempdir().expect("tmp");
    let soon = T0.add(Duration::from_secs(10));
    let ids = {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        store.set_memory_window(5);
        let p = store.open("ops", 0).await.expect("partition");
        let ids = p
            .produce(
                (0..50)
                    .map(|i| item(i, 0, if (30..40).contains(&i) { soon } else { FAR }))
                    .collect(),
            )
            .await
            .expect("produce");
        assert!(store.resident_ready("ops", 0).await.expect("open") <= 5);
        p.delete(vec![ids[3], ids[20], ids[45]]).await.expect("delete");
        let listed = p.list(None, 100, false).await.expect("list");
        assert_eq!(listed.len(), 47);
        assert!(listed.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(
            listed[19].payload,
            Bytes::from("item-000021"),
            "3 and 20 are gone"
        );
        let page = p.list(Some(ids[40]), 3, false).await.expect("list from a pivot");
        assert_eq!(
            page.iter().map(|i| i.id).collect::<Vec<_>>(),
            vec![ids[40], ids[41], ids[42]]
        );
        // The paged expiry deadline is due: lifecycle finds the ten items on disk.
        assert_eq!(p.next_deadline().await.expect("deadline"), Some(soon));
        let o = p
            .lifecycle(soon.add(Duration::from_secs(1)), DLQ, 100)
            .await
            .expect("lifecycle");
        assert_eq!(o.dead, 10);
        assert_eq!(p.dead_items(100).await.expect("dead").len(), 10);
        assert_eq!(p.counts().await.expect("counts").ready, 37);
        assert_eq!(
            p.next_deadline().await.expect("deadline"),
            Some(Ts::ZERO),
            "dead items wait"
        );
        p.remove_dead(ids[30..40].to_vec()).await.expect("remove dead");
        assert_eq!(p.next_deadline().await.expect("deadline"), Some(FAR));
        store.close().await;
        ids
    };
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window(5);
    let p = store.open("ops", 0).await.expect("partition");
    assert_eq!(p.counts().await.expect("counts").ready, 37);
    let first = p.lease(2, LEASE).await.expect("lease");
    assert_eq!(
        first.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![ids[0], ids[1]]
    );
    p.clear(ClearRequest {
        queue: true,
        destructive: false,
        ..Default::default()
    })
    .await
    .expect("clear");
    assert_eq!(p.counts().await.expect("counts").ready, 0);
    assert_eq!(
        p.list(None, 100, false).await.expect("list").len(),
        2,
        "the leased two stay"
    );
    store.close().await;
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    let p = store.open("ops", 0).await.expect("partition");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 2));
}

/// A steady pipeline over a deep backlog (many page-ins in the background): every lease of 100 gets 100 items, in
/// FIFO order, across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_pipeline_over_a_deep_backlog_never_starves() {
    let dir = tempfile::tempdir().expect("tmp");
    const DEPTH: usize = 60_000;
    let mut next_expected = 0usize;
    let mut produced = 0usize;
    for session in 0..2 {
        let store = FjallStore::open(dir.path(), Durability::None).expect("open");
        store.set_memory_window(4_000);
        let p = store.open("steady", 0).await.expect("partition");
        if session == 0 {
            for _ in 0..DEPTH / 1000 {
                p.produce((0..1000).map(|i| item(produced + i, 0, FAR)).collect())
                    .await
                    .expect("produce");
                produced += 1000;
            }
        }
        for round in 0..300 {
            p.produce((0..100).map(|i| item(produced + i, 0, FAR)).collect())
                .await
                .expect("produce");
            produced += 100;
            let got = p.lease(100, LEASE).await.expect("lease");
            assert_eq!(got.len(), 100, "session {session} round {round}");
            for it in &got {
                assert_eq!(
                    it.payload,
                    Bytes::from(format!("item-{next_expected:06}")),
                    "round {round}"
                );
                next_expected += 1;
            }
            let ids = got.iter().map(|i| i.id).collect();
            assert!(p.complete(vec![ids]).await.expect("complete")[0].is_ok());
        }
        assert!(store.items_paged_in() > 0);
        store.close().await;
    }
}

/// Backlogs produced across restarts (each restart starts ids at a new floor, leaving a gap), with expired leases
/// requeued at the tail in between, drain whole and in order in leases of 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlogs_across_restarts_with_id_gaps_drain_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let policy = LifecyclePolicy {
        max_attempts: 0,
        has_dead_queue: false,
        backoff: Backoff::OFF,
    };
    let mut produced = 0usize;
    let mut stage_ids: Vec<ItemId> = Vec::new();
    for stage in 0..3 {
        let store = FjallStore::open(dir.path(), Durability::None).expect("open");
        store.set_memory_window(1_000);
        let p = store.open("gaps", 0).await.expect("partition");
        for _ in 0..5 {
            stage_ids.extend(
                p.produce((0..1000).map(|i| item(produced + i, 0, FAR)).collect())
                    .await
                    .expect("produce"),
            );
            produced += 1000;
        }
        // One lease that expires: its item goes back at the tail under a new id.
        let l = p.lease(1, Ts(T0.0 + stage)).await.expect("lease");
        assert_eq!(l[0].id, stage_ids[0]);
        stage_ids.remove(0);
        let o = p.lifecycle(Ts(T0.0 + 10), policy, 100).await.expect("lifecycle");
        assert_eq!(o.lease_expired, 1);
        let listed = p
            .list(Some(stage_ids[stage_ids.len() - 1]), 10, false)
            .await
            .expect("list");
        stage_ids.push(listed.last().expect("the requeued item").id);
        store.close().await;
    }
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    store.set_memory_window(1_000);
    let p = store.open("gaps", 0).await.expect("partition");
    assert_eq!(p.counts().await.expect("counts").ready, produced as u64);
    let mut got = Vec::new();
    loop {
        let l = p.lease(400, LEASE).await.expect("lease");
        if l.is_empty() {
            break;
        }
        assert!(
            l.len() == 400 || got.len() + l.len() == produced,
            "a short lease at {}",
            got.len()
        );
        got.extend(l.iter().map(|i| i.id));
        let ids = l.iter().map(|i| i.id).collect();
        assert!(p.complete(vec![ids]).await.expect("complete")[0].is_ok());
    }
    assert_eq!(got, stage_ids);
}

/// A partition that never fills its window writes exactly the keys it wrote before paging existed: its items
/// (metadata and payload), its id high-water mark and its catalog entry, and nothing under its paged prefix, after
/// produce, lease, complete, retry, expiry and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_under_its_window_writes_no_paging_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let policy = LifecyclePolicy {
        max_attempts: 0,
        has_dead_queue: false,
        backoff: Backoff::OFF,
    };
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    store.set_memory_window(1_000);
    let p = store.open("shallow", 0).await.expect("partition");
    for b in 0..5 {
        p.produce((0..100).map(|i| item(b * 100 + i, (i % 3) as u8, FAR)).collect())
            .await
            .expect("produce");
    }
    let l = p.lease(200, LEASE).await.expect("lease");
    let done: Vec<ItemId> = l[..100].iter().map(|i| i.id).collect();
    assert!(p.complete(vec![done]).await.expect("complete")[0].is_ok());
    // The other 100 leases expire and go back at the tail under new ids.
    let o = p
        .lifecycle(Ts(LEASE.0 + 1), policy, 1_000)
        .await
        .expect("lifecycle");
    assert_eq!(o.lease_expired, 100);
    assert_eq!(store.paged_keys("shallow", 0).await.expect("scan"), Some(0));
    let counts = store.paging_counts("shallow", 0).await.expect("open");
    assert_eq!((counts.resident_ready, counts.paged_ready), (400, 0));
    // 400 items of one key each (small payloads are inline), the high-water mark, the catalog entry.
    assert_eq!(store.stored_keys().expect("keys"), 400 + 2);
    p.close().await;
    store.close().await;
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window(1_000);
    let p = store.open("shallow", 0).await.expect("partition");
    assert_eq!(p.counts().await.expect("counts").ready, 400);
    assert_eq!(store.paged_keys("shallow", 0).await.expect("scan"), Some(0));
    assert_eq!(store.stored_keys().expect("keys"), 400 + 2);
}

/// A deep backlog drained through a small window leaves nothing under the paged prefix (every record moved back
/// and the counters deleted with the last one), and the next open reads only the items left: what was consumed
/// before costs an open nothing but the engine's deleted entries, as before paging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backlog_leaves_no_paging_keys_and_opens_with_what_is_left() {
    let dir = tempfile::tempdir().expect("tmp");
    const N: usize = 20_000;
    {
        let store = FjallStore::open(dir.path(), Durability::None).expect("open");
        store.set_memory_window(100);
        let p = store.open("drained", 0).await.expect("partition");
        for b in 0..N / 1000 {
            p.produce((0..1000).map(|i| item(b * 1000 + i, 0, FAR)).collect())
                .await
                .expect("produce");
        }
        let c = store.paging_counts("drained", 0).await.expect("open");
        assert!(c.resident_ready <= 100, "{c:?}");
        assert_eq!(c.resident_ready + c.paged_ready, N as u64);
        assert_eq!(c.paged_bytes, (N as u64 - c.resident_ready) * 11);
        // Paged records plus their counters.
        assert_eq!(
            store.paged_keys("drained", 0).await.expect("scan"),
            Some(c.paged_ready as usize + 1)
        );
        let mut got = 0;
        loop {
            let l = p.lease(250, LEASE).await.expect("lease");
            if l.is_empty() {
                break;
            }
            got += l.len();
            let ids = l.iter().map(|i| i.id).collect();
            assert!(p.complete(vec![ids]).await.expect("complete")[0].is_ok());
        }
        assert_eq!(got, N);
        assert_eq!(store.paged_keys("drained", 0).await.expect("scan"), Some(0));
        p.produce((0..50).map(|i| item(i, 0, FAR)).collect())
            .await
            .expect("produce");
        p.close().await;
        store.close().await;
    }
    let store = FjallStore::open(dir.path(), Durability::None).expect("reopen");
    store.set_memory_window(100);
    let p = store.open("drained", 0).await.expect("partition");
    assert_eq!(store.items_loaded(), 50);
    assert_eq!(p.counts().await.expect("counts").ready, 50);
    assert_eq!(store.paged_keys("drained", 0).await.expect("scan"), Some(0));
}

/// A snapshot reads paged items too, in id order with the resident ones (the offload sweeper finds the objects
/// they reference through it, and a backup must hold them); a destroyed partition's paged records go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_read_paged_items_and_destroy_removes_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    store.set_memory_window(10);
    let p = store.open("snap", 0).await.expect("partition");
    let mut ids = Vec::new();
    for b in 0..10 {
        ids.extend(
            p.produce((0..100).map(|i| item(b * 100 + i, (i % 4) as u8, FAR)).collect())
                .await
                .expect("produce"),
        );
    }
    // Some paged in, some leased.
    let leased = p.lease(25, LEASE).await.expect("lease");
    assert_eq!(leased.len(), 25);
    let mut snap = p.snapshot().await.expect("snapshot");
    // Changes after the snapshot do not show.
    p.produce(vec![item(9_999, 0, FAR)]).await.expect("produce");
    let mut got = Vec::new();
    loop {
        let page = snap.next(64).await.expect("page");
        if page.is_empty() {
            break;
        }
        got.extend(page);
    }
    // A snapshot is in id order; with priorities mixed, ids are in production order within each priority only
    // (each priority takes ids from blocks of its own).
    let mut in_id_order = ids.clone();
    in_id_order.sort_unstable();
    assert_eq!(got.iter().map(|i| i.id).collect::<Vec<_>>(), in_id_order);
    for it in &got {
        let i = ids.iter().position(|x| *x == it.id).expect("known");
        assert_eq!(it.payload, Bytes::from(format!("item-{i:06}")));
    }
    assert_eq!(got.iter().filter(|i| i.is_leased).count(), 25);
    drop(snap);
    p.close().await;
    store.destroy("snap", 0).await.expect("destroy");
    lessor_testkit::eventually("background deletions done", Duration::from_secs(20), || async {
        match store.pending_deletions() {
            0 => Ok(()),
            n => Err(format!("{n} deletions pending")),
        }
    })
    .await;
    assert_eq!(store.stored_keys().expect("keys"), 0);
}

/// A scheduled item that comes due behind a full window is requeued as a paged record; when its expiry deadline
/// passed too, the same lifecycle pass must expire it (as the memory backend and a resident item do), not leave
/// it ready to be leased after its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_scheduled_item_requeued_into_the_paged_records_expires_in_the_same_pass() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    store.set_memory_window(1);
    let p = store.open("due", 0).await.expect("partition");
    let mut sched = item(0, 0, Ts(T0.0 + 5));
    sched.enqueue_at = Ts(T0.0 + 1);
    p.produce(vec![item(1, 0, FAR), sched]).await.expect("produce");
    let o = p.lifecycle(Ts(T0.0 + 8), DLQ, 100_000).await.expect("lifecycle");
    assert_eq!((o.enqueued, o.dead), (1, 1), "{o:?}");
    let leased: Vec<Bytes> = p
        .lease(10, LEASE)
        .await
        .expect("lease")
        .into_iter()
        .map(|it| it.payload)
        .collect();
    assert_eq!(
        leased,
        vec![Bytes::from("item-000001")],
        "an expired item was leased"
    );
    assert_eq!(p.dead_items(10).await.expect("dead").len(), 1);
    store.close().await;
}

/// Payload bytes a partition holds in memory: its payload total less what is paged and what leased, scheduled
/// and dead items keep on disk only.
async fn resident_bytes(store: &FjallStore, p: &dyn lessor_core::storage::Partition, name: &str) -> u64 {
    let total = p.stats(T0).await.expect("stats").payload_bytes;
    let counts = store.paging_counts(name, 0).await.expect("open");
    total - counts.paged_bytes - counts.on_disk_bytes
}

/// A byte window (`memory-window-bytes`) bounds the payloads a partition keeps in memory when its items are
/// large, before the item window is anywhere near full: 200 items of 1,000 bytes under a byte window of 10,000
/// keep at most the window and one item resident, while producing, after a restart and while draining; the drain
/// (bounded leases asked again while they stop short, as the engine does) returns every item once, in order.
/// Without it, all 200,000 bytes stayed resident, and a restart read them all back.
#[tokio::test]
async fn a_byte_window_bounds_the_payloads_in_memory() {
    const N: usize = 200;
    const WINDOW: u64 = 10_000;
    let big = |i: usize| NewItem {
        payload: Bytes::from(format!("{i:06}{}", "x".repeat(994))),
        ..item(i, 0, FAR)
    };
    let dir = tempfile::tempdir().expect("tmp");
    let ids = {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        store.set_memory_window_bytes(WINDOW);
        let p = store.open("bytes", 0).await.expect("partition");
        let mut ids = Vec::new();
        for b in 0..N / 20 {
            ids.extend(
                p.produce((0..20).map(|i| big(b * 20 + i)).collect())
                    .await
                    .expect("produce"),
            );
            let r = resident_bytes(&store, &*p, "bytes").await;
            assert!(r <= WINDOW + 1000, "batch {b}: {r} bytes resident");
        }
        p.close().await;
        store.close().await;
        ids
    };
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window_bytes(WINDOW);
    let p = store.open("bytes", 0).await.expect("partition");
    assert_eq!(p.counts().await.expect("counts").ready, N as u64);
    let r = resident_bytes(&store, &*p, "bytes").await;
    assert!(r <= WINDOW + 1000, "after the restart: {r} bytes resident");
    let mut drained = Vec::new();
    let mut payloads = Vec::new();
    loop {
        let (got, stopped) = p.lease_within(50, LEASE, 16 << 20).await.expect("lease");
        if got.is_empty() {
            assert!(!stopped);
            break;
        }
        drained.extend(got.iter().map(|it| it.id));
        payloads.extend(got.iter().map(|it| it.payload[..6].to_vec()));
        assert!(p
            .complete(vec![got.iter().map(|it| it.id).collect()])
            .await
            .expect("complete")[0]
            .is_ok());
        let r = resident_bytes(&store, &*p, "bytes").await;
        assert!(r <= WINDOW + 1000, "draining: {r} bytes resident");
    }
    assert_eq!(drained, ids, "every item once, in order");
    let expected: Vec<Vec<u8>> = (0..N).map(|i| format!("{i:06}").into_bytes()).collect();
    assert_eq!(payloads, expected, "payloads intact");
    assert_eq!(p.counts().await.expect("counts").ready, 0);
}

/// A payload of `BIG` bytes that starts with the item's number.
fn big_payload(i: usize) -> Bytes {
    Bytes::from(format!("{i:06}{}", "x".repeat(BIG - 6)))
}

const BIG: usize = 20_000;

/// Scheduled items keep no payload in memory: 100 items of 20,000 bytes due in an hour, under a byte window of
/// 50,000, keep at most the window (and an item) resident while they are produced and after a restart; when they
/// come due (in their due order, not their production order) the lifecycle passes requeue them and the leases
/// return every one in due order with its payload. Without it the whole schedule (2 MB) stayed resident and a
/// restart read it all back.
#[tokio::test]
async fn scheduled_items_keep_their_payloads_on_disk() {
    const N: usize = 100;
    const WINDOW: u64 = 50_000;
    const BOUND: u64 = WINDOW + 2 * BIG as u64;
    let due = |i: usize| Ts(T0.0 + 3_600_000_000 + (i % 10) as i64 * 1_000);
    let dir = tempfile::tempdir().expect("tmp");
    {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        store.set_memory_window_bytes(WINDOW);
        let p = store.open("sched", 0).await.expect("partition");
        for b in 0..N / 10 {
            let batch = (b * 10..b * 10 + 10)
                .map(|i| NewItem {
                    payload: big_payload(i),
                    enqueue_at: due(i),
                    ..item(i, 0, FAR)
                })
                .collect();
            p.produce(batch).await.expect("produce");
            let r = resident_bytes(&store, &*p, "sched").await;
            assert!(r <= BOUND, "batch {b}: {r} bytes resident");
        }
        assert_eq!(p.counts().await.expect("counts").scheduled, N as u64);
        p.close().await;
        store.close().await;
    }
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window_bytes(WINDOW);
    let p = store.open("sched", 0).await.expect("partition");
    assert_eq!(p.counts().await.expect("counts").scheduled, N as u64);
    assert_eq!(
        p.stats(T0).await.expect("stats").payload_bytes,
        (N * BIG) as u64,
        "the payload bytes count the ones on disk"
    );
    let r = resident_bytes(&store, &*p, "sched").await;
    assert!(r <= BOUND, "after the restart: {r} bytes resident");
    let tiers = p.stats(T0).await.expect("stats").tiers;
    assert!(tiers.memory.bytes <= BOUND, "{tiers:?}");
    assert_eq!(tiers.disk.bytes, (N * BIG) as u64, "{tiers:?}");
    let listed = p.list(None, N, true).await.expect("list");
    assert_eq!(listed.len(), N);
    assert!(
        listed
            .iter()
            .enumerate()
            .all(|(i, it)| it.payload == big_payload(i)),
        "a list reads the payloads back"
    );
    let now = due(9);
    let policy = LifecyclePolicy::default();
    let mut enqueued = 0;
    loop {
        let o = p.lifecycle(now, policy, 1_000).await.expect("lifecycle");
        enqueued += o.enqueued;
        let r = resident_bytes(&store, &*p, "sched").await;
        assert!(r <= BOUND, "coming due: {r} bytes resident");
        if !o.more {
            break;
        }
    }
    assert_eq!(enqueued, N as u64);
    let mut order: Vec<usize> = (0..N).collect();
    order.sort_by_key(|&i| (due(i), i));
    let mut got = Vec::new();
    loop {
        let (leased, _) = p.lease_within(7, LEASE, 16 << 20).await.expect("lease");
        if leased.is_empty() {
            break;
        }
        for it in &leased {
            let i: usize = std::str::from_utf8(&it.payload[..6])
                .expect("utf8")
                .parse()
                .expect("number");
            assert_eq!(it.payload, big_payload(i), "payload of item {i} intact");
            got.push(i);
        }
        let r = resident_bytes(&store, &*p, "sched").await;
        assert!(r <= BOUND, "leasing: {r} bytes resident");
        let ids = leased.iter().map(|it| it.id).collect();
        assert!(p.complete(vec![ids]).await.expect("complete")[0].is_ok());
    }
    assert_eq!(got, order, "every item once, in due order");
    assert_eq!(p.stats(T0).await.expect("stats").payload_bytes, 0);
    store.close().await;
}

/// Leased items keep no payload in memory: 100 items of 20,000 bytes leased in leases of 3 without completing keep
/// at most the byte window of ready items (and an item) resident, also after a restart; once the leases expired
/// (the lifecycle's clock, no sleep) the items are requeued, read back from disk under their new ids, and leased
/// again in order with their payloads and a second attempt counted. Without it every leased payload stayed
/// resident (2 MB), whatever the window.
#[tokio::test]
async fn leased_items_keep_their_payloads_on_disk() {
    const N: usize = 100;
    const WINDOW: u64 = 50_000;
    const BOUND: u64 = WINDOW + 2 * BIG as u64;
    let dir = tempfile::tempdir().expect("tmp");
    {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        store.set_memory_window_bytes(WINDOW);
        let p = store.open("leased", 0).await.expect("partition");
        for b in 0..N / 10 {
            let batch = (b * 10..b * 10 + 10)
                .map(|i| NewItem {
                    payload: big_payload(i),
                    ..item(i, 0, FAR)
                })
                .collect();
            p.produce(batch).await.expect("produce");
        }
        let mut leased = 0;
        loop {
            let (got, _) = p.lease_within(3, LEASE, 16 << 20).await.expect("lease");
            if got.is_empty() {
                break;
            }
            for it in &got {
                assert_eq!(it.payload, big_payload(leased), "first lease of item {leased}");
                assert_eq!(it.attempts, 1);
                leased += 1;
            }
            let r = resident_bytes(&store, &*p, "leased").await;
            assert!(r <= BOUND, "{leased} leased: {r} bytes resident");
        }
        assert_eq!(leased, N);
        assert_eq!(p.counts().await.expect("counts").leased, N as u64);
        p.close().await;
        store.close().await;
    }
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window_bytes(WINDOW);
    let p = store.open("leased", 0).await.expect("partition");
    assert_eq!(p.counts().await.expect("counts").leased, N as u64);
    let r = resident_bytes(&store, &*p, "leased").await;
    assert!(r <= BOUND, "after the restart: {r} bytes resident");
    let policy = LifecyclePolicy::default();
    let mut expired = 0;
    loop {
        let o = p
            .lifecycle(Ts(LEASE.0 + 1), policy, 1_000)
            .await
            .expect("lifecycle");
        expired += o.lease_expired;
        let r = resident_bytes(&store, &*p, "leased").await;
        assert!(r <= BOUND, "expiring: {r} bytes resident");
        if !o.more {
            break;
        }
    }
    assert_eq!(expired, N as u64);
    assert_eq!(p.counts().await.expect("counts").ready, N as u64);
    let mut got = Vec::new();
    loop {
        let (leased, _) = p.lease_within(3, FAR, 16 << 20).await.expect("lease");
        if leased.is_empty() {
            break;
        }
        for it in &leased {
            assert_eq!(
                it.payload,
                big_payload(got.len()),
                "second lease of item {}",
                got.len()
            );
            assert_eq!(it.attempts, 2, "attempts counted");
            got.push(it.id);
        }
        let r = resident_bytes(&store, &*p, "leased").await;
        assert!(r <= BOUND, "leasing again: {r} bytes resident");
    }
    assert_eq!(got.len(), N);
    assert!(p.complete(vec![got]).await.expect("complete")[0].is_ok());
    assert_eq!(p.stats(T0).await.expect("stats").payload_bytes, 0);
    store.close().await;
}

/// The schedule is paged like the ready backlog: 10,000 items scheduled far ahead behind a window of 40 keep at
/// most a bounded part resident (a quarter of the window, plus what one pass reads back), while producing, after a
/// restart (which must not read the paged schedule) and while they come due; they come due in due order, FIFO
/// among equal times, and counts, bytes, list, delete by id and snapshots see every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_schedule_stays_on_disk_and_comes_due_in_order() {
    const N: usize = 10_000;
    const WINDOW: usize = 40;
    let dir = tempfile::tempdir().expect("tmp");
    // Due times: 100 distinct times, 100 items each, produced in a shuffled order of times.
    let at = |i: usize| Ts(T0.0 + 1_000 + ((i * 37) % 100) as i64 * 10);
    let (mut order, deleted, payloads) = {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        store.set_memory_window(WINDOW);
        let p = store.open("sched", 0).await.expect("partition");
        let mut order: Vec<(Ts, ItemId, u8)> = Vec::new();
        let mut payloads: BTreeMap<ItemId, Bytes> = BTreeMap::new();
        for b in 0..N / 500 {
            let batch: Vec<NewItem> = (b * 500..(b + 1) * 500)
                .map(|i| NewItem {
                    enqueue_at: at(i),
                    ..item(i, (i % 3) as u8, FAR)
                })
                .collect();
            let meta: Vec<(Ts, u8, Bytes)> = batch
                .iter()
                .map(|n| (n.enqueue_at, n.priority, n.payload.clone()))
                .collect();
            let ids = p.produce(batch).await.expect("produce");
            for ((t, prio, payload), id) in meta.into_iter().zip(ids) {
                order.push((t, id, prio));
                payloads.insert(id, payload);
            }
            let resident = store.resident_scheduled("sched", 0).await.expect("open");
            assert!(
                resident <= WINDOW as u64,
                "{resident} scheduled items resident after batch {b}"
            );
        }
        let counts = p.counts().await.expect("counts");
        assert_eq!(counts.scheduled, N as u64);
        assert_eq!(p.stats(T0).await.expect("stats").payload_bytes, N as u64 * 11);
        // Delete by id reaches items on disk only; a list in id order sees the rest.
        let deleted: Vec<ItemId> = order.iter().step_by(97).map(|x| x.1).collect();
        p.delete(deleted.clone()).await.expect("delete");
        assert_eq!(
            p.counts().await.expect("counts").scheduled,
            (N - deleted.len()) as u64
        );
        let mut listed = 0;
        let mut pivot = None;
        loop {
            let page = p.list(pivot, 333, true).await.expect("list");
            let Some(last) = page.last() else { break };
            assert!(page.windows(2).all(|w| w[0].id < w[1].id));
            assert!(page
                .iter()
                .all(|it| it.enqueue_at.0 > 0 && it.payload.len() == 11));
            pivot = Some(ItemId(last.id.0 + 1));
            listed += page.len();
        }
        assert_eq!(listed, N - deleted.len());
        let mut snap = p.snapshot().await.expect("snapshot");
        let mut seen = 0;
        loop {
            let page = snap.next(1000).await.expect("page");
            if page.is_empty() {
                break;
            }
            seen += page.len();
        }
        assert_eq!(seen, N - deleted.len(), "a snapshot reads every item once");
        p.close().await;
        store.close().await;
        (order, deleted, payloads)
    };
    order.retain(|x| !deleted.contains(&x.1));
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window(WINDOW);
    let p = store.open("sched", 0).await.expect("partition");
    let loaded = store.items_loaded();
    assert!(loaded <= WINDOW as u64, "an open read {loaded} items");
    assert_eq!(p.counts().await.expect("counts").scheduled, order.len() as u64);
    // Expected per due time: its items as leases serve them, priority first, then FIFO (the original ids: the
    // pass requeues equal times in id order).
    let mut want: BTreeMap<Ts, Vec<(Reverse<u8>, ItemId)>> = BTreeMap::new();
    for &(t, id, prio) in &order {
        want.entry(t).or_default().push((Reverse(prio), id));
    }
    let mut leased = 0;
    let mut now = T0.0 + 1_000;
    while now <= T0.0 + 2_000 {
        let o = p.lifecycle(Ts(now), DLQ, 1_000).await.expect("lifecycle");
        let resident = store.resident_scheduled("sched", 0).await.expect("open");
        assert!(
            resident <= WINDOW as u64 + 1_000,
            "{resident} scheduled items resident"
        );
        if o.more {
            continue;
        }
        let mut got = Vec::new();
        loop {
            let l = p.lease(1_000, LEASE).await.expect("lease");
            if l.is_empty() {
                break;
            }
            got.extend(l.into_iter().map(|it| it.payload));
        }
        let mut expect = want.remove(&Ts(now)).unwrap_or_default();
        expect.sort();
        let expect: Vec<Bytes> = expect.iter().map(|&(_, id)| payloads[&id].clone()).collect();
        assert_eq!(got, expect, "the items due at +{}", now - T0.0);
        leased += got.len();
        now += 10;
    }
    assert_eq!(leased, order.len(), "every scheduled item came due once");
    assert_eq!(p.counts().await.expect("counts").scheduled, 0);
    store.close().await;
}

/// A schedule within its bound (a quarter of the window) writes nothing under the paged prefix, before and after a
/// restart and while it comes due; one past it pages, and once every paged scheduled item came due the paged prefix
/// is empty again (records and counters deleted with the last one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_within_its_bound_writes_no_paging_keys_and_a_drained_one_leaves_none() {
    let dir = tempfile::tempdir().expect("tmp");
    let sched = |i: usize, at: i64| NewItem {
        enqueue_at: Ts(T0.0 + at),
        ..item(i, 0, FAR)
    };
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    store.set_memory_window(1_000);
    let p = store.open("s", 0).await.expect("partition");
    p.produce((0..250).map(|i| sched(i, 10 + (i % 5) as i64)).collect())
        .await
        .expect("produce");
    assert_eq!(store.paged_keys("s", 0).await.expect("scan"), Some(0));
    assert_eq!(store.resident_scheduled("s", 0).await, Some(250));
    p.close().await;
    store.close().await;
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window(1_000);
    let p = store.open("s", 0).await.expect("partition");
    assert_eq!(p.counts().await.expect("counts").scheduled, 250);
    assert_eq!(store.paged_keys("s", 0).await.expect("scan"), Some(0));
    // 250 more: past the bound, paged (a record and a due-order key each, and the counters).
    p.produce((250..500).map(|i| sched(i, 20 + (i % 5) as i64)).collect())
        .await
        .expect("produce");
    assert_eq!(store.resident_scheduled("s", 0).await, Some(250));
    assert_eq!(store.paged_keys("s", 0).await.expect("scan"), Some(2 * 250 + 1));
    let c = store.paging_counts("s", 0).await.expect("open");
    assert_eq!((c.paged_scheduled, c.paged_scheduled_bytes), (250, 250 * 11));
    let o = p.lifecycle(Ts(T0.0 + 30), DLQ, 10_000).await.expect("lifecycle");
    assert_eq!((o.enqueued, o.more), (500, false), "{o:?}");
    assert_eq!(store.paged_keys("s", 0).await.expect("scan"), Some(0));
    let got = p.lease(1_000, LEASE).await.expect("lease");
    let want: Vec<Bytes> = (0..500)
        .map(|i| {
            let at = if i < 250 { 10 + i % 5 } else { 20 + i % 5 };
            (at, i)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|(_, i)| Bytes::from(format!("item-{i:06}")))
        .collect();
    assert_eq!(
        got.into_iter().map(|it| it.payload).collect::<Vec<_>>(),
        want,
        "due order, FIFO among equal times"
    );
    store.close().await;
}

/// The paged schedule's boundary is a lower bound (a delete by id does not read what follows), but a pass that
/// reaches it makes it exact: the next deadline is then the next paged item's due time, not the time of the pass
/// (a queue task woken at a stale bound would read nothing, again and again, until the item came due).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_deadline_of_a_paged_schedule_becomes_exact_after_a_pass() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    // A schedule bound of 1.
    store.set_memory_window(4);
    let p = store.open("d", 0).await.expect("partition");
    let at = |s: i64| Ts(T0.0 + s);
    let ids = p
        .produce(
            [10, 20, 30]
                .iter()
                .enumerate()
                .map(|(i, &s)| NewItem {
                    enqueue_at: at(s),
                    ..item(i, 0, FAR)
                })
                .collect(),
        )
        .await
        .expect("produce");
    assert_eq!(store.resident_scheduled("d", 0).await, Some(1));
    p.delete(vec![ids[1]]).await.expect("delete");
    assert_eq!(p.counts().await.expect("counts").scheduled, 2);
    let o = p.lifecycle(at(25), DLQ, 100).await.expect("lifecycle");
    assert_eq!((o.enqueued, o.more), (1, false), "{o:?}");
    assert_eq!(p.next_deadline().await.expect("deadline"), Some(at(30)));
    let o = p.lifecycle(at(30), DLQ, 100).await.expect("lifecycle");
    assert_eq!(o.enqueued, 1);
    let got: Vec<Bytes> = p
        .lease(10, LEASE)
        .await
        .expect("lease")
        .into_iter()
        .map(|it| it.payload)
        .collect();
    assert_eq!(got, [Bytes::from("item-000000"), Bytes::from("item-000002")]);
    assert_eq!(store.paged_keys("d", 0).await.expect("scan"), Some(0));
    store.close().await;
}

/// Paged scheduled items that carry a source id (dead-letter moves, redrives) keep it in the resident index, across
/// a restart (which then reads the paged schedule once): producing the same source again returns the item's id,
/// until the item is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_scheduled_items_keep_their_source_ids_across_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let sourced = |i: usize| NewItem {
        enqueue_at: Ts(T0.0 + 100 + i as i64),
        source_id: format!("src-{i}"),
        ..item(i, 0, FAR)
    };
    let ids = {
        let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
        store.set_memory_window(4);
        let p = store.open("src", 0).await.expect("partition");
        let ids = p.produce((0..20).map(sourced).collect()).await.expect("produce");
        assert_eq!(store.resident_scheduled("src", 0).await, Some(1));
        store.close().await;
        ids
    };
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("reopen");
    store.set_memory_window(4);
    let p = store.open("src", 0).await.expect("partition");
    let again = p.produce((0..20).map(sourced).collect()).await.expect("produce");
    assert_eq!(again, ids, "the same sources: the same items");
    assert_eq!(p.counts().await.expect("counts").scheduled, 20);
    p.delete(vec![ids[7]]).await.expect("delete");
    let fresh = p.produce(vec![sourced(7)]).await.expect("produce");
    assert_ne!(fresh[0], ids[7], "a deleted item's source id is free again");
    assert_eq!(p.counts().await.expect("counts").scheduled, 20);
    let o = p.lifecycle(Ts(T0.0 + 200), DLQ, 1_000).await.expect("lifecycle");
    assert_eq!(o.enqueued, 20);
    store.close().await;
}

/// A write of the paged schedule that fails (disk full) leaves memory ahead of the disk; the partition re-reads its
/// state from the disk at its next call, so a failed produce past the bound is not counted, and a failed pass (its
/// page-in and requeues) is done again, whole: every acknowledged item comes due once, in due order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_writes_of_the_paged_schedule_are_redone_from_the_disk() {
    use lessor_storage::fjall::Fault;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::Sync).expect("open");
    store.set_memory_window(8);
    let p = store.open("f", 0).await.expect("partition");
    let sched = |i: usize| NewItem {
        enqueue_at: Ts(T0.0 + 10 + (i % 4) as i64),
        ..item(i, 0, FAR)
    };
    p.produce((0..30).map(sched).collect()).await.expect("produce");
    store.inject_fault(Some(Fault::NoSpace));
    p.produce((30..40).map(sched).collect())
        .await
        .expect_err("disk full");
    p.lifecycle(Ts(T0.0 + 20), DLQ, 1_000)
        .await
        .expect_err("disk full");
    store.inject_fault(None);
    // Writes resume after the engine's back-off.
    let started = std::time::Instant::now();
    let o = loop {
        match p.lifecycle(Ts(T0.0 + 20), DLQ, 1_000).await {
            Ok(o) => break o,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                assert!(e.is_transient(), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("writes did not resume: {e}"),
        }
    };
    assert_eq!((o.enqueued, o.more), (30, false), "{o:?}");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.scheduled), (30, 0));
    let got: Vec<Bytes> = p
        .lease(100, LEASE)
        .await
        .expect("lease")
        .into_iter()
        .map(|it| it.payload)
        .collect();
    let mut want: Vec<(usize, usize)> = (0..30).map(|i| (i % 4, i)).collect();
    want.sort();
    let want: Vec<Bytes> = want
        .into_iter()
        .map(|(_, i)| Bytes::from(format!("item-{i:06}")))
        .collect();
    assert_eq!(got, want);
    assert_eq!(store.paged_keys("f", 0).await.expect("scan"), Some(0));
    store.close().await;
}

/// A backlog of expired leases takes every pass's whole limit (a server back after an outage): the passes page in
/// due scheduled items that none of them gets to requeue. The resident schedule must stay within its bound plus
/// one pass's page, not grow by a page per pass until the whole due schedule is in memory; once the leases are
/// handled every scheduled item comes due, in due order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_filling_the_passes_do_not_page_the_whole_schedule_in() {
    const WINDOW: usize = 40;
    const LIMIT: usize = 50;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    store.set_memory_window(WINDOW);
    let p = store.open("backlog", 0).await.expect("partition");
    // 1,000 scheduled items, due at ten times: all but a quarter of the window are paged.
    let due = |i: usize| Ts(T0.0 + 100 + (i % 10) as i64);
    p.produce(
        (0..1_000)
            .map(|i| NewItem {
                enqueue_at: due(i),
                ..item(i, 0, FAR)
            })
            .collect(),
    )
    .await
    .expect("produce");
    // 600 leased items whose leases expire before the schedule comes due.
    p.produce((1_000..1_600).map(|i| item(i, 0, FAR)).collect())
        .await
        .expect("produce");
    let mut leased = 0;
    while leased < 600 {
        let got = p.lease(600 - leased, Ts(T0.0 + 50)).await.expect("lease");
        assert!(!got.is_empty(), "nothing left to lease after {leased}");
        leased += got.len();
    }
    let now = Ts(T0.0 + 1_000);
    let mut most = 0;
    let mut enqueued = 0;
    for pass in 0..100 {
        let o = p.lifecycle(now, DLQ, LIMIT).await.expect("lifecycle");
        enqueued += o.enqueued;
        let resident = store.resident_scheduled("backlog", 0).await.expect("open");
        most = most.max(resident);
        assert!(
            resident <= (WINDOW / 4 + LIMIT) as u64,
            "pass {pass}: {resident} scheduled items resident ({o:?})"
        );
        if !o.more {
            break;
        }
    }
    assert_eq!(
        enqueued, 1_000,
        "every scheduled item came due (most resident: {most})"
    );
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (1_600, 0, 0));
    // The requeued leases first (they came back first), then the schedule in due order, FIFO among equal times.
    let mut got = Vec::new();
    loop {
        let page = p.lease(1_600, LEASE).await.expect("lease");
        if page.is_empty() {
            break;
        }
        got.extend(page.into_iter().map(|it| it.payload));
    }
    let mut sched: Vec<(Ts, usize)> = (0..1_000).map(|i| (due(i), i)).collect();
    sched.sort();
    let want: Vec<Bytes> = (1_000..1_600)
        .chain(sched.into_iter().map(|(_, i)| i))
        .map(|i| Bytes::from(format!("item-{i:06}")))
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got[600..], want[600..], "the schedule comes due in due order");
    store.close().await;
}

/// A delete by id that names a paged item twice (the API takes the list as given) drops it once: counted twice, the
/// paged schedule's count would fall below what its records hold, and once it reached zero the records left would
/// never come due, be listed or counted again (acknowledged items lost). The paged ready items likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_naming_a_paged_item_twice_drops_it_once() {
    const WINDOW: usize = 40;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    store.set_memory_window(WINDOW);
    let p = store.open("dups", 0).await.expect("partition");
    let due = Ts(T0.0 + 100);
    let sched = p
        .produce(
            (0..100)
                .map(|i| NewItem {
                    enqueue_at: due,
                    ..item(i, 0, FAR)
                })
                .collect(),
        )
        .await
        .expect("produce");
    let ready = p
        .produce((100..200).map(|i| item(i, 0, FAR)).collect())
        .await
        .expect("produce");
    let c = store.paging_counts("dups", 0).await.expect("open");
    assert!(c.paged_scheduled > 0 && c.paged_ready > 0, "{c:?}");
    // The last ones produced are paged in both.
    let (s, r) = (sched[99], ready[99]);
    p.delete(vec![s, s, r, r]).await.expect("delete");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.scheduled), (99, 99));
    let o = p.lifecycle(Ts(due.0 + 1), DLQ, 1_000).await.expect("lifecycle");
    assert_eq!((o.enqueued, o.more), (99, false), "{o:?}");
    let mut got = Vec::new();
    loop {
        let page = p.lease(1_000, LEASE).await.expect("lease");
        if page.is_empty() {
            break;
        }
        got.extend(page.into_iter().map(|it| it.payload));
    }
    let want: Vec<Bytes> = (100..199)
        .chain(0..99)
        .map(|i| Bytes::from(format!("item-{i:06}")))
        .collect();
    assert_eq!(got, want, "every item but the deleted ones, once");
    store.close().await;
}

/// A delete by id reads paged ready items back in reads of at most 16 MiB of payloads, each of which may stop in
/// the middle of the ids it was given (an id is looked up under each paged priority that may hold it, so where the
/// next read starts is counted in ids, not look-ups): 120 items of 512 KiB in three priorities, a window of 4, and
/// a delete naming every other one (some twice, some resident, one unknown) drops each named item once and no
/// other, with counts and paged bytes exact. A complete naming paged items (looked up the same way) calls them not
/// leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_of_large_paged_items_in_bounded_reads_drops_each_named_item_once() {
    const N: usize = 120;
    const LEN: usize = 512 << 10;
    let dir = tempfile::tempdir().expect("tmp");
    let store = FjallStore::open(dir.path(), Durability::None).expect("open");
    store.set_memory_window(4);
    let p = store.open("bounded", 0).await.expect("partition");
    let mut ids = Vec::new();
    for b in (0..N).step_by(10) {
        let batch = (b..b + 10)
            .map(|i| NewItem {
                payload: Bytes::from(vec![(i % 251) as u8; LEN]),
                ..item(i, [0, 3, 7][i % 3], FAR)
            })
            .collect();
        ids.extend(p.produce(batch).await.expect("produce"));
    }
    let c = store.paging_counts("bounded", 0).await.expect("open");
    assert!(c.paged_ready >= (N - 4) as u64, "{c:?}");
    let named: Vec<ItemId> = ids[N / 2..].to_vec();
    // One request of 60 paged ids: it fails as a whole, on an id not leased (not one not found).
    let done = p.complete(vec![named]).await.expect("complete");
    assert!(
        matches!(done[..], [Err(lessor_core::error::ItemError::NotLeased(_))]),
        "{done:?}"
    );
    let mut gone: Vec<ItemId> = ids.iter().copied().step_by(2).collect();
    let mut named = gone.clone();
    named.extend(gone.iter().copied().step_by(5));
    named.push(ItemId(ids[N - 1].0 + 1_000));
    named.reverse();
    p.delete(named).await.expect("delete");
    gone.sort_unstable();
    let mut left: Vec<ItemId> = ids
        .iter()
        .copied()
        .filter(|id| gone.binary_search(id).is_err())
        .collect();
    let c = p.counts().await.expect("counts");
    assert_eq!(c.ready, left.len() as u64);
    let pc = store.paging_counts("bounded", 0).await.expect("open");
    assert_eq!(pc.paged_bytes, pc.paged_ready * LEN as u64, "{pc:?}");
    let mut got = Vec::new();
    loop {
        let page = p.lease(7, LEASE).await.expect("lease");
        if page.is_empty() {
            break;
        }
        got.extend(page.into_iter().map(|it| it.id));
    }
    // Ids carry their priority, so production order is not id order.
    got.sort_unstable();
    left.sort_unstable();
    assert_eq!(got, left, "every item not named, once");
    store.close().await;
}
