//! Queue invariant property test (Querator's FuzzQueueInvariant, extended with concurrent consumers, retries and
//! both encodings).
//!
//! For arbitrary item counts, produce and lease batch sizes, payload bytes, encoding/kind/reference strings,
//! consumer counts and retry ratios, against a real server on one partition with an injected clock:
//! - every produced item is leased exactly once per lease cycle (never held by two consumers, never leased again
//!   after it completed), with its payload, encoding, kind and reference preserved and `attempts` equal to the
//!   number of times it was leased;
//! - items leased for the first time reach each consumer in FIFO (production) order within their priority;
//! - Lessor extensions, chosen at random per case: priorities (0..=2); a dedup id on every item with every produce
//!   request sent twice (an at-least-once producer), which must store each item once; lease extensions before
//!   settling, which must always be accepted for a lease that is held;
//! - every item completes exactly once, after which the queue is empty (stats total 0, nothing leased) and a final
//!   lease ends with 454 "request timeout".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lessor_client::proto::{
    QueueCompleteRequest, QueueInfo, QueueLeaseItem, QueueLeaseRequest, QueueProduceItem,
    QueueProduceRequest, QueueRetryItem, QueueRetryRequest, QueueStatsRequest,
};
use lessor_client::{Client, ClientError, Encoding};
use proptest::prelude::*;

const QUEUE: &str = "prop";
/// Long-polls never time out on their own; the test releases them by advancing the clock past this.
const POLL_TIMEOUT: &str = "10m";
const RELEASE_POLLS: Duration = Duration::from_secs(11 * 60);
/// Most times one item is retried, so every run ends.
const MAX_RETRIES: u32 = 2;

#[derive(Debug, Clone)]
struct Params {
    count: usize,
    produce_batch: usize,
    lease_batch: usize,
    payload: Vec<u8>,
    encoding: String,
    kind: String,
    reference: String,
    consumers: usize,
    retry_percent: u64,
    json: bool,
    seed: u64,
    priorities: bool,
    dedup: bool,
    extend_percent: u64,
}

/// What a produced item must look like when leased.
#[derive(Debug, Clone)]
struct Expected {
    payload: Vec<u8>,
    encoding: String,
    kind: String,
    reference: String,
}

/// Book-keeping of one item across its lease cycles.
#[derive(Debug, Default)]
struct Track {
    leases: u32,
    retries: u32,
    held: bool,
    done: bool,
}

struct Shared {
    expected: Vec<Expected>,
    track: Mutex<Vec<Track>>,
    completed: AtomicUsize,
}

fn item_index(payload: &[u8]) -> usize {
    let head = payload.get(..6).expect("payload carries its index");
    let text = std::str::from_utf8(head).expect("index is ascii");
    text.strip_suffix('|')
        .and_then(|n| n.parse().ok())
        .expect("index prefix")
}

/// The produce items and what each must look like when leased. Every third item travels as `utf8`, the rest as
/// `bytes`; each payload starts with its index so items can be told apart whatever their ids.
fn build_items(p: &Params) -> (Vec<QueueProduceItem>, Vec<Expected>) {
    let mut items = Vec::with_capacity(p.count);
    let mut expected = Vec::with_capacity(p.count);
    for i in 0..p.count {
        let reference = format!("{}{i}", p.reference);
        let mut item = QueueProduceItem {
            encoding: p.encoding.clone(),
            kind: p.kind.clone(),
            reference: reference.clone(),
            priority: if p.priorities { (i % 3) as i32 } else { 0 },
            dedup_id: if p.dedup { format!("d{i}") } else { String::new() },
            ..Default::default()
        };
        let payload = if i % 3 == 0 {
            let text = format!("{i:05}|{}", p.kind);
            item.utf8 = text.clone();
            text.into_bytes()
        } else {
            let mut bytes = format!("{i:05}|").into_bytes();
            bytes.extend_from_slice(&p.payload);
            item.bytes = bytes.clone();
            bytes
        };
        items.push(item);
        expected.push(Expected {
            payload,
            encoding: p.encoding.clone(),
            kind: p.kind.clone(),
            reference,
        });
    }
    (items, expected)
}

/// Checks one leased item against its expectations and marks it held; returns its index.
fn on_leased(shared: &Shared, who: &str, it: &QueueLeaseItem) -> usize {
    let i = item_index(&it.bytes);
    let want = shared
        .expected
        .get(i)
        .unwrap_or_else(|| panic!("{who}: unknown item {i}"));
    assert_eq!(it.bytes, want.payload, "{who}: payload of item {i}");
    assert_eq!(it.encoding, want.encoding, "{who}: encoding of item {i}");
    assert_eq!(it.kind, want.kind, "{who}: kind of item {i}");
    assert_eq!(it.reference, want.reference, "{who}: reference of item {i}");
    assert_eq!(
        it.id.len(),
        16,
        "{who}: id of item {i} is 16 hex digits: {:?}",
        it.id
    );
    assert!(
        it.lease_deadline.is_some(),
        "{who}: item {i} has a lease deadline"
    );
    let mut track = shared.track.lock().expect("track lock");
    let t = &mut track[i];
    assert!(!t.done, "{who}: item {i} leased after it completed");
    assert!(!t.held, "{who}: item {i} leased while another consumer holds it");
    t.held = true;
    t.leases += 1;
    assert_eq!(
        it.attempts,
        i32::try_from(t.leases).expect("few leases"),
        "{who}: attempts of item {i}"
    );
    i
}

async fn consumer(client: Client, shared: Arc<Shared>, who: String, p: Params, mut rng: u64) {
    // The last first-cycle item seen, per priority.
    let mut last_first_cycle: [Option<usize>; 3] = [None; 3];
    loop {
        let res = client
            .queue_lease(&QueueLeaseRequest {
                queue_name: QUEUE.into(),
                batch_size: i32::try_from(p.lease_batch).expect("small batch"),
                client_id: who.clone(),
                request_timeout: POLL_TIMEOUT.into(),
            })
            .await;
        let leased = match res {
            Ok(r) => r,
            Err(ClientError::Api {
                code: 454, message, ..
            }) if message.starts_with("request timeout") => {
                assert_eq!(
                    shared.completed.load(Ordering::SeqCst),
                    p.count,
                    "{who}: a long-poll timed out before every item completed"
                );
                return;
            }
            Err(e) => panic!("{who}: lease failed: {e}"),
        };
        assert_eq!(leased.partition, 0, "{who}: one partition");
        assert!(!leased.items.is_empty(), "{who}: a lease answer carries items");
        assert!(
            leased.items.len() <= p.lease_batch,
            "{who}: more items than the batch size"
        );
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        if (rng >> 33) % 100 < p.extend_percent {
            // Nobody else can hold these and no clock moves while the consumers run: the extension must hold.
            client
                .call::<lessor_proto::routes::QueueExtend>(&lessor_proto::QueueExtendRequest {
                    queue_name: QUEUE.into(),
                    partition: leased.partition,
                    ids: leased.items.iter().map(|it| it.id.clone()).collect(),
                    lease_timeout: "5m".into(),
                    request_timeout: "1m".into(),
                })
                .await
                .unwrap_or_else(|e| panic!("{who}: extend failed: {e}"));
        }
        let mut complete = Vec::new();
        let mut retry = Vec::new();
        for it in &leased.items {
            let i = on_leased(&shared, &who, it);
            let mut track = shared.track.lock().expect("track lock");
            let t = &mut track[i];
            if t.leases == 1 {
                // Items on their first cycle keep their production order (within their priority).
                let level = if p.priorities { i % 3 } else { 0 };
                assert_eq!(it.priority, level as i32, "{who}: priority of item {i}");
                let last = &mut last_first_cycle[level];
                assert!(
                    last.is_none_or(|last| last < i),
                    "{who}: item {i} after item {last:?}: FIFO order broken"
                );
                *last = Some(i);
            }
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            if t.retries < MAX_RETRIES && (rng >> 33) % 100 < p.retry_percent {
                t.retries += 1;
                // Released before the request goes out: once the server applies it, anyone may lease it again.
                t.held = false;
                retry.push(it.id.clone());
            } else {
                complete.push((i, it.id.clone()));
            }
        }
        if !retry.is_empty() {
            client
                .queue_retry(&QueueRetryRequest {
                    queue_name: QUEUE.into(),
                    partition: leased.partition,
                    items: retry
                        .into_iter()
                        .map(|id| QueueRetryItem {
                            id,
                            ..Default::default()
                        })
                        .collect(),
                })
                .await
                .unwrap_or_else(|e| panic!("{who}: retry failed: {e}"));
        }
        if !complete.is_empty() {
            client
                .queue_complete(&QueueCompleteRequest {
                    queue_name: QUEUE.into(),
                    partition: leased.partition,
                    request_timeout: "1m".into(),
                    ids: complete.iter().map(|(_, id)| id.clone()).collect(),
                })
                .await
                .unwrap_or_else(|e| panic!("{who}: complete failed: {e}"));
            let mut track = shared.track.lock().expect("track lock");
            for (i, _) in &complete {
                let t = &mut track[*i];
                assert!(!t.done, "{who}: item {i} completed twice");
                t.done = true;
                t.held = false;
            }
            shared.completed.fetch_add(complete.len(), Ordering::SeqCst);
        }
    }
}

async fn stats_totals(client: &Client) -> (i32, i32) {
    let s = client
        .queue_stats(&QueueStatsRequest {
            queue_name: QUEUE.into(),
            ..Default::default()
        })
        .await
        .expect("stats");
    s.logical_queues
        .iter()
        .flat_map(|l| &l.partitions)
        .fold((0, 0), |(t, l), p| (t + p.total, l + p.total_leased))
}

async fn scenario(p: Params) {
    let (srv, client, clock) = lessor_testkit::server::memory_with_manual_clock().await;
    let enc = if p.json {
        Encoding::Json
    } else {
        Encoding::Protobuf
    };
    let client = client.with_encoding(enc);
    client
        .queues_create(&QueueInfo {
            queue_name: QUEUE.into(),
            lease_timeout: "1m".into(),
            expire_timeout: "24h".into(),
            requested_partitions: 1,
            ..Default::default()
        })
        .await
        .expect("queue created");

    let (items, expected) = build_items(&p);
    let shared = Arc::new(Shared {
        track: Mutex::new((0..p.count).map(|_| Track::default()).collect()),
        expected,
        completed: AtomicUsize::new(0),
    });

    let mut consumers = Vec::new();
    for k in 0..p.consumers {
        consumers.push(tokio::spawn(consumer(
            client.clone(),
            shared.clone(),
            format!("c{k}"),
            p.clone(),
            p.seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        )));
    }
    // Produce while the consumers are already long-polling.
    for chunk in items.chunks(p.produce_batch) {
        // With dedup ids, each request goes twice, as a producer that lost the first answer would send it.
        for _ in 0..if p.dedup { 2 } else { 1 } {
            client
                .queue_produce(&QueueProduceRequest {
                    queue_name: QUEUE.into(),
                    request_timeout: "1m".into(),
                    items: chunk.to_vec(),
                })
                .await
                .expect("produce");
        }
    }

    // Wait (bounded) for every item to complete; a consumer that panicked ends the wait early.
    for _ in 0..6000 {
        if shared.completed.load(Ordering::SeqCst) == p.count || consumers.iter().any(|c| c.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Release the consumers' long-polls: each then sees 454 and checks that everything completed.
    for _ in 0..2000 {
        if consumers.iter().all(|c| c.is_finished()) {
            break;
        }
        clock.advance(RELEASE_POLLS);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for c in consumers {
        tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("consumer stopped")
            .expect("consumer succeeded");
    }
    assert_eq!(
        shared.completed.load(Ordering::SeqCst),
        p.count,
        "every item completed"
    );
    for (i, t) in shared.track.lock().expect("track lock").iter().enumerate() {
        assert!(t.done && !t.held, "item {i} not completed: {t:?}");
        assert_eq!(t.leases, t.retries + 1, "item {i}: one lease per cycle");
    }
    assert_eq!(stats_totals(&client).await, (0, 0), "the queue ends empty");

    // A last lease finds nothing and times out with 454.
    let last = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .queue_lease(&QueueLeaseRequest {
                    queue_name: QUEUE.into(),
                    batch_size: 1,
                    client_id: "last".into(),
                    request_timeout: "1s".into(),
                })
                .await
        })
    };
    for _ in 0..2000 {
        if last.is_finished() {
            break;
        }
        clock.advance(Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let res = tokio::time::timeout(Duration::from_secs(5), last)
        .await
        .expect("last lease answered")
        .expect("joined");
    match res {
        Err(ClientError::Api {
            code: 454,
            ref code_text,
            ref message,
        }) => {
            assert_eq!(code_text, "Retry Request");
            assert!(message.starts_with("request timeout"), "{message}");
        }
        other => panic!("last lease: expected 454 request timeout, got {other:?}"),
    }
    srv.stop().await;
}

fn params() -> impl Strategy<Value = Params> {
    (
        (1usize..300, 1usize..=100, 1usize..=64),
        proptest::collection::vec(any::<u8>(), 0..48),
        ("\\PC{0,12}", "\\PC{0,12}", "\\PC{0,24}"),
        (1usize..=4, 0u64..=50, any::<bool>(), any::<u64>()),
        (any::<bool>(), any::<bool>(), 0u64..=50),
    )
        .prop_map(
            |(
                (count, produce_batch, lease_batch),
                payload,
                (encoding, kind, reference),
                (consumers, retry, json, seed),
                (priorities, dedup, extend_percent),
            )| {
                Params {
                    count,
                    produce_batch,
                    lease_batch,
                    payload,
                    encoding,
                    kind,
                    reference,
                    consumers,
                    retry_percent: retry,
                    json,
                    seed,
                    priorities,
                    dedup,
                    extend_percent,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 32, ..ProptestConfig::default() })]

    #[test]
    fn every_item_is_leased_once_per_cycle_and_completes_once(p in params()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(90), scenario(p))
                .await
                .expect("scenario finished within 90 s");
        });
    }
}
