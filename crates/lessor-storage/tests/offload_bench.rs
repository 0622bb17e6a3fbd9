//! Benchmark (ignored; run in release, figures in docs/benchmarks.md): 1 MiB payloads through a fjall partition
//! directly, and through the offload wrapper to the S3 test server on the loopback (`LESSOR_TEST_S3_ENDPOINT`).
//!
//! ```text
//! cargo test --release -p lessor-storage --features s3,fjall --test offload_bench -- --ignored --nocapture
//! ```
//!
//! Produce: batches of 8 items of 1 MiB; then lease batches of 8 and complete them. MiB/s of payload either way.
//! `LESSOR_BENCH_ITEMS` changes the item count (default 256); `LESSOR_S3_SERVER` names the S3 server in the output
//! (as `scripts/s3-test-server.sh` takes it: moto by default, or s3s-fs).
#![cfg(all(feature = "s3", feature = "fjall"))]
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lessor_core::storage::{Partition, PartitionStore};
use lessor_core::time::Ts;
use lessor_core::types::NewItem;
use lessor_storage::fjall::{Durability, FjallStore};
use lessor_storage::offload::{Compression, ObjectStoreConfig, OffloadSettings, OffloadStore};

const MIB: usize = 1 << 20;
const BATCH: usize = 8;
const T0: Ts = Ts(1_800_000_000_000_000);

fn payloads(n: usize) -> Vec<Bytes> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            Bytes::from(
                (0..MIB)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect::<Vec<u8>>(),
            )
        })
        .collect()
}

async fn run(name: &str, p: Arc<dyn Partition>, data: &[Bytes]) {
    let t = Instant::now();
    for chunk in data.chunks(BATCH) {
        let items = chunk
            .iter()
            .map(|b| NewItem {
                expire_deadline: T0.add(Duration::from_secs(86_400)),
                created_at: T0,
                payload: b.clone(),
                ..Default::default()
            })
            .collect();
        p.produce(items).await.unwrap();
    }
    let produce = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut got = 0;
    while got < data.len() {
        let items = p.lease(BATCH, T0.add(Duration::from_secs(600))).await.unwrap();
        assert!(!items.is_empty());
        assert_eq!(items[0].payload.len(), MIB);
        got += items.len();
        p.complete(vec![items.iter().map(|i| i.id).collect()])
            .await
            .unwrap()[0]
            .clone()
            .unwrap();
    }
    let consume = t.elapsed().as_secs_f64();
    let mib = data.len() as f64;
    println!(
        "{name}: {} items of 1 MiB | produce {:.0} MiB/s ({:.2} s) | lease+complete {:.0} MiB/s ({:.2} s)",
        data.len(),
        mib / produce,
        produce,
        mib / consume,
        consume
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
async fn one_mib_payloads_fjall_vs_s3_offload() {
    let n: usize = std::env::var("LESSOR_BENCH_ITEMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let data = payloads(n);
    let dir = tempfile::tempdir().unwrap();
    let fjall = FjallStore::open(dir.path().join("plain"), Durability::Sync).unwrap();
    run(
        "fjall directly (durability sync)",
        fjall.open("q", 0).await.unwrap(),
        &data,
    )
    .await;
    if std::env::var("LESSOR_TEST_S3_ENDPOINT").is_err() {
        println!("LESSOR_TEST_S3_ENDPOINT not set: no S3 figures");
        return;
    }
    // moto (a bucket on an unsigned PUT) or s3s-fs (a directory): the test kit knows both.
    let endpoint = lessor_testkit::s3::bucket("lessor-bench").await.unwrap();
    let server = std::env::var("LESSOR_S3_SERVER").unwrap_or_else(|_| "moto_server".into());
    let inner = FjallStore::open(dir.path().join("offload"), Durability::Sync).unwrap();
    let store = OffloadStore::new(
        Arc::new(inner),
        "disk-0",
        OffloadSettings {
            object_store: Some(ObjectStoreConfig {
                name: "s3-0".into(),
                endpoint,
                bucket: "lessor-bench".into(),
                access_key_id: Some("test".into()),
                secret_access_key: Some("test".into()),
                path_style: true,
                prefix: format!("bench-{}/", std::process::id()),
                ..Default::default()
            }),
            compression: Compression::None,
            ..Default::default()
        },
    )
    .unwrap();
    run(
        &format!("fjall + S3 offload ({server}, loopback)"),
        store.open("q", 0).await.unwrap(),
        &data,
    )
    .await;
}

/// What the wrapper costs a store that neither offloads nor compresses (every partition store of an `s3` build
/// has it, so that frames written under earlier settings keep reading): 100-byte payloads through a memory
/// partition, bare and wrapped, produce / lease / complete in batches of 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
async fn passthrough_wrapper_overhead_on_small_items() {
    use lessor_storage::memory::MemoryStore;

    const N: usize = 200_000;
    let payload = Bytes::from(vec![b'x'; 100]);
    let mut best = [f64::MAX; 2];
    for _ in 0..5 {
        for (k, wrapped) in [false, true].into_iter().enumerate() {
            let bare: Arc<dyn PartitionStore> = Arc::new(MemoryStore::new());
            let store: Arc<dyn PartitionStore> = if wrapped {
                OffloadStore::new(bare, "ram-0", OffloadSettings::default()).unwrap()
            } else {
                bare
            };
            let p = store.open("q", 0).await.unwrap();
            let t = Instant::now();
            for _ in 0..N / 100 {
                let items = (0..100)
                    .map(|_| NewItem {
                        expire_deadline: T0.add(Duration::from_secs(86_400)),
                        created_at: T0,
                        payload: payload.clone(),
                        ..Default::default()
                    })
                    .collect();
                p.produce(items).await.unwrap();
                let got = p.lease(100, T0.add(Duration::from_secs(60))).await.unwrap();
                p.complete(vec![got.iter().map(|i| i.id).collect()])
                    .await
                    .unwrap();
            }
            best[k] = best[k].min(t.elapsed().as_secs_f64() * 1e9 / N as f64);
        }
    }
    println!(
        "produce+lease+complete of one 100 B item, memory partition, best of 5: bare {:.0} ns, wrapped {:.0} ns ({:+.1} %)",
        best[0],
        best[1],
        (best[1] / best[0] - 1.0) * 100.0
    );
}
