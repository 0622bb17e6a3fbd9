//! The API key and the access-control calls, against a canned HTTP/1.1 responder on 127.0.0.1: the key goes out as
//! `Authorization: Bearer <key>` on every kind of request, the typed calls hit their paths with their messages, and
//! replies decode.

use lessor_client::{Client, ClientError, Encoding};
use lessor_proto::{
    decode, encode, APIKeyCreateRequest, APIKeyCreateResponse, Reply, RoleBindingsListRequest,
    RoleBindingsListResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A request as the responder saw it: request line, headers (lowercased names), body.
#[derive(Debug)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Answers one request with `status`, `content_type` and `body`, then reports the request.
async fn serve_once(status: u16, content_type: &str, body: Vec<u8>) -> (String, oneshot::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    let content_type = content_type.to_string();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let path = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or_default()
            .to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut req_body = buf[end..].to_vec();
        while req_body.len() < len {
            let n = sock.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "client closed mid-body");
            req_body.extend_from_slice(&chunk[..n]);
        }
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(reply.as_bytes()).await.expect("write head");
        sock.write_all(&body).await.expect("write body");
        let _ = sock.shutdown().await;
        let _ = tx.send(Seen {
            path,
            headers,
            body: req_body,
        });
    });
    (format!("http://{addr}"), rx)
}

#[tokio::test]
async fn apikeys_create_sends_the_key_and_decodes_the_new_one() {
    let minted = APIKeyCreateResponse {
        id: "k1".into(),
        key: "qtr-ci-0123456789012345678901234567890123456789abc".into(),
        prefix: "qtr-ci-01234567".into(),
    };
    let (endpoint, seen) = serve_once(200, "application/json", encode(Encoding::Json, &minted)).await;
    let client = Client::new(&endpoint)
        .expect("client")
        .with_encoding(Encoding::Json)
        .with_api_key("qtr-live-admin");
    let req = APIKeyCreateRequest {
        user_id: "u1".into(),
        key_tag: "ci".into(),
        ..Default::default()
    };
    assert_eq!(client.apikeys_create(&req).await.expect("create"), minted);
    let seen = seen.await.expect("seen");
    assert_eq!(seen.path, "/v1/apikeys.create");
    assert_eq!(seen.header("authorization"), Some("Bearer qtr-live-admin"));
    assert_eq!(
        String::from_utf8(seen.body).expect("utf8"),
        r#"{"user_id":"u1","key_tag":"ci"}"#
    );
}

#[tokio::test]
async fn rolebindings_list_over_protobuf_carries_the_filter() {
    let reply = RoleBindingsListResponse::default();
    let (endpoint, seen) = serve_once(200, "application/protobuf", encode(Encoding::Protobuf, &reply)).await;
    let client = Client::new(&endpoint).expect("client").with_api_key("k");
    let req = RoleBindingsListRequest {
        namespace: "team-a".into(),
        user_id_filter: "u1".into(),
        ..Default::default()
    };
    assert_eq!(client.rolebindings_list(&req).await.expect("list"), reply);
    let seen = seen.await.expect("seen");
    assert_eq!(seen.path, "/v1/rolebindings.list");
    assert_eq!(seen.header("authorization"), Some("Bearer k"));
    let sent: RoleBindingsListRequest = decode(Encoding::Protobuf, &seen.body).expect("body");
    assert_eq!(sent, req);
}

#[tokio::test]
async fn the_key_goes_with_health_metrics_and_raw_requests_too() {
    let (endpoint, seen) = serve_once(200, "application/json", br#"{"status":"pass"}"#.to_vec()).await;
    let client = Client::new(&endpoint).expect("client").with_api_key("k2");
    client.health().await.expect("health");
    assert_eq!(
        seen.await.expect("seen").header("authorization"),
        Some("Bearer k2")
    );

    let (endpoint, seen) = serve_once(200, "text/plain", b"# EOF\n".to_vec()).await;
    let client = Client::new(&endpoint).expect("client").with_api_key("k3");
    client.metrics().await.expect("metrics");
    assert_eq!(
        seen.await.expect("seen").header("authorization"),
        Some("Bearer k3")
    );

    let (endpoint, seen) = serve_once(200, "application/json", encode(Encoding::Json, &Reply::ok())).await;
    let client = Client::new(&endpoint).expect("client").with_api_key("k4");
    client
        .raw("/v1/users.list", Some("application/json"), None, "{}")
        .await
        .expect("raw");
    assert_eq!(
        seen.await.expect("seen").header("authorization"),
        Some("Bearer k4")
    );
}

#[tokio::test]
async fn a_refusal_is_an_api_error_and_a_key_that_is_no_header_is_refused_locally() {
    let (endpoint, _seen) = serve_once(
        401,
        "application/json",
        encode(Encoding::Json, &Reply::new(401, "authentication required")),
    )
    .await;
    let client = Client::new(&endpoint).expect("client");
    let err = client.users_list(&Default::default()).await.expect_err("401");
    assert_eq!(err.code(), Some(401));
    assert!(err.to_string().contains("authentication required"), "{err}");

    // A key with a line break cannot be a header value: refused before anything is sent.
    let client = Client::new("http://127.0.0.1:9")
        .expect("client")
        .with_api_key("bad\nkey");
    let err = client
        .namespaces_list(&Default::default())
        .await
        .expect_err("refused");
    assert!(matches!(err, ClientError::InvalidEndpoint { .. }), "{err:?}");
    assert!(
        !err.to_string().contains("bad\nkey"),
        "the key is not echoed: {err}"
    );
}
