//! Black-box tests of the wire types: protobuf field numbers, protojson names and rules, and round-trips
//! through the codec in both encodings.

use std::collections::HashMap;

use lessor_proto::*;
use serde_json::{json, Value};

fn to_json<T: serde::Serialize>(m: &T) -> Value {
    serde_json::to_value(m).expect("serialize")
}

fn from_json<T: prost::Message + Default + serde::de::DeserializeOwned>(s: &str) -> Result<T, CodecError> {
    decode(Encoding::Json, s.as_bytes())
}

fn sample_produce() -> QueueProduceRequest {
    QueueProduceRequest {
        queue_name: "orders".into(),
        request_timeout: "1m0s".into(),
        items: vec![
            QueueProduceItem {
                encoding: "json".into(),
                kind: "webhook-v1".into(),
                reference: "account-1".into(),
                enqueue_at: Some(Timestamp::new(1_767_323_045, 123_456_000)),
                bytes: vec![0, 1, 2, 250, 251, 252, 253, 254, 255],
                utf8: String::new(),
                ..Default::default()
            },
            QueueProduceItem {
                utf8: "hello".into(),
                ..Default::default()
            },
        ],
    }
}

fn sample_storage_item() -> StorageItem {
    StorageItem {
        id: "0001".into(),
        source_id: "src".into(),
        is_leased: true,
        lease_deadline: Some(Timestamp::new(10, 0)),
        expire_deadline: Some(Timestamp::new(20, 5_000_000)),
        dead_deadline: Some(Timestamp::new(30, 0)),
        created_at: Some(Timestamp::new(40, 7)),
        updated_at: Some(Timestamp::new(50, 0)),
        enqueue_at: Some(Timestamp::new(60, 0)),
        attempts: 3,
        max_attempts: 10,
        reference: "r".into(),
        encoding: "e".into(),
        kind: "k".into(),
        payload: b"payload".to_vec(),
        priority: 0,
    }
}

fn round_trip<T>(msg: &T)
where
    T: prost::Message
        + Default
        + serde::Serialize
        + serde::de::DeserializeOwned
        + PartialEq
        + std::fmt::Debug,
{
    for enc in [Encoding::Json, Encoding::Protobuf] {
        let bytes = encode(enc, msg);
        let back: T = decode(enc, &bytes).unwrap_or_else(|e| panic!("{enc:?}: {e}"));
        assert_eq!(&back, msg, "{enc:?} round trip");
    }
}

#[test]
fn round_trips_in_both_encodings() {
    round_trip(&sample_produce());
    round_trip(&QueueLeaseRequest {
        queue_name: "q".into(),
        batch_size: 10,
        client_id: "c".into(),
        request_timeout: "5s".into(),
    });
    round_trip(&QueueLeaseResponse {
        queue_name: "q".into(),
        partition: 2,
        items: vec![QueueLeaseItem {
            encoding: "e".into(),
            kind: "k".into(),
            reference: "r".into(),
            id: "id1".into(),
            attempts: 1,
            lease_deadline: Some(Timestamp::new(1, 1_000)),
            bytes: b"x".to_vec(),
            priority: 0,
        }],
    });
    round_trip(&QueueCompleteRequest {
        queue_name: "q".into(),
        partition: 1,
        request_timeout: "1s".into(),
        ids: vec!["a".into(), "b".into()],
    });
    round_trip(&QueueRetryRequest {
        queue_name: "q".into(),
        partition: 1,
        items: vec![QueueRetryItem {
            id: "a".into(),
            retry_at: Some(Timestamp::new(5, 0)),
            dead: true,
        }],
    });
    round_trip(&QueueStatsRequest {
        queue_name: "q".into(),
        ..Default::default()
    });
    round_trip(&QueueStatsResponse {
        queue_name: "q".into(),
        logical_queues: vec![QueueLogicalStats {
            produce_waiting: 1,
            lease_waiting: 2,
            complete_waiting: 3,
            in_flight: 4,
            partitions: vec![QueuePartitionStats {
                partition: 0,
                total: 5,
                total_leased: 6,
                failures: -1,
                average_age: "1m0s".into(),
                average_leased_age: "2s".into(),
                scheduled: 7,
                un_leased: 8,
                next_lifecycle_run: "3s".into(),
                oldest_ready_age: "9s".into(),
                tiers: Some(QueueTierStats {
                    memory_items: 1,
                    memory_bytes: 2,
                    disk_items: 3,
                    disk_bytes: 4,
                    object_items: 5,
                    object_bytes: 6 << 40,
                }),
            }],
        }],
    });
    round_trip(&QueueClearRequest {
        queue_name: "q".into(),
        scheduled: true,
        queue: true,
        destructive: true,
    });
    round_trip(&QueueReloadRequest {
        queue_name: "q".into(),
    });
    let info = QueueInfo {
        queue_name: "q".into(),
        created_at: Some(Timestamp::new(1, 0)),
        updated_at: Some(Timestamp::new(2, 0)),
        dead_queue: "q-dlq".into(),
        reference: "ref".into(),
        lease_timeout: "1m0s".into(),
        expire_timeout: "24h0m0s".into(),
        max_attempts: 5,
        requested_partitions: 3,
        partitions: vec![PartitionInfo { partition: 0 }, PartitionInfo { partition: 1 }],
        namespace: "ns".into(),
        ..Default::default()
    };
    round_trip(&info);
    round_trip(&QueuesListRequest {
        pivot: "a".into(),
        limit: 10,
        namespace: "ns".into(),
    });
    round_trip(&QueuesListResponse {
        items: vec![info.clone(), QueueInfo::default()],
    });
    round_trip(&QueuesDeleteRequest {
        queue_name: "q".into(),
        force: true,
    });
    round_trip(&QueuesInfoRequest {
        queue_name: "q".into(),
    });
    round_trip(&StorageItemsListRequest {
        queue_name: "q".into(),
        partition: 1,
        pivot: "p".into(),
        limit: 2,
    });
    round_trip(&StorageItemsListResponse {
        items: vec![sample_storage_item()],
    });
    round_trip(&StorageItemsImportRequest {
        queue_name: "q".into(),
        partition: 1,
        items: vec![sample_storage_item()],
    });
    round_trip(&StorageItemsImportResponse {
        items: vec![sample_storage_item()],
    });
    round_trip(&StorageItemsDeleteRequest {
        queue_name: "q".into(),
        partition: 1,
        ids: vec!["x".into()],
    });
    let mut reply = Reply::new(454, "queue is overloaded; try again later");
    reply.details.insert("k".into(), "v".into());
    round_trip(&reply);
    round_trip(&Reply::ok());
}

#[test]
fn protobuf_field_numbers_match_querator() {
    use prost::Message;
    // queue_name = 1 (string): key 0x0a.
    assert_eq!(
        QueueStatsRequest {
            queue_name: "q".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        vec![0x0a, 1, b'q']
    );
    // QueueClearRequest: scheduled = 3, queue = 4, destructive = 5 (varints 0x18, 0x20, 0x28).
    let clear = QueueClearRequest {
        queue_name: String::new(),
        scheduled: true,
        queue: true,
        destructive: true,
    };
    assert_eq!(clear.encode_to_vec(), vec![0x18, 1, 0x20, 1, 0x28, 1]);
    // QueueLogicalStats starts at field 6; in_flight is 10, partitions 11.
    let ls = QueueLogicalStats {
        produce_waiting: 1,
        lease_waiting: 1,
        complete_waiting: 1,
        in_flight: 1,
        partitions: vec![QueuePartitionStats::default()],
    };
    assert_eq!(
        ls.encode_to_vec(),
        vec![0x30, 1, 0x38, 1, 0x40, 1, 0x50, 1, 0x5a, 0]
    );
    // QueuesListRequest: pivot = 2, limit = 3, namespace = 4.
    let list = QueuesListRequest {
        pivot: "p".into(),
        limit: 1,
        namespace: "n".into(),
    };
    assert_eq!(list.encode_to_vec(), vec![0x12, 1, b'p', 0x18, 1, 0x22, 1, b'n']);
    // StorageItemsImportResponse.items is field 2.
    let resp = StorageItemsImportResponse {
        items: vec![StorageItem::default()],
    };
    assert_eq!(resp.encode_to_vec(), vec![0x12, 0]);
    // StorageItem.payload is field 15 (key 0x7a).
    let item = StorageItem {
        payload: vec![9],
        ..Default::default()
    };
    assert_eq!(item.encode_to_vec(), vec![0x7a, 1, 9]);
    // QueueProduceItem: enqueue_at = 4, bytes = 5, utf8 = 6.
    let pi = QueueProduceItem {
        enqueue_at: Some(Timestamp::new(1, 2)),
        bytes: vec![7],
        utf8: "u".into(),
        ..Default::default()
    };
    assert_eq!(
        pi.encode_to_vec(),
        vec![0x22, 4, 0x08, 1, 0x10, 2, 0x2a, 1, 7, 0x32, 1, b'u']
    );
    // QueueInfo.namespace is field 11 (key 0x5a).
    let qi = QueueInfo {
        namespace: "n".into(),
        ..Default::default()
    };
    assert_eq!(qi.encode_to_vec(), vec![0x5a, 1, b'n']);
    // Reply: code = 1, code_text = 2, message = 3, details = 4.
    let mut r = Reply {
        code: 400,
        code_text: "B".into(),
        message: "m".into(),
        details: HashMap::new(),
    };
    r.details.insert("k".into(), "v".into());
    assert_eq!(
        r.encode_to_vec(),
        vec![0x08, 0x90, 0x03, 0x12, 1, b'B', 0x1a, 1, b'm', 0x22, 6, 0x0a, 1, b'k', 0x12, 1, b'v']
    );
}

#[test]
fn json_output_uses_json_names_and_omits_zero_values() {
    let v = to_json(&sample_produce());
    assert_eq!(
        v,
        json!({
            "queue_name": "orders",
            "request_timeout": "1m0s",
            "items": [
                {
                    "encoding": "json",
                    "kind": "webhook-v1",
                    "reference": "account-1",
                    "enqueue_at": "2026-01-02T03:04:05.123456Z",
                    "bytes": "AAEC+vv8/f7/"
                },
                { "utf8": "hello" }
            ]
        })
    );
    assert_eq!(to_json(&QueueInfo::default()), json!({}));
    assert_eq!(to_json(&QueueLeaseResponse::default()), json!({}));
    assert_eq!(to_json(&Reply::ok()), json!({"code": 200, "code_text": "OK"}));
    let stats = QueueStatsResponse {
        queue_name: "q".into(),
        logical_queues: vec![QueueLogicalStats {
            in_flight: 2,
            ..Default::default()
        }],
    };
    assert_eq!(
        to_json(&stats),
        json!({"queue_name": "q", "logicalQueues": [{"in_flight": 2}]})
    );
    let item = StorageItem {
        source_id: "s".into(),
        is_leased: true,
        ..Default::default()
    };
    assert_eq!(to_json(&item), json!({"source_id": "s", "is_leased": true}));
}

#[test]
fn json_field_order_follows_field_numbers() {
    let text = String::from_utf8(encode(Encoding::Json, &Reply::new(400, "bad"))).expect("utf8");
    assert_eq!(text, r#"{"code":400,"code_text":"Bad Request","message":"bad"}"#);
}

#[test]
fn json_accepts_json_name_and_proto_name() {
    let snake: QueueLeaseRequest =
        from_json(r#"{"queue_name":"q","batch_size":5,"client_id":"c","request_timeout":"1s"}"#)
            .expect("snake");
    let camel: QueueLeaseRequest =
        from_json(r#"{"queueName":"q","batchSize":5,"clientId":"c","requestTimeout":"1s"}"#).expect("camel");
    assert_eq!(snake, camel);
    assert_eq!(snake.batch_size, 5);

    let stats: QueueStatsResponse =
        from_json(r#"{"queueName":"q","logicalQueues":[{"inFlight":1}]}"#).expect("ok");
    assert_eq!(stats.logical_queues[0].in_flight, 1);
    // logicalQueues has no snake_case json_name, so protojson does not know "logical_queues".
    let err = from_json::<QueueStatsResponse>(r#"{"logical_queues":[]}"#).expect_err("should fail");
    assert!(
        err.to_string().contains("unknown field 'logical_queues'"),
        "{err}"
    );

    let reply: Reply = from_json(r#"{"code":454,"codeText":"Retry Request","message":"m"}"#).expect("reply");
    assert_eq!(reply.code_text, "Retry Request");
    let item: StorageItem =
        from_json(r#"{"isLeased":true,"leaseDeadline":"1970-01-01T00:00:01Z"}"#).expect("it");
    assert!(item.is_leased);
    assert_eq!(item.lease_deadline, Some(Timestamp::new(1, 0)));
}

#[test]
fn json_rejects_unknown_fields_naming_them() {
    let err = from_json::<QueueStatsRequest>(r#"{"foo":1}"#).expect_err("should fail");
    assert_eq!(
        err.to_string(),
        "invalid JSON: unknown field 'foo' at line 1 column 6"
    );
    let err = from_json::<QueueProduceRequest>(r#"{"queue_name":"q","items":[{"payload":"x"}]}"#)
        .expect_err("should fail");
    assert!(err.to_string().contains("unknown field 'payload'"), "{err}");
    // Querator's OpenAPI drift: `name` is not a field of QueuesInfoRequest.
    let err = from_json::<QueuesInfoRequest>(r#"{"name":"q"}"#).expect_err("should fail");
    assert!(err.to_string().contains("unknown field 'name'"), "{err}");
}

#[test]
fn json_rejects_duplicates_wrong_types_and_non_objects() {
    let err =
        from_json::<QueueStatsRequest>(r#"{"queue_name":"a","queueName":"b"}"#).expect_err("should fail");
    assert!(err.to_string().contains("duplicate field 'queueName'"), "{err}");
    for bad in [
        r#"{"queue_name":1}"#,
        r#"{"batch_size":"x"}"#,
        r#"{"batch_size":1.5}"#,
        r#"{"batch_size":4294967296}"#,
        r#"{"batch_size":true}"#,
        r#"["q",1]"#,
        r#"null"#,
        r#"{"queue_name":"q"} trailing"#,
        r#"{"queue_name":"q""#,
        " ",
    ] {
        assert!(from_json::<QueueLeaseRequest>(bad).is_err(), "{bad} should fail");
    }
    assert!(from_json::<QueueClearRequest>(r#"{"queue":"true"}"#).is_err());
    assert!(from_json::<QueueCompleteRequest>(r#"{"ids":[null]}"#).is_err());
    assert!(from_json::<QueueProduceRequest>(r#"{"items":[null]}"#).is_err());
    assert!(from_json::<QueueProduceRequest>(r#"{"items":{}}"#).is_err());
}

#[test]
fn json_null_means_default() {
    let r: QueueProduceRequest = from_json(
        r#"{"queue_name":null,"request_timeout":null,"items":[{"bytes":null,"enqueue_at":null,"utf8":null}]}"#,
    )
    .expect("nulls");
    assert_eq!(
        r,
        QueueProduceRequest {
            items: vec![QueueProduceItem::default()],
            ..Default::default()
        }
    );
    let r: QueueLeaseRequest = from_json(r#"{"batch_size":null}"#).expect("null int");
    assert_eq!(r.batch_size, 0);
    let r: QueueClearRequest = from_json(r#"{"queue":null}"#).expect("null bool");
    assert!(!r.queue);
    let r: Reply = from_json(r#"{"details":null}"#).expect("null map");
    assert!(r.details.is_empty());
}

#[test]
fn json_int32_accepts_numbers_and_strings() {
    for (text, want) in [
        (r#"{"batch_size":7}"#, 7),
        (r#"{"batch_size":"7"}"#, 7),
        (r#"{"batch_size":"-7"}"#, -7),
        (r#"{"batch_size":7.0}"#, 7),
        (r#"{"batch_size":1e2}"#, 100),
        (r#"{"batch_size":2147483647}"#, i32::MAX),
        (r#"{"batch_size":-2147483648}"#, i32::MIN),
    ] {
        let r: QueueLeaseRequest = from_json(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(r.batch_size, want, "{text}");
    }
    for bad in [
        r#"{"batch_size":"2147483648"}"#,
        r#"{"batch_size":" 7"}"#,
        r#"{"batch_size":""}"#,
    ] {
        assert!(from_json::<QueueLeaseRequest>(bad).is_err(), "{bad}");
    }
}

#[test]
fn json_bytes_are_base64_in_every_common_form() {
    let want = vec![0xfb, 0xff, 0xbf];
    for text in ["+/+/", "-_-_"] {
        let body = format!(r#"{{"bytes":"{text}"}}"#);
        let item: QueueProduceItem = from_json(&body).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(item.bytes, want, "{text}");
    }
    for (text, want) in [
        ("aGk=", b"hi".to_vec()),
        ("aGk", b"hi".to_vec()),
        ("", Vec::new()),
    ] {
        let body = format!(r#"{{"bytes":"{text}"}}"#);
        let item: QueueProduceItem = from_json(&body).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(item.bytes, want, "{text}");
    }
    let err = from_json::<QueueProduceItem>(r#"{"bytes":"not base64!"}"#).expect_err("should fail");
    assert!(err.to_string().contains("invalid base64"), "{err}");
    // Output is standard alphabet with padding.
    let item = QueueProduceItem {
        bytes: b"hi".to_vec(),
        ..Default::default()
    };
    assert_eq!(to_json(&item), json!({"bytes": "aGk="}));
}

#[test]
fn timestamps_format_like_protojson() {
    let cases = [
        (Timestamp::new(0, 0), "1970-01-01T00:00:00Z"),
        (Timestamp::new(1_767_323_045, 0), "2026-01-02T03:04:05Z"),
        (
            Timestamp::new(1_767_323_045, 100_000_000),
            "2026-01-02T03:04:05.100Z",
        ),
        (
            Timestamp::new(1_767_323_045, 123_000_000),
            "2026-01-02T03:04:05.123Z",
        ),
        (
            Timestamp::new(1_767_323_045, 123_456_000),
            "2026-01-02T03:04:05.123456Z",
        ),
        (
            Timestamp::new(1_767_323_045, 123_456_789),
            "2026-01-02T03:04:05.123456789Z",
        ),
        (Timestamp::new(1_767_323_045, 1), "2026-01-02T03:04:05.000000001Z"),
        (Timestamp::new(-1, 0), "1969-12-31T23:59:59Z"),
        (Timestamp::new(951_782_400, 0), "2000-02-29T00:00:00Z"),
        (Timestamp::new(timestamp::MIN_SECONDS, 0), "0001-01-01T00:00:00Z"),
        (
            Timestamp::new(timestamp::MAX_SECONDS, 999_999_999),
            "9999-12-31T23:59:59.999999999Z",
        ),
    ];
    for (ts, text) in cases {
        assert_eq!(ts.to_rfc3339(), text);
        assert_eq!(Timestamp::parse_rfc3339(text), Ok(ts), "{text}");
        let item = QueueRetryItem {
            retry_at: Some(ts),
            ..Default::default()
        };
        assert_eq!(to_json(&item), json!({ "retry_at": text }));
    }
}

#[test]
fn timestamps_parse_offsets_and_fractions() {
    let base = Timestamp::new(1_767_323_045, 0);
    for (text, want) in [
        ("2026-01-02T04:04:05+01:00", base),
        ("2026-01-02T02:34:05-00:30", base),
        (
            "2026-01-02T03:04:05.5Z",
            Timestamp::new(base.seconds, 500_000_000),
        ),
        ("2026-01-02T03:04:05.0000001Z", Timestamp::new(base.seconds, 100)),
    ] {
        assert_eq!(Timestamp::parse_rfc3339(text), Ok(want), "{text}");
    }
    for bad in [
        "",
        "2026-01-02",
        "2026-01-02 03:04:05Z",
        "2026-01-02T03:04:05",
        "2026-01-02T03:04:05.Z",
        "2026-01-02T03:04:05.1234567890Z",
        "2026-13-02T03:04:05Z",
        "2026-02-29T03:04:05Z",
        "2026-01-02T24:00:00Z",
        "2026-01-02T03:04:60Z",
        "2026-01-02T03:04:05+24:00",
        "2026-01-02T03:04:05Zjunk",
        "0000-12-31T23:59:59Z",
        "0001-01-01T00:00:00+00:01",
        "２026-01-02T03:04:05Z",
    ] {
        assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad} should fail");
    }
    let err = from_json::<QueueRetryItem>(r#"{"retry_at":"yesterday"}"#).expect_err("should fail");
    assert!(err.to_string().contains("invalid timestamp 'yesterday'"), "{err}");
    assert!(from_json::<QueueRetryItem>(r#"{"retry_at":12}"#).is_err());
}

#[test]
fn timestamp_system_time_conversions() {
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(5, 7);
    let ts = Timestamp::from(t);
    assert_eq!(ts, Timestamp::new(5, 7));
    assert_eq!(ts.to_system_time(), Some(t));
    let before = std::time::UNIX_EPOCH - std::time::Duration::new(1, 500_000_000);
    let ts = Timestamp::from(before);
    assert_eq!(ts, Timestamp::new(-2, 500_000_000));
    assert_eq!(ts.to_system_time(), Some(before));
    assert_eq!(Timestamp::new(1, -1).normalized(), Timestamp::new(0, 999_999_999));
}

#[test]
fn empty_body_is_the_default_message() {
    let a: QueueLeaseRequest = decode(Encoding::Json, b"").expect("json");
    let b: QueueLeaseRequest = decode(Encoding::Protobuf, b"").expect("pb");
    assert_eq!(a, QueueLeaseRequest::default());
    assert_eq!(b, QueueLeaseRequest::default());
    let c: QueueLeaseRequest = decode(Encoding::Json, b"{}").expect("{}");
    assert_eq!(c, QueueLeaseRequest::default());
}

#[test]
fn invalid_protobuf_is_reported() {
    let err = decode::<QueueLeaseRequest>(Encoding::Protobuf, &[0x0a, 5, b'a']).expect_err("should fail");
    assert!(err.to_string().starts_with("invalid protobuf: "), "{err}");
    // A string field holding invalid UTF-8.
    let err = decode::<QueueLeaseRequest>(Encoding::Protobuf, &[0x0a, 1, 0xff]).expect_err("should fail");
    assert!(matches!(err, CodecError::InvalidProtobuf(_)), "{err}");
    // Protobuf ignores unknown fields (unlike JSON).
    let ok: QueueStatsRequest = decode(Encoding::Protobuf, &[0x0a, 1, b'q', 0x78, 1]).expect("unknown field");
    assert_eq!(ok.queue_name, "q");
}

// ---- Lessor extensions ----------------------------------------------------------------------------------------

// The JSON keys of Querator's messages: a strict protojson decoder of them accepts nothing else.
use lessor_proto::querator_keys::{
    LEASE_ITEM as QUERATOR_LEASE_ITEM, QUEUE_INFO as QUERATOR_QUEUE_INFO,
    STORAGE_ITEM as QUERATOR_STORAGE_ITEM,
};

fn only_keys(v: &Value, allowed: &[&str]) {
    for k in v.as_object().expect("an object").keys() {
        assert!(allowed.contains(&k.as_str()), "'{k}' is not Querator's: {v}");
    }
}

fn full_queue_info() -> QueueInfo {
    QueueInfo {
        queue_name: "q".into(),
        created_at: Some(Timestamp::new(1, 0)),
        updated_at: Some(Timestamp::new(2, 0)),
        dead_queue: "q-dlq".into(),
        reference: "ref".into(),
        lease_timeout: "30s".into(),
        expire_timeout: "24h0m0s".into(),
        max_attempts: 5,
        requested_partitions: 3,
        partitions: vec![PartitionInfo { partition: 0 }],
        namespace: "ns".into(),
        dedup_window: "10m0s".into(),
        retry_backoff: Some(RetryBackoff {
            base: "1s".into(),
            max: "5m0s".into(),
            factor: 2.5,
            jitter: 0.2,
        }),
        paused: true,
        max_lease_timeout: "1h0m0s".into(),
        restoring: true,
    }
}

#[test]
fn extension_messages_round_trip_in_both_encodings() {
    round_trip(&full_queue_info());
    round_trip(&QueuesOverviewRequest {
        namespace: "team-a".into(),
        pivot: "b".into(),
        limit: 50,
    });
    round_trip(&QueuesOverviewResponse {
        items: vec![QueueOverview {
            queue_name: "q".into(),
            namespace: "team-a".into(),
            ready: 1,
            leased: 2,
            scheduled: 3,
            dead_queue: "q-dlq".into(),
            dead_depth: 4,
            produce_rate: 1.5,
            lease_rate: 0.5,
            complete_rate: 0.25,
            oldest_ready_age: "1m30s".into(),
            paused: true,
            error: "e".into(),
            stats_hidden: true,
            tiers: Some(QueueTierStats {
                disk_items: 7,
                disk_bytes: 8,
                ..Default::default()
            }),
        }],
        next_pivot: "r".into(),
    });
    round_trip(&AuthWhoamiResponse {
        auth_enabled: true,
        user_id: "u".into(),
        username: "alice".into(),
        key_id: "k".into(),
        namespace_scope: "team-a".into(),
        namespaces: vec![NamespacePermissions {
            namespace: "team-a".into(),
            permissions: vec!["queue.list".into(), "queue.stats".into()],
        }],
    });
    // A Lessor client asks queue.stats for the oldest age with field 100.
    round_trip(&QueueStatsRequest {
        queue_name: "q".into(),
        with_oldest_age: true,
        with_tiers: true,
    });
    round_trip(&QueueProduceRequest {
        queue_name: "q".into(),
        request_timeout: "1m".into(),
        items: vec![QueueProduceItem {
            utf8: "x".into(),
            dedup_id: "order-17".into(),
            priority: 9,
            ..Default::default()
        }],
    });
    round_trip(&QueueLeaseResponse {
        queue_name: "q".into(),
        partition: 1,
        items: vec![QueueLeaseItem {
            id: "0000000000000001".into(),
            priority: 3,
            ..Default::default()
        }],
    });
    round_trip(&StorageItem {
        priority: 7,
        ..sample_storage_item()
    });
    round_trip(&QueueExtendRequest {
        queue_name: "q".into(),
        partition: 2,
        ids: vec!["a".into(), "b".into()],
        lease_timeout: "10m".into(),
        request_timeout: "5s".into(),
    });
    round_trip(&QueuePauseRequest {
        queue_name: "q".into(),
    });
    round_trip(&QueueResumeRequest {
        queue_name: "q".into(),
    });
    for priority in [None, Some(0), Some(9)] {
        round_trip(&QueueBrowseRequest {
            queue_name: "q".into(),
            partition: 1,
            state: "leased".into(),
            priority,
            pivot: "0000000000000001".into(),
            limit: 50,
        });
    }
    round_trip(&QueueBrowseResponse {
        items: vec![BrowseItem {
            id: "0000000000000001".into(),
            state: "leased".into(),
            holder: "worker-1".into(),
            lease_deadline: Some(Timestamp::new(10, 0)),
            priority: 4,
            attempts: 2,
            enqueue_at: Some(Timestamp::new(11, 0)),
            expire_deadline: Some(Timestamp::new(12, 0)),
            created_at: Some(Timestamp::new(13, 0)),
            reference: "r".into(),
            encoding: "e".into(),
            kind: "k".into(),
            payload: vec![0, 255],
            source_id: "s".into(),
        }],
        next_pivot: "0000000000000002".into(),
    });
    let task = RedriveTask {
        task_id: "rd-1".into(),
        dead_queue: "dlq".into(),
        target_queue: "t".into(),
        source_queue: "s".into(),
        kind: "k".into(),
        rate_per_sec: 100,
        max_items: 9_007_199_254_740_993, // 2^53 + 1: exact only as a string in JSON
        status: "running".into(),
        moved: 5,
        skipped: 1,
        remaining: 3,
        error: "e".into(),
        created_at: Some(Timestamp::new(20, 0)),
        updated_at: Some(Timestamp::new(21, 0)),
    };
    round_trip(&task);
    round_trip(&RedriveListResponse {
        items: vec![task.clone(), RedriveTask::default()],
    });
    round_trip(&QueueRedriveRequest {
        dead_queue: "dlq".into(),
        target_queue: "t".into(),
        source_queue: "s".into(),
        kind: "k".into(),
        rate_per_sec: 10,
        max_items: 1000,
    });
    round_trip(&RedriveListRequest {
        dead_queue: "dlq".into(),
    });
    round_trip(&RedriveTaskRequest {
        task_id: "rd-1".into(),
        dead_queue: "dlq".into(),
    });
}

#[test]
fn zero_extension_fields_are_absent_so_querator_clients_see_their_messages() {
    // Every Querator field set, every extension at zero: only Querator's keys, in both messages that gained fields.
    let info = QueueInfo {
        dedup_window: String::new(),
        retry_backoff: None,
        paused: false,
        max_lease_timeout: String::new(),
        restoring: false,
        ..full_queue_info()
    };
    let v = to_json(&info);
    only_keys(&v, QUERATOR_QUEUE_INFO);
    assert_eq!(v.as_object().map(|o| o.len()), Some(QUERATOR_QUEUE_INFO.len()));
    let lease = QueueLeaseItem {
        encoding: "e".into(),
        kind: "k".into(),
        reference: "r".into(),
        id: "i".into(),
        attempts: 1,
        lease_deadline: Some(Timestamp::new(1, 0)),
        bytes: b"x".to_vec(),
        priority: 0,
    };
    only_keys(&to_json(&lease), QUERATOR_LEASE_ITEM);
    only_keys(&to_json(&sample_storage_item()), QUERATOR_STORAGE_ITEM);
    let produce = to_json(&sample_produce());
    for item in produce["items"].as_array().expect("items") {
        assert!(
            item.get("priority").is_none() && item.get("dedup_id").is_none(),
            "{item}"
        );
    }
    // In protobuf, zero extension fields add no byte either.
    use prost::Message;
    let querator_only = QueueInfo {
        namespace: "n".into(),
        ..Default::default()
    };
    assert_eq!(querator_only.encode_to_vec(), vec![0x5a, 1, b'n']);
}

#[test]
fn set_extension_fields_use_their_names_and_numbers() {
    let v = to_json(&full_queue_info());
    assert_eq!(v["dedup_window"], "10m0s");
    assert_eq!(
        v["retry_backoff"],
        json!({"base": "1s", "max": "5m0s", "factor": 2.5, "jitter": 0.2})
    );
    assert_eq!(v["paused"], true);
    assert_eq!(v["max_lease_timeout"], "1h0m0s");
    assert_eq!(v["restoring"], true);
    use prost::Message;
    // Extension fields are numbered from 100: field 100 varint key is 0xa0 0x06, field 100 length-delimited is
    // 0xa2 0x06, field 101 varint is 0xa8 0x06.
    assert_eq!(extensions::FIRST_EXTENSION_FIELD, 100);
    let pi = QueueProduceItem {
        dedup_id: "d".into(),
        priority: 2,
        ..Default::default()
    };
    assert_eq!(pi.encode_to_vec(), vec![0xa2, 0x06, 1, b'd', 0xa8, 0x06, 2]);
    let li = QueueLeaseItem {
        priority: 9,
        ..Default::default()
    };
    assert_eq!(li.encode_to_vec(), vec![0xa0, 0x06, 9]);
    let si = StorageItem {
        priority: 1,
        ..Default::default()
    };
    assert_eq!(si.encode_to_vec(), vec![0xa0, 0x06, 1]);
    let qi = QueueInfo {
        dedup_window: "1s".into(),
        paused: true,
        max_lease_timeout: "2s".into(),
        ..Default::default()
    };
    // dedup_window = 100 (0xa2 0x06), paused = 102 (0xb0 0x06), max_lease_timeout = 103 (0xba 0x06).
    assert_eq!(
        qi.encode_to_vec(),
        vec![0xa2, 0x06, 2, b'1', b's', 0xb0, 0x06, 1, 0xba, 0x06, 2, b'2', b's']
    );
    // retry_backoff = 101, a message (0xaa 0x06); an empty one is present (it turns backoff off in an update).
    let off = QueueInfo {
        retry_backoff: Some(RetryBackoff::default()),
        ..Default::default()
    };
    assert_eq!(off.encode_to_vec(), vec![0xaa, 0x06, 0]);
    let back = QueueInfo::decode(off.encode_to_vec().as_slice()).expect("decode");
    assert_eq!(back.retry_backoff, Some(RetryBackoff::default()));
    assert_eq!(to_json(&off), json!({"retry_backoff": {}}));
    let from_json: QueueInfo = from_json(r#"{"retry_backoff":{}}"#).expect("json");
    assert_eq!(from_json.retry_backoff, Some(RetryBackoff::default()));
}

#[test]
fn extension_json_accepts_proto_names_and_rejects_unknown_fields() {
    let info: QueueInfo = from_json(
        r#"{"queueName":"q","dedupWindow":"1m","retryBackoff":{"base":"1s","factor":"3","jitter":0},
            "maxLeaseTimeout":"1h","paused":true}"#,
    )
    .expect("proto names");
    assert_eq!(info.dedup_window, "1m");
    assert_eq!(info.retry_backoff.as_ref().map(|b| b.factor), Some(3.0));
    assert_eq!(info.max_lease_timeout, "1h");
    assert!(info.paused);
    let item: QueueProduceItem = from_json(r#"{"dedupId":"k","priority":"4"}"#).expect("proto names");
    assert_eq!((item.dedup_id.as_str(), item.priority), ("k", 4));
    let err = from_json::<RetryBackoff>(r#"{"base":"1s","multiplier":2}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field 'multiplier'"), "{err}");
    let err = from_json::<QueueExtendRequest>(r#"{"queue_name":"q","ttl":"1m"}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field 'ttl'"), "{err}");
    let err = from_json::<QueueBrowseRequest>(r#"{"priority":1.5}"#).unwrap_err();
    assert!(err.to_string().contains("not an integer"), "{err}");
}

#[test]
fn json_doubles_and_int64s_follow_protojson() {
    // double: numbers out, NaN and infinities as strings; numbers or strings in.
    let b = RetryBackoff {
        factor: f64::NAN,
        jitter: f64::INFINITY,
        ..Default::default()
    };
    assert_eq!(to_json(&b), json!({"factor": "NaN", "jitter": "Infinity"}));
    let back: RetryBackoff = from_json(r#"{"factor":"-Infinity","jitter":"0.25"}"#).expect("strings");
    assert_eq!((back.factor, back.jitter), (f64::NEG_INFINITY, 0.25));
    let back: RetryBackoff = from_json(r#"{"factor":2,"jitter":1e-1}"#).expect("numbers");
    assert_eq!((back.factor, back.jitter), (2.0, 0.1));
    assert!(from_json::<RetryBackoff>(r#"{"factor":"two"}"#).is_err());
    assert!(from_json::<RetryBackoff>(r#"{"factor":true}"#).is_err());
    // int64: a string out (exact past 2^53), a number or a string in.
    let t = RedriveTask {
        moved: i64::MAX,
        ..Default::default()
    };
    assert_eq!(to_json(&t), json!({"moved": "9223372036854775807"}));
    let t: RedriveTask = from_json(r#"{"moved":12,"skipped":"13","remaining":1e2}"#).expect("int64");
    assert_eq!((t.moved, t.skipped, t.remaining), (12, 13, 100));
    assert!(from_json::<RedriveTask>(r#"{"moved":"9223372036854775808"}"#).is_err());
    assert!(from_json::<RedriveTask>(r#"{"moved":1.5}"#).is_err());
}

#[test]
fn browse_priority_keeps_absent_and_zero_apart() {
    use prost::Message;
    let any = QueueBrowseRequest::default();
    let zero = QueueBrowseRequest {
        priority: Some(0),
        ..Default::default()
    };
    // proto3 `optional`: a set zero is on the wire (field 4, varint 0), an absent one is not.
    assert_eq!(any.encode_to_vec(), Vec::<u8>::new());
    assert_eq!(zero.encode_to_vec(), vec![0x20, 0]);
    assert_eq!(
        QueueBrowseRequest::decode(zero.encode_to_vec().as_slice())
            .expect("decode")
            .priority,
        Some(0)
    );
    assert_eq!(to_json(&any), json!({}));
    assert_eq!(to_json(&zero), json!({"priority": 0}));
    let null: QueueBrowseRequest = from_json(r#"{"priority":null}"#).expect("null");
    assert_eq!(null.priority, None);
}
