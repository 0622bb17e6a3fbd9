//! A differential test of one fjall partition with a tiny window: whatever the operations (produce with
//! dedup keys, leases, completes, retries, expiry, dead removal, deletes, clears, imports), a restart must read
//! back exactly the state the partition held (items with payloads and flags, counts, dedup records).
#![cfg(feature = "fjall")]

use std::sync::Arc;

use bytes::Bytes;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, ClearRequest, Item, ItemId, NewItem};
use lessor_storage::fjall::{Durability, FjallStore};

const T0: i64 = 1_800_000_000_000_000;

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

async fn all(p: &dyn Partition) -> Vec<Item> {
    let mut s = p.snapshot().await.expect("snapshot");
    let mut out = Vec::new();
    loop {
        let page = s.next(5).await.expect("page");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

async fn open(dir: &std::path::Path) -> (FjallStore, Arc<dyn Partition>) {
    let store = FjallStore::open(dir, Durability::Sync).expect("open");
    store.set_memory_window(3);
    let p = store.open("d", 0).await.expect("partition");
    (store, p)
}

async fn run(seed: u64) {
    let dir = tempfile::tempdir().expect("tmp");
    let policy = LifecyclePolicy {
        max_attempts: 3,
        has_dead_queue: seed.is_multiple_of(2),
        backoff: Backoff::OFF,
    };
    let mut rng = Lcg(seed);
    let (mut store, mut p) = open(dir.path()).await;
    let mut now = T0;
    let mut tag = 0u64;
    let mut leased: Vec<ItemId> = Vec::new();
    for step in 0..300 {
        let op = rng.next(100);
        let ctx = format!("seed {seed} step {step} op {op}");
        match op {
            0..=29 => {
                let n = 1 + rng.next(5) as usize;
                let items = (0..n)
                    .map(|_| {
                        tag += 1;
                        let size = [0usize, 20, 1100, 3000][rng.next(4) as usize];
                        let key = if rng.next(3) == 0 {
                            format!("k{}", rng.next(30))
                        } else {
                            String::new()
                        };
                        NewItem {
                            expire_deadline: Ts(now + 5 + rng.next(60) as i64),
                            created_at: Ts(now),
                            payload: Bytes::from(vec![b'a' + (tag % 26) as u8; size]),
                            priority: rng.next(4) as u8,
                            dedup_until: Ts(now + 1 + rng.next(40) as i64),
                            dedup_id: key,
                            ..Default::default()
                        }
                    })
                    .collect();
                p.produce(items).await.expect("produce");
            }
            30..=44 => {
                let got = p
                    .lease(1 + rng.next(4) as usize, Ts(now + 1 + rng.next(15) as i64))
                    .await
                    .expect("lease");
                leased.extend(got.iter().map(|i| i.id));
            }
            45..=54 if !leased.is_empty() => {
                let id = leased.swap_remove(rng.next(leased.len() as u64) as usize);
                let _ = p.complete(vec![vec![id]]).await.expect("complete");
            }
            55..=62 if !leased.is_empty() => {
                let id = leased.swap_remove(rng.next(leased.len() as u64) as usize);
                let action = match rng.next(3) {
                    0 => RetryAction::Requeue,
                    1 => RetryAction::Schedule(Ts(now + 1 + rng.next(6) as i64)),
                    _ => RetryAction::Dead,
                };
                let _ = p
                    .retry(vec![vec![RetryOp { id, action }]], policy)
                    .await
                    .expect("retry");
            }
            63..=76 => {
                now += rng.next(6) as i64;
                p.lifecycle(Ts(now), policy, 1 + rng.next(50) as usize)
                    .await
                    .expect("lifecycle");
            }
            77..=80 => {
                let dead = p.dead_items(3).await.expect("dead");
                p.remove_dead(dead.iter().map(|i| i.id).collect())
                    .await
                    .expect("remove");
            }
            81..=84 => {
                let items = all(&*p).await;
                if !items.is_empty() {
                    let id = items[rng.next(items.len() as u64) as usize].id;
                    p.delete(vec![id]).await.expect("delete");
                }
            }
            85..=86 => {
                p.clear(ClearRequest {
                    queue: rng.next(2) == 0,
                    scheduled: rng.next(2) == 0,
                    destructive: rng.next(4) == 0,
                })
                .await
                .expect("clear");
            }
            87..=89 => {
                let items = all(&*p).await;
                let copy: Vec<Item> = items.iter().take(3).cloned().collect();
                p.import(copy).await.expect("import");
            }
            _ => {
                let before = all(&*p).await;
                let counts = p.counts().await.expect("counts");
                let dedup = p.dedup_records(Ts(now)).await.expect("dedup");
                store.close().await;
                drop(p);
                (store, p) = open(dir.path()).await;
                let after = all(&*p).await;
                assert_eq!(after, before, "{ctx}: a restart changed the items");
                assert_eq!(p.counts().await.expect("counts"), counts, "{ctx}: counts");
                let mut d2 = p.dedup_records(Ts(now)).await.expect("dedup");
                let mut d1 = dedup;
                d1.sort_by(|a, b| (&a.dedup_id, a.id, a.until).cmp(&(&b.dedup_id, b.id, b.until)));
                d2.sort_by(|a, b| (&a.dedup_id, a.id, a.until).cmp(&(&b.dedup_id, b.id, b.until)));
                assert_eq!(d2, d1, "{ctx}: dedup records");
                leased.retain(|id| after.iter().any(|i| i.id == *id && i.is_leased));
            }
        }
        // Memory vs disk: the counts the state keeps against the snapshot read from disk.
        let items = all(&*p).await;
        let c = p.counts().await.expect("counts");
        let ready = items
            .iter()
            .filter(|i| !i.dead && !i.is_leased && !i.is_scheduled())
            .count() as u64;
        let leased_n = items.iter().filter(|i| i.is_leased).count() as u64;
        let sched = items.iter().filter(|i| i.is_scheduled() && !i.dead).count() as u64;
        assert_eq!(
            (c.ready, c.leased, c.scheduled),
            (ready, leased_n, sched),
            "{ctx}: memory vs disk"
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_back_exactly_the_state_held() {
    // A few seeds in the test run (a debug build restarts fjall slowly); LESSOR_TEST_SEEDS=N runs more.
    let seeds: u64 = std::env::var("LESSOR_TEST_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for seed in 1..=seeds {
        run(seed).await;
    }
}
