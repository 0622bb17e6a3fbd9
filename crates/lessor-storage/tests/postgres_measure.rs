//! Call costs of the postgres backend, for the numbers quoted in reviews; not a pass/fail test.
//!
//! `cargo test --release -p lessor-storage --features postgres --test postgres_measure -- --ignored --nocapture`
//! with `LESSOR_TEST_DATABASE_URL` set. Prints items per second and time per call for produce, lease, complete and
//! retry at several batch sizes, one lifecycle pass over many expired leases, and the index-head queries. Batch sizes
//! grow 1 -> 1000 -> 4000 so a cost that is not linear in the batch shows. `measure_issue10_costs`: produce with a
//! dedup key on every item against plain produce, lease+complete with mixed priorities at 1,000 and 1,000,000 items
//! queued, lease extension, and the upgrade of a table made before priorities.
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Items with priorities 0..=9 mixed, optionally each with a distinct dedup key `tag-<i>`.
fn mixed(n: usize, tag: Option<&str>) -> Vec<NewItem> {
    let mut v = items(n);
    for (i, it) in v.iter_mut().enumerate() {
        it.priority = u8::try_from(i * 7 % 10).unwrap_or(0);
        if let Some(tag) = tag {
            it.dedup_id = format!("{tag}-{i}");
            it.dedup_until = T0.add(MINUTE * 5);
        }
    }
    v
}

/// Produce with a dedup key on every item against plain produce, in batches of 100 and of 1: `rounds` rounds of each,
/// alternating plain and keyed on fresh partitions so that drift of the machine hits both; prints the medians.
async fn dedup_produce_rates(store: &PgStore, rounds: usize) {
    for batch in [100usize, 1] {
        let calls = if batch == 1 { 1000 } else { 100 };
        let (mut plain, mut keyed) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for with_key in [false, true] {
                let q = unique_queue("measure-dedup");
                let p = store.open(&q, 0).await.expect("open");
                p.produce(mixed(batch, Some("warm"))).await.expect("warm up");
                let t = Instant::now();
                for c in 0..calls {
                    let tag = format!("r{round}-c{c}");
                    p.produce(mixed(batch, with_key.then_some(tag.as_str())))
                        .await
                        .expect("produce");
                }
                let r = (batch * calls) as f64 / t.elapsed().as_secs_f64();
                if with_key {
                    keyed.push(r)
                } else {
                    plain.push(r)
                }
                store.destroy(&q, 0).await.expect("destroy");
            }
        }
        let (plain_all, keyed_all) = (plain.clone(), keyed.clone());
        let (p, k) = (median(plain), median(keyed));
        println!(
            "produce batch {batch:3}: plain {p:8.0} items/s, every item keyed {k:8.0} items/s: keyed/plain {:.2}",
            k / p
        );
        println!("  rounds: plain {plain_all:.0?}, keyed {keyed_all:.0?}");
    }
}

/// Only the dedup part of [`measure_issue10_costs`], with `LESSOR_MEASURE_ROUNDS` rounds (default 5): for comparing
/// builds run alternately.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_dedup_produce() {
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    let store = PgStore::new(&PgConfig::new(url)).expect("store");
    let rounds = std::env::var("LESSOR_MEASURE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    dedup_produce_rates(&store, rounds).await;
}

/// Issue 10 costs: produce with and without a dedup key on every item, lease+complete with mixed priorities at
/// 1,000 and 1,000,000 items queued, lease extension, and the upgrade of a table of the layout before priorities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_issue10_costs() {
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    let store = PgStore::new(&PgConfig::new(url.clone())).expect("store");
    let client = lessor_testkit::connect(&url).await;

    dedup_produce_rates(&store, 5).await;

    // Lease + complete (and produce) at depth, priorities mixed; the depths are filled by SQL, then phases alternate
    // between the shallow and the deep queue, so that load from elsewhere on the machine hits both alike.
    let depths = [1_000usize, 1_000_000];
    let mut queues = Vec::new();
    for depth in depths {
        let q = unique_queue("measure-depth");
        let p = store.open(&q, 0).await.expect("open");
        let t = lessor_storage::postgres::table_name(&q, 0);
        let fill = Instant::now();
        client
            .batch_execute(&format!(
                "SET synchronous_commit = on;
                 INSERT INTO {t} (expire_deadline, created_at, payload, payload_len, priority)
                 SELECT {exp}, {t0}, convert_to(repeat('x', 100), 'UTF8'), 100, (g * 7) % 10
                 FROM generate_series(1, {depth}) g;
                 RESET synchronous_commit",
                exp = T0.add(MINUTE * 60).0,
                t0 = T0.0,
            ))
            .await
            .expect("fill");
        client
            .batch_execute(&format!("VACUUM ANALYZE {t}"))
            .await
            .expect("vacuum");
        println!("depth {depth:8}: filled in {:?}", fill.elapsed());
        queues.push((q, p));
    }
    let mut prod = vec![Vec::new(); depths.len()];
    let mut drain = vec![Vec::new(); depths.len()];
    for _phase in 0..7 {
        for (k, (_, p)) in queues.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..20 {
                p.produce(mixed(100, None)).await.expect("produce");
            }
            prod[k].push(2000.0 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..20 {
                let l = p.lease(100, T0.add(MINUTE)).await.expect("lease");
                assert_eq!(l.len(), 100);
                let r = p
                    .complete(vec![l.iter().map(|i| i.id).collect()])
                    .await
                    .expect("complete");
                assert!(r[0].is_ok());
            }
            drain[k].push(2000.0 / t.elapsed().as_secs_f64());
        }
    }
    let mut rates = Vec::new();
    for (k, depth) in depths.iter().enumerate() {
        let (pm, dm) = (median(prod[k].clone()), median(drain[k].clone()));
        println!(
            "depth {depth:8}: produce {pm:8.0} items/s, lease+complete {dm:8.0} items/s (phases: {:.0?} / {:.0?})",
            prod[k], drain[k]
        );
        rates.push((pm, dm));
    }
    println!(
        "deep / shallow: produce {:.2}, lease+complete {:.2}",
        rates[1].0 / rates[0].0,
        rates[1].1 / rates[0].1
    );
    for (depth, (q, p)) in depths.iter().zip(&queues) {
        // Extension of 100 held leases in one request.
        let l = p.lease(100, T0.add(MINUTE)).await.expect("lease");
        let ids: Vec<ItemId> = l.iter().map(|i| i.id).collect();
        let t = Instant::now();
        for k in 0..50u32 {
            let r = p
                .extend(vec![(ids.clone(), T0.add(MINUTE * (2 + k)))])
                .await
                .expect("extend");
            assert!(r[0].is_ok());
        }
        println!(
            "depth {depth:8}: extend of 100 leases: {}",
            per_call(t.elapsed(), 50)
        );
        store.destroy(q, 0).await.expect("destroy");
    }

    // Upgrade of a table of layout 1 (before priorities), on the open after the build that added them.
    for rows in [100_000usize, 1_000_000] {
        let q = unique_queue("measure-upgrade");
        store.open(&q, 0).await.expect("open");
        let t = lessor_storage::postgres::table_name(&q, 0);
        client
            .batch_execute(&format!(
                "SET synchronous_commit = on;
                 DROP TABLE {t};
                 CREATE SEQUENCE {t}_id_seq;
                 CREATE TABLE {t} (
                    id BIGINT PRIMARY KEY DEFAULT nextval('{t}_id_seq'), source_id TEXT,
                    is_leased BOOLEAN NOT NULL DEFAULT false, lease_deadline BIGINT NOT NULL DEFAULT 0,
                    expire_deadline BIGINT NOT NULL, enqueue_at BIGINT NOT NULL DEFAULT 0,
                    created_at BIGINT NOT NULL, attempts BIGINT NOT NULL DEFAULT 0,
                    max_attempts BIGINT NOT NULL DEFAULT 0, reference TEXT NOT NULL DEFAULT '',
                    encoding TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT '', payload BYTEA NOT NULL,
                    payload_len BIGINT NOT NULL DEFAULT 0, dead BOOLEAN NOT NULL DEFAULT false);
                 ALTER SEQUENCE {t}_id_seq OWNED BY {t}.id;
                 CREATE INDEX {t}_ready ON {t} (id) INCLUDE (created_at, payload_len)
                    WHERE NOT is_leased AND enqueue_at = 0 AND NOT dead;
                 INSERT INTO {t} (expire_deadline, created_at, payload, payload_len)
                    SELECT 1, 1, convert_to(repeat('x', 100), 'UTF8'), 100 FROM generate_series(1, {rows});
                 UPDATE lessor_partitions SET layout = 1 WHERE table_name = '{t}';
                 RESET synchronous_commit"
            ))
            .await
            .expect("layout 1 table");
        client
            .batch_execute(&format!("VACUUM ANALYZE {t}"))
            .await
            .expect("vacuum");
        let other = PgStore::new(&PgConfig::new(format!("{url}?application_name=upgrade"))).expect("store");
        let t0 = Instant::now();
        other.open(&q, 0).await.expect("upgrade");
        println!(
            "upgrade of a layout-1 table of {rows} ready items: {:?}",
            t0.elapsed()
        );
        store.destroy(&q, 0).await.expect("destroy");
    }
}
