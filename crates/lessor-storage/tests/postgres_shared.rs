//! The postgres backend when several servers share one database: two independent stores (two pools, as two
//! processes would have) race on the same partition, and each item is leased, moved or completed exactly once.
//! Issue 10: keyed produce racing into different partitions stores each key once, a lease extension is fenced by
//! another server's lifecycle, concurrent leases serve priorities in order, and tables of the layout before
//! priorities are upgraded once when several servers open them. Also: table naming, and stores that start while
//! the database is down.
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
use lessor_core::storage::{RetryAction, RetryOp};
use lessor_core::time::Ts;
use lessor_core::types::{Backoff, Item, ItemId, NewItem};
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
    store.create("hello", &[0]).await.expect("create");
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
    assert_eq!(v, 7);
    drop(client);
    queues.close().await;
}

/// A version-4 database (dedup records keyed by text, in `lessor_dedup`) migrates to the hashed records of version 5
/// and keeps them: a key whose record is live is still a duplicate, acknowledged with the stored item's id; an
/// expired record is replaced; the old table is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_4_dedup_records_keep_working_after_the_upgrade() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_dedup_upgrade").await;
    let min = 60_000_000_000i64;
    lessor_testkit::execute(
        db.url(),
        &format!(
            "CREATE TABLE lessor_schema (singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
                                         version INTEGER NOT NULL);
             INSERT INTO lessor_schema VALUES (true, 4);
             {ddl}
             INSERT INTO lessor_dedup (queue, dedup_id, item_id, partition, created_at, until) VALUES
                 ('q', 'k-live', 4242, 0, {t0}, {live}),
                 ('q', 'k-expired', 4343, 0, {old}, {t0}),
                 ('other', 'k-live', 4444, 0, {t0}, {live});",
            ddl = lessor_storage::postgres::migrations_up_to(4),
            t0 = T0.0,
            live = T0.0 + 5 * min,
            old = T0.0 - 5 * min,
        ),
    )
    .await
    .expect("a version 4 schema with dedup records");
    let store = PgStore::new(&PgConfig::new(unique_url(db.url()))).expect("store");
    let p = store.open("q", 0).await.expect("open");
    let keyed: Vec<NewItem> = ["k-live", "k-expired", "k-new"]
        .iter()
        .map(|k| NewItem {
            dedup_id: (*k).to_string(),
            dedup_until: T0.add(Duration::from_secs(300)),
            ..items(1, k).remove(0)
        })
        .collect();
    let ids = p.produce(keyed.clone()).await.expect("produce");
    assert_eq!(ids[0], ItemId(4242), "the live record's item");
    assert!(ids[1] != ItemId(4343) && ids[2] != ids[1]);
    let stored: Vec<ItemId> = p
        .list(None, 10, false)
        .await
        .expect("list")
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(stored, vec![ids[1], ids[2]], "the duplicate was not stored");
    // Repeated: all three are duplicates now.
    assert_eq!(p.produce(keyed).await.expect("again"), ids);
    let client = lessor_testkit::connect(db.url()).await;
    let old: Option<String> = client
        .query_one("SELECT to_regclass('lessor_dedup')::text", &[])
        .await
        .expect("regclass")
        .get(0);
    assert_eq!(old, None, "the version-3 table is dropped");
    let n: i64 = client
        .query_one("SELECT count(*) FROM lessor_dedup_keys", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        n, 4,
        "three records of q (one replaced, one new) and the other queue's"
    );
    // The other queue's record was moved under its own queue: it is a duplicate there, not in q.
    let other = store.open("other", 0).await.expect("open other");
    let again = NewItem {
        dedup_id: "k-live".to_string(),
        dedup_until: T0.add(Duration::from_secs(300)),
        ..items(1, "o").remove(0)
    };
    assert_eq!(
        other.produce(vec![again]).await.expect("produce other"),
        vec![ItemId(4444)]
    );
    drop(client);
    store.close().await;
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

/// Many keyed produces race: four handles (two per server) produce the same keys into four different partitions of
/// one queue, in different orders and batchings, so most keys are claimed concurrently. Each key is stored exactly
/// once, every producer is told the one stored id, and the queue's records go with its last partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_produces_racing_into_different_partitions_store_each_key_once() {
    let Some((a, b)) = two_servers() else { return };
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    let q = unique_queue("pg-dedup-race");
    let parts = 4u32;
    let mut workers = Vec::new();
    for i in 0..parts {
        let store = if i % 2 == 0 { &a } else { &b };
        workers.push(store.open(&q, i).await.expect("open"));
    }
    let keys = 300usize;
    let until = T0.add(SEC * 300);
    let mut tasks = Vec::new();
    for (w, p) in workers.iter().cloned().enumerate() {
        let mut order: Vec<usize> = (0..keys).collect();
        order.rotate_left(w * 37);
        if w % 2 == 1 {
            order.reverse();
        }
        tasks.push(tokio::spawn(async move {
            let mut got = vec![ItemId(0); keys];
            for chunk in order.chunks(7 + w * 6) {
                let batch = chunk
                    .iter()
                    .map(|&k| NewItem {
                        expire_deadline: T0.add(SEC * 3600),
                        created_at: T0,
                        payload: Bytes::from(format!("w{w}-k{k}")),
                        dedup_id: format!("key-{k}"),
                        dedup_until: until,
                        ..Default::default()
                    })
                    .collect();
                let ids = p.produce(batch).await.expect("produce");
                for (&k, id) in chunk.iter().zip(ids) {
                    got[k] = id;
                }
            }
            got
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("join"));
    }
    let mut stored: Vec<(ItemId, String, u32)> = Vec::new();
    for (i, p) in workers.iter().enumerate() {
        for it in p.list(None, 10 * keys, false).await.expect("list") {
            stored.push((it.id, String::from_utf8_lossy(&it.payload).into_owned(), i as u32));
        }
    }
    assert_eq!(stored.len(), keys, "each key stored once across the partitions");
    let by_key: std::collections::HashMap<usize, ItemId> = stored
        .iter()
        .map(|(id, payload, _)| {
            let k: usize = payload
                .split("-k")
                .nth(1)
                .and_then(|k| k.parse().ok())
                .expect("payload");
            (k, *id)
        })
        .collect();
    assert_eq!(by_key.len(), keys, "no key stored twice");
    for (w, got) in answers.iter().enumerate() {
        for (k, id) in got.iter().enumerate() {
            assert_eq!(*id, by_key[&k], "producer {w} was told the stored id of key {k}");
        }
    }
    let spread: HashSet<u32> = stored.iter().map(|s| s.2).collect();
    assert!(
        spread.len() >= 2,
        "the race stored keys in several partitions: {spread:?}"
    );
    // One record per key, naming the partition that holds its item.
    let client = lessor_testkit::connect(&url).await;
    // Records are stored under a keyed hash of the queue name (the queue's id) and of the key: the queue's id is
    // found through the items stored.
    let stored_ids: Vec<i64> = stored.iter().map(|s| s.0 .0 as i64).collect();
    let queue_ids: Vec<i64> = client
        .query(
            "SELECT DISTINCT queue_id FROM lessor_dedup_keys WHERE item_id = ANY($1)",
            &[&stored_ids],
        )
        .await
        .expect("queue id")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(queue_ids.len(), 1, "one queue id: {queue_ids:?}");
    let rows = client
        .query(
            "SELECT h1, item_id, partition FROM lessor_dedup_keys WHERE queue_id = $1",
            &[&queue_ids[0]],
        )
        .await
        .expect("records");
    assert_eq!(rows.len(), keys);
    let home: std::collections::HashMap<ItemId, u32> = stored.iter().map(|s| (s.0, s.2)).collect();
    for r in &rows {
        let id = ItemId(u64::try_from(r.get::<_, i64>(1)).expect("id"));
        assert_eq!(
            Some(&u32::try_from(r.get::<_, i64>(2)).expect("partition")),
            home.get(&id)
        );
    }
    let partitions: Vec<u32> = (0..parts).collect();
    b.destroy_many(&q, &partitions[..2]).await.expect("destroy");
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM lessor_dedup_keys WHERE queue_id = $1",
            &[&queue_ids[0]],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        left, keys as i64,
        "records stay while partitions of the queue remain"
    );
    a.destroy_many(&q, &partitions[2..]).await.expect("destroy");
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM lessor_dedup_keys WHERE queue_id = $1",
            &[&queue_ids[0]],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "the queue's records went with its last partition");
}

/// A worker on one server holds leases that another server's lifecycle moves: its extensions of the moved ids
/// fail (the item went back to the tail with a new id, or into the backoff schedule under its id) and change
/// nothing, while the leases it still holds extend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extension_is_fenced_after_another_servers_lifecycle_moved_the_item() {
    let Some((a, b)) = two_servers() else { return };
    let q = unique_queue("pg-extend-fence");
    let worker = a.open(&q, 0).await.expect("open");
    let other = b.open(&q, 0).await.expect("open");
    produce(&worker, 3).await;
    let l = worker.lease(3, T0.add(SEC * 10)).await.expect("lease");
    let o = other
        .lifecycle(T0.add(SEC * 10), LifecyclePolicy::default(), 100)
        .await
        .expect("lifecycle");
    assert_eq!(o.lease_expired, 3);
    let r = worker
        .extend(vec![
            (vec![l[0].id], T0.add(SEC * 60)),
            (vec![l[1].id, l[2].id], T0.add(SEC * 60)),
        ])
        .await
        .expect("extend");
    assert_eq!(
        r,
        vec![
            Err(ItemError::NotFound(l[0].id.to_string())),
            Err(ItemError::NotFound(l[1].id.to_string()))
        ]
    );
    let c = other.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (3, 0), "a fenced extension leases nothing");

    // Under a backoff policy the moved items keep their ids in the schedule: still fenced.
    let backoff = LifecyclePolicy {
        backoff: Backoff {
            base: SEC * 30,
            factor: 2.0,
            max: SEC * 300,
            jitter: 0.0,
        },
        ..Default::default()
    };
    let l = worker.lease(3, T0.add(SEC * 20)).await.expect("lease");
    assert_eq!(
        worker
            .extend(vec![(vec![l[0].id], T0.add(SEC * 100))])
            .await
            .expect("extend"),
        vec![Ok(())]
    );
    let o = other
        .lifecycle(T0.add(SEC * 50), backoff, 100)
        .await
        .expect("lifecycle");
    assert_eq!((o.lease_expired, o.enqueued), (2, 0));
    let sched: Vec<ItemId> = other
        .list(None, 10, true)
        .await
        .expect("list")
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(sched, vec![l[1].id, l[2].id], "backed-off items keep their ids");
    let r = worker
        .extend(vec![
            (vec![l[1].id], T0.add(SEC * 200)),
            (vec![l[0].id, l[2].id], T0.add(SEC * 200)),
        ])
        .await
        .expect("extend");
    assert_eq!(
        r,
        vec![
            Err(ItemError::NotFound(l[1].id.to_string())),
            Err(ItemError::NotFound(l[2].id.to_string()))
        ]
    );
    let held = other.list(None, 10, false).await.expect("list");
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].id, held[0].lease_deadline),
        (l[0].id, T0.add(SEC * 100)),
        "the failed request did not touch the lease it also named"
    );
    assert_eq!(
        worker.complete(vec![vec![l[0].id]]).await.expect("complete"),
        vec![Ok(())]
    );
    a.destroy(&q, 0).await.expect("destroy");
}

/// Extensions from one server race lifecycle passes from the other over 500 expired leases: every request of ten
/// ids is applied whole (its items stay leased) or fails whole (its items go back to the tail), never in part.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extensions_racing_a_lifecycle_are_all_or_nothing() {
    let Some((a, b)) = two_servers() else { return };
    let q = unique_queue("pg-extend-race");
    let extenders = handles(&a, &a, &q, 3).await;
    let movers = handles(&b, &b, &q, 3).await;
    let n = 500;
    produce(&extenders[0], n).await;
    let l = extenders[0].lease(n, T0.add(SEC * 10)).await.expect("lease");
    let mut ids: Vec<ItemId> = l.iter().map(|i| i.id).collect();
    ids.reverse();
    let chunks: Vec<Vec<ItemId>> = ids.chunks(10).map(<[ItemId]>::to_vec).collect();
    let mut tasks = Vec::new();
    for (i, p) in extenders.iter().cloned().enumerate() {
        let mine: Vec<Vec<ItemId>> = chunks.iter().skip(i).step_by(extenders.len()).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let mut kept = 0usize;
            for pair in mine.chunks(2) {
                let reqs = pair.iter().map(|c| (c.clone(), T0.add(SEC * 100))).collect();
                for r in p.extend(reqs).await.expect("extend") {
                    match r {
                        Ok(()) => kept += 10,
                        Err(ItemError::NotFound(_)) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            }
            kept
        }));
    }
    let moved = race_lifecycle(&movers, T0.add(SEC * 10), LifecyclePolicy::default()).await;
    let mut kept = 0;
    for t in tasks {
        kept += t.await.expect("join");
    }
    // Leases a failed request left behind expire in a last pass.
    let rest = race_lifecycle(&movers, T0.add(SEC * 10), LifecyclePolicy::default()).await;
    let c = movers[0].counts().await.expect("counts");
    eprintln!(
        "extensions racing a lifecycle: {kept} of {n} leases kept, {} moved during the race",
        moved.lease_expired
    );
    assert_eq!(
        c.leased as usize, kept,
        "exactly the items of successful requests are held"
    );
    assert_eq!(c.ready as usize, n - kept);
    assert_eq!((moved.lease_expired + rest.lease_expired) as usize, n - kept);
    let held = movers[1].list(None, n, false).await.expect("list");
    assert!(held
        .iter()
        .filter(|i| i.is_leased)
        .all(|i| i.lease_deadline == T0.add(SEC * 100)));
    b.destroy(&q, 0).await.expect("destroy");
}

/// Leasers on two servers drain a partition of mixed priorities at once: each batch comes highest priority first
/// and in id order within one, no leaser ever gets a higher priority than it had already passed (anything higher
/// went to another leaser), and every item is leased once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_leases_serve_priorities_in_order() {
    let Some((a, b)) = two_servers() else { return };
    let q = unique_queue("pg-prio-race");
    let workers = handles(&a, &b, &q, 4).await;
    let n = 1200;
    for chunk in 0..n / 400 {
        let batch: Vec<NewItem> = (0..400)
            .map(|i| NewItem {
                priority: u8::try_from((chunk * 400 + i) * 7 % 10).expect("priority"),
                ..items(1, &format!("c{chunk}-{i}")).remove(0)
            })
            .collect();
        workers[0].produce(batch).await.expect("produce");
    }
    let mut tasks = Vec::new();
    for p in &workers {
        let p = Arc::clone(p);
        tasks.push(tokio::spawn(async move {
            let mut batches: Vec<Vec<Item>> = Vec::new();
            loop {
                let l = p.lease(29, T0.add(SEC * 600)).await.expect("lease");
                if l.is_empty() {
                    return batches;
                }
                batches.push(l);
            }
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        let batches = t.await.expect("join");
        let mut floor = u8::MAX;
        for batch in &batches {
            let order: Vec<(std::cmp::Reverse<u8>, ItemId)> = batch
                .iter()
                .map(|i| (std::cmp::Reverse(i.priority), i.id))
                .collect();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(
                order, sorted,
                "a batch is served highest priority first, then by id"
            );
            assert!(
                batch[0].priority <= floor,
                "a later batch never serves a higher priority"
            );
            floor = batch[batch.len() - 1].priority;
            for it in batch {
                assert!(seen.insert(it.id), "leased twice");
            }
        }
    }
    assert_eq!(seen.len(), n);
    a.destroy(&q, 0).await.expect("destroy");
}

/// The item table DDL of layout 1 (before priorities), as older builds created it.
fn layout_1_ddl(t: &str) -> String {
    format!(
        "CREATE SEQUENCE {t}_id_seq START WITH 1000;
         CREATE TABLE {t} (
            id BIGINT PRIMARY KEY DEFAULT nextval('{t}_id_seq'), source_id TEXT,
            is_leased BOOLEAN NOT NULL DEFAULT false, lease_deadline BIGINT NOT NULL DEFAULT 0,
            expire_deadline BIGINT NOT NULL, enqueue_at BIGINT NOT NULL DEFAULT 0, created_at BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0, max_attempts BIGINT NOT NULL DEFAULT 0,
            reference TEXT NOT NULL DEFAULT '', encoding TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT '',
            payload BYTEA NOT NULL, payload_len BIGINT NOT NULL DEFAULT 0, dead BOOLEAN NOT NULL DEFAULT false);
         ALTER SEQUENCE {t}_id_seq OWNED BY {t}.id;
         CREATE UNIQUE INDEX {t}_src ON {t} (source_id) WHERE source_id IS NOT NULL;
         CREATE INDEX {t}_ready ON {t} (id) INCLUDE (created_at, payload_len)
            WHERE NOT is_leased AND enqueue_at = 0 AND NOT dead;
         CREATE INDEX {t}_leased ON {t} (lease_deadline, id) INCLUDE (created_at, payload_len)
            WHERE is_leased AND NOT dead;
         CREATE INDEX {t}_sched ON {t} (enqueue_at, id) INCLUDE (payload_len) WHERE enqueue_at <> 0 AND NOT dead;
         CREATE INDEX {t}_expire ON {t} (expire_deadline, id) WHERE enqueue_at = 0 AND NOT dead;
         CREATE INDEX {t}_dead ON {t} (id) WHERE dead;"
    )
}

/// A partition table an older build made (no priority column, the id-ordered ready index, registered as layout 1)
/// is upgraded when servers next open it: eight opens from two servers at once all succeed, the upgrade runs once,
/// the items are kept (priority 0, FIFO) and new items are served by priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_layout_1_table_is_upgraded_once_by_concurrent_opens() {
    let Some((a, _)) = two_servers() else { return };
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    let q = unique_queue("pg-upgrade");
    let t = table_name(&q, 0);
    // Registers the partition (and migrates the shared tables), then swaps in a layout-1 table with 1000 items.
    a.open(&q, 0).await.expect("open");
    let client = lessor_testkit::connect(&url).await;
    client
        .batch_execute(&format!(
            "DROP TABLE {t}; {ddl}
             INSERT INTO {t} (expire_deadline, created_at, payload, payload_len)
                SELECT {exp}, {t0}, convert_to('old-' || g, 'UTF8'), 5 FROM generate_series(1, 1000) g;
             UPDATE lessor_partitions SET layout = 1 WHERE table_name = '{t}';",
            ddl = layout_1_ddl(&t),
            exp = T0.add(SEC * 3600).0,
            t0 = T0.0,
        ))
        .await
        .expect("layout 1 table");
    let (a2, b2) = two_servers().expect("stores");
    let started = std::time::Instant::now();
    let opens = (0..8).map(|i| {
        let store = if i % 2 == 0 {
            Arc::clone(&a2)
        } else {
            Arc::clone(&b2)
        };
        let q = q.clone();
        tokio::spawn(async move { store.open(&q, 0).await.map(|_| ()) })
    });
    for r in futures::future::join_all(opens).await {
        r.expect("join").expect("open during the upgrade");
    }
    eprintln!(
        "8 concurrent opens with the upgrade of 1000 items: {:?}",
        started.elapsed()
    );
    let indexes: Vec<String> = client
        .query(
            "SELECT indexname FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
            &[&t],
        )
        .await
        .expect("indexes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(indexes.contains(&format!("{t}_ready_p")), "{indexes:?}");
    assert!(
        !indexes.contains(&format!("{t}_ready")),
        "the old ready index is gone: {indexes:?}"
    );
    let layout: i32 = client
        .query_one(
            "SELECT layout FROM lessor_partitions WHERE table_name = $1",
            &[&t],
        )
        .await
        .expect("layout")
        .get(0);
    assert_eq!(layout, lessor_storage::postgres::PARTITION_LAYOUT);

    let p = b2.open(&q, 0).await.expect("open");
    let first = p.lease(3, T0.add(SEC * 60)).await.expect("lease");
    let payloads: Vec<&[u8]> = first.iter().map(|i| &i.payload[..]).collect();
    assert_eq!(payloads, vec![&b"old-1"[..], b"old-2", b"old-3"]);
    assert!(first.iter().all(|i| i.priority == 0));
    p.produce(vec![NewItem {
        priority: 4,
        ..items(1, "new").remove(0)
    }])
    .await
    .expect("produce");
    let next = p.lease(2, T0.add(SEC * 60)).await.expect("lease");
    assert_eq!((next[0].priority, &next[0].payload[..]), (4, &b"new-0"[..]));
    assert_eq!(&next[1].payload[..], b"old-4");
    let c = p.counts().await.expect("counts");
    assert_eq!((c.ready, c.leased), (996, 5));
    // Retries keep working on upgraded rows.
    let r = p
        .retry(
            vec![vec![RetryOp {
                id: next[1].id,
                action: RetryAction::Requeue,
            }]],
            LifecyclePolicy::default(),
        )
        .await
        .expect("retry");
    assert!(r[0].is_ok());
    a.destroy(&q, 0).await.expect("destroy");
}

/// A lease starts where the previous one of its partition stopped (so it skips the dead index entries earlier
/// leases left behind); an item that becomes ready below that position, as a lease rolled back on another server
/// leaves it, is still served: by the first lease that finds nothing from the position, which then reads the ready
/// index from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_ready_below_the_lease_position_is_still_served() {
    let Some(url) = lessor_testkit::database_or_skip() else {
        return;
    };
    let store = PgStore::new(&PgConfig::new(unique_url(&url))).expect("store");
    let q = unique_queue("pg-lease-hint");
    let p = store.open(&q, 0).await.expect("open");
    p.produce(items(3, "h")).await.expect("produce");
    let first = p.lease(2, T0.add(SEC * 600)).await.expect("lease");
    assert_eq!(first.len(), 2);
    // The first item goes back to ready with its id, below where the next lease starts.
    let client = lessor_testkit::connect(&url).await;
    let table = table_name(&q, 0);
    let low = i64::try_from(first[0].id.0).expect("id");
    let n = client
        .execute(
            &format!("UPDATE {table} SET is_leased = false, lease_deadline = 0 WHERE id = $1"),
            &[&low],
        )
        .await
        .expect("unlease");
    assert_eq!(n, 1);
    let second = p.lease(10, T0.add(SEC * 600)).await.expect("lease");
    let payloads = |v: &[Item]| v.iter().map(|i| i.payload.clone()).collect::<Vec<_>>();
    assert_eq!(
        payloads(&second),
        vec![Bytes::from("h-2")],
        "started after the last leased item"
    );
    let third = p.lease(10, T0.add(SEC * 600)).await.expect("lease");
    assert_eq!(
        payloads(&third),
        vec![Bytes::from("h-0")],
        "nothing after the position: read from the start"
    );
    assert!(p.lease(10, T0.add(SEC * 600)).await.expect("lease").is_empty());
    store.destroy(&q, 0).await.expect("destroy");
}

/// A keyed produce stamped (created_at) before its key's record ended, that reaches the database after
/// another server dropped that record as expired (its lifecycle or produce ran with a later `now`), is a duplicate
/// by the contract (`until` > the item's `created_at`) and must not be stored again: records are pruned only after a grace
/// period past their window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_produce_within_the_window_is_not_stored_after_a_prune() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let queue = unique_queue("pg-late-prune");
    let pa = a.open(&queue, 0).await.expect("open a");
    let pb = b.open(&queue, 1).await.expect("open b");
    let window = SEC * 60;
    let keyed = |tag: &str, at: Ts| NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: at,
        payload: Bytes::from(tag.to_string()),
        dedup_id: "k".into(),
        dedup_until: at.add(window),
        ..Default::default()
    };
    pb.produce(vec![keyed("first", T0)]).await.expect("first");
    // Server B's lifecycle pass runs at the instant the record ends, and drops it.
    pb.lifecycle(T0.add(window), LifecyclePolicy::default(), 100)
        .await
        .expect("lifecycle");
    // Server A stamped its produce 1 ms before the window ended; the statement reaches the database only now.
    let late = T0.add(window - Duration::from_millis(1));
    let ids = pa.produce(vec![keyed("late", late)]).await.expect("late");
    let stored_a = pa.list(None, 100, false).await.expect("list");
    assert!(
        stored_a.is_empty(),
        "a produce within the window was stored a second time: ids {ids:?}, items {:?}",
        stored_a
            .iter()
            .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
            .collect::<Vec<_>>()
    );
    a.destroy(&queue, 0).await.ok();
    b.destroy(&queue, 1).await.ok();
}

/// `produce_reporting` tells the engine which items a call stored: a key live in another server's record is
/// reported skipped, as is a key's second copy within one call; items without a key are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn produce_reports_which_items_were_skipped_as_duplicates() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let queue = unique_queue("pg-reporting");
    let pa = a.open(&queue, 0).await.expect("open a");
    let pb = b.open(&queue, 1).await.expect("open b");
    let item = |tag: &str, key: &str| NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        payload: Bytes::from(tag.to_string()),
        dedup_id: key.into(),
        dedup_until: T0.add(SEC * 60),
        ..Default::default()
    };
    let (_, stored) = pb
        .produce_reporting(vec![item("first", "k")])
        .await
        .expect("first");
    assert_eq!(stored, [true]);
    let (ids, stored) = pa
        .produce_reporting(vec![
            item("dup", "k"),
            item("new", "j"),
            item("again", "j"),
            item("plain", ""),
        ])
        .await
        .expect("second");
    assert_eq!(stored, [false, true, false, true], "ids {ids:?}");
    assert_eq!(ids[1], ids[2], "a repeated key takes its first copy's id");
    a.destroy(&queue, 0).await.ok();
    b.destroy(&queue, 1).await.ok();
}

/// A keyed item with a source id (a redrive copy: its key is derived from its source id) produced again while a
/// consumer's complete of the stored copy is committing: the statement's snapshot still sees the stored copy, so the
/// claim does not try its key, and the insert's own conflict check waits for the complete and then finds the source
/// id free. The key's record is live all along, so the item is a duplicate and must not be stored a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_copy_is_not_stored_again_when_its_stored_copy_is_completed_meanwhile() {
    keyed_copy_completed_meanwhile(false).await;
}

/// The same in the upsert form (the partition met a record within the last second).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyed_copy_is_not_stored_again_when_its_stored_copy_is_completed_meanwhile_upsert() {
    keyed_copy_completed_meanwhile(true).await;
}

async fn keyed_copy_completed_meanwhile(upsert: bool) {
    let Some((a, _b)) = two_servers() else {
        return;
    };
    let url = lessor_testkit::database_or_skip().expect("database");
    let queue = unique_queue("pg-src-race");
    let p = a.open(&queue, 0).await.expect("open");
    if upsert {
        let warm = NewItem {
            dedup_id: "warm".into(),
            dedup_until: T0.add(SEC * 300),
            ..items(1, "warm").remove(0)
        };
        p.produce(vec![warm.clone()]).await.expect("warm");
        p.produce(vec![warm]).await.expect("warm again");
        // The warm item goes, so the list below holds only the copies of the item under test.
        let warm_id = p.lease(1, T0.add(SEC)).await.expect("lease")[0].id;
        p.complete(vec![vec![warm_id]]).await.expect("complete warm");
    }
    let item = |tag: &str| NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        payload: Bytes::from(tag.to_string()),
        source_id: "dlq/0/42".into(),
        dedup_id: "redrive:dlq/0/42".into(),
        dedup_until: T0.add(SEC * 300),
        ..Default::default()
    };
    let first = p.produce(vec![item("first")]).await.expect("first");
    // The consumer's complete of the stored copy, held open until the second produce waits for it.
    let client = lessor_testkit::connect(&url).await;
    client.batch_execute("BEGIN").await.expect("begin");
    let deleted = client
        .execute(
            &format!("DELETE FROM {} WHERE source_id = $1", table_name(&queue, 0)),
            &[&"dlq/0/42"],
        )
        .await
        .expect("delete");
    assert_eq!(deleted, 1);
    let again = {
        let p = p.clone();
        let it = item("again");
        tokio::spawn(async move { p.produce_reporting(vec![it]).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.batch_execute("COMMIT").await.expect("commit");
    let (ids, stored) = again.await.expect("join").expect("again");
    let left: Vec<String> = p
        .list(None, 10, false)
        .await
        .expect("list")
        .iter()
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect();
    assert!(
        left.is_empty() && stored == [false],
        "a duplicate of a live key was stored again (first {first:?}, again {ids:?} stored {stored:?}): {left:?}"
    );
    a.destroy(&queue, 0).await.ok();
}

/// A queue deleted and created again under the same name within its keys' window starts without records, as the
/// memory and fjall stores do (their records live in the deleted partitions): a key produced before the delete is
/// stored again after it, on either server and in any partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_created_again_under_its_name_forgets_the_old_keys() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let queue = unique_queue("pg-dedup-recreate");
    let item = |tag: &str| NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        payload: Bytes::from(tag.to_string()),
        dedup_id: "k".into(),
        dedup_until: T0.add(SEC * 300),
        ..Default::default()
    };
    a.create(&queue, &[0, 1]).await.expect("create");
    let p0 = a.open(&queue, 0).await.expect("open");
    let first = p0.produce(vec![item("first")]).await.expect("first");
    b.destroy_many(&queue, &[0, 1]).await.expect("delete");
    a.create(&queue, &[0, 1]).await.expect("create again");
    for (store, part) in [(&b, 1u32), (&a, 0)] {
        let p = store.open(&queue, part).await.expect("open again");
        let (ids, stored) = p.produce_reporting(vec![item("after")]).await.expect("after");
        if part == 1 {
            assert_eq!(
                stored,
                [true],
                "the old key is gone (first {first:?}, now {ids:?})"
            );
        } else {
            assert_eq!(stored, [false], "the new record holds");
        }
    }
    a.destroy_many(&queue, &[0, 1]).await.ok();
}

/// The delete window: the engine destroys a queue's partitions before its definition, so another server may still
/// serve the queue while its tables go, or load it from the definition meanwhile. Neither may make the tables again
/// by opening them: a produce there would be acknowledged into the deleted queue, and a queue created later under
/// the name would find those items (and their dedup keys). The other server's calls fail instead, and the queue
/// created again starts empty and forgets the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_serving_a_queue_being_deleted_does_not_make_its_tables_again() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let queue = unique_queue("pg-delete-window");
    let keyed = |tag: &str| NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        payload: Bytes::from(tag.to_string()),
        dedup_id: format!("key-{tag}"),
        dedup_until: T0.add(SEC * 300),
        ..Default::default()
    };
    a.create(&queue, &[0, 1]).await.expect("create");
    // B serves partition 0 (opened before the delete); partition 1 it has not opened yet.
    let b0 = b.open(&queue, 0).await.expect("B opens partition 0");
    b0.produce(vec![keyed("old")])
        .await
        .expect("produce before the delete");
    // Server A deletes the queue: its partitions go, its definition (not modelled here) is still there.
    a.destroy_many(&queue, &[0, 1]).await.expect("destroy");

    // B still serves partition 0: its produce fails (nothing acknowledged), and so does opening it again, as the
    // engine does after a failure, and opening partition 1, as a load from the definition does.
    b0.produce(vec![keyed("stale")])
        .await
        .expect_err("a produce into a destroyed partition is refused");
    let again = b.open(&queue, 0).await;
    let fresh = b.open(&queue, 1).await;
    let reopened = (again.is_ok(), fresh.is_ok());
    // Had the opens made the tables again, B stored these (acknowledged) into the deleted queue.
    for p in [again, fresh].into_iter().flatten() {
        p.produce(vec![keyed("stale")])
            .await
            .expect("stored in a re-made table");
    }

    // The queue is created again under its name (through B this time): empty, and the old keys are forgotten.
    b.create(&queue, &[0, 1]).await.expect("create again");
    for (store, part) in [(&a, 0u32), (&b, 1)] {
        let p = store.open(&queue, part).await.expect("open the new queue");
        let c = p.counts().await.expect("counts");
        assert_eq!(
            (c.ready, c.leased, c.scheduled),
            (0, 0, 0),
            "partition {part} of the queue created again holds the deleted queue's items"
        );
        let (_, stored) = p
            .produce_reporting(vec![keyed("old"), keyed("stale")])
            .await
            .expect("produce into the new queue");
        assert_eq!(
            stored,
            [part == 0, part == 0],
            "partition {part}: the deleted queue's keys are forgotten (and partition 0's are the new queue's)"
        );
    }
    assert_eq!(
        reopened,
        (false, false),
        "B opened the destroyed partitions (0 as served, 1 as loaded)"
    );
    a.destroy_many(&queue, &[0, 1]).await.ok();
}

/// A lifecycle pass reports how it changed the partition's counts (the engine follows them with it instead of
/// counting rows after every pass): expired leases requeued, scheduled or dead, schedules come due, and ready and
/// leased items past their expiry, under each kind of policy and when the limit cuts the pass short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifecycle_pass_reports_how_it_changed_the_counts() {
    let Some((a, _b)) = two_servers() else {
        return;
    };
    let item = |expire: u64, enqueue: u64| NewItem {
        expire_deadline: T0.add(Duration::from_secs(expire)),
        enqueue_at: if enqueue == 0 {
            Ts::ZERO
        } else {
            T0.add(Duration::from_secs(enqueue))
        },
        created_at: T0,
        payload: Bytes::from_static(b"x"),
        ..Default::default()
    };
    let backoff = Backoff {
        base: SEC * 5,
        factor: 2.0,
        max: SEC * 60,
        jitter: 0.0,
    };
    let policies = [
        LifecyclePolicy::default(),
        LifecyclePolicy {
            max_attempts: 1,
            has_dead_queue: true,
            ..Default::default()
        },
        LifecyclePolicy {
            backoff,
            ..Default::default()
        },
        LifecyclePolicy {
            max_attempts: 1,
            backoff,
            ..Default::default()
        },
    ];
    let now = T0.add(SEC * 100);
    for (case, policy) in policies.iter().enumerate() {
        for limit in [10_000, 3] {
            let q = unique_queue("pg-lifecycle-delta");
            a.create(&q, &[0]).await.expect("create");
            let p = a.open(&q, 0).await.expect("open");
            // Leased, expiring at 60 s, lease ending at 500 s: die as leased items.
            p.produce(vec![item(60, 0), item(60, 0)]).await.expect("produce");
            p.lease(2, T0.add(SEC * 500)).await.expect("lease");
            // Leased, lease ending at 50 s: requeued, scheduled or dead by the policy.
            p.produce((0..4).map(|_| item(3600, 0)).collect())
                .await
                .expect("produce");
            p.lease(4, T0.add(SEC * 50)).await.expect("lease");
            // Ready, expiring at 10 s: die as ready items; ready for good; scheduled, due at 20 s and at 900 s.
            p.produce(vec![
                item(10, 0),
                item(10, 0),
                item(10, 0),
                item(3600, 0),
                item(3600, 20),
            ])
            .await
            .expect("produce");
            p.produce(vec![item(3600, 20), item(3600, 900)])
                .await
                .expect("produce");
            let mut counts = p.counts().await.expect("counts");
            let mut passes = 0;
            loop {
                let o = p.lifecycle(now, *policy, limit).await.expect("lifecycle");
                let delta = o.counts_delta.expect("the pass reports how the counts changed");
                let after = p.counts().await.expect("counts");
                assert_eq!(
                    delta.apply(counts),
                    after,
                    "policy {case}, limit {limit}, pass {passes}: {o:?}"
                );
                counts = after;
                passes += 1;
                if !o.more {
                    break;
                }
            }
            assert!(limit > 10 || passes > 1, "the limit cut the pass short");
            a.destroy(&q, 0).await.expect("destroy");
        }
    }
}

/// Opens partition `part` of `q`, again after transient errors (as the engine does on its backoff).
async fn open_retrying(s: &PgStore, part: u32) -> Arc<dyn Partition> {
    for _ in 0..100 {
        match s.open("q", part).await {
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            r => return r.expect("open"),
        }
    }
    panic!("partition {part} never opened");
}

/// A version-4 database with dedup records of several queues (live and expired ones, and a deleted queue's):
/// a migration killed in the middle of moving them leaves the database at version 4 with every record, and two
/// servers migrating it at once afterwards write one secret and move each record exactly once, both then hashing
/// keys alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_then_concurrent_version_5_migration_moves_each_record_once() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_dedup_migrate").await;
    let min = 60_000_000_000i64;
    let n = 60_000i64;
    lessor_testkit::execute(
        db.url(),
        &format!(
            "CREATE TABLE lessor_schema (singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
                                         version INTEGER NOT NULL);
             INSERT INTO lessor_schema VALUES (true, 4);
             {ddl}
             INSERT INTO lessor_dedup (queue, dedup_id, item_id, partition, created_at, until)
                 SELECT (ARRAY['q', 'other', 'gone'])[1 + i % 3], 'k-' || i, 1000 + i, 0, {t0},
                        CASE WHEN i % 2 = 0 THEN {live} ELSE {t0} END
                 FROM generate_series(1, {n}) i;",
            ddl = lessor_storage::postgres::migrations_up_to(4),
            t0 = T0.0,
            live = T0.0 + 5 * min,
        ),
    )
    .await
    .expect("a version 4 schema with dedup records");
    let client = lessor_testkit::connect(db.url()).await;
    // The first migration is killed while it moves the records.
    let killed_url = unique_url(db.url());
    let app = killed_url
        .rsplit("application_name=")
        .next()
        .expect("name")
        .to_string();
    let killed = tokio::spawn(async move {
        let store = PgStore::new(&PgConfig::new(killed_url)).expect("store");
        let r = store.open("q", 0).await.map(|_| ());
        store.close().await;
        r
    });
    let mut terminated = false;
    for _ in 0..2000 {
        let rows = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = $1 AND query LIKE '%lessor_dedup_keys%' AND state = 'active'",
                &[&app],
            )
            .await
            .expect("terminate");
        if !rows.is_empty() {
            terminated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(terminated, "caught the migration moving records");
    assert!(
        killed.await.expect("join").is_err(),
        "the killed migration failed"
    );
    let version: i32 = client
        .query_one("SELECT version FROM lessor_schema", &[])
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, 4);
    let left: i64 = client
        .query_one("SELECT count(*) FROM lessor_dedup", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, n, "every old record is still there");
    // Two servers migrate at once. The one waiting for the migration lock gives up after the lock timeout (1 s)
    // while the other moves the records, with a transient error; the engine opens the partition again later.
    let a = PgStore::new(&PgConfig::new(unique_url(db.url()))).expect("store a");
    let b = PgStore::new(&PgConfig::new(unique_url(db.url()))).expect("store b");
    let (pa, pb) = tokio::join!(open_retrying(&a, 0), open_retrying(&b, 1));
    let secrets: i64 = client
        .query_one("SELECT count(*) FROM lessor_dedup_secret", &[])
        .await
        .expect("secrets")
        .get(0);
    assert_eq!(secrets, 1);
    let moved: i64 = client
        .query_one("SELECT count(*) FROM lessor_dedup_keys", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(moved, n, "each record moved once");
    let item = |key: &str| NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        payload: Bytes::from(key.to_string()),
        dedup_id: key.into(),
        dedup_until: T0.add(SEC * 300),
        ..Default::default()
    };
    // k-3 is q's (3 % 3 == 0) and live (odd: no; 3 is odd, so expired), k-6 q's and live.
    assert_eq!(
        pa.produce(vec![item("k-6")]).await.expect("live"),
        vec![ItemId(1006)],
        "a live moved record is a duplicate"
    );
    let fresh = pb.produce(vec![item("k-3")]).await.expect("expired");
    assert_ne!(fresh, vec![ItemId(1003)], "an expired moved record is replaced");
    assert_eq!(
        pa.produce(vec![item("k-3")]).await.expect("again"),
        fresh,
        "both servers hash alike"
    );
    a.close().await;
    b.close().await;
}

/// Two servers produce the same keyed item with a source id (a redrive copy) into one partition, one of them in
/// the upsert form (its partition met a record within the last second) and the other in the plain form. Both
/// forms must take the key before the source id: the upsert form claims first, and a plain form that inserted the
/// source id first and then waited for the key would deadlock with it. The upsert batch is held between its claim
/// and its insert of the shared row by a row another transaction is inserting (the batch's second row), while the
/// plain one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plain_and_the_upsert_claim_take_keys_and_source_ids_in_one_order() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let url = lessor_testkit::database_or_skip().expect("database");
    let queue = unique_queue("pg-claim-order");
    let pa = a.open(&queue, 0).await.expect("open a");
    let pb = b.open(&queue, 0).await.expect("open b");
    let item = |source: &str, key: &str| NewItem {
        expire_deadline: T0.add(SEC * 3600),
        created_at: T0,
        payload: Bytes::from(format!("{source}/{key}")),
        source_id: source.into(),
        dedup_id: key.into(),
        dedup_until: T0.add(SEC * 300),
        ..Default::default()
    };
    // Server A's partition meets a record: its keyed produces send the upsert form for a second.
    pa.produce(vec![item("", "warm")]).await.expect("warm");
    pa.produce(vec![item("", "warm")]).await.expect("warm again");
    let client = lessor_testkit::connect(&url).await;
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .execute(
            &format!(
                "INSERT INTO {} (source_id, expire_deadline, created_at, payload) VALUES ('s0', 0, 0, '')",
                table_name(&queue, 0)
            ),
            &[],
        )
        .await
        .expect("hold s0");
    let upsert = {
        let p = pa.clone();
        let batch = vec![item("s2", "k2"), item("s0", ""), item("s1", "k1")];
        tokio::spawn(async move { p.produce(batch).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let plain = {
        let p = pb.clone();
        tokio::spawn(async move { p.produce(vec![item("s1", "k1")]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let (upsert, plain) = (upsert.await.expect("join"), plain.await.expect("join"));
    assert!(
        upsert.is_ok() && plain.is_ok(),
        "both produces succeed: upsert {upsert:?}, plain {plain:?}"
    );
    let (upsert, plain) = (upsert.expect("upsert"), plain.expect("plain"));
    assert_eq!(upsert[2], plain[0], "one copy of s1/k1");
    let stored = pa.list(None, 10, false).await.expect("list");
    assert_eq!(stored.len(), 4, "warm, s2, s0, s1");
    a.destroy(&queue, 0).await.ok();
}

/// The throttled prune keeps up: one key per call, the item clock advancing 1 s per call with a 1 s window, 1,500
/// calls from two partitions on two servers (as fast as they go, so most calls fall within a prune's 10 ms). The
/// records kept are the window plus the 5 minutes of grace (about 300 calls' keys) and a few calls' worth not yet
/// due, never the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_throttled_prune_keeps_the_records_bounded() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let url = lessor_testkit::database_or_skip().expect("database");
    let queue = unique_queue("pg-prune-bound");
    let parts = [
        a.open(&queue, 0).await.expect("open"),
        b.open(&queue, 1).await.expect("open"),
    ];
    let client = lessor_testkit::connect(&url).await;
    let calls = 1500u64;
    let (mut most, mut last) = (0i64, 0i64);
    let mut queue_id: Option<i64> = None;
    for c in 0..calls {
        let at = T0.add(SEC * c as u32);
        let item = NewItem {
            expire_deadline: at.add(SEC * 3600),
            created_at: at,
            payload: Bytes::from_static(b"x"),
            dedup_id: format!("k{c}"),
            dedup_until: at.add(SEC),
            ..Default::default()
        };
        let id = parts[(c % 2) as usize]
            .produce(vec![item])
            .await
            .expect("produce")[0];
        if queue_id.is_none() {
            // The queue's id in the records, found through the first record's item.
            queue_id = Some(
                client
                    .query_one(
                        "SELECT queue_id FROM lessor_dedup_keys WHERE item_id = $1",
                        &[&(id.0 as i64)],
                    )
                    .await
                    .expect("queue id")
                    .get(0),
            );
        }
        if c % 50 == 49 {
            last = client
                .query_one(
                    "SELECT count(*) FROM lessor_dedup_keys WHERE queue_id = $1",
                    &[&queue_id],
                )
                .await
                .expect("count")
                .get(0);
            most = most.max(last);
        }
    }
    assert!(
        most <= 400,
        "at most about 300 records are due to stay, {most} were kept"
    );
    // After call 1,499 the 301 records whose window ended within the grace are still there.
    assert!(last >= 301, "records within the grace were dropped: {last} kept");
    a.destroy(&queue, 0).await.ok();
    b.destroy(&queue, 1).await.ok();
}

/// A batch mixing an unkeyed item, a key whose record ended but is not pruned yet (the plain claim meets it and the
/// batch goes again as the upsert), a new key with a source id, and a repeat of the first key: the unkeyed item and
/// both keys are stored once, the repeat takes its first copy's id. The same batch again (now in the upsert form,
/// within the second after the conflict) stores only the unkeyed item; a third copy from the other server, in the
/// plain form, the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_batch_meeting_an_ended_record_stores_each_item_once() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let queue = unique_queue("pg-dedup-mixed");
    let pa = a.open(&queue, 0).await.expect("open a");
    let pb = b.open(&queue, 0).await.expect("open b");
    let item = |tag: &str, source: &str, key: &str, at: Ts| NewItem {
        expire_deadline: at.add(SEC * 3600),
        created_at: at,
        payload: Bytes::from(tag.to_string()),
        source_id: source.into(),
        dedup_id: key.into(),
        dedup_until: at.add(SEC),
        ..Default::default()
    };
    // k's record ends at T0 + 1 s; it stays 5 minutes more before a prune may drop it.
    pb.produce(vec![item("old", "", "k", T0)]).await.expect("old");
    let at = T0.add(SEC * 2);
    let batch = || {
        vec![
            item("plain", "", "", at),
            item("k", "", "k", at),
            item("sourced", "s1", "j", at),
            item("k again", "", "k", at),
        ]
    };
    let (ids, stored) = pa.produce_reporting(batch()).await.expect("first");
    assert_eq!(stored, [true, true, true, false], "ids {ids:?}");
    assert_eq!(ids[3], ids[1]);
    let (ids2, stored2) = pa.produce_reporting(batch()).await.expect("second");
    assert_eq!(stored2, [true, false, false, false], "ids {ids2:?}");
    assert_eq!(ids2[1..], ids[1..]);
    let (ids3, stored3) = pb.produce_reporting(batch()).await.expect("third");
    assert_eq!(stored3, [true, false, false, false], "ids {ids3:?}");
    assert_eq!(ids3[1..], ids[1..]);
    let payloads: Vec<String> = pa
        .list(None, 20, false)
        .await
        .expect("list")
        .iter()
        .map(|i| String::from_utf8_lossy(&i.payload).into_owned())
        .collect();
    assert_eq!(payloads, ["old", "plain", "k", "sourced", "plain", "plain"]);
    a.destroy(&queue, 0).await.ok();
}

/// The dedup secret is never drawn again once the schema is at version 5: with its row gone (a partial restore),
/// a server starting on the database refuses every partition with `Corrupt` instead of hashing keys under a new
/// secret that the existing records and the other servers do not share, while a server that read it before keeps
/// the one it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dedup_secret_is_refused_not_drawn_again() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_dedup_secret").await;
    let running = PgStore::new(&PgConfig::new(unique_url(db.url()))).expect("store");
    let p = running.open("q", 0).await.expect("open");
    let keyed = NewItem {
        dedup_id: "k".into(),
        dedup_until: T0.add(SEC * 300),
        ..items(1, "k").remove(0)
    };
    let first = p.produce(vec![keyed.clone()]).await.expect("produce");
    let client = lessor_testkit::connect(db.url()).await;
    client
        .batch_execute("DELETE FROM lessor_dedup_secret")
        .await
        .expect("delete the secret");
    let starting = PgStore::new(&PgConfig::new(unique_url(db.url()))).expect("store");
    for queue in ["q", "no-dedup"] {
        let e = starting.open(queue, 1).await.expect_err("no secret");
        assert_eq!(e.kind, StorageErrorKind::Corrupt, "{e}");
    }
    let rows: i64 = client
        .query_one("SELECT count(*) FROM lessor_dedup_secret", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "no secret was drawn again");
    assert_eq!(
        p.produce(vec![keyed]).await.expect("produce again"),
        first,
        "the running server keeps its secret"
    );
    running.close().await;
    starting.close().await;
}

/// Incarnations: a queue deleted and created again under its name is another incarnation, with other tables. A
/// delete of the old incarnation that another server runs late (it read the old definition before the delete and
/// the create) drops only the old tables: the new queue keeps its items and its partitions open (before, the late
/// drop dropped the new tables and tombstoned them for a day). A server still serving the old incarnation can
/// neither make its tables again nor store into the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_destroy_of_an_old_incarnation_leaves_the_new_one_alone() {
    let Some((a, b)) = two_servers() else {
        return;
    };
    let queue = unique_queue("pg-incarnations");
    let (old, new) = (Ts(1_000_000), Ts(2_000_000));
    a.create_incarnation(&queue, old, &[0, 1]).await.expect("create");
    // B serves partition 0 of the old queue.
    let b0 = b
        .open_incarnation(&queue, old, 0)
        .await
        .expect("open the old queue");
    b0.produce(items(1, "old"))
        .await
        .expect("produce into the old queue");
    // A deletes the queue, and creates it again.
    a.destroy_many_incarnation(&queue, old, &[0, 1])
        .await
        .expect("delete");
    a.create_incarnation(&queue, new, &[0, 1])
        .await
        .expect("create again");
    let n0 = a
        .open_incarnation(&queue, new, 0)
        .await
        .expect("open the new queue");
    n0.produce(items(2, "new"))
        .await
        .expect("produce into the new queue");
    // B, still serving the old queue: its produce fails, and its opens are refused.
    b0.produce(items(1, "stale"))
        .await
        .expect_err("a produce through the old queue's handle is refused");
    for p in [0, 1] {
        assert!(
            b.open_incarnation(&queue, old, p).await.is_err(),
            "partition {p} of the deleted incarnation was opened"
        );
    }
    // A delete of the old queue that B runs late: the new queue is not touched.
    b.destroy_many_incarnation(&queue, old, &[0, 1])
        .await
        .expect("the late delete");
    for (store, p) in [(&a, 0u32), (&b, 1)] {
        let h = store
            .open_incarnation(&queue, new, p)
            .await
            .expect("the new queue's partitions open");
        let c = h.counts().await.expect("counts");
        assert_eq!(c.ready, if p == 0 { 2 } else { 0 }, "partition {p}");
    }
    assert_eq!(
        n0.counts().await.expect("counts").ready,
        2,
        "the handle of the new queue still reads its table"
    );
    a.destroy_many_incarnation(&queue, new, &[0, 1]).await.ok();
}

/// Schema version 7 (incarnations): a database at version 6 migrates; a queue created before keeps its tables of
/// incarnation 0, which an open of any incarnation uses (upgraded, with their items) until a destroy of the queue
/// drops them; a partition a version-6 destroy tombstoned stays refused; a create after the destroy makes fresh
/// tables of the new incarnation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_6_database_migrates_and_its_tables_serve_on() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_incarnations").await;
    let (t0, t1) = (table_name("old", 0), table_name("old", 1));
    lessor_testkit::execute(
        db.url(),
        &format!(
            "CREATE TABLE lessor_schema (singleton BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
                                         version INTEGER NOT NULL);
             INSERT INTO lessor_schema VALUES (true, 6);
             {ddl}
             INSERT INTO lessor_dedup_secret (singleton, secret) VALUES (true, '\\x{secret}'::bytea);
             {table}
             INSERT INTO {t0} (expire_deadline, created_at, payload, payload_len)
                 SELECT {exp}, {now}, convert_to('kept-' || g, 'UTF8'), 6 FROM generate_series(1, 2) g;
             INSERT INTO lessor_partitions (table_name, queue, partition, created_at, layout)
                 VALUES ('{t0}', 'old', 0, 1, 1);
             INSERT INTO lessor_dropped_partitions (table_name, queue, partition, dropped_at)
                 VALUES ('{t1}', 'old', 1, {now});",
            ddl = lessor_storage::postgres::migrations_up_to(6),
            secret = "ab".repeat(32),
            table = layout_1_ddl(&t0),
            exp = T0.add(SEC * 3600).0,
            now = ItemId::floor_now().0,
        ),
    )
    .await
    .expect("a version 6 schema with a queue");
    let store = PgStore::new(&PgConfig::new(unique_url(db.url()))).expect("store");
    let inc = Ts(1_700_000_000_000_000);
    let p0 = store
        .open_incarnation("old", inc, 0)
        .await
        .expect("the old table serves the queue's incarnation");
    let leased = p0.lease(5, T0.add(SEC * 60)).await.expect("lease");
    let payloads: Vec<&[u8]> = leased.iter().map(|i| &i.payload[..]).collect();
    assert_eq!(payloads, vec![&b"kept-1"[..], b"kept-2"]);
    assert!(
        store.open_incarnation("old", inc, 1).await.is_err(),
        "a partition a version-6 destroy tombstoned was opened"
    );
    let client = lessor_testkit::connect(db.url()).await;
    let row = client
        .query_one(
            "SELECT (SELECT version FROM lessor_schema),
                    (SELECT incarnation FROM lessor_partitions WHERE table_name = $1)",
            &[&t0],
        )
        .await
        .expect("version");
    let (version, registered): (i32, i64) = (row.get(0), row.get(1));
    assert_eq!(
        (version, registered),
        (lessor_storage::postgres::SCHEMA_VERSION, 0)
    );
    assert_eq!(version, 7);
    store
        .destroy_many_incarnation("old", inc, &[0, 1])
        .await
        .expect("delete");
    let gone: Option<String> = client
        .query_one("SELECT to_regclass($1)::text", &[&t0])
        .await
        .expect("regclass")
        .get(0);
    assert_eq!(gone, None, "the destroy drops the table of incarnation 0");
    assert!(store.open_incarnation("old", inc, 0).await.is_err());
    let again = Ts(inc.0 + 1);
    store
        .create_incarnation("old", again, &[0, 1])
        .await
        .expect("create again");
    for p in [0, 1] {
        let h = store.open_incarnation("old", again, p).await.expect("open");
        assert_eq!(h.counts().await.expect("counts").ready, 0, "partition {p}");
    }
    let named: String = client
        .query_one(
            "SELECT table_name FROM lessor_partitions WHERE queue = 'old' AND partition = 0",
            &[],
        )
        .await
        .expect("registration")
        .get(0);
    assert_eq!(
        named,
        lessor_storage::postgres::incarnation_table_name("old", 0, again.0)
    );
    drop(client);
    store.close().await;
}
