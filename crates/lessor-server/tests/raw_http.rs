//! Black-box tests of the server's HTTP/1.1 connection handling, with a client that writes requests by hand on a
//! raw socket, since an HTTP library hides exactly what is checked here: which status line goes out, whether a
//! kept-alive connection survives a refused request, and whether a client still sending an oversized body gets to
//! read its 400.
//!
//! The real server runs on port 0 over memory storage with the system clock.

use std::net::SocketAddr;
use std::time::Duration;

use lessor_client::{proto as pb, Client};
use lessor_server::{start, Config, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every socket operation, so a server that never answers fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);

async fn server() -> RunningServer {
    let srv = start(&Config::memory(), "127.0.0.1:0", None)
        .await
        .expect("server starts");
    let c = Client::new(&srv.endpoint()).expect("client");
    c.queues_create(&pb::QueueInfo {
        queue_name: "q".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "24h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("create q");
    srv
}

/// One answer as it came off the wire.
#[derive(Debug)]
struct Answer {
    /// `HTTP/1.1 455 Client Content Error`.
    status_line: String,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn code(&self) -> u16 {
        self.status_line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {:?}", self.status_line))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the server announced that it closes the connection after this answer.
    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A hand-driven HTTP/1.1 connection.
struct Raw {
    stream: TcpStream,
    /// Bytes read past the last answer.
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes all of `bytes`; an error here is what a client sees when the server closed on it mid-request.
    async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write in time")
            .expect("the server reads the whole request");
    }

    /// Reads more bytes into the buffer; false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("read in time")
            .expect("read (a reset here means the server closed without reading the request)");
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Reads one answer (the server's are all `Content-Length`-framed).
    async fn answer(&mut self) -> Answer {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(
                self.fill().await,
                "connection closed before an answer; read so far: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line").to_string();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().expect("numeric length"))
            .unwrap_or(0);
        let body_start = head_end + 4;
        while self.buf.len() < body_start + len {
            assert!(self.fill().await, "connection closed inside an answer body");
        }
        let body = String::from_utf8_lossy(&self.buf[body_start..body_start + len]).into_owned();
        self.buf.drain(..body_start + len);
        Answer {
            status_line,
            headers,
            body,
        }
    }

    /// Whether the server closes the connection (end of stream, or a reset) with nothing more to say.
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => self.buf.is_empty(),
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    /// Checks that the connection still serves requests: a small valid call answered 200.
    async fn still_usable(&mut self) {
        let body = br#"{"queue_name":"q"}"#;
        self.send(&request(
            "/v1/queue.stats",
            &[("Content-Type", "application/json")],
            body,
        ))
        .await;
        let a = self.answer().await;
        assert_eq!(a.code(), 200, "{a:?}");
    }
}

/// The head of a `POST` declaring a `Content-Length` body.
fn head(path: &str, headers: &[(&str, &str)], content_length: usize) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: lessor\r\nContent-Length: {content_length}\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A `POST` with a `Content-Length` body.
fn request(path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = head(path, headers, body.len());
    out.extend_from_slice(body);
    out
}

/// A `POST` with a chunked body, in chunks of `chunk` bytes.
fn chunked_request(path: &str, headers: &[(&str, &str)], body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: lessor\r\nTransfer-Encoding: chunked\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    for c in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A JSON produce request of about `size` bytes (valid, so only a header can make it fail).
fn big_produce(size: usize) -> Vec<u8> {
    format!(
        r#"{{"queue_name":"q","request_timeout":"5s","items":[{{"utf8":"{}"}}]}}"#,
        "x".repeat(size)
    )
    .into_bytes()
}

#[tokio::test]
async fn refused_headers_leave_the_connection_usable() {
    let srv = server().await;
    let mut raw = Raw::connect(srv.addr).await;
    // Bodies far larger than a socket buffer: the server answers from the headers alone, so unless it reads the
    // rest, the client's write fails or the next request lands in the middle of the old body.
    let body = big_produce(1_000_000);
    for headers in [
        vec![("Content-Type", "text/plain")],
        vec![("Content-Type", "application/json"), ("Accept", "text/html")],
    ] {
        raw.send(&request("/v1/queue.produce", &headers, &body)).await;
        let a = raw.answer().await;
        assert_eq!(
            a.status_line, "HTTP/1.1 455 Client Content Error",
            "{headers:?}: {a:?}"
        );
        assert!(!a.closes(), "{a:?}");
        raw.still_usable().await;
    }
    // A wrong method and an unknown path are refused before the body too.
    for (method, path, code) in [("GET", "/v1/queue.produce", 400), ("POST", "/v1/queue.nope", 501)] {
        let mut req = request(path, &[("Content-Type", "application/json")], &body);
        req.splice(..4, method.bytes());
        raw.send(&req).await;
        let a = raw.answer().await;
        assert_eq!(a.code(), code, "{method} {path}: {a:?}");
        assert!(!a.closes(), "{a:?}");
        raw.still_usable().await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn an_oversized_body_gets_its_400_and_the_connection_survives() {
    let srv = server().await;
    let mut raw = Raw::connect(srv.addr).await;
    // queue.lease takes 4 KB; 300 KB is over the limit but within what the server reads past it.
    let body = vec![b' '; 300_000];
    let json = [("Content-Type", "application/json")];
    for (framing, req) in [
        ("content-length", request("/v1/queue.lease", &json, &body)),
        ("chunked", chunked_request("/v1/queue.lease", &json, &body, 1000)),
    ] {
        raw.send(&req).await;
        let a = raw.answer().await;
        assert_eq!(a.status_line, "HTTP/1.1 400 Bad Request", "{framing}: {a:?}");
        assert!(
            a.body.contains("request body exceeds 4096 limit"),
            "{framing}: {a:?}"
        );
        assert!(!a.closes(), "{framing}: {a:?}");
        raw.still_usable().await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_body_too_large_to_drain_is_refused_with_connection_close() {
    let srv = server().await;
    let mut raw = Raw::connect(srv.addr).await;
    // Declared far beyond limit + slack: the server answers without waiting for the body, and says it closes.
    raw.send(&head(
        "/v1/queue.lease",
        &[("Content-Type", "application/json")],
        100_000_000,
    ))
    .await;
    let a = raw.answer().await;
    assert_eq!(a.code(), 400, "{a:?}");
    assert!(a.body.contains("request body exceeds 4096 limit"), "{a:?}");
    assert!(a.closes(), "{a:?}");
    assert!(raw.closed().await, "the server closes after saying so");
    srv.stop().await;
}

#[tokio::test]
async fn expect_continue_gets_the_refusal_instead_of_a_go_ahead() {
    let srv = server().await;
    for (headers, body_len, status_line) in [
        // Over the limit by its declared length.
        (
            vec![("Content-Type", "application/json"), ("Expect", "100-continue")],
            10_000,
            "HTTP/1.1 400 Bad Request",
        ),
        // A content type the server cannot read.
        (
            vec![("Content-Type", "text/plain"), ("Expect", "100-continue")],
            100,
            "HTTP/1.1 455 Client Content Error",
        ),
    ] {
        let mut raw = Raw::connect(srv.addr).await;
        // Only the head: a client that asked for a go-ahead waits before sending the body.
        raw.send(&head("/v1/queue.lease", &headers, body_len)).await;
        let a = raw.answer().await;
        assert_eq!(a.status_line, status_line, "{headers:?}: {a:?}");
        // The body will not be read, so the connection cannot carry another request, and the answer says so.
        assert!(a.closes(), "{a:?}");
        assert!(raw.closed().await);
    }
    // With a body that fits, the go-ahead comes and the call works.
    let mut raw = Raw::connect(srv.addr).await;
    let body = br#"{"queue_name":"q"}"#;
    let headers = [("Content-Type", "application/json"), ("Expect", "100-continue")];
    raw.send(&head("/v1/queue.stats", &headers, body.len())).await;
    let a = raw.answer().await;
    assert_eq!(a.status_line, "HTTP/1.1 100 Continue", "{a:?}");
    raw.send(body).await;
    let a = raw.answer().await;
    assert_eq!(a.code(), 200, "{a:?}");
    raw.still_usable().await;
    srv.stop().await;
}

#[tokio::test]
async fn status_lines_carry_querator_code_texts() {
    let srv = server().await;
    let mut raw = Raw::connect(srv.addr).await;
    let json = [("Content-Type", "application/json")];

    // 455: a body that is not JSON.
    raw.send(&request("/v1/queue.stats", &json, b"{not json")).await;
    let a = raw.answer().await;
    assert_eq!(a.status_line, "HTTP/1.1 455 Client Content Error", "{a:?}");

    // 454: a lease that times out on an empty queue.
    let lease = br#"{"queue_name":"q","batch_size":1,"client_id":"w","request_timeout":"50ms"}"#;
    raw.send(&request("/v1/queue.lease", &json, lease)).await;
    let a = raw.answer().await;
    assert_eq!(a.status_line, "HTTP/1.1 454 Retry Request", "{a:?}");

    // 453: a lease still waiting when the server shuts down.
    let lease = br#"{"queue_name":"q","batch_size":1,"client_id":"w","request_timeout":"1m"}"#;
    raw.send(&request("/v1/queue.lease", &json, lease)).await;
    let c = Client::new(&srv.endpoint()).expect("client");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = c
            .queue_stats(&pb::QueueStatsRequest {
                queue_name: "q".into(),
                ..Default::default()
            })
            .await
            .expect("stats");
        if s.logical_queues.iter().map(|l| l.lease_waiting).sum::<i32>() == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the lease never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopping = tokio::spawn(srv.stop());
    let a = raw.answer().await;
    assert_eq!(a.status_line, "HTTP/1.1 453 Request Failed", "{a:?}");
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("stops")
        .expect("join");
}

/// `/metrics` is Prometheus text format 0.0.4 (as Querator serves it) unless the scraper asks for OpenMetrics.
#[tokio::test]
async fn metrics_format_follows_accept() {
    let srv = server().await;
    let mut raw = Raw::connect(srv.addr).await;
    let get = |accept: Option<&str>| {
        let mut r = "GET /metrics HTTP/1.1\r\nHost: lessor\r\n".to_string();
        if let Some(a) = accept {
            r.push_str(&format!("Accept: {a}\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    };

    for accept in [None, Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")] {
        raw.send(&get(accept)).await;
        let a = raw.answer().await;
        assert_eq!(a.code(), 200, "{a:?}");
        assert_eq!(
            a.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert!(
            !a.body.contains("# EOF") && !a.body.contains("# UNIT"),
            "{}",
            a.body
        );
        for line in a.body.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("TYPE name kind");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                if kind == "counter" {
                    assert!(
                        name.ends_with("_total"),
                        "0.0.4 counters are named as their samples: {line}"
                    );
                }
            } else if !line.starts_with("# HELP ") {
                let (name_labels, value) = line.rsplit_once(' ').expect("sample: name value");
                assert!(value.parse::<f64>().is_ok(), "{line}");
                assert!(!name_labels.is_empty() && !name_labels.starts_with('#'), "{line}");
            }
        }
        assert!(
            a.body.contains("# TYPE lessor_http_requests_total counter"),
            "{}",
            a.body
        );
    }

    raw.send(&get(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )))
    .await;
    let a = raw.answer().await;
    assert_eq!(
        a.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(a.body.trim_end().ends_with("# EOF"), "{}", a.body);
    srv.stop().await;
}
