//! Payload offload seen from the HTTP API, against a real S3-compatible server (`LESSOR_TEST_S3_ENDPOINT`, from
//! `scripts/s3-test-server.sh`): clients see no difference for large items, a produce whose object cannot be
//! written gets 454 (retry) while small items keep working, and `/metrics` reports the objects.
#![cfg(feature = "s3")]
#![allow(clippy::unwrap_used)]

use lessor_client::proto as pb;
use lessor_server::Config;

const BUCKET: &str = "lessor-http";

async fn endpoint() -> Option<String> {
    lessor_testkit::s3::bucket(BUCKET).await
}

fn config(s3: &str, prefix: &str) -> Config {
    Config::from_yaml(&yaml_of(s3, prefix)).unwrap()
}

fn yaml_of(s3: &str, prefix: &str) -> String {
    format!(
        "object-storage:\n  - name: s3-0\n    endpoint: {s3}\n    bucket: {BUCKET}\n    access-key-id: test\n    \
         secret-access-key: test\n    path-style: true\n    prefix: {prefix}/\n\
         queue-storage:\n  driver: memory\n\
         partition-storage:\n  - name: ram-0\n    driver: memory\n    config:\n      payload-offload: s3-0\n      \
         offload-threshold: 64KiB\n      compression: zstd\n\
         \x20 - name: plain\n    driver: memory\n    affinity: 0\n\
         queues:\n  - name: small-only\n    lease-timeout: 1m\n    expire-timeout: 1h\n    partitions: [ {{ partition: 0, storage-name: plain }} ]\n\
         limits:\n  max-offload-produce-body: 64000000\n"
    )
}

fn produce(queue: &str, payloads: &[Vec<u8>]) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "30s".into(),
        items: payloads
            .iter()
            .map(|p| pb::QueueProduceItem {
                bytes: p.clone(),
                ..Default::default()
            })
            .collect(),
    }
}

fn lease(queue: &str, n: i32) -> pb::QueueLeaseRequest {
    pb::QueueLeaseRequest {
        queue_name: queue.into(),
        batch_size: n,
        client_id: "w".into(),
        request_timeout: "2s".into(),
    }
}

/// Completes every item of a lease.
async fn complete_all(c: &lessor_client::Client, queue: &str, got: &pb::QueueLeaseResponse) {
    c.queue_complete(&pb::QueueCompleteRequest {
        queue_name: queue.into(),
        partition: got.partition,
        request_timeout: "5s".into(),
        ids: got.items.iter().map(|i| i.id.clone()).collect(),
    })
    .await
    .unwrap();
}

async fn create(c: &lessor_client::Client, name: &str) {
    c.queues_create(&pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_item_round_trips_and_metrics_show_the_object() {
    let Some(s3) = endpoint().await else { return };
    let (srv, c) = lessor_testkit::server::start(&config(&s3, "http-rt"), None).await;
    create(&c, "big").await;
    // 20 MiB of not very compressible bytes, and a small item beside it.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let big: Vec<u8> = (0..20 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 64) as u8 + b' '
        })
        .collect();
    let small = b"{\"small\":true}".to_vec();
    // The 5 MB produce limit stays for a queue whose partitions keep their payloads...
    let e = c
        .queue_produce(&produce("small-only", std::slice::from_ref(&big)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(400), "{e}");
    assert!(e.to_string().contains("5000000"), "{e}");
    // ...and max-offload-produce-body applies to one whose partitions offload them.
    c.queue_produce(&produce("big", &[big.clone(), small.clone()]))
        .await
        .unwrap();
    let got = c.queue_lease(&lease("big", 10)).await.unwrap();
    assert_eq!(got.items.len(), 2);
    assert!(
        got.items[0].bytes == big,
        "the 20 MiB payload comes back byte for byte"
    );
    assert_eq!(got.items[1].bytes, small);
    complete_all(&c, "big", &got).await;
    let metrics = reqwest::get(format!("{}/metrics", srv.endpoint()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert!(value("lessor_offload_objects_written_total") >= 1);
    assert!(value("lessor_offload_payload_bytes_total") >= 20 << 20);
    assert!(value("lessor_offload_request_duration_seconds_count") >= 2);
    assert!(
        metrics.contains("lessor_offload_fetch_errors_total{reason=\"missing\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_storage_down_large_produce_gets_454_small_items_work() {
    let Some(_s3) = endpoint().await else { return };
    // Port 9 (discard) is closed on the loopback of test machines.
    let (_srv, c) = lessor_testkit::server::start(&config("http://127.0.0.1:9", "http-down"), None).await;
    create(&c, "down").await;
    let e = c
        .queue_produce(&produce("down", &[vec![b'x'; 200_000]]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(454), "{e}");
    assert!(
        e.to_string().contains("internal error, try your request again;"),
        "{e}"
    );
    assert!(
        e.to_string().contains("object storage"),
        "the message says what failed: {e}"
    );
    // At once: the partition stayed in service (a failed object write is not a failed partition).
    c.queue_produce(&produce("down", &[b"small".to_vec()]))
        .await
        .unwrap();
    let got = c.queue_lease(&lease("down", 10)).await.unwrap();
    assert_eq!(got.items.len(), 1, "only the small item was stored");
    assert_eq!(got.items[0].bytes, b"small");
}

/// A server whose object storage cannot be reached answers a lease of an offloaded item with 454 and keeps the
/// item; the same data served with object storage back hands the item out whole.
#[cfg(feature = "fjall")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_without_object_storage_gets_454_and_the_item_stays() {
    let Some(s3) = endpoint().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = serde_json_path(dir.path());
    let fjall = |s3: &str| {
        Config::from_yaml(&format!(
            "object-storage:\n  - name: s3-0\n    endpoint: {s3}\n    bucket: {BUCKET}\n    access-key-id: test\n    \
             secret-access-key: test\n    path-style: true\n    prefix: http-lease-{}/\n\
             queue-storage:\n  driver: fjall\n  config:\n    storage-dir: {d}\n\
             partition-storage:\n  - name: disk-0\n    driver: fjall\n    config:\n      storage-dir: {d}\n      \
             payload-offload: s3-0\n",
            std::process::id()
        ))
        .unwrap()
    };
    let big = vec![b'y'; 300_000];
    let (srv, c) = lessor_testkit::server::start(&fjall(&s3), None).await;
    create(&c, "q").await;
    c.queue_produce(&produce("q", std::slice::from_ref(&big)))
        .await
        .unwrap();
    srv.stop().await;

    let (srv, c) = lessor_testkit::server::start(&fjall("http://127.0.0.1:9"), None).await;
    let e = c.queue_lease(&lease("q", 1)).await.unwrap_err();
    assert_eq!(e.code(), Some(454), "{e}");
    srv.stop().await;

    let (_srv, c) = lessor_testkit::server::start(&fjall(&s3), None).await;
    let got = c.queue_lease(&lease("q", 1)).await.unwrap();
    assert_eq!(got.items.len(), 1, "the item stayed leasable");
    assert!(got.items[0].bytes == big);
}

/// A path as a YAML scalar (JSON strings are YAML).
#[cfg(feature = "fjall")]
fn serde_json_path(p: &std::path::Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

/// `queue.stats` reports items and bytes per storage tier only when asked (`with_tiers`, field 101): a Querator
/// client's reply is unchanged. Offloaded payloads count in the object tier with their length, not in the bytes
/// of the memory tier that holds their items; `queues.overview` and `/metrics` show the queue's sums.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_tiers_only_when_asked() {
    let Some(s3) = endpoint().await else { return };
    let (srv, c) = lessor_testkit::server::start(&config(&s3, "http-tiers"), None).await;
    create(&c, "tiered").await;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut big = || -> Vec<u8> {
        (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 64) as u8 + b' '
            })
            .collect()
    };
    let small: Vec<Vec<u8>> = ["{\"n\":1}", "{\"n\":22}", "{\"n\":333}"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let small_bytes: usize = small.iter().map(Vec::len).sum();
    let mut payloads = vec![big(), big()];
    payloads.extend(small.iter().cloned());
    c.queue_produce(&produce("tiered", &payloads)).await.unwrap();
    let http = reqwest::Client::new();
    let stats = |body: &'static str| {
        let req = http
            .post(format!("{}/v1/queue.stats", srv.endpoint()))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            serde_json::from_slice::<serde_json::Value>(&r.bytes().await.unwrap()).unwrap()
        }
    };
    // Not asked for: exactly Querator's keys.
    let plain = stats(r#"{"queue_name":"tiered"}"#).await;
    let part = &plain["logicalQueues"][0]["partitions"][0];
    let keys: Vec<&String> = part.as_object().unwrap().keys().collect();
    assert!(part.get("tiers").is_none(), "tiers without asking: {part}");
    for k in &keys {
        assert!(
            [
                "partition",
                "total",
                "total_leased",
                "failures",
                "average_age",
                "average_leased_age",
                "scheduled"
            ]
            .contains(&k.as_str()),
            "a key Querator's QueuePartitionStats lacks: {k}"
        );
    }
    assert_eq!(part["total"], 5);
    // Asked for (protojson: int64 figures are strings, zero ones left out).
    let with = stats(r#"{"queue_name":"tiered","with_tiers":true}"#).await;
    let t = &with["logicalQueues"][0]["partitions"][0]["tiers"];
    assert_eq!(t["memory_items"], "5", "{t}");
    assert_eq!(t["memory_bytes"], small_bytes.to_string(), "{t}");
    assert_eq!(t["object_items"], "2", "{t}");
    assert_eq!(t["object_bytes"], "400000", "{t}");
    assert!(
        t.get("disk_items").is_none(),
        "a memory store holds nothing on disk: {t}"
    );
    // The same through the client (protobuf).
    let r = c
        .queue_stats(&pb::QueueStatsRequest {
            queue_name: "tiered".into(),
            with_tiers: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let t = r.logical_queues[0].partitions[0].tiers.clone().unwrap();
    assert_eq!((t.memory_items, t.object_items, t.object_bytes), (5, 2, 400_000));
    // Completing the large items empties the object tier.
    let got = c.queue_lease(&lease("tiered", 2)).await.unwrap();
    complete_all(&c, "tiered", &got).await;
    let after = stats(r#"{"queue_name":"tiered","withTiers":true}"#).await;
    let t = &after["logicalQueues"][0]["partitions"][0]["tiers"];
    assert_eq!(t["memory_items"], "3", "{t}");
    assert!(t.get("object_items").is_none(), "{t}");
    // queues.overview sums the partitions.
    let o = c
        .call::<pb::routes::QueuesOverview>(&pb::QueuesOverviewRequest::default())
        .await
        .unwrap();
    let row = o.items.iter().find(|r| r.queue_name == "tiered").unwrap();
    let t = row.tiers.clone().unwrap();
    assert_eq!(
        (t.memory_items, t.memory_bytes, t.object_items),
        (3, small_bytes as i64, 0)
    );
    // /metrics: gauges per queue and tier (the stats above refreshed them).
    let metrics = reqwest::get(format!("{}/metrics", srv.endpoint()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (line, want) in [
        ("lessor_queue_tier_items{queue=\"tiered\",tier=\"memory\"}", "3"),
        ("lessor_queue_tier_items{queue=\"tiered\",tier=\"object\"}", "0"),
        ("lessor_queue_tier_bytes{queue=\"tiered\",tier=\"disk\"}", "0"),
    ] {
        let got = metrics
            .lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("{line} missing from /metrics:\n{metrics}"));
        assert_eq!(got, want, "{line}");
    }
}

/// `offload.sweep` runs the sweeper at once: an unreferenced object older than the store's grace is deleted, one
/// an item references never is, and a young orphan is spared until it is older than the grace. Asking a store
/// that does not exist, or one without object storage, is a 400 naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_sweep_deletes_old_orphans_only() {
    let Some(s3) = endpoint().await else { return };
    // A prefix of this run only: the test server keeps the objects of earlier runs.
    let prefix = format!(
        "http-sweep-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let cfg = Config::from_yaml(&yaml_of(&s3, &prefix).replace(
        "compression: zstd\n",
        "compression: zstd\n      offload-grace: 3s\n",
    ))
    .unwrap();
    let (_srv, c) = lessor_testkit::server::start(&cfg, None).await;
    create(&c, "swept").await;
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    c.queue_produce(&produce("swept", std::slice::from_ref(&big)))
        .await
        .unwrap();
    // An object no item references, where a crash between writing an object and storing its item leaves one.
    // Signed requests, so that any S3 server will do (moto or s3s-fs).
    let objects = lessor_storage::offload::client(&lessor_storage::offload::ObjectStoreConfig {
        name: "s3-0".into(),
        endpoint: s3.clone(),
        bucket: BUCKET.into(),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        path_style: true,
        ..Default::default()
    })
    .unwrap();
    let orphan = object_store::path::Path::from(format!("{prefix}/ram-0/swept/0/{}", "0f".repeat(16)));
    objects
        .put(&orphan, object_store::PutPayload::from(vec![1u8; 1000]))
        .await
        .unwrap();
    let sweep = |store: &str| {
        let req = pb::OffloadSweepRequest { store: store.into() };
        let c = &c;
        async move { c.offload_sweep(&req).await }
    };
    // Younger than the grace: spared.
    let r = sweep("").await.unwrap();
    assert_eq!(r.stores.len(), 1, "{r:?}");
    let s = &r.stores[0];
    assert_eq!(
        (s.store.as_str(), s.listed, s.deleted, s.spared, s.not_open),
        ("ram-0", 2, 0, 2, 0)
    );
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    // Older than the grace: the orphan goes, the referenced object stays.
    let r = sweep("ram-0").await.unwrap();
    let s = &r.stores[0];
    assert_eq!((s.listed, s.deleted, s.spared), (2, 1, 1), "{r:?}");
    assert!(
        matches!(
            objects.head(&orphan).await,
            Err(object_store::Error::NotFound { .. })
        ),
        "the orphan is gone"
    );
    let got = c.queue_lease(&lease("swept", 1)).await.unwrap();
    assert!(got.items[0].bytes == big, "the referenced payload is intact");
    // Nothing left to delete.
    let r = sweep("").await.unwrap();
    assert_eq!((r.stores[0].listed, r.stores[0].deleted), (1, 0));
    // Bad requests: an unknown store, a store without object storage.
    let e = sweep("nope").await.unwrap_err();
    assert_eq!(e.code(), Some(400), "{e}");
    assert!(
        e.to_string().contains("no partition store is named 'nope'"),
        "{e}"
    );
    assert!(
        e.to_string().contains("ram-0, plain"),
        "the known stores are named: {e}"
    );
    let e = sweep("plain").await.unwrap_err();
    assert_eq!(e.code(), Some(400), "{e}");
    assert!(
        e.to_string()
            .contains("partition store 'plain' has no payload-offload configured"),
        "{e}"
    );
}

/// A server without object storage answers `offload.sweep` with a 400 saying there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_sweep_without_object_storage_is_400() {
    let cfg = Config::from_yaml(
        "queue-storage:\n  driver: memory\npartition-storage:\n  - name: ram\n    driver: memory\n",
    )
    .unwrap();
    let (_srv, c) = lessor_testkit::server::start(&cfg, None).await;
    let e = c
        .offload_sweep(&pb::OffloadSweepRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(400), "{e}");
    assert!(
        e.to_string()
            .contains("no object storage; no partition store of this server has payload-offload"),
        "{e}"
    );
}
