//! Which backup format a server writes, and items larger than one record: a client that says it reads version 2
//! (`lessor backup` does) gets an item above 16 MiB split into payload parts, which verify and join back byte for
//! byte; a client that does not say (one that predates version 2) gets version 1, as before, and a backup holding
//! an item that version 1 cannot carry fails before its trailer rather than end in a file no reader takes.

#![allow(clippy::unwrap_used)]

use lessor_client::proto as pb;
use lessor_proto::backup as fmt;
use lessor_server::Config;

/// The backup the server streams for `format_version`, whole, or the error that ended it.
async fn backup(c: &lessor_client::Client, format_version: i32) -> Result<Vec<u8>, String> {
    let mut stream = c
        .storage_backup(&pb::StorageBackupRequest {
            format_version,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut file = Vec::new();
    while let Some(chunk) = stream.chunk().await.map_err(|e| e.to_string())? {
        file.extend_from_slice(&chunk);
    }
    Ok(file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gets_the_newest_format_it_reads_and_large_items_in_parts() {
    // Any queue takes 80 MB bodies here (no offload needed): `limits.max-produce-body`.
    let mut config = Config::memory();
    config.limits.max_produce_body = Some(80_000_000);
    let (_srv, c) = lessor_testkit::server::start(&config, None).await;
    c.queues_create(&pb::QueueInfo {
        queue_name: "q".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let big: Vec<u8> = (0..fmt::V1_MAX_PAYLOAD + 1000).map(|i| (i % 251) as u8).collect();
    for payload in [b"small".to_vec(), big.clone()] {
        c.queue_produce(&pb::QueueProduceRequest {
            queue_name: "q".into(),
            request_timeout: "30s".into(),
            items: vec![pb::QueueProduceItem {
                bytes: payload,
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    }

    // Version 2: the big item's payload is in parts of at most PART_BYTES, every record within MAX_RECORD.
    let file = backup(&c, 2).await.unwrap();
    let s = fmt::verify(file.as_slice(), |_, _| {}).unwrap();
    assert_eq!(
        (s.items, s.parts),
        (2, big.len().div_ceil(fmt::PART_BYTES) as u64)
    );
    let mut r = fmt::Reader::new(file.as_slice()).unwrap();
    assert_eq!(r.version(), 2);
    let (mut split, mut parts, mut payloads) = (None, Vec::new(), Vec::new());
    while let Some(rec) = r.next_raw().unwrap() {
        assert!(rec.body.len() <= fmt::MAX_RECORD);
        match rec.kind {
            fmt::RecordKind::Items => {
                let b: fmt::ItemBlock = fmt::decode_body(&rec.body).unwrap();
                if b.payload_len > 0 {
                    split = Some(b);
                } else {
                    payloads.extend(b.items.into_iter().map(|i| i.payload));
                }
            }
            fmt::RecordKind::Part => parts.push(fmt::decode_body::<fmt::PayloadPart>(&rec.body).unwrap()),
            fmt::RecordKind::Header | fmt::RecordKind::Trailer => {}
        }
    }
    let joined = fmt::join_parts(split.expect("a split block"), parts).unwrap();
    assert!(
        joined.items[0].payload == big,
        "the parts join back byte for byte"
    );
    assert_eq!(payloads, [&b"small"[..]]);

    // Version 1 (a client that does not say): the item does not fit a record, so the backup ends before its
    // trailer (the server's log names the item), and what came is refused as incomplete.
    match backup(&c, 0).await {
        Err(_) => {}
        Ok(file) => {
            let e = fmt::verify(file.as_slice(), |_, _| {}).unwrap_err();
            assert!(matches!(e, fmt::BackupError::Truncated(_)), "{e}");
        }
    }
    // Without the big item, version 1 is what such a client always got.
    c.queue_clear(&pb::QueueClearRequest {
        queue_name: "q".into(),
        queue: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let file = backup(&c, 0).await.unwrap();
    assert_eq!(fmt::Reader::new(file.as_slice()).unwrap().version(), 1);
    fmt::verify(file.as_slice(), |_, _| {}).unwrap();
}
