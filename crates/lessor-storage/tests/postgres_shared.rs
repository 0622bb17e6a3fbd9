//! The postgres backend when several servers share one database: two independent stores (two pools, as two
//! processes would have) race on the same partition, and each item is leased, moved or completed exactly once.
//! Also: table naming, and stores that start while the database is down.
//!
//! The database tests need `LESSOR_TEST_DATABASE_URL` (see `scripts/pg-test-cluster.sh`) and are skipped without it
//! (failed when `CI` is set); the down-database tests need no database.
#![cfg(feature = "postgres")]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lessor_core::error::{ItemError, StorageErrorKind};
use lessor_core::storage::{LifecycleOutcome, LifecyclePolicy, Partition, PartitionStore, QueuesStore};
use lessor_core::time::Ts;
use lessor_core::types::{ItemId, NewItem};
use lessor_storage::postgres::{table_name, PgConfig, PgQueues, PgStore};
use lessor_storage::testsuite::{unique_queue, T0};

const SEC: Duration = Duration::from_secs(1);

/// The test database's URL with a per-call `application_name`, so each store gets its own pool (see
/// `conformance_postgres.rs`): two stores built from two such URLs behave like two servers.
fn unique_url(base: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "lessor-shared-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    if base.contains("://") {
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}application_name={name}")
    } else {
        format!("{base} application_name={name}")
    }
}

/// Two stores on separate pools, or `None` when no database is configured.
fn two_servers() -> Option<(Arc<PgStore>, Arc<PgStore>)> {
    let url = lessor_testkit::database_or_skip()?;
    let a = PgStore::new(&PgConfig::new(unique_url(&url)).with_max_conns(8)).expect("store a");
    let b = PgStore::new(&PgConfig::new(unique_url(&url)).with_max_conns(8)).expect("store b");
    Some((Arc::new(a), Arc::new(b)))
}

fn items(n: usize, tag: &str) -> Vec<NewItem> {
    (0..n)
        .map(|i| NewItem {
            expire_deadline: T0.add(SEC * 3600),
            created_at: T0,
            payload: Bytes::from(format!("{tag}-{i}")),
            ..Default::default()
        })
        .collect()
}

async fn produce(p: &Arc<dyn Partition>, n: usize) {
    for chunk in 0..n.div_ceil(500) {
        let k = (n - chunk * 500).min(500);
        p.produce(items(k, &format!("c{chunk}"))).await.expect("produce");
    }
}

/// Opens one handle per worker, alternating between the two stores.
async fn handles(a: &Arc<PgStore>, b: &Arc<PgStore>, queue: &str, n: usize) -> Vec<Arc<dyn Partition>> {
    let mut out = Vec::new();
    for i in 0..n {
        let store = if i % 2 == 0 { a } else { b };
        out.push(store.open(queue, 0).await.expect("open"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_leases_from_two_servers_never_share_an_item() {
    let Some((a, b)) = two_servers() else { return };
    let q = unique_queue("pg-lease-race");
    let workers = handles(&a, &b, &q, 8).await;
    produce(&workers[0], 2000).await;
    let mut tasks = Vec::new();
    for p in &workers {
        let p = Arc::clone(p);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let l = p.lease(37, T0.add(SEC * 600)).await.expect("lease");
                if l.is_empty() {
                    return got;
                }
                got.extend(l.into_iter().map(|i| (i.id, i.payload, i.attempts)));
            }
        }));
    }
    let mut all = Vec::new();
    let mut busy = 0;
    for t in tasks {
        let got = t.await.expect("join");
        busy += usize::from(!got.is_empty());
        all.extend(got);
    }
    assert_eq!(all.len(), 2000, "every item leased once");
    let ids: HashSet<ItemId> = all.iter().map(|x| x.0).collect();
    let payloads: HashSet<&Bytes> = all.iter().map(|x| &x.1).collect();
    assert_eq!(ids.len(), 2000, "no id leased twice");
    assert_eq!(payloads.len(), 2000, "no item leased twice");
    assert!(all.iter().all(|x| x.2 == 1), "each lease counted one attempt");
    assert!(busy >= 2, "the leasers overlapped ({busy} got items)");
    let c = workers[1].counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 2000));
    a.destroy(&q, 0).await.expect("destroy");
}

/// Runs lifecycle passes from every handle at once until none has anything left; returns the summed outcome.
async fn race_lifecycle(
    workers: &[Arc<dyn Partition>],
    now: Ts,
    policy: LifecyclePolicy,
) -> LifecycleOutcome {
    let mut tasks = Vec::new();
    for p in workers {
        let p = Arc::clone(p);
        tasks.push(tokio::spawn(async move {
            let mut sum = LifecycleOutcome::default();
            loop {
                let o = p.lifecycle(now, policy, 25).await.expect("lifecycle");
                sum.lease_expired += o.lease_expired;
                sum.enqueued += o.enqueued;
                sum.dead += o.dead;
                if o.lease_expired + o.enqueued + o.dead == 0 {
                    return sum;
                }
            }
        }));
    }
    let mut sum = LifecycleOutcome::default();
    for t in tasks {
        let o = t.await.expect("join");
        sum.lease_expired += o.lease_expired;
        sum.enqueued += o.enqueued;
        sum.dead += o.dead;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_lifecycles_apply_each_action_exactly_once() {
    let Some((a, b)) = two_servers() else { return };
    let q = unique_queue("pg-lifecycle-race");
    let workers = handles(&a, &b, &q, 6).await;
    let n = 1000;
    produce(&workers[0], n).await;
    let unlimited = LifecyclePolicy::default();

    // Round 1: every lease expires; each item must be requeued once (attempts stay 1, one new id each).
    assert_eq!(workers[0].lease(n, T0.add(SEC)).await.expect("lease").len(), n);
    let o = race_lifecycle(&workers, T0.add(SEC), unlimited).await;
    assert_eq!((o.lease_expired, o.dead), (n as u64, 0));
    let c = workers[1].counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (n as u64, 0));

    // Round 2: lease again (attempts 2), expire with max_attempts 2 and a dead-letter queue: all die once.
    let l = workers[2].lease(n, T0.add(SEC * 2)).await.expect("lease");
    assert_eq!(l.len(), n);
    assert!(
        l.iter().all(|i| i.attempts == 2),
        "each item was requeued exactly once"
    );
    let policy = LifecyclePolicy {
        max_attempts: 2,
        has_dead_queue: true,
        ..Default::default()
    };
    let o = race_lifecycle(&workers, T0.add(SEC * 2), policy).await;
    assert_eq!((o.lease_expired, o.dead), (0, n as u64));
    assert_eq!(workers[3].dead_items(2 * n).await.expect("dead").len(), n);
    let dead: Vec<ItemId> = workers[3]
        .dead_items(2 * n)
        .await
        .expect("dead")
        .iter()
        .map(|i| i.id)
        .collect();
    workers[3].remove_dead(dead).await.expect("remove dead");

    // Round 3: scheduled items come due once each, in schedule order.
    let mut batch = items(n, "sched");
    for (i, it) in batch.iter_mut().enumerate() {
        it.enqueue_at = T0.add(SEC * (10 + (i as u32 % 7)));
    }
    workers[0].produce(batch).await.expect("produce");
    let o = race_lifecycle(&workers, T0.add(SEC * 20), unlimited).await;
    assert_eq!(o.enqueued, n as u64);
    let c = workers[4].counts().await.expect("counts");
    assert_eq!((c.ready, c.scheduled), (n as u64, 0));

    // Round 4: expire deadlines pass: every item dies once (deleted: no dead-letter queue).
    let o = race_lifecycle(&workers, T0.add(SEC * 7200), unlimited).await;
    assert_eq!(o.dead, n as u64);
    let c = workers[5].counts().await.expect("counts");
    assert_eq!((c.ready, c.leased, c.scheduled), (0, 0, 0));
    assert_eq!(workers[5].next_deadline().await.expect("deadline"), None);
    b.destroy(&q, 0).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_completes_succeed_once_per_item() {
    let Some((a, b)) = two_servers() else { return };
    let q = unique_queue("pg-complete-race");
    let workers = handles(&a, &b, &q, 4).await;
    produce(&workers[0], 400).await;
    let leased: Vec<ItemId> = workers[0]
        .lease(400, T0.add(SEC * 600))
        .await
        .expect("lease")
        .iter()
        .map(|i| i.id)
        .collect();
    let mut tasks = Vec::new();
    for (w, p) in workers.iter().cloned().enumerate() {
        // Each worker completes every id, in its own order and batching, so most requests lose a race.
        let mut ids = leased.clone();
        ids.rotate_left(w * 97);
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for chunk in ids.chunks(20) {
                let reqs: Vec<Vec<ItemId>> = chunk.iter().map(|id| vec![*id]).collect();
                let res = p.complete(reqs).await.expect("complete");
                for (id, r) in chunk.iter().zip(res) {
                    match r {
                        Ok(()) => won.push(*id),
                        Err(ItemError::NotFound(_)) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            }
            won
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.expect("join"));
    }
    let distinct: HashSet<ItemId> = won.iter().copied().collect();
    assert_eq!(won.len(), 400, "each id completed exactly once");
    assert_eq!(distinct.len(), 400);
    let c = workers[1].counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (0, 0));
    a.destroy(&q, 0).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_named_by_queue_hash_and_partition() {
    assert_eq!(table_name("hello", 0), "items_5d41402abc4b_000000");
    assert_eq!(table_name("hello", 1), "items_5d41402abc4b_000001");
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let exists = |t: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&t])
                .await
                .expect("query");
            row.get::<_, bool>(0)
        }
    };
    let store = PgStore::new(&PgConfig::new(unique_url(&url))).expect("store");
    // Another run may have left it: start from nothing.
    store.destroy("hello", 0).await.expect("destroy");
    assert!(!exists("items_5d41402abc4b_000000").await);
    let p = store.open("hello", 0).await.expect("open");
    assert!(exists("items_5d41402abc4b_000000").await);
    assert!(exists("items_5d41402abc4b_000000_id_seq").await);
    let ids = p.produce(items(2, "hello")).await.expect("produce");
    let first_id: i64 = client
        .query_one("SELECT min(id) FROM items_5d41402abc4b_000000", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(ItemId(u64::try_from(first_id).expect("positive")), ids[0]);
    let owner: String = client
        .query_one(
            "SELECT queue FROM lessor_partitions WHERE table_name = 'items_5d41402abc4b_000000'",
            &[],
        )
        .await
        .expect("registered")
        .get(0);
    assert_eq!(owner, "hello");
    store.destroy("hello", 0).await.expect("destroy");
    assert!(!exists("items_5d41402abc4b_000000").await);
    assert!(!exists("items_5d41402abc4b_000000_id_seq").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_start_with_the_database_down_and_report_unavailable() {
    // Port 1 on localhost refuses connections at once.
    let cfg = PgConfig::new("postgres://lessor@127.0.0.1:1/lessor?connect_timeout=2");
    let store = PgStore::new(&cfg).expect("building a store never connects");
    let queues = PgQueues::new(&cfg).expect("building a store never connects");
    assert!(store.shared(), "other servers may change the tables");
    let e = store.open("q", 0).await.expect_err("no database");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = store.destroy("q", 0).await.expect_err("no database");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = queues.get("q").await.expect_err("no database");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = queues.ping().await.expect_err("no database");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    store.close().await;
    queues.close().await;

    let e = PgStore::new(&PgConfig::new("postgres://host:notaport/db")).expect_err("bad string");
    assert_eq!(e.kind, StorageErrorKind::Config, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_from_a_newer_build_is_refused() {
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    // A private PostgreSQL schema (through search_path), so the shared tables of the other tests stay untouched.
    let schema = format!("lessor_newer_{}", std::process::id());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
             CREATE TABLE {schema}.lessor_schema (singleton BOOLEAN PRIMARY KEY, version INTEGER NOT NULL);
             INSERT INTO {schema}.lessor_schema VALUES (true, 999);"
        ))
        .await
        .expect("newer schema");
    let sep = if url.contains('?') { '&' } else { '?' };
    let cfg = PgConfig::new(unique_url(&format!("{url}{sep}options=-csearch_path%3D{schema}")));
    let queues = PgQueues::new(&cfg).expect("queues");
    let e = queues.get("q").await.expect_err("newer schema");
    assert_eq!(e.kind, StorageErrorKind::Corrupt, "{e}");
    let store = PgStore::new(&cfg).expect("store");
    let e = store.open("q", 0).await.expect_err("newer schema");
    assert_eq!(e.kind, StorageErrorKind::Corrupt, "{e}");

    // The same schema at the current version works, and the tables land in it.
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema}"))
        .await
        .expect("fresh schema");
    let cfg = PgConfig::new(unique_url(&format!("{url}{sep}options=-csearch_path%3D{schema}")));
    let store = PgStore::new(&cfg).expect("store");
    let p = store.open("q", 0).await.expect("open");
    p.produce(items(1, "s")).await.expect("produce");
    let n: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.{}", table_name("q", 0)),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    let v: i32 = client
        .query_one(&format!("SELECT version FROM {schema}.lessor_schema"), &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(v, lessor_storage::postgres::SCHEMA_VERSION);
    store.close().await;
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_schema_migrates_and_gains_the_auth_store() {
    use lessor_core::auth::Commit;

    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_migrate").await;
    // What a build before the auth store left behind: migration 1 and a queue.
    lessor_testkit::execute(
        db.url(),
        "CREATE TABLE lessor_schema (singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
                                     version INTEGER NOT NULL);
         INSERT INTO lessor_schema VALUES (true, 1);
         CREATE TABLE queues (
             name TEXT COLLATE \"C\" PRIMARY KEY, namespace TEXT NOT NULL DEFAULT '',
             created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, dead_queue TEXT NOT NULL DEFAULT '',
             reference TEXT NOT NULL DEFAULT '', lease_timeout_ns BIGINT NOT NULL,
             expire_timeout_ns BIGINT NOT NULL, max_attempts BIGINT NOT NULL DEFAULT 0,
             requested_partitions BIGINT NOT NULL DEFAULT 0, partition_info JSONB NOT NULL DEFAULT '[]'::jsonb);
         CREATE TABLE lessor_partitions (table_name TEXT PRIMARY KEY, queue TEXT NOT NULL,
                                         partition BIGINT NOT NULL, created_at BIGINT NOT NULL);
         INSERT INTO queues (name, created_at, updated_at, lease_timeout_ns, expire_timeout_ns)
             VALUES ('old', 1, 1, 60000000000, 3600000000000);",
    )
    .await
    .expect("a version 1 schema");
    let queues = PgQueues::new(&PgConfig::new(unique_url(db.url()))).expect("queues");
    let auth = queues.auth();
    assert_eq!(
        auth.generation().await.expect("generation"),
        0,
        "an empty auth store"
    );
    assert!(auth.scan(b"", b"", 10).await.expect("scan").is_empty());
    let mut c = Commit::default();
    c.absent(b"k".to_vec()).put(b"k".to_vec(), b"v".to_vec());
    auth.commit(c).await.expect("commit").expect("absent");
    assert_eq!(auth.generation().await.expect("generation"), 1);
    assert!(
        queues.get("old").await.expect("get").is_some(),
        "queue definitions are kept"
    );
    let client = lessor_testkit::connect(db.url()).await;
    let v: i32 = client
        .query_one("SELECT version FROM lessor_schema", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(v, lessor_storage::postgres::SCHEMA_VERSION);
    assert_eq!(v, 3);
    drop(client);
    queues.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_store_reports_an_unreachable_database_as_unavailable() {
    let cfg = PgConfig::new("postgres://lessor@127.0.0.1:1/lessor?connect_timeout=2");
    let queues = PgQueues::new(&cfg).expect("building a store never connects");
    let auth = queues.auth();
    let e = auth.get(b"k").await.expect_err("no database");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    assert!(e.is_transient());
    let e = auth.generation().await.expect_err("no database");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    let e = auth
        .commit(lessor_core::auth::Commit::default())
        .await
        .expect_err("no database");
    assert_eq!(e.kind, StorageErrorKind::Unavailable, "{e}");
    // A closed queue store closes its auth store too.
    queues.close().await;
    assert!(auth.scan(b"", b"", 1).await.is_err());
}
