#![cfg(feature = "postgres")]
//! temporary measurement (not part of the change)
use bytes::Bytes;
use lessor_core::storage::{LifecyclePolicy, PartitionStore, RetryAction, RetryOp};
use lessor_core::types::NewItem;
use lessor_storage::postgres::{PgConfig, PgStore};
use lessor_storage::testsuite::{unique_queue, T0};
use std::time::{Duration, Instant};

fn items(n: usize) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            expire_deadline: T0.add(Duration::from_secs(3600)),
            created_at: T0,
            payload: Bytes::from(vec![b'x'; 100 + i % 3]),
            ..Default::default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure() {
    let url = std::env::var("LESSOR_TEST_DATABASE_URL").expect("url");
    let store = PgStore::new(&PgConfig::new(format!("{url}&application_name=measure"))).expect("s");
    let q = unique_queue("measure");
    let p = store.open(&q, 0).await.expect("open");
    for &batch in &[1usize, 100, 1000] {
        let rounds = if batch == 1 {
            500
        } else if batch == 100 {
            100
        } else {
            20
        };
        let t = Instant::now();
        for _ in 0..rounds {
            p.produce(items(batch)).await.expect("p");
        }
        let pe = t.elapsed();
        let t = Instant::now();
        let mut leased = Vec::new();
        for _ in 0..rounds {
            leased.push(p.lease(batch, T0.add(Duration::from_secs(60))).await.expect("l"));
        }
        let le = t.elapsed();
        let t = Instant::now();
        for l in &leased {
            let r = p
                .complete(vec![l.iter().map(|i| i.id).collect()])
                .await
                .expect("c");
            assert!(r[0].is_ok());
        }
        let ce = t.elapsed();
        let n = (rounds * batch) as f64;
        println!("batch {batch:5}: produce {:8.0} items/s ({:6.0} us/call), lease {:8.0} items/s ({:6.0} us/call), complete {:8.0} items/s ({:6.0} us/call)",
            n / pe.as_secs_f64(), pe.as_micros() as f64 / rounds as f64,
            n / le.as_secs_f64(), le.as_micros() as f64 / rounds as f64,
            n / ce.as_secs_f64(), ce.as_micros() as f64 / rounds as f64);
    }
    // retry
    p.produce(items(1000)).await.expect("p");
    let l = p.lease(1000, T0.add(Duration::from_secs(60))).await.expect("l");
    let t = Instant::now();
    for chunk in l.chunks(100) {
        p.retry(
            vec![chunk
                .iter()
                .map(|i| RetryOp {
                    id: i.id,
                    action: RetryAction::Requeue,
                })
                .collect()],
            LifecyclePolicy::default(),
        )
        .await
        .expect("r");
    }
    println!("retry requeue 10x100: {:?} per call", t.elapsed() / 10);
    for &n in &[1000usize, 4000] {
        p.produce(items(n)).await.expect("p");
        let l = p.lease(n, T0.add(Duration::from_secs(60))).await.expect("l");
        let t = Instant::now();
        p.retry(
            vec![l
                .iter()
                .map(|i| RetryOp {
                    id: i.id,
                    action: RetryAction::Requeue,
                })
                .collect()],
            LifecyclePolicy::default(),
        )
        .await
        .expect("r");
        println!("retry requeue 1x{n}: {:?}", t.elapsed());
        let l = p.lease(n, T0.add(Duration::from_secs(60))).await.expect("l");
        let t = Instant::now();
        p.retry(
            vec![l
                .iter()
                .map(|i| RetryOp {
                    id: i.id,
                    action: RetryAction::Schedule(T0.add(Duration::from_secs(5))),
                })
                .collect()],
            LifecyclePolicy::default(),
        )
        .await
        .expect("r");
        println!("retry schedule 1x{n}: {:?}", t.elapsed());
        p.clear(lessor_core::types::ClearRequest {
            queue: true,
            scheduled: true,
            destructive: true,
        })
        .await
        .expect("clear");
    }
    // slow complete path: one bad id per batch
    let l = p.lease(1000, T0.add(Duration::from_secs(60))).await.expect("l");
    let t = Instant::now();
    for chunk in l.chunks(100) {
        let mut ids: Vec<_> = chunk.iter().map(|i| i.id).collect();
        ids.push(lessor_core::types::ItemId(1));
        let r = p
            .complete(vec![ids, chunk.iter().map(|i| i.id).collect()])
            .await
            .expect("c");
        assert!(r[0].is_err() && r[1].is_ok());
    }
    println!(
        "complete with a bad request 10x100: {:?} per call",
        t.elapsed() / 10
    );
    // lifecycle
    p.produce(items(10000)).await.expect("p");
    let mut n = 0;
    while n < 10000 {
        n += p
            .lease(1000, T0.add(Duration::from_secs(1)))
            .await
            .expect("l")
            .len();
    }
    let t = Instant::now();
    let mut calls = 0;
    let mut moved = 0;
    loop {
        let o = p
            .lifecycle(T0.add(Duration::from_secs(2)), LifecyclePolicy::default(), 1000)
            .await
            .expect("lc");
        calls += 1;
        moved += o.lease_expired;
        if !o.more {
            break;
        }
    }
    println!(
        "lifecycle: {moved} expired leases in {calls} calls of limit 1000: {:?} ({:?} per call)",
        t.elapsed(),
        t.elapsed() / calls
    );
    let t = Instant::now();
    for _ in 0..100 {
        p.next_deadline().await.expect("nd");
    }
    println!("next_deadline: {:?}/call", t.elapsed() / 100);
    let t = Instant::now();
    for _ in 0..100 {
        p.counts().await.expect("c");
    }
    println!("counts (10k ready): {:?}/call", t.elapsed() / 100);
    let t = Instant::now();
    for _ in 0..20 {
        p.stats(T0).await.expect("s");
    }
    println!("stats (10k ready): {:?}/call", t.elapsed() / 20);
    store.destroy(&q, 0).await.expect("d");
}
