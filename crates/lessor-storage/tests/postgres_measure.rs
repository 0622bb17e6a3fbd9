//! Call costs of the postgres backend, for the numbers quoted in reviews; not a pass/fail test.
//!
//! `cargo test --release -p lessor-storage --features postgres --test postgres_measure -- --ignored --nocapture`
//! with `LESSOR_TEST_DATABASE_URL` set. Prints items per second and time per call for produce, lease, complete and
//! retry at several batch sizes, one lifecycle pass over many expired leases, and the index-head queries. Batch sizes
//! grow 1 -> 1000 -> 4000 so a cost that is not linear in the batch shows.
#![cfg(feature = "postgres")]

use std::time::{Duration, Instant};

use bytes::Bytes;
use lessor_core::storage::{LifecyclePolicy, Partition, PartitionStore, RetryAction, RetryOp};
use lessor_core::types::{ClearRequest, ItemId, NewItem};
use lessor_storage::postgres::{PgConfig, PgStore};
use lessor_storage::testsuite::{unique_queue, T0};

const MINUTE: Duration = Duration::from_secs(60);

fn items(n: usize) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            expire_deadline: T0.add(MINUTE * 60),
            created_at: T0,
            payload: Bytes::from(vec![b'x'; 100 + i % 3]),
            ..Default::default()
        })
        .collect()
}

fn per_call(d: Duration, calls: usize) -> String {
    format!("{:8.0} us/call", d.as_secs_f64() * 1e6 / calls as f64)
}

fn rate(d: Duration, n: usize) -> String {
    format!("{:8.0} items/s", n as f64 / d.as_secs_f64())
}

async fn empty(p: &dyn Partition) {
    let all = ClearRequest {
        queue: true,
        scheduled: true,
        destructive: true,
    };
    p.clear(all).await.expect("clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_call_costs() {
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    let store = PgStore::new(&PgConfig::new(url)).expect("store");
    let q = unique_queue("measure");
    let p = store.open(&q, 0).await.expect("open");

    for (batch, calls) in [(1usize, 500usize), (100, 100), (1000, 20)] {
        let n = batch * calls;
        let t = Instant::now();
        for _ in 0..calls {
            p.produce(items(batch)).await.expect("produce");
        }
        let produce = t.elapsed();
        let t = Instant::now();
        let mut leased = Vec::new();
        for _ in 0..calls {
            leased.push(p.lease(batch, T0.add(MINUTE)).await.expect("lease"));
        }
        let lease = t.elapsed();
        let t = Instant::now();
        for l in &leased {
            let r = p
                .complete(vec![l.iter().map(|i| i.id).collect()])
                .await
                .expect("complete");
            assert!(r[0].is_ok());
        }
        let complete = t.elapsed();
        println!(
            "batch {batch:5}: produce {} {} | lease {} {} | complete {} {}",
            rate(produce, n),
            per_call(produce, calls),
            rate(lease, n),
            per_call(lease, calls),
            rate(complete, n),
            per_call(complete, calls)
        );
    }

    for n in [100usize, 1000, 4000] {
        p.produce(items(n)).await.expect("produce");
        let l = p.lease(n, T0.add(MINUTE)).await.expect("lease");
        let ops = l
            .iter()
            .map(|i| RetryOp {
                id: i.id,
                action: RetryAction::Requeue,
            })
            .collect();
        let t = Instant::now();
        p.retry(vec![ops], LifecyclePolicy::default())
            .await
            .expect("retry");
        let requeue = t.elapsed();
        let l = p.lease(n, T0.add(MINUTE)).await.expect("lease");
        let mut ids: Vec<ItemId> = l.iter().map(|i| i.id).collect();
        // One request with a missing id, one valid: the two-round-trip path of complete.
        ids.push(ItemId(1));
        let t = Instant::now();
        let r = p
            .complete(vec![ids, l.iter().map(|i| i.id).collect()])
            .await
            .expect("complete");
        let mixed = t.elapsed();
        assert!(r[0].is_err() && r[1].is_ok());
        println!(
            "batch {n:5}: retry (requeue) {} | complete with one failing request {}",
            per_call(requeue, 1),
            per_call(mixed, 1)
        );
        empty(p.as_ref()).await;
    }

    p.produce(items(10_000)).await.expect("produce");
    let mut n = 0;
    while n < 10_000 {
        n += p.lease(1000, T0.add(MINUTE)).await.expect("lease").len();
    }
    let t = Instant::now();
    let mut calls = 0;
    let mut moved = 0;
    loop {
        let o = p
            .lifecycle(T0.add(MINUTE * 2), LifecyclePolicy::default(), 1000)
            .await
            .expect("lifecycle");
        calls += 1;
        moved += o.lease_expired;
        if !o.more {
            break;
        }
    }
    println!(
        "lifecycle: {moved} expired leases, {calls} passes of limit 1000: {}",
        per_call(t.elapsed(), calls)
    );
    let t = Instant::now();
    for _ in 0..100 {
        p.next_deadline().await.expect("next deadline");
    }
    println!("next_deadline: {}", per_call(t.elapsed(), 100));
    let t = Instant::now();
    for _ in 0..100 {
        p.counts().await.expect("counts");
    }
    println!("counts (10k ready): {}", per_call(t.elapsed(), 100));
    let t = Instant::now();
    for _ in 0..100 {
        p.stats(T0).await.expect("stats");
    }
    println!("stats (10k ready): {}", per_call(t.elapsed(), 100));
    store.destroy(&q, 0).await.expect("destroy");
}
