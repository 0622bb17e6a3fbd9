//! What decoding a request costs in memory against what its body costs on the wire, measured with a counting
//! global allocator: the bytes allocated while the server answers it.
//!
//! A repeated message field costs two bytes on the wire per element in protobuf (`{},` three in JSON) and a whole
//! decoded struct in memory (a `QueueProduceItem` is about 180 bytes): a produce body of 5 MB of empty items would
//! decode to about 450 MB, and a 64 MB body (`limits.max-offload-produce-body`) to several GB, before any item
//! count is checked. The count must be bounded before the body is decoded.

use std::alloc::System;

use lessor_client::{proto as pb, Client};
use lessor_server::{start, Config};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated so far by the whole process (freed or not): what a request made the allocator hand out is the
/// difference across it, an upper bound of how far it made the live memory grow.
fn allocated() -> usize {
    GLOBAL.stats().bytes_allocated
}

/// Protobuf body and JSON body of a produce to `q` with `n` empty items.
fn empty_items(n: usize) -> (Vec<u8>, Vec<u8>) {
    // Field 3 (items), wire type 2 (length-delimited), length 0.
    let mut proto = vec![0x0a, 0x01, b'q'];
    for _ in 0..n {
        proto.extend_from_slice(&[0x1a, 0x00]);
    }
    let mut json = b"{\"queue_name\":\"q\",\"items\":[".to_vec();
    for i in 0..n {
        if i > 0 {
            json.push(b',');
        }
        json.extend_from_slice(b"{}");
    }
    json.extend_from_slice(b"]}");
    (proto, json)
}

/// 500,000 empty items in a 1 MB protobuf body (and 333,333 in a 1 MB JSON body) are refused with 400, and the
/// server's live memory never grows by more than a few times the body while doing so. Before the fix the protobuf
/// body decoded to about 90 MB of items (and was converted once more) before the batch limit refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_empty_items_is_refused_before_it_is_decoded() {
    let srv = start(&Config::memory(), "127.0.0.1:0", None)
        .await
        .expect("server");
    let client = Client::new(&srv.endpoint()).expect("client");
    client
        .queues_create(&pb::QueueInfo {
            queue_name: "q".into(),
            lease_timeout: "1m".into(),
            expire_timeout: "24h".into(),
            requested_partitions: 1,
            ..Default::default()
        })
        .await
        .expect("create q");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/queue.produce", srv.endpoint());
    let (proto, _) = empty_items(500_000);
    let (_, json) = empty_items(333_333);
    for (content_type, body) in [("application/protobuf", proto), ("application/json", json)] {
        let len = body.len();
        // Bodies built, client ready: from here on, allocations are the server's (and the client's copy in flight).
        let before = allocated();
        let answer = http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("sent");
        let status = answer.status().as_u16();
        let text = answer.text().await.expect("answer");
        let grew = allocated() - before;
        assert_eq!(status, 400, "{content_type}: {text}");
        assert!(
            grew < 8 * len,
            "{content_type}: a body of {len} bytes made the server allocate {grew} bytes ({}x): {text}",
            grew / len
        );
    }
}

/// A restore page is a zstd frame of an item block: 1,000,000 empty items (100 times the most a page takes)
/// compress to a few hundred bytes and decoded to about 180 MB of records before the page's item count was checked
/// (64 MiB of them, the most a frame may decompress to, to over 6 GB). The items are counted on the wire first: the
/// page is refused with 400, and the server allocates little more than the decompressed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_page_of_empty_items_is_refused_before_it_is_decoded() {
    use base64::Engine as _;
    let srv = start(&Config::memory(), "127.0.0.1:0", None)
        .await
        .expect("server");
    let block = lessor_proto::backup::ItemBlockShallow {
        queue: "q".into(),
        partition: 0,
        first: 0,
        items: vec![bytes::Bytes::new(); 1_000_000],
        payload_len: 0,
    };
    let frame = lessor_proto::backup::compress(&block);
    drop(block);
    assert!(frame.len() < 10_000, "{} bytes", frame.len());
    let body = serde_json::json!({
        "queue_name": "q",
        "block": base64::engine::general_purpose::STANDARD.encode(&frame),
        "crc32": crc32fast::hash(&frame),
    })
    .to_string();
    let http = reqwest::Client::new();
    let url = format!("{}/v1/storage.restore.import", srv.endpoint());
    let before = allocated();
    let answer = http
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    let status = answer.status().as_u16();
    let text = answer.text().await.expect("answer");
    let grew = allocated() - before;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("block is invalid;") && text.contains("more than 10000 items"),
        "{text}"
    );
    // The decompressed frame is 2 MB; its records would have been about 180 MB.
    assert!(
        grew < 16 << 20,
        "a {}-byte page made the server allocate {grew} bytes",
        frame.len()
    );
}

/// A server that accepts items of 200 MB (`limits.max-offload-produce-body`) takes restore pages of that size, so
/// that such an item can be restored. The pages that allow it do not make a small request decode into a large
/// allocation: a compressed page still decompresses to at most 64 MiB whatever the body limit (one item of 100 MB
/// of zeros is a frame of a few KB, refused), and an uncompressed page (how an item above 64 MiB travels) is counted
/// before it is decoded and allocates what its own body holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_pages_sized_for_large_items_still_refuse_amplification() {
    use lessor_proto::backup as fmt;
    use prost::Message as _;
    let mut config = Config::memory();
    config.limits.max_offload_produce_body = Some(200_000_000);
    let srv = start(&config, "127.0.0.1:0", None).await.expect("server");
    let client = Client::new(&srv.endpoint()).expect("client");
    client
        .queues_create(&pb::QueueInfo {
            queue_name: "q".into(),
            lease_timeout: "1m".into(),
            expire_timeout: "24h".into(),
            requested_partitions: 1,
            ..Default::default()
        })
        .await
        .expect("create q");
    let zeros = fmt::ItemBlock {
        queue: "q".into(),
        items: vec![fmt::ItemRecord {
            payload: bytes::Bytes::from(vec![0u8; 100_000_000]),
            ..Default::default()
        }],
        ..Default::default()
    };
    let bomb = fmt::compress(&zeros);
    drop(zeros);
    assert!(bomb.len() < 100_000, "{} bytes", bomb.len());
    let empties = fmt::ItemBlockShallow {
        queue: "q".into(),
        items: vec![bytes::Bytes::new(); 1_000_000],
        ..Default::default()
    }
    .encode_to_vec();
    let cases = [
        (
            "a compressed page of a 100 MB item",
            bomb,
            false,
            "decompresses to more than 67108864 bytes",
            200 << 20,
        ),
        (
            "an uncompressed page of empty items",
            empties,
            true,
            "more than 10000 items",
            0,
        ),
    ];
    let http = reqwest::Client::new();
    let url = format!("{}/v1/storage.restore.import", srv.endpoint());
    for (what, block, uncompressed, refusal, most) in cases {
        let len = block.len();
        let body = pb::RestoreImportRequest {
            queue_name: "q".into(),
            crc32: i64::from(crc32fast::hash(&block)),
            block,
            uncompressed,
        }
        .encode_to_vec();
        let before = allocated();
        let answer = http
            .post(&url)
            .header("content-type", "application/protobuf")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .expect("sent");
        let status = answer.status().as_u16();
        let text = answer.text().await.expect("answer");
        let grew = allocated() - before;
        assert_eq!(status, 400, "{what}: {text}");
        assert!(
            text.contains("block is invalid;") && text.contains(refusal),
            "{what}: {text}"
        );
        // The compressed page: what 64 MiB decompressed into a growing buffer takes, never its 100 MB (the
        // item's records and copies would be several times that). The uncompressed one: a few times its body.
        let most = if most == 0 { 8 * len } else { most };
        assert!(
            grew < most,
            "{what}: a {len}-byte page made the server allocate {grew} bytes"
        );
    }
}
