//! A differential test of a fjall partition with a tiny memory window (paging) against the memory backend: the same
//! operations (produce with priorities, schedules and expiry deadlines, leases, completes, retries with and without
//! a retry time, lifecycle passes, deletes, clears, dead removal, restarts of the fjall store) must lease the same
//! items in the same order and leave the same items in the same states.
#![cfg(feature = "fjall")]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, ClearRequest, Item, ItemId, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};
use lessor_storage::memory::MemoryStore;

const T0: i64 = 1_800_000_000_000_000;
const FAR: i64 = 1_900_000_000_000_000;

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

/// The payload of item `tag`: 12 bytes, or with `big` for every other tag, 1,100 to 1,700 bytes, above the size
/// whose payload a leased, scheduled or dead item keeps on disk only.
fn payload(tag: u64, big: bool) -> Bytes {
    let mut p = format!("tag-{tag:08}");
    if big && tag % 2 == 1 {
        p.extend(std::iter::repeat_n(
            (b'a' + (tag % 26) as u8) as char,
            1_088 + (tag % 7) as usize * 100,
        ));
    }
    Bytes::from(p)
}

/// The length and a checksum of a payload (the views must agree on the payloads too).
fn fingerprint(p: &[u8]) -> (usize, u64) {
    let sum = p.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (p.len(), sum)
}

fn tag_of(it: &Item) -> u64 {
    std::str::from_utf8(&it.payload[4..12])
        .expect("a tag")
        .parse()
        .expect("a numeric tag")
}

async fn all(p: &dyn Partition) -> Vec<Item> {
    let mut s = p.snapshot().await.expect("snapshot");
    let mut out = Vec::new();
    loop {
        let page = s.next(4).await.expect("page");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// What must agree between the two backends, per tag.
type View = BTreeMap<u64, (bool, bool, i64, i64, i64, u32, u8, (usize, u64))>;

fn view(items: &[Item]) -> (View, BTreeMap<u64, ItemId>) {
    let mut v = BTreeMap::new();
    let mut ids = BTreeMap::new();
    for it in items {
        let t = tag_of(it);
        let lease = if it.is_leased { it.lease_deadline.0 } else { 0 };
        let prev = v.insert(
            t,
            (
                it.dead,
                it.is_leased,
                lease,
                it.enqueue_at.0,
                it.expire_deadline.0,
                it.attempts,
                it.priority,
                fingerprint(&it.payload),
            ),
        );
        assert!(prev.is_none(), "tag {t} twice: {items:?}");
        ids.insert(t, it.id);
    }
    (v, ids)
}

#[cfg(feature = "s3")]
#[path = "support/cold.rs"]
#[allow(clippy::unwrap_used)]
mod support;

/// The object store of the cold variant, if any.
#[cfg(feature = "s3")]
type Cold = Option<lessor_storage::offload::ObjectStoreConfig>;
#[cfg(not(feature = "s3"))]
type Cold = Option<()>;

/// The tags `list` returns, with their payloads' fingerprints, page by page, sorted (ids of different priorities need not order alike in the two
/// backends), checking that each page is in id order.
async fn listed(p: &dyn Partition, scheduled: bool) -> Vec<(u64, (usize, u64))> {
    let mut out = Vec::new();
    let mut pivot = None;
    loop {
        let page = p.list(pivot, 3, scheduled).await.expect("list");
        let Some(last) = page.last() else { break };
        assert!(
            page.windows(2).all(|w| w[0].id < w[1].id),
            "list out of id order: {page:?}"
        );
        pivot = Some(ItemId(last.id.0 + 1));
        out.extend(page.iter().map(|it| (tag_of(it), fingerprint(&it.payload))));
    }
    out.sort_unstable();
    out
}

async fn open(
    dir: &std::path::Path,
    window: usize,
    window_bytes: Option<u64>,
    cold: &Cold,
) -> (FjallStore, Arc<dyn Partition>) {
    let store = FjallStore::open(dir, Durability::Sync).expect("open");
    store.set_memory_window(window);
    if let Some(b) = window_bytes {
        store.set_memory_window_bytes(b);
    }
    #[cfg(feature = "s3")]
    if let Some(cfg) = cold {
        store
            .set_cold(
                lessor_storage::registry::ColdSettings {
                    object_store: cfg.clone(),
                    after_depth: 4,
                    segment_items: 3,
                    segment_bytes: 1 << 20,
                    prefetch_items: 2,
                },
                "disk-0",
            )
            .expect("cold");
        store.set_cold_eager(true);
    }
    #[cfg(not(feature = "s3"))]
    let _ = cold;
    let p = store.open("d", 0).await.expect("partition");
    (store, p)
}

/// What the produced items' schedules look like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sched {
    /// A quarter of the items scheduled 1-10 ahead.
    Near,
    /// Half of them, due 1-10 ahead (times often equal) or 30-130 ahead (far: they come due late in the run,
    /// after restarts, deletes and clears), so that the schedule pages (the bound is 1 at windows 1-3).
    Paged,
    /// As `Paged`, with lifecycle passes of 1-4 items, so that the paged items a pass reads back must be exactly what
    /// is left of its limit after the resident ones due before them. Leases and expiry deadlines are far, and every
    /// item has priority 0: a pass of a few items that handles some of many expired leases or items picks them by
    /// position in indexes whose order differs between the backends (a lease of paged items is several calls), and
    /// among items due at one time by id, and ids of different priorities need not order alike in the two (blocks
    /// start afresh after a restart).
    PagedTight,
}

/// Runs seed `seed`: item window 1-3, the byte window `window_bytes` when given (payloads are 12 bytes, or with
/// `big` half of them over 1,100), cold segments when `cold` is given.
async fn run(seed: u64, cold: Cold, window_bytes: Option<u64>, big: bool) {
    run_with(seed, cold, window_bytes, big, Sched::Near).await
}

/// [`run`] with schedules as `sched` says.
async fn run_with(seed: u64, cold: Cold, window_bytes: Option<u64>, big: bool, sched: Sched) {
    let dir = tempfile::tempdir().expect("tmp");
    let policy = LifecyclePolicy {
        max_attempts: if seed.is_multiple_of(3) { 0 } else { 4 },
        has_dead_queue: seed.is_multiple_of(2),
        backoff: if seed % 4 == 1 {
            Backoff {
                base: std::time::Duration::from_micros(3),
                factor: 2.0,
                max: std::time::Duration::from_micros(12),
                jitter: 0.0,
            }
        } else {
            Backoff::OFF
        },
    };
    let window = 1 + (seed % 3) as usize;
    let mut rng = Lcg(seed);
    let (mut store, mut f) = open(dir.path(), window, window_bytes, &cold).await;
    let mem = MemoryStore::new();
    let m = mem.open("d", 0).await.expect("memory partition");
    let mut now = T0;
    let mut tag = 0u64;
    let mut fids: BTreeMap<u64, ItemId> = BTreeMap::new();
    let mut mids: BTreeMap<u64, ItemId> = BTreeMap::new();
    let mut mview: View = BTreeMap::new();
    let mut log: Vec<String> = Vec::new();
    // Whether `fids` comes from a read of the whole fjall partition after the last operation.
    let mut fresh = true;
    // Most payload bytes the fjall partition kept on disk only (leased, scheduled, dead items) after a step.
    let mut most_on_disk = 0;
    // Most scheduled items the fjall partition held on disk only after a step.
    let mut most_paged_sched = 0;
    // Deadlines of leases and expiry, and priorities, as drawn, or far and all 0 under tight passes (see
    // `Sched::PagedTight`).
    let tight = sched == Sched::PagedTight;
    let until = |t: i64| if tight { FAR } else { t };
    let prio = |p: u8| if tight { 0 } else { p };
    for step in 0..250 {
        let op = rng.next(100);
        let ctx = format!("seed {seed} window {window} step {step} op {op}");
        // A full snapshot loads every cold segment back: with segments, the fjall side is read whole only now and
        // then, so that the backlog stays cold in between.
        let full = cold.is_none() || step % 10 == 9;
        // A backup taken before the operation and read after it must read the state from before it.
        let pre = if op < 95 && full {
            Some(f.snapshot().await.expect("snapshot"))
        } else {
            None
        };
        match op {
            0..=29 => {
                let n = 1 + rng.next(if cold.is_some() { 12 } else { 5 }) as usize;
                let mut items = Vec::new();
                for _ in 0..n {
                    let enqueue_at = match sched {
                        Sched::Near if rng.next(4) == 0 => now + 1 + rng.next(10) as i64,
                        Sched::Paged | Sched::PagedTight if rng.next(2) == 0 => {
                            if rng.next(3) == 0 {
                                now + 30 + rng.next(100) as i64
                            } else {
                                now + 1 + rng.next(10) as i64
                            }
                        }
                        _ => 0,
                    };
                    let expire = until(if rng.next(3) == 0 {
                        now + 1 + rng.next(30) as i64
                    } else {
                        FAR
                    });
                    items.push(NewItem {
                        enqueue_at: Ts(enqueue_at),
                        expire_deadline: Ts(expire),
                        created_at: Ts(now),
                        payload: payload(tag, big),
                        priority: prio(rng.next(3) as u8),
                        ..Default::default()
                    });
                    tag += 1;
                }
                log.push(format!(
                    "{ctx}: produce {:?}",
                    items
                        .iter()
                        .map(|i| (
                            tag_of_new(i),
                            i.priority,
                            i.enqueue_at.0 - now,
                            i.expire_deadline.0 - now
                        ))
                        .collect::<Vec<_>>()
                ));
                f.produce(items.clone()).await.expect("produce");
                m.produce(items).await.expect("produce");
            }
            30..=49 => {
                let n = 1 + rng.next(4) as usize;
                let d = Ts(until(now + 1 + rng.next(20) as i64));
                // As the engine does: a lease that stopped short with items left (a byte window's page-in reads
                // fewer than the lease wants) is asked again.
                let mut got = Vec::new();
                while got.len() < n {
                    let (more, stopped) = f.lease_within(n - got.len(), d, u64::MAX).await.expect("lease");
                    got.extend(more);
                    if !stopped {
                        break;
                    }
                }
                for it in &got {
                    fids.insert(tag_of(it), it.id);
                }
                let tagged = |it: &Item| (tag_of(it), fingerprint(&it.payload));
                let a: Vec<_> = got.iter().map(tagged).collect();
                let b: Vec<_> = m.lease(n, d).await.expect("lease").iter().map(tagged).collect();
                log.push(format!("{ctx}: lease {n} -> fjall {a:?} memory {b:?}"));
                assert_eq!(a, b, "{ctx}: leased items differ\n{}", log.join("\n"));
            }
            50..=62 => {
                let leased: Vec<u64> = mview.iter().filter(|(_, s)| s.1).map(|(t, _)| *t).collect();
                if leased.is_empty() {
                    continue;
                }
                let t = leased[rng.next(leased.len() as u64) as usize];
                log.push(format!("{ctx}: complete {t}"));
                let a = f.complete(vec![vec![fids[&t]]]).await.expect("complete");
                let b = m.complete(vec![vec![mids[&t]]]).await.expect("complete");
                assert_eq!(a, b, "{ctx}: complete {t}\n{}", log.join("\n"));
            }
            63..=74 => {
                let leased: Vec<u64> = mview.iter().filter(|(_, s)| s.1).map(|(t, _)| *t).collect();
                if leased.is_empty() {
                    continue;
                }
                let t = leased[rng.next(leased.len() as u64) as usize];
                let action = match rng.next(4) {
                    0 | 1 => RetryAction::Requeue,
                    2 => RetryAction::Schedule(Ts(now + 1 + rng.next(6) as i64)),
                    _ => RetryAction::Dead,
                };
                log.push(format!("{ctx}: retry {t} {action:?}"));
                let a = f
                    .retry(vec![vec![RetryOp { id: fids[&t], action }]], policy)
                    .await
                    .expect("retry");
                let b = m
                    .retry(vec![vec![RetryOp { id: mids[&t], action }]], policy)
                    .await
                    .expect("retry");
                assert_eq!(a, b, "{ctx}: retry {t}\n{}", log.join("\n"));
            }
            75..=84 => {
                now += rng.next(8) as i64;
                log.push(format!("{ctx}: lifecycle at +{}", now - T0));
                let limit = if sched == Sched::PagedTight {
                    1 + rng.next(4) as usize
                } else {
                    100_000
                };
                let a = f.lifecycle(Ts(now), policy, limit).await.expect("lifecycle");
                let b = m.lifecycle(Ts(now), policy, limit).await.expect("lifecycle");
                log.push(format!("{ctx}: lifecycle outcome fjall {a:?} memory {b:?}"));
            }
            85 if rng.next(2) == 0 => {
                let leased: Vec<u64> = mview.iter().filter(|(_, s)| s.1).map(|(t, _)| *t).collect();
                if leased.is_empty() {
                    continue;
                }
                let t = leased[rng.next(leased.len() as u64) as usize];
                let d = Ts(until(now + 1 + rng.next(20) as i64));
                log.push(format!("{ctx}: extend {t} to +{}", d.0 - now));
                let a = f.extend(vec![(vec![fids[&t]], d)]).await.expect("extend");
                let b = m.extend(vec![(vec![mids[&t]], d)]).await.expect("extend");
                assert_eq!(a, b, "{ctx}: extend {t}\n{}", log.join("\n"));
            }
            85..=87 => {
                let a: Vec<_> = f
                    .dead_items(1000)
                    .await
                    .expect("dead")
                    .iter()
                    .map(|it| (tag_of(it), fingerprint(&it.payload)))
                    .collect();
                let b: Vec<_> = m
                    .dead_items(1000)
                    .await
                    .expect("dead")
                    .iter()
                    .map(|it| (tag_of(it), fingerprint(&it.payload)))
                    .collect();
                // In id order, and ids of different priorities need not order alike in the two backends.
                let (mut sa, mut sb) = (a.clone(), b.clone());
                sa.sort_unstable();
                sb.sort_unstable();
                assert_eq!(sa, sb, "{ctx}: dead items\n{}", log.join("\n"));
                if let Some(&(t, _)) = a.first() {
                    log.push(format!("{ctx}: remove dead {t}"));
                    let fid = f.dead_items(1).await.expect("dead")[0].id;
                    f.remove_dead(vec![fid]).await.expect("remove dead");
                    m.remove_dead(vec![mids[&t]]).await.expect("remove dead");
                }
            }
            88..=91 => {
                // Between full reads (segments) only leased items have ids known to stay.
                let tags: Vec<u64> = mview
                    .iter()
                    .filter(|(t, st)| (fresh || st.1) && fids.contains_key(t))
                    .map(|(t, _)| *t)
                    .collect();
                if tags.is_empty() {
                    continue;
                }
                let t = tags[rng.next(tags.len() as u64) as usize];
                log.push(format!("{ctx}: delete {t}"));
                f.delete(vec![fids[&t]]).await.expect("delete");
                m.delete(vec![mids[&t]]).await.expect("delete");
            }
            92..=93 => {
                let req = ClearRequest {
                    queue: rng.next(2) == 0,
                    scheduled: rng.next(2) == 0,
                    destructive: rng.next(3) == 0,
                };
                log.push(format!("{ctx}: clear {req:?}"));
                f.clear(req).await.expect("clear");
                m.clear(req).await.expect("clear");
            }
            94 => {
                let n = 1 + rng.next(4) as usize;
                let mut items = Vec::new();
                for _ in 0..n {
                    let mut it = Item {
                        expire_deadline: Ts(until(if rng.next(3) == 0 {
                            now + 1 + rng.next(30) as i64
                        } else {
                            FAR
                        })),
                        created_at: Ts(now),
                        payload: payload(tag, big),
                        priority: prio(rng.next(3) as u8),
                        attempts: rng.next(2) as u32,
                        ..Default::default()
                    };
                    tag += 1;
                    match rng.next(4) {
                        0 => {
                            it.is_leased = true;
                            it.lease_deadline = Ts(until(now + 1 + rng.next(10) as i64));
                        }
                        1 => it.enqueue_at = Ts(now + 1 + rng.next(10) as i64),
                        2 => it.dead = true,
                        _ => {}
                    }
                    items.push(it);
                }
                log.push(format!(
                    "{ctx}: import {:?}",
                    items
                        .iter()
                        .map(|i| (tag_of(i), i.priority, i.is_leased, i.enqueue_at.0, i.dead))
                        .collect::<Vec<_>>()
                ));
                let got = f.import(items.clone()).await.expect("import");
                for it in &got {
                    fids.insert(tag_of(it), it.id);
                }
                let a: Vec<u64> = got.iter().map(tag_of).collect();
                let b: Vec<u64> = m
                    .import(items)
                    .await
                    .expect("import")
                    .iter()
                    .map(tag_of)
                    .collect();
                assert_eq!(a, b, "{ctx}: import\n{}", log.join("\n"));
            }
            _ => {
                log.push(format!("{ctx}: restart"));
                store.close().await;
                drop(f);
                (store, f) = open(dir.path(), window, window_bytes, &cold).await;
            }
        }
        if let Some(mut pre) = pre {
            let mut items = Vec::new();
            loop {
                let page = pre.next(3).await.expect("page");
                if page.is_empty() {
                    break;
                }
                items.extend(page);
            }
            let (pv, _) = view(&items);
            assert!(
                pv == mview,
                "{ctx}: a snapshot taken before the operation reads {pv:?}, the state before was {mview:?}\n{}",
                log.join("\n")
            );
        }
        let (mv, mi) = view(&all(&*m).await);
        fresh = full || step + 1 == 250;
        let (fv, fi) = if fresh {
            view(&all(&*f).await)
        } else {
            (mv.clone(), fids.clone())
        };
        if fv != mv {
            let only_f: Vec<_> = fv.iter().filter(|(t, s)| mv.get(t) != Some(s)).collect();
            let only_m: Vec<_> = mv.iter().filter(|(t, s)| fv.get(t) != Some(s)).collect();
            panic!(
                "{ctx}: states differ\nfjall only:  {only_f:?}\nmemory only: {only_m:?}\n{}",
                log.join("\n")
            );
        }
        if fresh {
            for scheduled in [false, true] {
                let a = listed(&*f, scheduled).await;
                let b = listed(&*m, scheduled).await;
                assert_eq!(a, b, "{ctx}: list (scheduled {scheduled})\n{}", log.join("\n"));
            }
        }
        let fc = f.counts().await.expect("counts");
        let mc = m.counts().await.expect("counts");
        assert_eq!(fc, mc, "{ctx}: counts\n{}", log.join("\n"));
        let fd = f.next_deadline().await.expect("deadline");
        let md = m.next_deadline().await.expect("deadline");
        if let Some(md) = md {
            assert!(
                fd.is_some_and(|fd| fd <= md),
                "{ctx}: fjall next deadline {fd:?} after memory's {md:?}\n{}",
                log.join("\n")
            );
        }
        fids = fi;
        mids = mi;
        mview = mv;
        if let Some(c) = store.paging_counts("d", 0).await {
            most_on_disk = most_on_disk.max(c.on_disk_bytes);
            most_paged_sched = most_paged_sched.max(c.paged_scheduled);
        }
    }
    assert_eq!(
        big,
        most_on_disk > 0,
        "seed {seed}: payloads on disk only only with large payloads"
    );
    if sched != Sched::Near {
        assert!(most_paged_sched > 1, "seed {seed}: the schedule never paged");
    }
    eprintln!(
        "seed {seed}: segments written, loaded, failed: {:?}; most scheduled items paged {most_paged_sched}",
        store.segment_counters()
    );
    store.close().await;
}

fn tag_of_new(i: &NewItem) -> u64 {
    std::str::from_utf8(&i.payload[4..12])
        .expect("a tag")
        .parse()
        .expect("a numeric tag")
}

/// The seeds to run: 1 to `LESSOR_TEST_SEEDS` (6), or only `SEED`.
fn seeds() -> Vec<u64> {
    let only: Option<u64> = std::env::var("SEED").ok().map(|s| s.parse().expect("a seed"));
    let n: u64 = std::env::var("LESSOR_TEST_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    (1..=n).filter(|s| only.is_none_or(|o| o == *s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_partition_behaves_as_the_memory_backend() {
    for seed in seeds() {
        run(seed, None, None, false).await;
    }
}

/// The same with a byte window of 1 to 4 items' payloads, smaller than the item window in most seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paged_by_bytes_behaves_as_the_memory_backend() {
    for seed in seeds() {
        run(seed, None, Some(12 * (1 + seed % 4)), false).await;
    }
}

/// The same with cold segments (a tiny depth and segment size), against `LESSOR_TEST_S3_ENDPOINT`.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_partition_with_cold_segments_behaves_as_the_memory_backend() {
    for seed in seeds() {
        let Some(env) = support::env("lessor-cold", &format!("diff-{seed}")).await else {
            return;
        };
        run(seed, Some(env.cfg.clone()), None, false).await;
    }
}

/// The same with half the payloads large (kept on disk only while their items are leased, scheduled or dead) and a
/// byte window of 1 to 4 such items: leases, requeues after expiry or retry, schedules coming due, dead items, lists,
/// snapshots and restarts read the same payloads as the memory backend's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_with_payloads_on_disk_behaves_as_the_memory_backend() {
    for seed in seeds() {
        run(seed, None, Some(1_500 * (1 + seed % 4)), true).await;
    }
}

/// Payloads on disk with the item window only (no byte window: every ready payload resident), so the large payloads
/// leave memory only when their items are leased, scheduled or dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_on_disk_without_a_byte_window_behave_as_the_memory_backend() {
    for seed in seeds() {
        run(seed, None, None, true).await;
    }
}

/// Payloads on disk with cold segments (a tiny depth and segment size, against `LESSOR_TEST_S3_ENDPOINT`): paged
/// items with large payloads go to segments and come back to be leased, expire, be retried and die.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_on_disk_with_cold_segments_behave_as_the_memory_backend() {
    for seed in seeds() {
        let Some(env) = support::env("lessor-cold", &format!("diff-big-{seed}")).await else {
            return;
        };
        run(seed, Some(env.cfg.clone()), Some(1_500 * (1 + seed % 4)), true).await;
    }
}

/// Half the items scheduled, near (times often equal) and far (coming due after restarts, deletes, clears and
/// lists), the resident schedule bounded at 1: the paged schedule comes due in the memory backend's order, and
/// delete, list, clear, counts, snapshots and restarts see it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_schedule_behaves_as_the_memory_backend() {
    for seed in seeds() {
        run_with(seed, None, None, false, Sched::Paged).await;
    }
}

/// The same with half the payloads large and a byte window: paged scheduled items with large payloads come due
/// (their payloads read back with the page), and retried large items scheduled again keep theirs on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_schedule_with_payloads_on_disk_behaves_as_the_memory_backend() {
    for seed in seeds() {
        run_with(seed, None, Some(1_500 * (1 + seed % 4)), true, Sched::Paged).await;
    }
}

/// A paged schedule beside cold segments (against `LESSOR_TEST_S3_ENDPOINT`): deletes, clears and snapshots that
/// load segments back, and restarts, meet paged scheduled records under the same prefix as the segments' manifest
/// and the paged ready records, and the schedule still comes due in the memory backend's order.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_schedule_with_cold_segments_behaves_as_the_memory_backend() {
    for seed in seeds() {
        let Some(env) = support::env("lessor-cold", &format!("diff-sched-{seed}")).await else {
            return;
        };
        run_with(seed, Some(env.cfg.clone()), None, false, Sched::Paged).await;
    }
}

/// A paged schedule under lifecycle passes of 1-4 items: each pass requeues what the memory backend's does, the
/// resident items due before the paged ones first, then as many paged ones as the rest of its limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_schedule_under_tight_passes_behaves_as_the_memory_backend() {
    for seed in seeds() {
        run_with(seed, None, None, false, Sched::PagedTight).await;
    }
}
