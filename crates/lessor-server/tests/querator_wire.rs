//! Black-box check that a Querator client reads every reply of Querator's queue, queues and storage routes.
//!
//! Querator's Go client (duh-go) decodes a JSON reply with `protojson.Unmarshal`, whose default rejects any field
//! the message does not declare, and a protobuf reply with `proto.Unmarshal`. So every reply Lessor sends on these
//! routes, to a client that uses none of Lessor's extensions, must hold only the fields of Querator's messages
//! (as `shared/reference/querator.md` §1.4 lists them), under Querator's JSON names, with timestamps in RFC 3339
//! and durations as Go duration strings. The schemas below are written from that document, not from Lessor's
//! message types, so a field added to a Lessor message without care shows up here.
//!
//! Every scenario runs with the four combinations of request encoding (`Content-Type`) and reply encoding
//! (`Accept`). JSON replies are checked key by key; protobuf replies are walked on the wire, field number by field
//! number, since a decoder built from Lessor's own types would skip nothing.
//!
//! Every reply is also checked for duh-go's `X-Content-Type-Options: nosniff`. Further tests pin the rest of
//! Querator's transport (§1.1, §1.5: the `Authorization` header with auth off, `GET /health`), messages whose
//! constant part clients match on (§2.5, §2.6, §2.10), the 100 ms scheduling threshold (§2.1), and the places where
//! Lessor deliberately accepts what Querator refuses (docs/compatibility.md).
//!
//! The real server runs on port 0 over memory storage with the system clock.

use std::time::Duration;

use lessor_client::proto as pb;
use lessor_proto::duration::parse_go_duration;
use lessor_server::{start, Config, RunningServer};
use serde_json::Value;

/// How one field of a Querator message is encoded.
#[derive(Clone, Copy)]
enum Kind {
    /// A scalar (string, number, bool) or bytes.
    Scalar,
    /// A Go duration string (`"1m0s"`).
    Duration,
    /// A `google.protobuf.Timestamp` (an RFC 3339 string in JSON).
    Timestamp,
    /// A `map<string, string>`.
    StrMap,
    /// A nested message (repeated or not).
    Msg(&'static Schema),
}

/// One field: number, JSON name, kind.
type Field = (u32, &'static str, Kind);

/// A Querator message as `querator.md` §1.4 describes it.
struct Schema {
    name: &'static str,
    fields: &'static [Field],
}

use Kind::{Duration as Dur, Msg, Scalar, StrMap, Timestamp as Ts};

/// `duh.v1.Reply`.
static REPLY: Schema = Schema {
    name: "Reply",
    fields: &[
        (1, "code", Scalar),
        (2, "code_text", Scalar),
        (3, "message", Scalar),
        (4, "details", StrMap),
    ],
};

static LEASE_ITEM: Schema = Schema {
    name: "QueueLeaseItem",
    fields: &[
        (1, "encoding", Scalar),
        (2, "kind", Scalar),
        (3, "reference", Scalar),
        (4, "id", Scalar),
        (5, "attempts", Scalar),
        (6, "lease_deadline", Ts),
        (7, "bytes", Scalar),
    ],
};

static LEASE_RESPONSE: Schema = Schema {
    name: "QueueLeaseResponse",
    fields: &[
        (1, "queue_name", Scalar),
        (2, "partition", Scalar),
        (3, "items", Msg(&LEASE_ITEM)),
    ],
};

static PARTITION_STATS: Schema = Schema {
    name: "QueuePartitionStats",
    fields: &[
        (1, "partition", Scalar),
        (2, "total", Scalar),
        (3, "total_leased", Scalar),
        (4, "failures", Scalar),
        (5, "average_age", Dur),
        (6, "average_leased_age", Dur),
        (7, "scheduled", Scalar),
    ],
};

static LOGICAL_STATS: Schema = Schema {
    name: "QueueLogicalStats",
    fields: &[
        (6, "produce_waiting", Scalar),
        (7, "lease_waiting", Scalar),
        (8, "complete_waiting", Scalar),
        (10, "in_flight", Scalar),
        (11, "partitions", Msg(&PARTITION_STATS)),
    ],
};

/// `logicalQueues` has no json_name in Querator's proto, so protojson writes it in lowerCamelCase.
static STATS_RESPONSE: Schema = Schema {
    name: "QueueStatsResponse",
    fields: &[
        (1, "queue_name", Scalar),
        (2, "logicalQueues", Msg(&LOGICAL_STATS)),
    ],
};

static PARTITION_INFO: Schema = Schema {
    name: "PartitionInfo",
    fields: &[(1, "partition", Scalar)],
};

static QUEUE_INFO: Schema = Schema {
    name: "QueueInfo",
    fields: &[
        (1, "queue_name", Scalar),
        (2, "created_at", Ts),
        (3, "updated_at", Ts),
        (4, "dead_queue", Scalar),
        (5, "reference", Scalar),
        (6, "lease_timeout", Dur),
        (7, "expire_timeout", Dur),
        (8, "max_attempts", Scalar),
        (9, "requested_partitions", Scalar),
        (10, "partitions", Msg(&PARTITION_INFO)),
        (11, "namespace", Scalar),
    ],
};

static QUEUES_LIST_RESPONSE: Schema = Schema {
    name: "QueuesListResponse",
    fields: &[(1, "items", Msg(&QUEUE_INFO))],
};

static STORAGE_ITEM: Schema = Schema {
    name: "StorageItem",
    fields: &[
        (1, "id", Scalar),
        (2, "source_id", Scalar),
        (3, "is_leased", Scalar),
        (4, "lease_deadline", Ts),
        (5, "expire_deadline", Ts),
        (6, "dead_deadline", Ts),
        (7, "created_at", Ts),
        (8, "updated_at", Ts),
        (9, "enqueue_at", Ts),
        (10, "attempts", Scalar),
        (11, "max_attempts", Scalar),
        (12, "reference", Scalar),
        (13, "encoding", Scalar),
        (14, "kind", Scalar),
        (15, "payload", Scalar),
    ],
};

static ITEMS_LIST_RESPONSE: Schema = Schema {
    name: "StorageItemsListResponse",
    fields: &[(1, "items", Msg(&STORAGE_ITEM))],
};

/// Querator numbers this message's only field 2.
static ITEMS_IMPORT_RESPONSE: Schema = Schema {
    name: "StorageItemsImportResponse",
    fields: &[(2, "items", Msg(&STORAGE_ITEM))],
};

/// `google.protobuf.Timestamp` on the protobuf wire.
static TIMESTAMP: Schema = Schema {
    name: "Timestamp",
    fields: &[(1, "seconds", Scalar), (2, "nanos", Scalar)],
};

// ---- JSON ----------------------------------------------------------------------------------------------------

/// An RFC 3339 timestamp as protojson writes it: UTC with `Z`, and 0, 3, 6 or 9 fraction digits.
fn check_json_timestamp(s: &str, at: &str) {
    let b = s.as_bytes();
    let shape_ok = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && s.ends_with('Z');
    assert!(shape_ok, "{at}: '{s}' is not an RFC 3339 UTC timestamp");
    let frac = &s[19..s.len() - 1];
    let digits = frac.strip_prefix('.').unwrap_or(frac);
    assert!(
        (frac.is_empty() || [3, 6, 9].contains(&digits.len())) && digits.bytes().all(|c| c.is_ascii_digit()),
        "{at}: '{s}' has a fraction protojson would not write"
    );
}

/// Checks a JSON value against a schema: no key the message lacks, nested messages recursively, timestamps and
/// durations in their string forms.
fn check_json(v: &Value, schema: &Schema, at: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{at}: {} is not a JSON object: {v}", schema.name));
    for (key, value) in obj {
        let Some(&(_, _, kind)) = schema.fields.iter().find(|(_, name, _)| name == key) else {
            panic!(
                "{at}: {} has '{key}', which Querator's message lacks, so a strict protojson decoder refuses \
                 the reply: {v}",
                schema.name
            );
        };
        let at = format!("{at}.{key}");
        match kind {
            Scalar => assert!(
                !value.is_object() && !value.is_null(),
                "{at}: not a scalar: {value}"
            ),
            StrMap => assert!(value.is_object(), "{at}: not a map: {value}"),
            Dur => {
                let s = value
                    .as_str()
                    .unwrap_or_else(|| panic!("{at}: not a string: {value}"));
                parse_go_duration(s).unwrap_or_else(|e| panic!("{at}: '{s}' is not a Go duration: {e}"));
            }
            Ts => check_json_timestamp(
                value
                    .as_str()
                    .unwrap_or_else(|| panic!("{at}: not a string: {value}")),
                &at,
            ),
            Msg(inner) => match value {
                Value::Array(items) => {
                    for (n, item) in items.iter().enumerate() {
                        check_json(item, inner, &format!("{at}[{n}]"));
                    }
                }
                other => check_json(other, inner, &at),
            },
        }
    }
}

// ---- protobuf ------------------------------------------------------------------------------------------------

fn varint(buf: &[u8], pos: &mut usize, at: &str) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).unwrap_or_else(|| panic!("{at}: truncated varint"));
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
    }
    panic!("{at}: varint too long")
}

/// Walks a protobuf message: every field number must be one the schema has, with a nested message walked with its
/// own schema. A Go decoder would skip an unknown number, but one there means the JSON form of the same reply
/// carries a field Querator's message lacks.
fn check_proto(buf: &[u8], schema: &Schema, at: &str) {
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos, at);
        let number = u32::try_from(key >> 3).expect("field number");
        let wire = key & 7;
        let kind = schema
            .fields
            .iter()
            .find(|(n, _, _)| *n == number)
            .map(|&(_, _, k)| k)
            .unwrap_or_else(|| {
                panic!(
                    "{at}: {} has field number {number}, which Querator's message lacks",
                    schema.name
                )
            });
        let at = format!("{at}.{number}");
        match wire {
            0 => {
                varint(buf, &mut pos, &at);
            }
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos, &at)).expect("length");
                let body = buf
                    .get(pos..pos + len)
                    .unwrap_or_else(|| panic!("{at}: truncated field"));
                pos += len;
                match kind {
                    Msg(inner) => check_proto(body, inner, &at),
                    Ts => check_proto(body, &TIMESTAMP, &at),
                    Scalar | Dur | StrMap => {}
                }
            }
            other => panic!("{at}: wire type {other}"),
        }
    }
}

// ---- requests ------------------------------------------------------------------------------------------------

/// One way of talking to the server: the request's encoding and the encoding asked for in `Accept`.
#[derive(Clone, Copy, Debug)]
struct Way {
    request: pb::Encoding,
    reply: pb::Encoding,
}

const WAYS: [Way; 4] = [
    Way {
        request: pb::Encoding::Json,
        reply: pb::Encoding::Json,
    },
    Way {
        request: pb::Encoding::Json,
        reply: pb::Encoding::Protobuf,
    },
    Way {
        request: pb::Encoding::Protobuf,
        reply: pb::Encoding::Json,
    },
    Way {
        request: pb::Encoding::Protobuf,
        reply: pb::Encoding::Protobuf,
    },
];

struct Wire {
    http: reqwest::Client,
    endpoint: String,
}

impl Wire {
    /// Sends `msg` to `path` in `way`, checks the reply against `schema` and that its status is `status`, and
    /// returns the reply decoded as `R` (Lessor's type, for the values the scenario needs next).
    async fn call<M, R>(&self, way: Way, path: &str, msg: &M, status: u16, schema: &Schema) -> R
    where
        M: prost::Message + serde::Serialize,
        R: prost::Message + Default + serde::de::DeserializeOwned,
    {
        let at = format!("{path} ({way:?})");
        let res = self
            .http
            .post(format!("{}{path}", self.endpoint))
            .header("Content-Type", way.request.content_type())
            .header("Accept", way.reply.content_type())
            .body(pb::encode(way.request, msg))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        let code = res.status().as_u16();
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let nosniff = res
            .headers()
            .get("x-content-type-options")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = res.bytes().await.expect("body");
        assert_eq!(
            code,
            status,
            "{at}: status {code}, body {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(content_type, way.reply.content_type(), "{at}: Content-Type");
        // duh-go sets it on every reply, success or error.
        assert_eq!(
            nosniff.as_deref(),
            Some("nosniff"),
            "{at}: X-Content-Type-Options"
        );
        match way.reply {
            pb::Encoding::Json => {
                let v: Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("{at}: not JSON ({e}): {body:?}"));
                check_json(&v, schema, &at);
            }
            pb::Encoding::Protobuf => check_proto(&body, schema, &at),
        }
        pb::decode(way.reply, &body).unwrap_or_else(|e| panic!("{at}: {e}"))
    }

    /// A call answered with the `{code: 200}` envelope.
    async fn ok<M: prost::Message + serde::Serialize>(&self, way: Way, path: &str, msg: &M) {
        let r: pb::Reply = self.call(way, path, msg, 200, &REPLY).await;
        assert_eq!(r.code, 200, "{path} ({way:?})");
    }

    /// A call answered with an error envelope of `status` whose message starts with `constant`.
    async fn error<M: prost::Message + serde::Serialize>(
        &self,
        way: Way,
        path: &str,
        msg: &M,
        status: u16,
        constant: &str,
    ) {
        let r: pb::Reply = self.call(way, path, msg, status, &REPLY).await;
        assert_eq!(r.code, i32::from(status), "{path} ({way:?})");
        assert!(
            r.message.starts_with(constant),
            "{path} ({way:?}): '{}' does not start with '{constant}'",
            r.message
        );
    }
}

async fn server() -> (RunningServer, Wire) {
    let srv = start(&Config::memory(), "127.0.0.1:0", None)
        .await
        .expect("server starts");
    let wire = Wire {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client"),
        endpoint: srv.endpoint(),
    };
    (srv, wire)
}

fn queue_info(name: &str) -> pb::QueueInfo {
    pb::QueueInfo {
        queue_name: name.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 1,
        ..Default::default()
    }
}

fn far_future() -> pb::Timestamp {
    pb::Timestamp::new(4_102_444_800, 0) // 2100-01-01
}

/// Every Querator queue, queues and storage route, as a Querator client uses them (no extension fields), in every
/// combination of request and reply encoding: each reply, success or error, holds only Querator's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_querator_reply_decodes_strictly_in_both_encodings() {
    let (srv, w) = server().await;
    for (n, way) in WAYS.into_iter().enumerate() {
        let q = format!("q{n}");
        let dlq = format!("dlq{n}");
        // queues.*
        w.ok(way, "/v1/queues.create", &queue_info(&dlq)).await;
        w.ok(way, "/v1/queues.create", &queue_info(&q)).await;
        w.ok(
            way,
            "/v1/queues.update",
            &pb::QueueInfo {
                queue_name: q.clone(),
                dead_queue: dlq.clone(),
                max_attempts: 3,
                reference: "ref".into(),
                lease_timeout: "1m30s".into(),
                ..Default::default()
            },
        )
        .await;
        let info: pb::QueueInfo = w
            .call(
                way,
                "/v1/queues.info",
                &pb::QueuesInfoRequest {
                    queue_name: q.clone(),
                },
                200,
                &QUEUE_INFO,
            )
            .await;
        assert_eq!(
            (info.lease_timeout.as_str(), info.expire_timeout.as_str()),
            ("1m30s", "24h0m0s")
        );
        let list: pb::QueuesListResponse = w
            .call(
                way,
                "/v1/queues.list",
                &pb::QueuesListRequest::default(),
                200,
                &QUEUES_LIST_RESPONSE,
            )
            .await;
        assert!(list.items.iter().any(|i| i.queue_name == q));

        // queue.produce: ready items (bytes and utf8 payloads) and a scheduled one.
        w.ok(
            way,
            "/v1/queue.produce",
            &pb::QueueProduceRequest {
                queue_name: q.clone(),
                request_timeout: "1m".into(),
                items: vec![
                    pb::QueueProduceItem {
                        encoding: "e".into(),
                        kind: "k".into(),
                        reference: "r".into(),
                        bytes: b"one".to_vec(),
                        ..Default::default()
                    },
                    pb::QueueProduceItem {
                        utf8: "two".into(),
                        ..Default::default()
                    },
                    pb::QueueProduceItem {
                        utf8: "three".into(),
                        ..Default::default()
                    },
                    pb::QueueProduceItem {
                        utf8: "later".into(),
                        enqueue_at: Some(far_future()),
                        ..Default::default()
                    },
                ],
            },
        )
        .await;

        // queue.lease, queue.stats, storage lists.
        let lease: pb::QueueLeaseResponse = w
            .call(
                way,
                "/v1/queue.lease",
                &pb::QueueLeaseRequest {
                    queue_name: q.clone(),
                    batch_size: 3,
                    client_id: "c".into(),
                    request_timeout: "5s".into(),
                },
                200,
                &LEASE_RESPONSE,
            )
            .await;
        assert_eq!(lease.items.len(), 3, "{way:?}");
        let _: pb::QueueStatsResponse = w
            .call(
                way,
                "/v1/queue.stats",
                &pb::QueueStatsRequest {
                    queue_name: q.clone(),
                    ..Default::default()
                },
                200,
                &STATS_RESPONSE,
            )
            .await;
        let list_req = pb::StorageItemsListRequest {
            queue_name: q.clone(),
            ..Default::default()
        };
        let items: pb::StorageItemsListResponse = w
            .call(
                way,
                "/v1/storage/items.list",
                &list_req,
                200,
                &ITEMS_LIST_RESPONSE,
            )
            .await;
        assert_eq!(items.items.len(), 3, "{way:?}");
        let scheduled: pb::StorageItemsListResponse = w
            .call(
                way,
                "/v1/storage/scheduled.list",
                &list_req,
                200,
                &ITEMS_LIST_RESPONSE,
            )
            .await;
        assert_eq!(scheduled.items.len(), 1, "{way:?}");

        // queue.complete, queue.retry (now, later, dead: the last goes to the dead-letter queue).
        let ids: Vec<String> = lease.items.iter().map(|i| i.id.clone()).collect();
        w.ok(
            way,
            "/v1/queue.complete",
            &pb::QueueCompleteRequest {
                queue_name: q.clone(),
                partition: lease.partition,
                request_timeout: "5s".into(),
                ids: vec![ids[0].clone()],
            },
        )
        .await;
        w.ok(
            way,
            "/v1/queue.retry",
            &pb::QueueRetryRequest {
                queue_name: q.clone(),
                partition: lease.partition,
                items: vec![
                    pb::QueueRetryItem {
                        id: ids[1].clone(),
                        ..Default::default()
                    },
                    pb::QueueRetryItem {
                        id: ids[2].clone(),
                        dead: true,
                        ..Default::default()
                    },
                ],
            },
        )
        .await;
        // The dead-lettered item carries a source id; its listing stays within StorageItem. The source queue moves
        // its dead items in its next pass, after the retry's answer: a listing right after it may come first (it
        // did, 14 times in 40 on a busy machine), so the listing is polled until the move has landed.
        let dead: pb::StorageItemsListResponse = lessor_testkit::eventually::eventually(
            "the dead-lettered item listed in the dead-letter queue",
            Duration::from_secs(10),
            || async {
                let listed: pb::StorageItemsListResponse = w
                    .call(
                        way,
                        "/v1/storage/items.list",
                        &pb::StorageItemsListRequest {
                            queue_name: dlq.clone(),
                            ..Default::default()
                        },
                        200,
                        &ITEMS_LIST_RESPONSE,
                    )
                    .await;
                if listed.items.is_empty() {
                    Err(format!("no item yet ({way:?})"))
                } else {
                    Ok(listed)
                }
            },
        )
        .await;
        assert_eq!(dead.items.len(), 1, "{way:?}");
        assert!(!dead.items[0].source_id.is_empty(), "{way:?}");

        // The retried item is back in the queue under a new id, held by nobody: completing or retrying it is
        // Querator's 400 with its constant part (§2.5, §2.6), which clients match on.
        let listed: pb::StorageItemsListResponse = w
            .call(
                way,
                "/v1/storage/items.list",
                &list_req,
                200,
                &ITEMS_LIST_RESPONSE,
            )
            .await;
        let ready = listed
            .items
            .iter()
            .find(|i| !i.is_leased)
            .unwrap_or_else(|| panic!("the retried item is listed un-leased ({way:?}): {listed:?}"))
            .id
            .clone();
        w.error(
            way,
            "/v1/queue.complete",
            &pb::QueueCompleteRequest {
                queue_name: q.clone(),
                partition: lease.partition,
                request_timeout: "5s".into(),
                ids: vec![ready.clone()],
            },
            400,
            &format!("item(s) cannot be completed; '{ready}' is not marked as leased"),
        )
        .await;
        w.error(
            way,
            "/v1/queue.retry",
            &pb::QueueRetryRequest {
                queue_name: q.clone(),
                partition: lease.partition,
                items: vec![pb::QueueRetryItem {
                    id: ready.clone(),
                    ..Default::default()
                }],
            },
            400,
            &format!("item(s) cannot be retried; '{ready}' is not marked as leased"),
        )
        .await;
        w.error(
            way,
            "/v1/queues.create",
            &queue_info(&q),
            400,
            &format!("invalid queue; '{q}' already exists"),
        )
        .await;

        // storage/items.import and .delete.
        let imported: pb::StorageItemsImportResponse = w
            .call(
                way,
                "/v1/storage/items.import",
                &pb::StorageItemsImportRequest {
                    queue_name: q.clone(),
                    partition: 0,
                    items: vec![pb::StorageItem {
                        source_id: "src".into(),
                        attempts: 1,
                        max_attempts: 5,
                        reference: "r".into(),
                        encoding: "e".into(),
                        kind: "k".into(),
                        payload: b"imported".to_vec(),
                        ..Default::default()
                    }],
                },
                200,
                &ITEMS_IMPORT_RESPONSE,
            )
            .await;
        assert_eq!(imported.items.len(), 1, "{way:?}");
        w.ok(
            way,
            "/v1/storage/items.delete",
            &pb::StorageItemsDeleteRequest {
                queue_name: q.clone(),
                partition: 0,
                ids: vec![imported.items[0].id.clone()],
            },
        )
        .await;

        // queue.clear, queue.reload, queues.delete.
        w.ok(
            way,
            "/v1/queue.clear",
            &pb::QueueClearRequest {
                queue_name: q.clone(),
                scheduled: true,
                queue: true,
                destructive: true,
            },
        )
        .await;
        w.ok(
            way,
            "/v1/queue.reload",
            &pb::QueueReloadRequest {
                queue_name: q.clone(),
            },
        )
        .await;

        // Errors: the envelope, with Querator's constant part.
        let missing = "nope".to_string();
        w.error(
            way,
            "/v1/queue.lease",
            &pb::QueueLeaseRequest {
                queue_name: q.clone(),
                batch_size: 1,
                client_id: "c".into(),
                request_timeout: "50ms".into(),
            },
            454,
            "request timeout; no items are in the queue, try again",
        )
        .await;
        w.error(
            way,
            "/v1/queues.info",
            &pb::QueuesInfoRequest {
                queue_name: missing.clone(),
            },
            400,
            "queue does not exist; ",
        )
        .await;
        w.error(
            way,
            "/v1/queue.produce",
            &pb::QueueProduceRequest {
                queue_name: q.clone(),
                request_timeout: "1m".into(),
                items: vec![],
            },
            400,
            "items cannot be empty; ",
        )
        .await;
        w.error(
            way,
            "/v1/queue.complete",
            &pb::QueueCompleteRequest {
                queue_name: q.clone(),
                partition: 0,
                request_timeout: "5s".into(),
                ids: vec![],
            },
            400,
            "ids is invalid; ",
        )
        .await;
        w.error(
            way,
            "/v1/storage/items.list",
            &pb::StorageItemsListRequest {
                queue_name: q.clone(),
                partition: 7,
                ..Default::default()
            },
            400,
            "partition is invalid; ",
        )
        .await;
        w.error(
            way,
            "/v1/queue.nope",
            &pb::QueuesInfoRequest::default(),
            501,
            "no such method; ",
        )
        .await;

        w.ok(
            way,
            "/v1/queues.delete",
            &pb::QueuesDeleteRequest {
                queue_name: q.clone(),
                force: false,
            },
        )
        .await;
        w.ok(
            way,
            "/v1/queues.delete",
            &pb::QueuesDeleteRequest {
                queue_name: dlq.clone(),
                force: false,
            },
        )
        .await;
    }
    srv.stop().await;
}

/// A Querator client sharing a server with Lessor-aware clients: a Lessor client creates a queue with a dedup
/// window, a backoff and a longer lease cap, and produces an item with a priority; the Querator client (JSON
/// replies, as Querator's Go client asks for by sending no `Accept`) lists the queues, reads the queue's info, lists
/// its items and leases the item. It never used an extension, so none of these replies may carry one: its strict
/// protojson decoder would refuse the whole reply (a consumer could not lease at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_querator_client_reads_what_lessor_clients_wrote() {
    let (srv, w) = server().await;
    let lessor = lessor_client::Client::new(&srv.endpoint()).expect("client");
    lessor
        .queues_create(&pb::QueueInfo {
            dedup_window: "10m".into(),
            retry_backoff: Some(pb::RetryBackoff {
                base: "1s".into(),
                max: "1m".into(),
                factor: 2.0,
                jitter: 0.1,
            }),
            max_lease_timeout: "2m".into(),
            ..queue_info("shared")
        })
        .await
        .expect("create");
    lessor
        .queue_produce(&pb::QueueProduceRequest {
            queue_name: "shared".into(),
            request_timeout: "1m".into(),
            items: vec![pb::QueueProduceItem {
                utf8: "urgent".into(),
                priority: 7,
                dedup_id: "once".into(),
                ..Default::default()
            }],
        })
        .await
        .expect("produce");
    lessor
        .queue_pause(&pb::QueuePauseRequest {
            queue_name: "shared".into(),
        })
        .await
        .expect("pause");
    for request in [pb::Encoding::Json, pb::Encoding::Protobuf] {
        let way = Way {
            request,
            reply: pb::Encoding::Json,
        };
        let _: pb::QueuesListResponse = w
            .call(
                way,
                "/v1/queues.list",
                &pb::QueuesListRequest::default(),
                200,
                &QUEUES_LIST_RESPONSE,
            )
            .await;
        let _: pb::QueueInfo = w
            .call(
                way,
                "/v1/queues.info",
                &pb::QueuesInfoRequest {
                    queue_name: "shared".into(),
                },
                200,
                &QUEUE_INFO,
            )
            .await;
        let _: pb::StorageItemsListResponse = w
            .call(
                way,
                "/v1/storage/items.list",
                &pb::StorageItemsListRequest {
                    queue_name: "shared".into(),
                    ..Default::default()
                },
                200,
                &ITEMS_LIST_RESPONSE,
            )
            .await;
    }
    lessor
        .queue_resume(&pb::QueueResumeRequest {
            queue_name: "shared".into(),
        })
        .await
        .expect("resume");
    let lease: pb::QueueLeaseResponse = w
        .call(
            Way {
                request: pb::Encoding::Protobuf,
                reply: pb::Encoding::Json,
            },
            "/v1/queue.lease",
            &pb::QueueLeaseRequest {
                queue_name: "shared".into(),
                batch_size: 1,
                client_id: "querator".into(),
                request_timeout: "5s".into(),
            },
            200,
            &LEASE_RESPONSE,
        )
        .await;
    assert_eq!(lease.items.len(), 1);
    // The Lessor client still reads its extensions.
    let info = lessor
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "shared".into(),
        })
        .await
        .expect("info");
    assert_eq!(
        (info.dedup_window.as_str(), info.max_lease_timeout.as_str()),
        ("10m0s", "2m0s")
    );
    srv.stop().await;
}

/// Querator's answers outside its RPC routes: any method but `POST` is 400 `http method '<M>' not allowed; only
/// POST` (except `GET /health` and `GET /metrics`), and a `POST` to a path it does not serve, `/health` and
/// `/metrics` included, is 501 `no such method; <path>`. Both in the reply envelope a DUH client decodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_paths_get_querators_envelopes() {
    let (srv, w) = server().await;
    let cases: [(reqwest::Method, &str, u16, String); 6] = [
        (
            reqwest::Method::POST,
            "/health",
            501,
            "no such method; /health".into(),
        ),
        (
            reqwest::Method::POST,
            "/metrics",
            501,
            "no such method; /metrics".into(),
        ),
        (
            reqwest::Method::PUT,
            "/health",
            400,
            "http method 'PUT' not allowed; only POST".into(),
        ),
        (
            reqwest::Method::DELETE,
            "/metrics",
            400,
            "http method 'DELETE' not allowed; only POST".into(),
        ),
        (
            reqwest::Method::GET,
            "/nope",
            400,
            "http method 'GET' not allowed; only POST".into(),
        ),
        (
            reqwest::Method::GET,
            "/v1/queue.produce",
            400,
            "http method 'GET' not allowed; only POST".into(),
        ),
    ];
    for (method, path, status, message) in cases {
        let res = w
            .http
            .request(method.clone(), format!("{}{path}", w.endpoint))
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("send");
        let code = res.status().as_u16();
        let body = res.bytes().await.expect("body");
        let at = format!("{method} {path}");
        assert_eq!(code, status, "{at}: body {}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{at}: not a JSON envelope ({e}): {body:?}"));
        check_json(&v, &REPLY, &at);
        assert_eq!(v["message"], message.as_str(), "{at}");
    }
    srv.stop().await;
}

/// Querator reads the `Authorization` header before anything else (§1.1): one without the `Bearer ` prefix is 401
/// `invalid authorization header format` even with auth off, and with auth off any bearer token is the anonymous
/// caller. A Querator client configured with a key keeps working against a server without auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_headers_are_read_as_querator_reads_them_with_auth_off() {
    let (srv, w) = server().await;
    let send = |authorization: &'static str| {
        w.http
            .post(format!("{}/v1/queues.list", w.endpoint))
            .header("Content-Type", "application/json")
            .header("Authorization", authorization)
            .body("{}")
            .send()
    };
    for header in ["Basic dXNlcjpwYXNz", "bearer qtr-live-abc", "Bearer"] {
        let res = send(header).await.expect("send");
        let code = res.status().as_u16();
        let body = res.bytes().await.expect("body");
        assert_eq!(code, 401, "{header:?}: body {}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).expect("a JSON envelope");
        check_json(&v, &REPLY, header);
        assert_eq!(
            (v["code"].as_i64(), v["message"].as_str()),
            (Some(401), Some("invalid authorization header format")),
            "{header:?}"
        );
    }
    let res = send("Bearer qtr-live-not-a-key-anyone-issued")
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 200, "a bearer token with auth off");
    srv.stop().await;
}

/// `GET /health` as Querator serves it (§1.5): 200 with `application/health+json` and the draft's body, `status`,
/// `version` and one `queues:storage` check of `componentType` `datastore` with its `status` and an RFC 3339 `time`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_querators_health_json() {
    let (srv, w) = server().await;
    let res = w
        .http
        .get(format!("{}/health", w.endpoint))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/health+json")
    );
    let v: Value = serde_json::from_slice(&res.bytes().await.expect("body")).expect("JSON body");
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["checks", "status", "version"], "{v}");
    assert_eq!(v["status"], "pass", "{v}");
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    let checks = v["checks"]["queues:storage"]
        .as_array()
        .expect("queues:storage checks");
    assert_eq!(checks.len(), 1, "{v}");
    assert_eq!(checks[0]["componentType"], "datastore", "{v}");
    assert_eq!(checks[0]["status"], "pass", "{v}");
    check_json_timestamp(checks[0]["time"].as_str().expect("time"), "checks.time");
    srv.stop().await;
}

/// Deleting a queue answers the leases waiting on it with Querator's 453 `queue is shutting down` (§2.10), in the
/// envelope, at once rather than at their request_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_queue_answers_its_waiting_leases_453() {
    let (srv, w) = server().await;
    let way = WAYS[2]; // protobuf requests, JSON replies: Querator's Go client
    w.ok(way, "/v1/queues.create", &queue_info("gone")).await;
    let started = std::time::Instant::now();
    let waiting = pb::QueueLeaseRequest {
        queue_name: "gone".into(),
        batch_size: 1,
        client_id: "waiting".into(),
        request_timeout: "20s".into(),
    };
    let lease = w.error(way, "/v1/queue.lease", &waiting, 453, "queue is shutting down");
    let delete = async {
        lessor_testkit::eventually::eventually(
            "the lease waits on the queue",
            Duration::from_secs(10),
            || async {
                let s: pb::QueueStatsResponse = w
                    .call(
                        way,
                        "/v1/queue.stats",
                        &pb::QueueStatsRequest {
                            queue_name: "gone".into(),
                            ..Default::default()
                        },
                        200,
                        &STATS_RESPONSE,
                    )
                    .await;
                match s.logical_queues.first().map(|l| l.lease_waiting) {
                    Some(1) => Ok(()),
                    other => Err(format!("lease_waiting {other:?}")),
                }
            },
        )
        .await;
        w.ok(
            way,
            "/v1/queues.delete",
            &pb::QueuesDeleteRequest {
                queue_name: "gone".into(),
                force: false,
            },
        )
        .await;
    };
    tokio::join!(lease, delete);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the waiting lease was answered at its timeout, not at the delete"
    );
    srv.stop().await;
}

/// A Timestamp `ms` milliseconds from now (negative: in the past), on the system clock the server runs on.
fn from_now(ms: i64) -> pb::Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    let nanos = i128::try_from(now.as_nanos()).expect("nanos") + i128::from(ms) * 1_000_000;
    pb::Timestamp::from_unix_nanos(nanos)
}

/// Querator's rules for what a produce may carry and when an item is scheduled (§2.1, §2.3): an `enqueue_at` or
/// `retry_at` less than 100 ms ahead (or past) is "now", so the item is ready at once and never listed as
/// scheduled (Querator's `NearImmediate` and `PastTimestamp` tests); an item without payload is accepted; and a
/// list `limit` above 65,536 or below 0 is a 400 (`limit is invalid; ...`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_and_past_schedules_are_immediate_and_empty_items_are_accepted() {
    let (srv, w) = server().await;
    let way = WAYS[2];
    w.ok(way, "/v1/queues.create", &queue_info("now")).await;
    w.ok(
        way,
        "/v1/queue.produce",
        &pb::QueueProduceRequest {
            queue_name: "now".into(),
            request_timeout: "1m".into(),
            items: vec![
                pb::QueueProduceItem {
                    utf8: "near".into(),
                    enqueue_at: Some(from_now(50)),
                    ..Default::default()
                },
                pb::QueueProduceItem {
                    utf8: "past".into(),
                    enqueue_at: Some(from_now(-60_000)),
                    ..Default::default()
                },
                // No payload at all.
                pb::QueueProduceItem::default(),
            ],
        },
    )
    .await;
    let list = |path: &'static str| {
        let w = &w;
        async move {
            let r: pb::StorageItemsListResponse = w
                .call(
                    way,
                    path,
                    &pb::StorageItemsListRequest {
                        queue_name: "now".into(),
                        ..Default::default()
                    },
                    200,
                    &ITEMS_LIST_RESPONSE,
                )
                .await;
            r.items
        }
    };
    assert_eq!(
        list("/v1/storage/items.list").await.len(),
        3,
        "all three ready at once"
    );
    assert!(list("/v1/storage/scheduled.list").await.is_empty());

    // A retry 50 ms ahead is a retry now: the item is ready again at once.
    let lease: pb::QueueLeaseResponse = w
        .call(
            way,
            "/v1/queue.lease",
            &pb::QueueLeaseRequest {
                queue_name: "now".into(),
                batch_size: 1,
                client_id: "c".into(),
                request_timeout: "5s".into(),
            },
            200,
            &LEASE_RESPONSE,
        )
        .await;
    w.ok(
        way,
        "/v1/queue.retry",
        &pb::QueueRetryRequest {
            queue_name: "now".into(),
            partition: lease.partition,
            items: vec![pb::QueueRetryItem {
                id: lease.items[0].id.clone(),
                retry_at: Some(from_now(50)),
                dead: false,
            }],
        },
    )
    .await;
    let ready = list("/v1/storage/items.list").await;
    assert_eq!(ready.len(), 3);
    assert!(ready.iter().all(|i| !i.is_leased), "{ready:?}");
    assert!(list("/v1/storage/scheduled.list").await.is_empty());

    for limit in [65_537, -1] {
        w.error(
            way,
            "/v1/queues.list",
            &pb::QueuesListRequest {
                limit,
                ..Default::default()
            },
            400,
            "limit is invalid; ",
        )
        .await;
        w.error(
            way,
            "/v1/storage/items.list",
            &pb::StorageItemsListRequest {
                queue_name: "now".into(),
                limit,
                ..Default::default()
            },
            400,
            "limit is invalid; ",
        )
        .await;
    }
    srv.stop().await;
}

/// Where Lessor accepts what Querator refuses (compatibility.md, "Deliberate differences in form"): an `Accept`
/// listing several types is answered in the first one Lessor speaks (Querator reads only the first type: 455),
/// `application/x-protobuf` is protobuf, and a produce may wait the full 15 minutes (Querator refuses a produce
/// `request_timeout` of `15m` itself, though lease and complete take it). No Querator client relies on these
/// refusals; the test pins the documented leniency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_leniencies_over_querator() {
    let (srv, w) = server().await;
    w.ok(WAYS[0], "/v1/queues.create", &queue_info("lenient")).await;
    let produce = |timeout: &str| pb::QueueProduceRequest {
        queue_name: "lenient".into(),
        request_timeout: timeout.into(),
        items: vec![pb::QueueProduceItem {
            utf8: "x".into(),
            ..Default::default()
        }],
    };
    let post = |content_type: &'static str, accept: &'static str, body: Vec<u8>| {
        w.http
            .post(format!("{}/v1/queue.produce", w.endpoint))
            .header("Content-Type", content_type)
            .header("Accept", accept)
            .body(body)
            .send()
    };
    let res = post(
        "application/json",
        "text/html, application/json;q=0.9",
        pb::encode(pb::Encoding::Json, &produce("1m")),
    )
    .await
    .expect("send");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let res = post(
        "application/x-protobuf",
        "application/x-protobuf",
        pb::encode(pb::Encoding::Protobuf, &produce("1m")),
    )
    .await
    .expect("send");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/protobuf")
    );
    w.ok(WAYS[0], "/v1/queue.produce", &produce("15m")).await;
    w.error(
        WAYS[0],
        "/v1/queue.produce",
        &produce("15m1s"),
        400,
        "request timeout is invalid; ",
    )
    .await;
    srv.stop().await;
}
