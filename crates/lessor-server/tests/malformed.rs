//! Black-box malformed input over HTTP.
//!
//! Hand-made bad requests (broken or mistyped JSON, unknown fields, truncated or garbage protobuf, wrong
//! Content-Type or Accept, wrong HTTP methods, unknown paths, oversized bodies, unknown queues, batch sizes over
//! the limits, absurd timeouts, negative partitions, malformed ids) must each get a 4xx whose message names the
//! problem. Every error answer must be the `{code, code_text, message}` envelope, in the encoding the client
//! accepts, with the HTTP status equal to `code`.
//!
//! A property test then posts arbitrary bytes and JSON-ish text to every route with every content type and
//! checks that the server never answers 5xx, always answers with a well-formed envelope, and still reports
//! healthy afterwards; a second one does the same with auth on, over the auth routes too. These servers run on the
//! system clock: the generated requests never contain a long request timeout, so the rare valid lease they form
//! ends within a second instead of long-polling forever.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use lessor_client::proto::{
    QueueCompleteRequest, QueueInfo, QueueLeaseRequest, QueueProduceItem, QueueProduceRequest,
};
use lessor_client::Client;
use lessor_core::time::ManualClock;
use lessor_proto::{code_text, decode, encode, Encoding, Reply};
use lessor_server::RunningServer;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

const QUEUE: &str = "mq";
const JSON: Option<&str> = Some("application/json");
const PROTO: Option<&str> = Some("application/protobuf");

const ROUTES: &[&str] = &[
    "/v1/queue.produce",
    "/v1/queue.lease",
    "/v1/queue.complete",
    "/v1/queue.retry",
    "/v1/queue.stats",
    "/v1/queue.clear",
    "/v1/queue.reload",
    "/v1/queues.create",
    "/v1/queues.list",
    "/v1/queues.update",
    "/v1/queues.delete",
    "/v1/queues.info",
    "/v1/storage/items.list",
    "/v1/storage/scheduled.list",
    "/v1/storage/items.import",
    "/v1/storage/items.delete",
    // Lessor's extensions.
    "/v1/queue.extend",
    "/v1/queue.pause",
    "/v1/queue.resume",
    "/v1/queue.browse",
    "/v1/queue.history",
    "/v1/server.info",
    "/v1/queues.overview",
    "/v1/auth.whoami",
    "/v1/queue.redrive",
    "/v1/redrive.list",
    "/v1/redrive.get",
    "/v1/redrive.cancel",
    "/v1/offload.sweep",
];

/// The auth routes (namespaces, users, API keys, roles, role bindings).
const AUTH_ROUTES: &[&str] = &[
    "/v1/namespaces.create",
    "/v1/namespaces.update",
    "/v1/namespaces.list",
    "/v1/namespaces.delete",
    "/v1/users.create",
    "/v1/users.list",
    "/v1/users.delete",
    "/v1/apikeys.create",
    "/v1/apikeys.list",
    "/v1/apikeys.delete",
    "/v1/roles.create",
    "/v1/roles.update",
    "/v1/roles.list",
    "/v1/roles.delete",
    "/v1/rolebindings.create",
    "/v1/rolebindings.list",
    "/v1/rolebindings.delete",
];

/// Every RPC route.
fn all_routes() -> impl Iterator<Item = &'static str> {
    ROUTES.iter().chain(AUTH_ROUTES).copied()
}

async fn server(manual_clock: bool) -> (RunningServer, Client) {
    let clock: Option<lessor_core::time::SharedClock> = if manual_clock {
        Some(Arc::new(ManualClock::starting_now()))
    } else {
        None
    };
    let (srv, c) = lessor_testkit::server::start(&lessor_server::Config::memory(), clock).await;
    c.queues_create(&QueueInfo {
        queue_name: QUEUE.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("queue created");
    (srv, c)
}

/// A memory server with auth on (`internal`, open door, so anonymous requests run as administrators and reach
/// every handler), the queue [`QUEUE`], and auth records the fuzzer's names hit: namespace `fz` with a role `fz`
/// bound to a user, and a key for that user.
async fn auth_server() -> (RunningServer, Client) {
    let config = lessor_server::Config::from_yaml(
        "queue-storage: { driver: memory }\n\
         partition-storage: [ { name: ram, driver: memory } ]\n\
         auth-backend: { driver: internal, open-door: true }\n",
    )
    .expect("config");
    let (srv, c) = lessor_testkit::server::start(&config, None).await;
    let ok = |what: &str, a: &Answer| {
        assert_eq!(a.status, 200, "{what}: {:?}", String::from_utf8_lossy(&a.body));
    };
    let post = |path: &'static str, body: String| {
        let c = c.clone();
        async move { send(&c, Method::POST, path, JSON, JSON, body.as_bytes()).await }
    };
    let a = post(
        "/v1/queues.create",
        format!(r#"{{"queue_name":"{QUEUE}","lease_timeout":"1m","expire_timeout":"24h","requested_partitions":1}}"#),
    )
    .await;
    ok("queues.create", &a);
    ok(
        "namespaces.create",
        &post(
            "/v1/namespaces.create",
            r#"{"name":"fz","api_key_tag":"fz"}"#.into(),
        )
        .await,
    );
    ok(
        "roles.create",
        &post(
            "/v1/roles.create",
            r#"{"namespace":"fz","name":"fz","permissions":["queue.stats"]}"#.into(),
        )
        .await,
    );
    let user = post("/v1/users.create", r#"{"username":"fz"}"#.into()).await;
    ok("users.create", &user);
    let user: serde_json::Value = serde_json::from_slice(&user.body).expect("JSON");
    let id = user["id"].as_str().expect("the user id").to_string();
    ok(
        "rolebindings.create",
        &post(
            "/v1/rolebindings.create",
            format!(r#"{{"namespace":"fz","role_name":"fz","user_id":"{id}"}}"#),
        )
        .await,
    );
    ok(
        "apikeys.create",
        &post(
            "/v1/apikeys.create",
            format!(r#"{{"user_id":"{id}","namespace_scope":"fz"}}"#),
        )
        .await,
    );
    (srv, c)
}

/// An answer of the server, with the envelope decoded when it is not a 200.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

async fn send(
    c: &Client,
    method: Method,
    path: &str,
    ct: Option<&str>,
    accept: Option<&str>,
    body: &[u8],
) -> Answer {
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        c.raw_with_method(method.clone(), path, ct, accept, body.to_vec()),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {path}: no answer within 30 s"))
    .unwrap_or_else(|e| panic!("{method} {path}: transport error: {e}"));
    let (status, headers, body) = res;
    Answer {
        status: status.as_u16(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: body.to_vec(),
    }
}

/// Decodes the error envelope and checks its shape: the encoding named by Content-Type, `code` equal to the
/// HTTP status, the standard `code_text`, a non-empty message. For JSON it also checks the raw object's keys.
fn envelope(a: &Answer, what: &str) -> Reply {
    let enc = match a.content_type.as_str() {
        "application/json" => Encoding::Json,
        "application/protobuf" => Encoding::Protobuf,
        other => panic!("{what}: error answer with content type {other:?}"),
    };
    let reply: Reply = decode(enc, &a.body).unwrap_or_else(|e| {
        panic!(
            "{what}: error body is not an envelope: {e}: {:?}",
            String::from_utf8_lossy(&a.body)
        )
    });
    if enc == Encoding::Json {
        let v: serde_json::Value = serde_json::from_slice(&a.body).expect("JSON body");
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("{what}: envelope is not an object: {v}"));
        assert_eq!(
            obj.get("code").and_then(|c| c.as_i64()),
            Some(i64::from(a.status)),
            "{what}: {v}"
        );
        assert!(
            obj.get("code_text").is_some_and(|t| t.is_string()),
            "{what}: code_text: {v}"
        );
        assert!(
            obj.get("message").is_some_and(|t| t.is_string()),
            "{what}: message: {v}"
        );
        for k in obj.keys() {
            assert!(
                ["code", "code_text", "message", "details"].contains(&k.as_str()),
                "{what}: extra key {k}"
            );
        }
    }
    assert_eq!(
        reply.code,
        i32::from(a.status),
        "{what}: code equals the HTTP status"
    );
    assert_eq!(reply.code_text, code_text(reply.code), "{what}: code_text");
    assert!(!reply.code_text.is_empty(), "{what}: code_text is set");
    assert!(!reply.message.is_empty(), "{what}: message is set");
    reply
}

/// Sends a request that must fail with `code` and a message containing `needle`.
async fn expect_error(
    c: &Client,
    method: Method,
    path: &str,
    (ct, accept): (Option<&str>, Option<&str>),
    body: &[u8],
    code: u16,
    needle: &str,
) -> Reply {
    let what = format!("{method} {path} ({ct:?} -> {accept:?})");
    let a = send(c, method, path, ct, accept, body).await;
    assert_eq!(
        a.status,
        code,
        "{what}: status; body {:?}",
        String::from_utf8_lossy(&a.body)
            .chars()
            .take(300)
            .collect::<String>()
    );
    let r = envelope(&a, &what);
    assert!(
        r.message.contains(needle),
        "{what}: message {:?} should contain {needle:?}",
        r.message
    );
    r
}

/// POSTs JSON text that must fail with `code` and `needle`, answered in JSON.
async fn json_error(c: &Client, path: &str, body: &str, code: u16, needle: &str) -> Reply {
    expect_error(c, Method::POST, path, (JSON, JSON), body.as_bytes(), code, needle).await
}

/// POSTs a message as protobuf that must fail with `code` and `needle`, answered in protobuf.
async fn proto_error<T: prost::Message + serde::Serialize>(
    c: &Client,
    path: &str,
    msg: &T,
    code: u16,
    needle: &str,
) {
    let body = encode(Encoding::Protobuf, msg);
    let r = expect_error(c, Method::POST, path, (PROTO, PROTO), &body, code, needle).await;
    assert_eq!(r.code, i32::from(code));
}

fn lease_json(batch: &str, timeout: &str) -> String {
    format!(
        r#"{{"queue_name":"{QUEUE}","batch_size":{batch},"client_id":"c1","request_timeout":"{timeout}"}}"#
    )
}

fn produce_json(items: usize, timeout: &str) -> String {
    let items: Vec<String> = (0..items).map(|i| format!(r#"{{"utf8":"p{i}"}}"#)).collect();
    format!(
        r#"{{"queue_name":"{QUEUE}","request_timeout":"{timeout}","items":[{}]}}"#,
        items.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_mistyped_json() {
    let (srv, c) = server(true).await;
    let p = "/v1/queue.produce";
    for (path, body, code, needle) in [
        (p, r#"{"queue_name": "#, 455, "invalid JSON"),
        (p, "not json at all", 455, "invalid JSON"),
        (p, "[1,2,3]", 455, "invalid JSON"),
        (p, r#"{"queue_name":"mq"} trailing"#, 455, "invalid JSON"),
        (p, r#"{"queue_name":"mq","items":5}"#, 455, "invalid JSON"),
        (
            p,
            r#"{"queue_name":"mq","items":[{"bytes":"%%%"}]}"#,
            455,
            "invalid JSON",
        ),
        (
            p,
            r#"{"queue_name":"mq","items":[{"enqueue_at":"yesterday"}]}"#,
            455,
            "invalid JSON",
        ),
        (p, r#"{"queue_name":12}"#, 455, "invalid JSON"),
        (p, r#"{"queue_name":"mq","queue_name":"mq"}"#, 455, "queue_name"),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    let l = "/v1/queue.lease";
    for (path, body, code, needle) in [
        (l, lease_json(r#""abc""#, "1s").as_str(), 455, "invalid JSON"),
        (l, lease_json("1.5", "1s").as_str(), 455, "invalid JSON"),
        (l, lease_json("99999999999", "1s").as_str(), 455, "invalid JSON"),
        (l, lease_json("true", "1s").as_str(), 455, "invalid JSON"),
        (
            "/v1/queue.complete",
            r#"{"queue_name":"mq","ids":"0000000000000001"}"#,
            455,
            "invalid JSON",
        ),
        (
            "/v1/queue.clear",
            r#"{"queue_name":"mq","queue":"yes"}"#,
            455,
            "invalid JSON",
        ),
        ("/v1/queues.list", r#"{"limit":{}}"#, 455, "invalid JSON"),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    // Invalid UTF-8 inside a JSON string.
    let mut bad_utf8 = br#"{"queue_name":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    bad_utf8.extend_from_slice(br#""}"#);
    expect_error(&c, Method::POST, p, (JSON, JSON), &bad_utf8, 455, "invalid JSON").await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_json_fields_are_named() {
    let (srv, c) = server(true).await;
    let r = json_error(
        &c,
        "/v1/queue.produce",
        r#"{"queue_name":"mq","bogus":1}"#,
        455,
        "bogus",
    )
    .await;
    assert!(r.message.contains("unknown field"), "{}", r.message);
    for (path, body, code, needle) in [
        (
            "/v1/queue.lease",
            r#"{"queue_name":"mq","batchSize":1,"batch":2}"#,
            455,
            "batch",
        ),
        (
            "/v1/queue.produce",
            r#"{"queue_name":"mq","items":[{"payload":"x"}]}"#,
            455,
            "payload",
        ),
        (
            "/v1/queues.create",
            r#"{"queue_name":"x","lease":"1m"}"#,
            455,
            "lease",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_garbage_protobuf() {
    let (srv, c) = server(true).await;
    let good = encode(
        Encoding::Protobuf,
        &QueueProduceRequest {
            queue_name: QUEUE.into(),
            request_timeout: "1m".into(),
            items: vec![QueueProduceItem {
                utf8: "hello world".into(),
                reference: "r".into(),
                ..Default::default()
            }],
        },
    );
    let p = "/v1/queue.produce";
    for cut in [1, 3, 7] {
        let truncated = &good[..good.len() - cut];
        expect_error(
            &c,
            Method::POST,
            p,
            (PROTO, PROTO),
            truncated,
            455,
            "invalid protobuf",
        )
        .await;
    }
    for (method, path, types, body, code, needle) in [
        (
            Method::POST,
            p,
            (PROTO, PROTO),
            &[0xff; 12][..],
            455,
            "invalid protobuf",
        ),
        // A length prefix far beyond the body.
        (
            Method::POST,
            p,
            (PROTO, PROTO),
            &[0x0a, 0xff, 0xff, 0xff, 0x0f, b'm'][..],
            455,
            "invalid protobuf",
        ),
        // A string field holding invalid UTF-8.
        (
            Method::POST,
            p,
            (PROTO, JSON),
            &[0x0a, 0x02, 0xff, 0xfe][..],
            455,
            "invalid protobuf",
        ),
        // A varint that never ends.
        (
            Method::POST,
            "/v1/queue.lease",
            (PROTO, PROTO),
            &[0x10, 0xff, 0xff, 0xff][..],
            455,
            "invalid protobuf",
        ),
        // Protobuf sent as JSON and the other way round.
        (Method::POST, p, (JSON, JSON), &good[..], 455, "invalid JSON"),
    ] {
        expect_error(&c, method, path, types, body, code, needle).await;
    }
    let json = produce_json(1, "1m");
    expect_error(
        &c,
        Method::POST,
        p,
        (PROTO, PROTO),
        json.as_bytes(),
        455,
        "invalid protobuf",
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_negotiation_errors() {
    let (srv, c) = server(true).await;
    let body = produce_json(1, "1m");
    let p = "/v1/queue.produce";
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "text/plain, application/json",
    ] {
        let r = expect_error(
            &c,
            Method::POST,
            p,
            (Some(ct), JSON),
            body.as_bytes(),
            455,
            "unsupported content type",
        )
        .await;
        assert!(
            r.message.contains(ct.split([',', ';']).next().unwrap_or(ct)),
            "{}",
            r.message
        );
    }
    for accept in ["text/html", "application/xml", "image/png;q=0.9"] {
        // The error comes back in JSON, since the client asked for nothing the server speaks.
        let r = expect_error(
            &c,
            Method::POST,
            p,
            (JSON, Some(accept)),
            body.as_bytes(),
            455,
            "unsupported accept type",
        )
        .await;
        assert!(
            r.message.contains(accept.split(';').next().unwrap_or(accept)),
            "{}",
            r.message
        );
    }
    // Errors answer in protobuf when the client accepts protobuf.
    let a = send(&c, Method::POST, p, Some("text/plain"), PROTO, body.as_bytes()).await;
    assert_eq!((a.status, a.content_type.as_str()), (455, "application/protobuf"));
    envelope(&a, "text/plain with protobuf accepted");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_unknown_paths() {
    let (srv, c) = server(true).await;
    for route in all_routes() {
        for m in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
            let needle = format!("http method '{m}' not allowed; only POST");
            expect_error(&c, m, route, (None, None), b"", 400, &needle).await;
        }
    }
    for path in [
        "/v1/queue.nope",
        "/v1/storage/scheduled.add",
        "/nope",
        "/v2/queue.produce",
    ] {
        let r = expect_error(&c, Method::POST, path, (JSON, JSON), b"{}", 501, "no such method").await;
        assert!(r.message.contains(path), "{}", r.message);
    }
    // /health and /metrics are GET routes of their own; Querator has no RPC there, so a POST is 501.
    let a = send(&c, Method::GET, "/health", None, None, b"").await;
    assert_eq!(a.status, 200);
    for path in ["/health", "/metrics"] {
        let r = expect_error(&c, Method::POST, path, (JSON, JSON), b"{}", 501, "no such method").await;
        assert!(r.message.contains(path), "{}", r.message);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies() {
    let (srv, c) = server(true).await;
    // Lease, stats, clear and reload take small bodies.
    for route in [
        "/v1/queue.lease",
        "/v1/queue.stats",
        "/v1/queue.clear",
        "/v1/queue.reload",
        "/v1/queue.pause",
        "/v1/queue.resume",
        "/v1/queue.browse",
        "/v1/queue.redrive",
        "/v1/redrive.list",
        "/v1/redrive.get",
        "/v1/redrive.cancel",
        "/v1/rebalance.get",
        "/v1/rebalance.cancel",
    ] {
        let big = format!(r#"{{"queue_name":"{}"}}"#, "q".repeat(5000));
        expect_error(
            &c,
            Method::POST,
            route,
            (JSON, JSON),
            big.as_bytes(),
            400,
            "request body exceeds 4096 limit",
        )
        .await;
    }
    // Complete, retry and the queues routes take 256 KB.
    let ids: Vec<String> = (0..20_000).map(|i| format!("\"{i:016x}\"")).collect();
    let big = format!(
        r#"{{"queue_name":"mq","request_timeout":"1m","ids":[{}]}}"#,
        ids.join(",")
    );
    assert!(big.len() > 256 * 1024);
    for route in [
        "/v1/queue.complete",
        "/v1/queue.retry",
        "/v1/queue.extend",
        "/v1/queues.create",
        "/v1/storage/items.delete",
    ] {
        expect_error(
            &c,
            Method::POST,
            route,
            (JSON, JSON),
            big.as_bytes(),
            400,
            "request body exceeds",
        )
        .await;
    }
    // Produce takes 5,000,000 bytes by default.
    let payload = "x".repeat(5_000_001);
    let big = format!(r#"{{"queue_name":"mq","request_timeout":"1m","items":[{{"utf8":"{payload}"}}]}}"#);
    let r = json_error(
        &c,
        "/v1/queue.produce",
        &big,
        400,
        "request body exceeds 5000000 limit",
    )
    .await;
    assert!(r.message.starts_with("request body exceeds"), "{}", r.message);
    // The queue is untouched and the server still answers.
    let a = send(&c, Method::GET, "/health", None, None, b"").await;
    assert_eq!(a.status, 200);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_queues() {
    let (srv, c) = server(true).await;
    let needle = "queue does not exist; no such queue named 'nope'";
    for (path, body, code, needle) in [
        (
            "/v1/queue.produce",
            r#"{"queue_name":"nope","request_timeout":"1m","items":[{"utf8":"x"}]}"#,
            400,
            needle,
        ),
        (
            "/v1/queue.lease",
            r#"{"queue_name":"nope","batch_size":1,"client_id":"c","request_timeout":"1s"}"#,
            400,
            needle,
        ),
        (
            "/v1/queue.complete",
            r#"{"queue_name":"nope","request_timeout":"1s","ids":["0000000000000001"]}"#,
            400,
            needle,
        ),
        (
            "/v1/queue.retry",
            r#"{"queue_name":"nope","items":[{"id":"0000000000000001"}]}"#,
            400,
            needle,
        ),
        ("/v1/queue.stats", r#"{"queue_name":"nope"}"#, 400, needle),
        (
            "/v1/queue.clear",
            r#"{"queue_name":"nope","queue":true}"#,
            400,
            needle,
        ),
        ("/v1/queue.reload", r#"{"queue_name":"nope"}"#, 400, needle),
        ("/v1/queues.info", r#"{"queue_name":"nope"}"#, 400, needle),
        ("/v1/queues.delete", r#"{"queue_name":"nope"}"#, 400, needle),
        (
            "/v1/queues.update",
            r#"{"queue_name":"nope","max_attempts":3}"#,
            400,
            needle,
        ),
        ("/v1/storage/items.list", r#"{"queue_name":"nope"}"#, 400, needle),
        (
            "/v1/queue.extend",
            r#"{"queue_name":"nope","ids":["0000000000000001"],"request_timeout":"1s"}"#,
            400,
            needle,
        ),
        ("/v1/queue.pause", r#"{"queue_name":"nope"}"#, 400, needle),
        ("/v1/queue.resume", r#"{"queue_name":"nope"}"#, 400, needle),
        ("/v1/queue.browse", r#"{"queue_name":"nope"}"#, 400, needle),
        (
            "/v1/queue.browse",
            r#"{"queue_name":"nope","state":"bogus"}"#,
            400,
            needle,
        ),
        ("/v1/queue.redrive", r#"{"dead_queue":"nope"}"#, 400, needle),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    proto_error(
        &c,
        "/v1/queue.produce",
        &QueueProduceRequest {
            queue_name: "nope".into(),
            request_timeout: "1m".into(),
            items: vec![QueueProduceItem::default()],
        },
        400,
        needle,
    )
    .await;
    // Names that cannot be queue names are refused as such.
    for (path, body, code, needle) in [
        (
            "/v1/queue.stats",
            r#"{"queue_name":"a b"}"#,
            400,
            "queue_name is invalid",
        ),
        (
            "/v1/queue.stats",
            r#"{"queue_name":""}"#,
            400,
            "queue_name is invalid; cannot be empty",
        ),
        (
            "/v1/queue.stats",
            r#"{"queue_name":"a~b"}"#,
            400,
            "queue_name is invalid",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_sizes_over_the_limits() {
    let (srv, c) = server(true).await;
    for (path, body, code, needle) in [
        (
            "/v1/queue.produce",
            produce_json(1001, "1m").as_str(),
            400,
            "items is invalid; max_produce_batch_size is 1000 but received 1001",
        ),
        (
            "/v1/queue.produce",
            produce_json(0, "1m").as_str(),
            400,
            "items cannot be empty",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    let l = "/v1/queue.lease";
    for (path, body, code, needle) in [
        (
            l,
            lease_json("100000", "1s").as_str(),
            400,
            "invalid batch size; max_lease_batch_size is 1000, but 100000 was requested",
        ),
        (
            l,
            lease_json("1001", "1s").as_str(),
            400,
            "max_lease_batch_size is 1000",
        ),
        (
            l,
            lease_json("0", "1s").as_str(),
            400,
            "invalid batch size; must be greater than zero",
        ),
        (
            l,
            lease_json("-5", "1s").as_str(),
            400,
            "invalid batch size; must be greater than zero",
        ),
        (
            l,
            lease_json("2147483647", "1s").as_str(),
            400,
            "invalid batch size",
        ),
        (
            l,
            lease_json("-2147483648", "1s").as_str(),
            400,
            "invalid batch size",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    proto_error(
        &c,
        l,
        &QueueLeaseRequest {
            queue_name: QUEUE.into(),
            batch_size: 100_000,
            client_id: "c".into(),
            request_timeout: "1s".into(),
        },
        400,
        "max_lease_batch_size is 1000",
    )
    .await;
    let ids: Vec<String> = (0..1001).map(|i| format!("{i:016x}")).collect();
    proto_error(
        &c,
        "/v1/queue.complete",
        &QueueCompleteRequest {
            queue_name: QUEUE.into(),
            partition: 0,
            request_timeout: "1m".into(),
            ids,
        },
        400,
        "ids is invalid; max_complete_batch_size is 1000 but received 1001",
    )
    .await;
    let items: Vec<String> = (0..1001).map(|i| format!(r#"{{"id":"{i:016x}"}}"#)).collect();
    for (path, body, code, needle) in [
        (
            "/v1/queue.retry",
            format!(r#"{{"queue_name":"mq","items":[{}]}}"#, items.join(",")).as_str(),
            400,
            "items is invalid; max_complete_batch_size is 1000 but received 1001",
        ),
        ("/v1/queues.list", r#"{"limit":100000}"#, 400, "limit is invalid"),
        ("/v1/queues.list", r#"{"limit":-1}"#, 400, "limit is invalid"),
        (
            "/v1/storage/items.list",
            r#"{"queue_name":"mq","limit":-1}"#,
            400,
            "limit is invalid",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_timeouts() {
    let (srv, c) = server(true).await;
    // (timeout, substrings the message must contain)
    let cases: [(&str, &[&str]); 10] = [
        ("999999h", &["timeout is invalid", "maximum timeout is '900s'"]),
        (
            "16m",
            &["timeout is invalid", "maximum timeout is '900s'", "'960s'"],
        ),
        ("9999999999999h", &["timeout is invalid", "'9999999999999h'"]),
        ("-1s", &["timeout is invalid", "negative", "'-1s'"]),
        (
            "1ns",
            &["timeout is invalid", "minimum timeout is greater than '10ms'"],
        ),
        (
            "10ms",
            &["timeout is invalid", "minimum timeout is greater than '10ms'"],
        ),
        ("abc", &["timeout is invalid", "'abc'", "expected format"]),
        ("1", &["timeout is invalid", "missing unit", "'1'"]),
        ("1 s", &["timeout is invalid", "'1 s'"]),
        ("0", &["request timeout is required"]),
    ];
    for (t, needles) in cases {
        for route in ["/v1/queue.lease", "/v1/queue.produce"] {
            let body = if route.ends_with("lease") {
                lease_json("1", t)
            } else {
                produce_json(1, t)
            };
            let r = json_error(&c, route, &body, 400, needles[0]).await;
            for n in &needles[1..] {
                assert!(
                    r.message.contains(n),
                    "{route} {t:?}: {:?} should contain {n:?}",
                    r.message
                );
            }
        }
    }
    for (path, body, code, needle) in [
        (
            "/v1/queue.lease",
            lease_json("1", "").as_str(),
            400,
            "request timeout is required",
        ),
        (
            "/v1/queue.produce",
            produce_json(1, "").as_str(),
            400,
            "request timeout is required",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    // Complete has a maximum but no minimum.
    for (t, needle) in [
        ("999999h", "maximum timeout"),
        ("-1s", "timeout is invalid"),
        ("abc", "timeout is invalid"),
    ] {
        let body = format!(r#"{{"queue_name":"mq","request_timeout":"{t}","ids":["0000000000000001"]}}"#);
        json_error(&c, "/v1/queue.complete", &body, 400, needle).await;
    }
    // Queue durations are checked by name too.
    for (path, body, code, needle) in [
        (
            "/v1/queues.create",
            r#"{"queue_name":"t1","lease_timeout":"-1m","expire_timeout":"24h"}"#,
            400,
            "lease_timeout is invalid",
        ),
        (
            "/v1/queues.create",
            r#"{"queue_name":"t1","lease_timeout":"1m","expire_timeout":"forever"}"#,
            400,
            "expire_timeout is invalid",
        ),
        (
            "/v1/queues.create",
            r#"{"queue_name":"t1","lease_timeout":"2h","expire_timeout":"1h"}"#,
            400,
            "lease_timeout is too long",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_partitions_and_bad_ids() {
    let (srv, c) = server(true).await;
    let id = "0000000000000001";
    let complete = |partition: &str, ids: &str| {
        format!(r#"{{"queue_name":"mq","partition":{partition},"request_timeout":"1m","ids":[{ids}]}}"#)
    };
    let cp = "/v1/queue.complete";
    for (path, body, code, needle) in [
        (
            cp,
            complete("-1", &format!("\"{id}\"")).as_str(),
            400,
            "partition is invalid; '-1' is not a valid partition",
        ),
        (
            cp,
            complete("65234", &format!("\"{id}\"")).as_str(),
            400,
            "partition is invalid; '65234'",
        ),
        (
            cp,
            complete("0", r#""xyz""#).as_str(),
            400,
            "invalid storage id; 'xyz'",
        ),
        (
            cp,
            complete("0", r#""000000000000000A""#).as_str(),
            400,
            "invalid storage id; '000000000000000A'",
        ),
        (cp, complete("0", r#""""#).as_str(), 400, "invalid storage id; ''"),
        (
            cp,
            complete("0", r#""00000000000000001""#).as_str(),
            400,
            "invalid storage id",
        ),
        (
            cp,
            complete("0", "").as_str(),
            400,
            "ids is invalid; list of ids cannot be empty",
        ),
        (
            cp,
            complete("0", &format!("\"{id}\"")).as_str(),
            400,
            &format!("invalid storage id; '{id}' does not exist"),
        ),
        (
            cp,
            complete("0", &format!("\"{id}\",\"{id}\"")).as_str(),
            400,
            // Ids are checked in order, existence first, as Querator does.
            "invalid storage id; ",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }

    let rp = "/v1/queue.retry";
    let retry = |partition: &str, id: &str| {
        format!(r#"{{"queue_name":"mq","partition":{partition},"items":[{{"id":"{id}"}}]}}"#)
    };
    for (path, body, code, needle) in [
        (
            rp,
            retry("-7", id).as_str(),
            400,
            "partition is invalid; '-7' is not a valid partition",
        ),
        (
            rp,
            retry("0", "not-an-id").as_str(),
            400,
            "invalid storage id; 'not-an-id'",
        ),
        (
            rp,
            retry("0", id).as_str(),
            400,
            &format!("invalid storage id; '{id}' does not exist"),
        ),
        (
            rp,
            r#"{"queue_name":"mq","items":[]}"#,
            400,
            "items is invalid; list of items cannot be empty",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }

    let sl = "/v1/storage/items.list";
    for (path, body, code, needle) in [
        (
            sl,
            r#"{"queue_name":"mq","partition":-1}"#,
            400,
            "partition is invalid; '-1'",
        ),
        (
            sl,
            r#"{"queue_name":"mq","partition":3}"#,
            400,
            "partition is invalid; '3'",
        ),
        (
            sl,
            r#"{"queue_name":"mq","pivot":"zz"}"#,
            400,
            "invalid storage id; 'zz'",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    let sd = "/v1/storage/items.delete";
    for (path, body, code, needle) in [
        (
            sd,
            r#"{"queue_name":"mq","ids":["zz"]}"#,
            400,
            "invalid storage id; 'zz'",
        ),
        (
            sd,
            r#"{"queue_name":"mq","partition":-2,"ids":["0000000000000001"]}"#,
            400,
            "partition is invalid",
        ),
        (sd, r#"{"queue_name":"mq"}"#, 400, "ids is invalid"),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    let si = "/v1/storage/items.import";
    for (path, body, code, needle) in [
        (
            si,
            r#"{"queue_name":"mq","partition":-1,"items":[{"payload":"eA=="}]}"#,
            400,
            "partition is invalid",
        ),
        (
            si,
            r#"{"queue_name":"mq","items":[{"attempts":-1}]}"#,
            400,
            "attempts is invalid",
        ),
        (si, r#"{"queue_name":"mq","items":[]}"#, 400, "items is invalid"),
        // Queue definitions with negative numbers.
        (
            "/v1/queues.create",
            r#"{"queue_name":"n1","lease_timeout":"1m","expire_timeout":"1h","max_attempts":-1}"#,
            400,
            "max_attempts is invalid",
        ),
        (
            "/v1/queues.create",
            r#"{"queue_name":"n1","lease_timeout":"1m","expire_timeout":"1h","requested_partitions":-3}"#,
            400,
            "requested_partitions is invalid",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_required_fields() {
    let (srv, c) = server(true).await;
    // An empty body is the default message in both encodings; each route names what is missing.
    for (route, needle) in [
        ("/v1/queue.produce", "request timeout is required"),
        ("/v1/queue.lease", "invalid client id; cannot be empty"),
        (
            "/v1/queue.complete",
            "ids is invalid; list of ids cannot be empty",
        ),
        (
            "/v1/queue.retry",
            "items is invalid; list of items cannot be empty",
        ),
        ("/v1/queue.stats", "queue_name is invalid; cannot be empty"),
        ("/v1/queue.reload", "queue_name is invalid; cannot be empty"),
        ("/v1/queues.create", "queue_name is invalid; cannot be empty"),
        ("/v1/queues.update", "queue_name is invalid; cannot be empty"),
        ("/v1/queues.delete", "queue_name is invalid; cannot be empty"),
        ("/v1/queues.info", "queue_name is invalid; cannot be empty"),
        ("/v1/storage/items.list", "queue_name is invalid; cannot be empty"),
        ("/v1/storage/items.delete", "ids is invalid"),
        ("/v1/storage/items.import", "items is invalid"),
        ("/v1/queue.extend", "ids is invalid; list of ids cannot be empty"),
        ("/v1/queue.pause", "queue_name is invalid; cannot be empty"),
        ("/v1/queue.resume", "queue_name is invalid; cannot be empty"),
        ("/v1/queue.browse", "queue_name is invalid; cannot be empty"),
        ("/v1/queue.redrive", "dead_queue is invalid; cannot be empty"),
        ("/v1/redrive.get", "task_id is invalid; cannot be empty"),
        ("/v1/redrive.cancel", "task_id is invalid; cannot be empty"),
        ("/v1/rebalance.get", "task_id is invalid; cannot be empty"),
        ("/v1/rebalance.cancel", "task_id is invalid; cannot be empty"),
    ] {
        for (ct, accept) in [(JSON, JSON), (PROTO, PROTO), (None, None)] {
            expect_error(&c, Method::POST, route, (ct, accept), b"", 400, needle).await;
        }
        expect_error(&c, Method::POST, route, (JSON, JSON), b"{}", 400, needle).await;
    }
    for (path, body, code, needle) in [
        (
            "/v1/queue.clear",
            r#"{"queue_name":"mq"}"#,
            400,
            "invalid clear request",
        ),
        (
            "/v1/queues.create",
            r#"{"queue_name":"x1"}"#,
            400,
            "lease_timeout is required",
        ),
        (
            "/v1/queues.create",
            r#"{"queue_name":"x1","lease_timeout":"1m"}"#,
            400,
            "expire_timeout is required",
        ),
        (
            "/v1/queue.lease",
            r#"{"queue_name":"mq","client_id":"   ","batch_size":1}"#,
            400,
            "invalid client id",
        ),
    ] {
        json_error(&c, path, body, code, needle).await;
    }
    let long_client = format!(
        r#"{{"queue_name":"mq","client_id":"{}","batch_size":1,"request_timeout":"1s"}}"#,
        "c".repeat(600)
    );
    json_error(&c, "/v1/queue.lease", &long_client, 400, "invalid client id").await;
    srv.stop().await;
}

// ---- property test: arbitrary input never breaks the server ---------------------------------------------------

/// Text built from JSON tokens, the wire field names and edge values, so the input reaches the field decoders and
/// validators rather than failing at the first byte. Queue names come from a set that excludes the test queue.
fn jsonish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("queue_name"),
        Just("queueName"),
        Just("request_timeout"),
        Just("items"),
        Just("batch_size"),
        Just("client_id"),
        Just("ids"),
        Just("partition"),
        Just("id"),
        Just("retry_at"),
        Just("dead"),
        Just("enqueue_at"),
        Just("bytes"),
        Just("utf8"),
        Just("reference"),
        Just("lease_timeout"),
        Just("expire_timeout"),
        Just("max_attempts"),
        Just("requested_partitions"),
        Just("dead_queue"),
        Just("limit"),
        Just("pivot"),
        Just("queue"),
        Just("scheduled"),
        Just("destructive"),
        Just("payload"),
        Just("attempts"),
        Just("lease_deadline"),
        Just("is_leased"),
        Just("namespace"),
        Just("zzz"),
        // The auth messages' fields.
        Just("name"),
        Just("description"),
        Just("api_key_tag"),
        Just("created_at"),
        Just("username"),
        Just("email"),
        Just("external_id"),
        Just("user_id"),
        Just("namespace_scope"),
        Just("expires_at"),
        Just("key_tag"),
        Just("role_name"),
        Just("permissions"),
        Just("user_id_filter"),
        // Lessor's extension fields.
        Just("dedup_id"),
        Just("priority"),
        Just("dedup_window"),
        Just("retry_backoff"),
        Just("max_lease_timeout"),
        Just("paused"),
        Just("state"),
        Just("target_queue"),
        Just("source_queue"),
        Just("kind"),
        Just("rate_per_sec"),
        Just("max_items"),
        Just("task_id"),
    ]
    .prop_map(|k| format!("\"{k}\""));
    let scalar = prop_oneof![
        Just("\"fz\"".to_string()),
        Just("\"fz2\"".to_string()),
        Just("\"\"".to_string()),
        Just("0".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("2147483648".to_string()),
        Just("-9223372036854775809".to_string()),
        Just("1e999".to_string()),
        Just("0.5".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
        Just("\"1s\"".to_string()),
        Just("\"20ms\"".to_string()),
        Just("\"-1s\"".to_string()),
        Just("\"999999h\"".to_string()),
        Just("\"1h\"".to_string()),
        Just("\"abc\"".to_string()),
        Just("\"0000000000000001\"".to_string()),
        Just("\"ffffffffffffffff\"".to_string()),
        Just("\"AAAA\"".to_string()),
        Just("\"=\"".to_string()),
        Just("\"2024-01-01T00:00:00Z\"".to_string()),
        Just("\"9999-12-31T23:59:59.999999999Z\"".to_string()),
        Just("\"0001-01-01T00:00:00Z\"".to_string()),
        Just("\"2024-13-45T99:99:99+25:00\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("\"ready\"".to_string()),
        Just("\"leased\"".to_string()),
        Just("\"scheduled\"".to_string()),
        Just("9".to_string()),
        Just("10".to_string()),
        Just("\"NaN\"".to_string()),
        // Names the auth routes know: reserved and standard ones, permissions, tags, keys.
        Just("\"_system\"".to_string()),
        Just("\"_x\"".to_string()),
        Just("\"Admin\"".to_string()),
        Just("\"NamespaceOwner\"".to_string()),
        Just("\"queue.produce\"".to_string()),
        Just("\"namespace.create\"".to_string()),
        Just("\"queue.*\"".to_string()),
        Just("\"live\"".to_string()),
        Just("\"a:b\"".to_string()),
        Just("\"qtr-live-0123456789012345678901234567890123456789012\"".to_string()),
        "\"\\PC{0,10}\"",
        any::<i64>().prop_map(|n| n.to_string()),
    ];
    let value = scalar.prop_recursive(3, 24, 5, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(
                (
                    prop_oneof![
                        Just("\"utf8\"".to_string()),
                        Just("\"id\"".to_string()),
                        Just("\"priority\"".to_string()),
                        Just("\"dedup_id\"".to_string()),
                        Just("\"base\"".to_string()),
                        Just("\"factor\"".to_string()),
                        Just("\"x\"".to_string())
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| format!(
                "{{{}}}",
                kv.iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        ]
    });
    let object = proptest::collection::vec((key, value), 0..7).prop_map(|kv| {
        format!(
            "{{{}}}",
            kv.iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(",")
        )
    });
    let token = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(":".to_string()),
        Just(",".to_string()),
        Just("\"queue_name\"".to_string()),
        Just("\"items\"".to_string()),
        Just("\"permissions\"".to_string()),
        Just("\"user_id\"".to_string()),
        Just("\"fz\"".to_string()),
        Just("null".to_string()),
        Just("-".to_string()),
        Just("\\".to_string()),
        Just("\"".to_string()),
        "[0-9]{1,20}",
        "\\PC{0,6}",
    ];
    let soup = proptest::collection::vec(token, 0..40).prop_map(|t| t.concat());
    prop_oneof![3 => object, 1 => soup]
}

#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Text(String),
}

/// Posts `cases` arbitrary requests to `routes` of the server behind `clients` (one picked per request, so the
/// `Authorization` header varies too) and checks that none gets a 5xx or a malformed answer, and that the server
/// still answers and still has the test queue afterwards. Returns the answers' statuses per route.
fn fuzz(
    rt: &tokio::runtime::Runtime,
    clients: &[Client],
    routes: &[&'static str],
    cases: u32,
) -> std::collections::HashMap<&'static str, Vec<u16>> {
    let content_types = [
        Some("application/json"),
        Some("application/protobuf"),
        None,
        Some("*/*"),
    ];
    let accepts = [Some("application/json"), Some("application/protobuf"), None];
    // Minimal well-formed bodies (`{}`, and the empty protobuf message) get a share of their own: random bytes and
    // random JSON almost never decode, and without some bodies that do, the handlers behind decoding (the auth
    // routes' own checks and successes, which the auth fuzz asserts it reached) ran only by luck: 0 to 7 of about
    // 550 auth requests came back 200 per run, and a run with none failed.
    let body = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..600).prop_map(Body::Bytes),
        4 => jsonish().prop_map(Body::Text),
        1 => Just(Body::Text("{}".into())),
        1 => Just(Body::Bytes(Vec::new())),
    ];
    let strategy = (
        0..routes.len(),
        0..content_types.len(),
        0..accepts.len(),
        0..clients.len(),
        body,
    );
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let seen = std::sync::Mutex::new(std::collections::HashMap::<&'static str, Vec<u16>>::new());
    let result = runner.run(&strategy, |(route, ct, accept, client, body)| {
        let path = routes[route];
        let (ct, accept) = (content_types[ct], accepts[accept]);
        let bytes = match &body {
            Body::Bytes(b) => b.clone(),
            Body::Text(t) => t.clone().into_bytes(),
        };
        let a = rt.block_on(send(&clients[client], Method::POST, path, ct, accept, &bytes));
        seen.lock()
            .expect("not poisoned")
            .entry(path)
            .or_default()
            .push(a.status);
        let what = format!("POST {path} ({ct:?} -> {accept:?}, client {client}) with {body:?}");
        prop_assert!(
            a.status < 500,
            "{what}: status {} body {:?}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        prop_assert!(
            a.status == 200 || (400..500).contains(&a.status),
            "{what}: status {}",
            a.status
        );
        let want_ct = if accept == Some("application/protobuf") {
            "application/protobuf"
        } else {
            "application/json"
        };
        prop_assert_eq!(a.content_type.as_str(), want_ct, "{}", what);
        if a.status != 200 {
            let reply = envelope(&a, &what);
            for trace in ["panicked", "backtrace", ".rs:"] {
                prop_assert!(!reply.message.contains(trace), "{what}: {:?}", reply.message);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // The server still answers, and our queue is intact.
    rt.block_on(async {
        let a = send(&clients[0], Method::GET, "/health", None, None, b"").await;
        assert_eq!(
            a.status,
            200,
            "health after fuzzing: {:?}",
            String::from_utf8_lossy(&a.body)
        );
        let stats = send(
            &clients[0],
            Method::POST,
            "/v1/queue.stats",
            JSON,
            JSON,
            format!(r#"{{"queue_name":"{QUEUE}"}}"#).as_bytes(),
        )
        .await;
        assert_eq!(stats.status, 200);
    });
    seen.into_inner().expect("not poisoned")
}

#[test]
fn arbitrary_input_never_fails_the_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (srv, c) = rt.block_on(server(false));
    fuzz(&rt, &[c], ROUTES, 768);
    rt.block_on(srv.stop());
}

/// The same with auth on (`internal`, open door) over every route, the auth routes included, with requests
/// without a key (administrators, so every handler runs), with a well-formed key nobody holds and with garbage:
/// no 5xx, no stack trace, always the envelope. The auth handlers must really have run: some requests succeeded and
/// some were refused by a handler's own checks.
#[test]
fn arbitrary_input_never_fails_the_server_with_auth() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (srv, c) = rt.block_on(auth_server());
    let clients = [
        c.clone(),
        c.clone(),
        c.clone()
            .with_api_key("qtr-live-0123456789012345678901234567890123456789012"),
        c.clone().with_api_key("garbage"),
    ];
    let routes: Vec<&'static str> = all_routes().collect();
    let seen = fuzz(&rt, &clients, &routes, 1536);
    let auth: Vec<u16> = AUTH_ROUTES
        .iter()
        .flat_map(|r| seen.get(r).cloned().unwrap_or_default())
        .collect();
    let count = |f: &dyn Fn(u16) -> bool| auth.iter().filter(|&&s| f(s)).count();
    assert!(count(&|s| s == 200) > 0, "no auth request succeeded: {auth:?}");
    assert!(
        count(&|s| s == 400 || s == 453) > 0,
        "no auth request reached a handler's checks: {auth:?}"
    );
    assert!(count(&|s| s == 401) > 0, "the bad keys were refused: {auth:?}");
    // The door is still open: anonymous still administers.
    rt.block_on(async {
        let a = send(&c, Method::POST, "/v1/users.list", JSON, JSON, b"{}").await;
        assert_eq!(a.status, 200, "{:?}", String::from_utf8_lossy(&a.body));
        srv.stop().await;
    });
}

// ---- deviations from Querator found by these tests (expected to fail until the server is fixed) ----------------

/// Querator's body limits use SI units (duh `Kilobyte = 1000`, reference §1.1): 256 KB is 256,000 bytes for
/// complete, retry, queues.create/list/delete/info and the storage routes, and 512 KB is 512,000 bytes for
/// queues.update. Lessor's produce (5,000,000) and import (64,000,000) limits follow that, but the 256 KB and
/// 512 KB limits are binary (262,144 and 524,288), so bodies in between are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_body_limits_use_si_kilobytes() {
    let (srv, c) = server(true).await;
    for (route, limit) in [("/v1/queue.complete", 256_000), ("/v1/queues.update", 512_000)] {
        // Valid JSON, just long: whitespace padding one byte over the SI limit.
        let head = format!(r#"{{"queue_name":"{QUEUE}""#);
        let body = format!("{head}{}}}", " ".repeat(limit + 1 - head.len() - 1));
        assert_eq!(body.len(), limit + 1);
        json_error(
            &c,
            route,
            &body,
            400,
            &format!("request body exceeds {limit} limit"),
        )
        .await;
    }
    srv.stop().await;
}

/// Querator answers an unparsable request_timeout with `request timeout is invalid; <err> - expected format: ...`
/// (reference §2.3), the same constant part as its range errors, and clients match on the constant part. Lessor
/// says `request_timeout is invalid; ...` for parse errors but `request timeout is invalid; ...` for range errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_request_timeout_parse_errors_use_querators_constant() {
    let (srv, c) = server(true).await;
    for t in ["abc", "-1s"] {
        let r = json_error(
            &c,
            "/v1/queue.lease",
            &lease_json("1", t),
            400,
            "timeout is invalid",
        )
        .await;
        assert!(
            r.message.starts_with("request timeout is invalid; "),
            "lease {t:?}: {:?}",
            r.message
        );
        let r = json_error(
            &c,
            "/v1/queue.produce",
            &produce_json(1, t),
            400,
            "timeout is invalid",
        )
        .await;
        assert!(
            r.message.starts_with("request timeout is invalid; "),
            "produce {t:?}: {:?}",
            r.message
        );
    }
    srv.stop().await;
}

/// A sub-millisecond request_timeout is reported as `'0ms' was requested`, which misstates what the client sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_too_short_timeout_message_states_the_requested_value() {
    let (srv, c) = server(true).await;
    for t in ["1ns", "999us"] {
        let r = json_error(&c, "/v1/queue.lease", &lease_json("1", t), 400, "minimum timeout").await;
        assert!(
            !r.message.contains("'0ms' was requested"),
            "{t:?}: {:?}",
            r.message
        );
    }
    srv.stop().await;
}
