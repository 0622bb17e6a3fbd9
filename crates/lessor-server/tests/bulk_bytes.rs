//! Every path that reads or moves many items at once is bounded in payload bytes (`limits.max-lease-bytes`), not
//! only in items: the storage list route, browse, dead-letter moves, redrive, rebalance moves, the count a
//! restore resumes from and the snapshot pages an online backup reads. Items may be 5 MB (64 MB offloaded), so a batch of a thousand bounded only in items holds
//! gigabytes. These tests run the engine with a bound of 3,100 bytes over items of 1,000 and watch, through a
//! hooked store, the most bytes any one storage call carries; a page that stops at the bound must still page on
//! correctly (nothing skipped, nothing repeated).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lessor_core::engine::{
    BrowseRequest, BrowseState, Engine, EngineConfig, NamedStore, ProduceItem, RebalanceRequest,
    RebalanceStatus, RedriveRequest, RedriveStatus,
};
use lessor_core::storage::PartitionStore;
use lessor_core::time::SystemClock;
use lessor_core::types::{Item, ItemId, Limits, QueueInfo, RetryItem};
use lessor_storage::memory::{MemoryQueues, MemoryStore};
use lessor_testkit::eventually::poll_until;
use lessor_testkit::hooked::{Call, Hook, HookedStore, Op};

/// Three items of 1,000 payload bytes fit (memory also counts an item's strings, here a few bytes).
const BOUND: u64 = 3100;
/// Payload bytes of every item.
const SIZE: usize = 1000;
const T: Option<Duration> = Some(Duration::from_secs(5));

/// The most items and bytes one storage call carried, per queue and operation.
#[derive(Default)]
struct Carried(Mutex<HashMap<(String, Op), (usize, u64)>>);

impl Carried {
    fn most(&self, queue: &str, op: Op) -> (usize, u64) {
        self.0
            .lock()
            .expect("lock")
            .get(&(queue.to_string(), op))
            .copied()
            .unwrap_or_default()
    }

    fn reset(&self) {
        self.0.lock().expect("lock").clear();
    }

    /// Every call of `op` on `queue` carried at most [`BOUND`] bytes.
    fn assert_bounded(&self, queue: &str, op: Op) {
        let (n, bytes) = self.most(queue, op);
        assert!(
            bytes <= BOUND,
            "{queue} {op:?}: one call carried {bytes} bytes (up to {n} items), over the bound of {BOUND}"
        );
    }
}

#[async_trait::async_trait]
impl Hook for Carried {
    fn carried(&self, call: &Call, items: usize, bytes: u64) {
        let mut m = self.0.lock().expect("lock");
        let e = m.entry((call.queue.clone(), call.op)).or_default();
        e.0 = e.0.max(items);
        e.1 = e.1.max(bytes);
    }
}

/// An engine over two hooked memory stores, `a` (where queues go) and `b` (only moves put partitions there), with
/// the byte bound.
fn engine() -> (Engine, Arc<Carried>) {
    let carried = Arc::new(Carried::default());
    let store = |s: MemoryStore| -> Arc<dyn PartitionStore> {
        Arc::new(HookedStore::new(Arc::new(s), carried.clone()))
    };
    let e = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![
            NamedStore {
                name: "a".into(),
                affinity: 1.0,
                store: store(MemoryStore::new()),
            },
            NamedStore {
                name: "b".into(),
                affinity: 0.0,
                store: store(MemoryStore::new()),
            },
        ],
        limits: Limits {
            max_lease_bytes: BOUND,
            ..Limits::default()
        },
        clock: Arc::new(SystemClock),
    })
    .expect("engine");
    (e, carried)
}

fn queue(name: &str, dead_queue: &str) -> QueueInfo {
    QueueInfo {
        name: name.into(),
        lease_timeout: Duration::from_secs(60),
        expire_timeout: Duration::from_secs(3600),
        requested_partitions: 1,
        dead_queue: dead_queue.into(),
        ..Default::default()
    }
}

async fn produce(e: &Engine, q: &str, n: usize) {
    produce_range(e, q, 0..n).await;
}

async fn produce_range(e: &Engine, q: &str, r: std::ops::Range<usize>) {
    let items = r
        .map(|i| ProduceItem {
            payload: bytes::Bytes::from(vec![b'a' + (i % 26) as u8; SIZE]),
            reference: format!("r{i}"),
            ..Default::default()
        })
        .collect();
    e.produce(q, items, T).await.expect("produce");
}

/// The references of the items of a list or browse, checking that no answer carried more than the bound.
fn refs(items: &[Item]) -> Vec<String> {
    items.iter().map(|it| it.reference.clone()).collect()
}

fn bytes(items: &[Item]) -> u64 {
    items.iter().map(|it| it.payload.len() as u64).sum()
}

/// Pages through partition 0 with `storage/items.list` (limit 100): each page within the bound, every item once.
async fn list_all(e: &Engine, q: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pivot: Option<ItemId> = None;
    for _ in 0..100 {
        let page = e.storage_list(q, 0, pivot, 100, false).await.expect("list");
        let Some(last) = page.last() else {
            return out;
        };
        assert!(
            page.len() == 1 || bytes(&page) <= BOUND,
            "a page of {} items, {} bytes",
            page.len(),
            bytes(&page)
        );
        pivot = Some(ItemId(last.id.0 + 1));
        out.extend(refs(&page));
    }
    panic!("the list does not end: {out:?}");
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn expected(n: usize) -> Vec<String> {
    sorted((0..n).map(|i| format!("r{i}")).collect())
}

/// `storage/items.list` with a limit of 100 over ten items of 1,000 bytes answered all ten (10,000 bytes; a
/// thousand items of 5 MB made a 5 GB answer, 65,536 of them 327 GB). Now each page stops at the bound and the
/// next page, from the last id + 1, goes on with nothing skipped or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_list_pages_within_the_bound() {
    let (e, carried) = engine();
    e.create_queue(queue("q", "")).await.expect("create");
    produce(&e, "q", 10).await;
    let all = list_all(&e, "q").await;
    assert_eq!(all.len(), 10, "{all:?}");
    assert_eq!(sorted(all), expected(10));
    carried.assert_bounded("q", Op::List);
}

/// Browse with a limit of 100 answered the ten items (and read up to 2,000 per storage call); now each page stops
/// at the bound with a next pivot, and paging returns every item once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_pages_within_the_bound() {
    let (e, carried) = engine();
    e.create_queue(queue("q", "")).await.expect("create");
    produce(&e, "q", 10).await;
    let mut seen = Vec::new();
    let mut pivot = None;
    for _ in 0..100 {
        let page = e
            .browse(
                "q",
                BrowseRequest {
                    partition: 0,
                    state: BrowseState::Queued,
                    priority: None,
                    pivot,
                    limit: 100,
                },
            )
            .await
            .expect("browse");
        let items: Vec<Item> = page.items.into_iter().map(|b| b.item).collect();
        assert!(
            items.len() <= 1 || bytes(&items) <= BOUND,
            "a page of {} items, {} bytes",
            items.len(),
            bytes(&items)
        );
        seen.extend(refs(&items));
        match page.next_pivot {
            Some(p) => pivot = Some(p),
            None => break,
        }
    }
    assert_eq!(sorted(seen), expected(10));
    carried.assert_bounded("q", Op::List);
}

/// Leases every item of `q` (a lease answers three at a time) and makes them all dead in one retry.
async fn kill_all(e: &Engine, q: &str, n: usize) {
    let mut leased = Vec::new();
    while leased.len() < n {
        let l = e.lease(q, 100, "c", T).await.expect("lease");
        leased.extend(l.items.iter().map(|it| RetryItem {
            id: it.id,
            retry_at: Default::default(),
            dead: true,
        }));
    }
    e.retry(q, 0, leased).await.expect("dead");
}

async fn wait_total(e: &Engine, q: &str, n: u64) {
    poll_until(Duration::from_secs(20), Duration::from_millis(20), || async {
        let s = e.stats(q).await.map_err(|e| e.to_string())?;
        let d: u64 = s.partitions.iter().map(|p| p.total).sum();
        if d == n {
            Ok(())
        } else {
            Err(format!("{q}: {d} items"))
        }
    })
    .await
    .expect("items arrive");
}

/// Ten items made dead in one call were moved to the dead-letter queue in one batch of ten (a batch is up to 1,000
/// items: 5 GB of 5 MB items read, then written, at once); a redrive listed 400 and wrote 100 at once. Now each
/// storage call of both carries at most the bound, and every item arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_and_redrive_move_within_the_bound() {
    let (e, carried) = engine();
    e.create_queue(queue("dlq", "")).await.expect("create dlq");
    e.create_queue(queue("jobs", "dlq")).await.expect("create jobs");
    produce(&e, "jobs", 10).await;
    kill_all(&e, "jobs", 10).await;
    wait_total(&e, "dlq", 10).await;
    carried.assert_bounded("jobs", Op::DeadItems);
    carried.assert_bounded("dlq", Op::Produce);
    assert_eq!(sorted(list_all(&e, "dlq").await), expected(10));

    carried.reset();
    let t = e
        .redrive_start(RedriveRequest {
            dead_queue: "dlq".into(),
            ..Default::default()
        })
        .await
        .expect("redrive");
    let done = poll_until(Duration::from_secs(20), Duration::from_millis(20), || async {
        let t = e.redrive_get(&t.id).await.map_err(|e| e.to_string())?;
        if t.status == RedriveStatus::Running {
            Err(format!("{t:?}"))
        } else {
            Ok(t)
        }
    })
    .await
    .expect("the redrive ends");
    assert_eq!(done.status, RedriveStatus::Completed, "{done:?}");
    assert_eq!(done.moved, 10, "{done:?}");
    assert_eq!(sorted(list_all(&e, "jobs").await), expected(10));
    assert!(list_all(&e, "dlq").await.is_empty());
    carried.assert_bounded("dlq", Op::List);
    carried.assert_bounded("jobs", Op::Produce);
}

/// Draining a partition (a shrink, as a move) read 1,000 items per storage call and imported 500 at once; now both
/// stay within the bound and every item arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_moves_within_the_bound() {
    let (e, carried) = engine();
    let mut info = queue("q", "");
    info.requested_partitions = 2;
    e.create_queue(info).await.expect("create");
    // One item per produce, so that both partitions get some.
    for i in 0..20 {
        produce_range(&e, "q", i..i + 1).await;
    }
    let task = e
        .rebalance_start(RebalanceRequest {
            queue: "q".into(),
            partitions: 1,
            ..Default::default()
        })
        .await
        .expect("start");
    let done = poll_until(Duration::from_secs(30), Duration::from_millis(20), || async {
        let t = e.rebalance_get(&task.id).await.map_err(|e| e.to_string())?;
        match t.status {
            RebalanceStatus::Running | RebalanceStatus::Cancelling => Err(format!("{t:?}")),
            _ => Ok(t),
        }
    })
    .await
    .expect("the shrink ends");
    assert_eq!(done.status, RebalanceStatus::Completed, "{done:?}");
    assert!(done.moved > 3, "enough items moved to meet the bound: {done:?}");
    carried.assert_bounded("q", Op::List);
    carried.assert_bounded("q", Op::Import);
    assert_eq!(sorted(list_all(&e, "q").await), expected(20));
}

/// A restore resuming (an empty page, asking where to go on from) read every dead item of the partition, payloads
/// and all, only to count them: ten of 1,000 bytes here, a whole dead-letter backlog of 5 MB items in production.
/// Now the count reads no payload, and the offset is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_resume_counts_dead_items_without_reading_them() {
    let (e, carried) = engine();
    e.restore_begin(queue("r", ""), false).await.expect("begin");
    let dead: Vec<Item> = (0..10)
        .map(|i| Item {
            reference: format!("r{i}"),
            payload: bytes::Bytes::from(vec![b'd'; SIZE]),
            dead: true,
            ..Default::default()
        })
        .collect();
    assert_eq!(e.restore_import("r", 0, 0, dead).await.expect("page"), 10);
    carried.reset();
    let offset = e.restore_import("r", 0, 0, Vec::new()).await.expect("resume");
    // A restoring queue's task outlives a test that panics with the engine still running: shut it down first.
    e.shutdown().await;
    assert_eq!(offset, 10);
    carried.assert_bounded("r", Op::DeadItems);
}

/// Produces `n` items of `size` payload bytes into `q`, referenced `{tag}{i}`.
async fn produce_sized(e: &Engine, q: &str, tag: &str, n: usize, size: usize) {
    let items = (0..n)
        .map(|i| ProduceItem {
            payload: bytes::Bytes::from(vec![b'a' + (i % 26) as u8; size]),
            reference: format!("{tag}{i}"),
            ..Default::default()
        })
        .collect();
    e.produce(q, items, T).await.expect("produce");
}

/// What a backup and a restore must keep of every item of partition 0 of `q`, in id order (ids are new after a
/// restore).
async fn contents(e: &Engine, q: &str) -> Vec<(String, bytes::Bytes, bool, bool, u32)> {
    let mut snap = e.snapshot(q, 0).await.expect("snapshot");
    let mut out = Vec::new();
    loop {
        let page = snap.next(1000).await.expect("page");
        if page.is_empty() {
            return out;
        }
        out.extend(
            page.into_iter()
                .map(|it| (it.reference, it.payload, it.is_leased, it.dead, it.attempts)),
        );
    }
}

/// An online backup read a partition's snapshot in pages of 256 items first, then of 8,000 once a page of small
/// items was seen: twenty items of 10 bytes followed by ten of 1,000 came in one read of 10,200 bytes under a
/// bound of 3,100 (at 5 MB, 8,000 items are 40 GB in one call). Now every snapshot read stays within the bound,
/// and the backup restores to the same items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_reads_snapshot_pages_within_the_bound() {
    let (e, carried) = engine();
    e.create_queue(queue("q", "")).await.expect("create");
    produce_sized(&e, "q", "small", 20, 10).await;
    produce_sized(&e, "q", "large", 10, SIZE).await;
    // Some items leased too: a backup keeps every state.
    let leased = e.lease("q", 2, "c", T).await.expect("lease");
    assert_eq!(leased.items.len(), 2);
    carried.reset();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = lessor_server::Config::memory();
    tokio::spawn(lessor_server::serve(
        listener,
        e.clone(),
        lessor_server::ServeOptions::from_config(&config),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = lessor_client::Client::new(&format!("http://{addr}")).expect("client");
    let mut stream = client
        .storage_backup(&lessor_proto::StorageBackupRequest::default())
        .await
        .expect("backup");
    let mut file = Vec::new();
    while let Some(chunk) = stream.chunk().await.expect("chunk") {
        file.extend_from_slice(&chunk);
    }
    carried.assert_bounded("q", Op::SnapshotRead);

    // Restored into a fresh engine, the backup holds exactly the items of the source.
    use lessor_proto::backup as fmt;
    let mut reader = fmt::Reader::new(&file[..]).expect("a backup file");
    let restored = Engine::new(EngineConfig {
        queues: Arc::new(MemoryQueues::new()),
        stores: vec![NamedStore {
            name: "a".into(),
            affinity: 1.0,
            store: Arc::new(MemoryStore::new()),
        }],
        limits: Limits::default(),
        clock: Arc::new(SystemClock),
    })
    .expect("engine");
    let mut names = Vec::new();
    while let Some(r) = reader.next_raw().expect("a record") {
        match r.kind {
            fmt::RecordKind::Header => {
                let h: fmt::BackupHeader = fmt::decode_body(&r.body).expect("header");
                for q in h.queues {
                    restored.restore_begin(q.to_info(), false).await.expect("begin");
                    names.push(q.name);
                }
            }
            fmt::RecordKind::Items => {
                let b: fmt::ItemBlock = fmt::decode_body(&r.body).expect("block");
                let items = b.items.into_iter().map(fmt::ItemRecord::into_item).collect();
                restored
                    .restore_import(&b.queue, b.partition, b.first, items)
                    .await
                    .expect("import");
            }
            _ => {}
        }
    }
    for n in &names {
        restored.restore_finish(n).await.expect("finish");
    }
    let want = contents(&e, "q").await;
    assert_eq!(want.len(), 30);
    assert_eq!(contents(&restored, "q").await, want);
    restored.shutdown().await;
    // Stopping the server shuts its engine down: the source is read first.
    let _ = stop.send(());
}
