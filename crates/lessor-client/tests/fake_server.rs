//! Client tests against a canned HTTP/1.1 responder on 127.0.0.1: what the client sends (path, headers,
//! body) and how it reads success replies, error envelopes, foreign error bodies and transport failures.

use std::time::Duration;

use lessor_client::{Client, ClientError, Encoding};
use lessor_proto::{
    decode, encode, QueueLeaseItem, QueueLeaseRequest, QueueLeaseResponse, QueueProduceItem,
    QueueProduceRequest, Reply, Timestamp,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// One request as the fake server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Serves exactly one request with the given reply, then reports what it received.
async fn serve_once(
    status: u16,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (String, oneshot::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    let content_type = content_type.map(str::to_string);
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let header_end = loop {
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "client closed before sending headers");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_string();
        let mut parts = request_line.split(' ');
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut req_body = buf[header_end..].to_vec();
        while req_body.len() < len {
            let n = sock.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "client closed mid-body");
            req_body.extend_from_slice(&chunk[..n]);
        }
        let mut reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        if let Some(ct) = content_type {
            reply.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        reply.push_str("X-Test: yes\r\n\r\n");
        sock.write_all(reply.as_bytes()).await.expect("write head");
        sock.write_all(&body).await.expect("write body");
        sock.shutdown().await.ok();
        let _ = tx.send(Seen {
            method,
            path,
            headers,
            body: req_body,
        });
    });
    (format!("http://{addr}"), rx)
}

fn lease_request() -> QueueLeaseRequest {
    QueueLeaseRequest {
        queue_name: "orders".into(),
        batch_size: 2,
        client_id: "w1".into(),
        request_timeout: "5s".into(),
    }
}

fn lease_response() -> QueueLeaseResponse {
    QueueLeaseResponse {
        queue_name: "orders".into(),
        partition: 1,
        items: vec![QueueLeaseItem {
            id: "id-1".into(),
            attempts: 1,
            lease_deadline: Some(Timestamp::new(1_767_323_045, 0)),
            bytes: b"hello".to_vec(),
            ..Default::default()
        }],
    }
}

#[tokio::test]
async fn lease_over_protobuf_sends_the_right_request_and_decodes_the_reply() {
    let (endpoint, seen) = serve_once(
        200,
        Some("application/protobuf"),
        encode(Encoding::Protobuf, &lease_response()),
    )
    .await;
    let client = Client::new(&endpoint).expect("client").with_api_key("secret");
    assert_eq!(client.encoding(), Encoding::Protobuf);
    let got = client.queue_lease(&lease_request()).await.expect("lease");
    assert_eq!(got, lease_response());

    let seen = seen.await.expect("seen");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/v1/queue.lease");
    assert_eq!(seen.header("content-type"), Some("application/protobuf"));
    assert_eq!(seen.header("accept"), Some("application/protobuf"));
    assert_eq!(seen.header("authorization"), Some("Bearer secret"));
    let sent: QueueLeaseRequest = decode(Encoding::Protobuf, &seen.body).expect("request body");
    assert_eq!(sent, lease_request());
}

#[tokio::test]
async fn lease_over_json_uses_json_both_ways() {
    let (endpoint, seen) = serve_once(
        200,
        Some("application/json"),
        encode(Encoding::Json, &lease_response()),
    )
    .await;
    let client = Client::new(&format!("{endpoint}/"))
        .expect("client")
        .with_encoding(Encoding::Json);
    let got = client.queue_lease(&lease_request()).await.expect("lease");
    assert_eq!(got, lease_response());

    let seen = seen.await.expect("seen");
    assert_eq!(
        seen.path, "/v1/queue.lease",
        "trailing slash of the endpoint is dropped"
    );
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("accept"), Some("application/json"));
    assert_eq!(seen.header("authorization"), None);
    let text = String::from_utf8(seen.body).expect("utf8");
    assert_eq!(
        text,
        r#"{"queue_name":"orders","batch_size":2,"client_id":"w1","request_timeout":"5s"}"#
    );
}

#[tokio::test]
async fn success_reply_is_decoded_by_its_own_content_type() {
    // Asked for protobuf, got JSON (Querator answers JSON when Accept is missing or odd).
    let (endpoint, _seen) = serve_once(
        200,
        Some("application/json"),
        encode(Encoding::Json, &lease_response()),
    )
    .await;
    let client = Client::new(&endpoint).expect("client");
    assert_eq!(
        client.queue_lease(&lease_request()).await.expect("lease"),
        lease_response()
    );
}

#[tokio::test]
async fn produce_accepts_the_ok_envelope() {
    let (endpoint, seen) = serve_once(
        200,
        Some("application/json"),
        encode(Encoding::Json, &Reply::ok()),
    )
    .await;
    let client = Client::new(&endpoint).expect("client");
    let req = QueueProduceRequest {
        queue_name: "orders".into(),
        request_timeout: "1m".into(),
        items: vec![QueueProduceItem {
            utf8: "x".into(),
            ..Default::default()
        }],
    };
    client.queue_produce(&req).await.expect("produce");
    assert_eq!(seen.await.expect("seen").path, "/v1/queue.produce");
}

#[tokio::test]
async fn error_envelopes_become_api_errors_in_both_encodings() {
    let reply = Reply::new(454, "request timeout; no items are in the queue, try again");
    for enc in [Encoding::Json, Encoding::Protobuf] {
        let (endpoint, _seen) = serve_once(454, Some(enc.content_type()), encode(enc, &reply)).await;
        let client = Client::new(&endpoint).expect("client").with_encoding(enc);
        let err = client.queue_lease(&lease_request()).await.expect_err("454");
        assert!(
            matches!(&err, ClientError::Api { code: 454, code_text, message }
                if code_text == "Retry Request" && message.starts_with("request timeout;")),
            "{enc:?}: {err:?}"
        );
        assert!(err.is_retryable());
        assert_eq!(err.code(), Some(454));
    }
}

#[tokio::test]
async fn foreign_error_bodies_become_http_errors() {
    let (endpoint, _seen) = serve_once(502, Some("text/html"), b"<h1>Bad Gateway</h1>".to_vec()).await;
    let client = Client::new(&endpoint).expect("client");
    let err = client.queues_info(&Default::default()).await.expect_err("502");
    assert!(
        matches!(&err, ClientError::Http { status: 502, body } if body == "<h1>Bad Gateway</h1>"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn undecodable_success_is_a_decode_error() {
    let (endpoint, _seen) = serve_once(200, Some("application/json"), b"{\"nope\":1}".to_vec()).await;
    let client = Client::new(&endpoint).expect("client");
    let err = client.queue_stats(&Default::default()).await.expect_err("decode");
    assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
    assert!(err.to_string().contains("unknown field 'nope'"), "{err}");
}

#[tokio::test]
async fn health_and_metrics() {
    let doc = br#"{"status":"fail","version":"dev-build","checks":{}}"#.to_vec();
    let (endpoint, seen) = serve_once(503, Some("application/health+json"), doc).await;
    let client = Client::new(&endpoint).expect("client");
    let health = client.health().await.expect("health");
    assert_eq!(health["status"], "fail");
    let seen = seen.await.expect("seen");
    assert_eq!((seen.method.as_str(), seen.path.as_str()), ("GET", "/health"));

    let (endpoint, _seen) = serve_once(200, Some("text/plain"), b"# HELP x\nx 1\n".to_vec()).await;
    let client = Client::new(&endpoint).expect("client");
    assert_eq!(client.metrics().await.expect("metrics"), "# HELP x\nx 1\n");
}

#[tokio::test]
async fn raw_sends_exactly_what_it_is_given() {
    let (endpoint, seen) = serve_once(455, Some("application/json"), b"{}".to_vec()).await;
    let client = Client::new(&endpoint).expect("client");
    let (status, headers, body) = client
        .raw("/v1/queue.produce", Some("text/plain"), None, b"hi".to_vec())
        .await
        .expect("raw");
    assert_eq!(status.as_u16(), 455);
    assert_eq!(headers.get("x-test").and_then(|v| v.to_str().ok()), Some("yes"));
    assert_eq!(&body[..], b"{}");
    let seen = seen.await.expect("seen");
    assert_eq!(seen.header("content-type"), Some("text/plain"));
    // The HTTP stack fills in `*/*` for a missing Accept, which DUH servers read as "no preference".
    assert_eq!(seen.header("accept"), Some("*/*"));
    assert_eq!(seen.body, b"hi");

    let (endpoint, seen) = serve_once(400, None, Vec::new()).await;
    let client = Client::new(&endpoint).expect("client");
    let (status, _, _) = client
        .raw_with_method(reqwest::Method::PUT, "/v1/queue.stats", None, None, Vec::new())
        .await
        .expect("raw");
    assert_eq!(status.as_u16(), 400);
    assert_eq!(seen.await.expect("seen").method, "PUT");
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    // Bind then drop to get a port with nothing listening.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").port()
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http");
    let client = Client::new(&format!("http://127.0.0.1:{port}"))
        .expect("client")
        .with_http_client(http);
    let err = client
        .queue_stats(&Default::default())
        .await
        .expect_err("refused");
    assert!(matches!(err, ClientError::Transport(_)), "{err:?}");
    assert_eq!(err.code(), None);
    assert!(err.to_string().starts_with("transport error: "), "{err}");
}

#[test]
fn endpoints_are_validated() {
    assert!(Client::new("http://127.0.0.1:2319").is_ok());
    assert!(Client::new("http://localhost:2319/prefix").is_ok());
    assert!(Client::new("https://host:1").is_ok());
    for bad in ["", "127.0.0.1:2319", "ftp://host", "http://", "http://h:1/?q=1"] {
        let err = Client::new(bad).expect_err(bad);
        assert!(
            matches!(err, ClientError::InvalidEndpoint { .. }),
            "{bad}: {err:?}"
        );
    }
}
