//! Clients that hold connections without finishing their requests, on a raw socket: headers or a body sent a byte
//! at a time, and more connections than the server takes. Each must cost the server a bounded time and a bounded
//! number of connections (`limits.header-read-timeout`, `limits.body-read-timeout`, `limits.max-connections`), set
//! small here so the tests take well under a second each.

use std::time::{Duration, Instant};

use lessor_server::{start, Config, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on how long a test waits for the server to act on a slow client.
const WAIT: Duration = Duration::from_secs(5);

async fn server(limits: &str) -> RunningServer {
    let yaml = format!(
        "queue-storage:\n  driver: memory\npartition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n\
         limits:\n{limits}"
    );
    start(&Config::from_yaml(&yaml).expect("config"), "127.0.0.1:0", None)
        .await
        .expect("server starts")
}

/// Sends `prefix`, then one byte of `trickle` every 50 ms, until the server closes the connection (Ok: how long
/// it took) or `WAIT` passes (Err). Anything the server answers before closing is returned too.
async fn trickle(stream: &mut TcpStream, prefix: &[u8], trickle: u8) -> Result<(Duration, String), String> {
    let started = Instant::now();
    stream.write_all(prefix).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < WAIT {
        if stream.write_all(&[trickle]).await.is_err() {
            return Ok((started.elapsed(), String::from_utf8_lossy(&answer).into_owned()));
        }
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Ok((started.elapsed(), String::from_utf8_lossy(&answer).into_owned()))
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    Err(format!(
        "still open after {WAIT:?}; answered so far: {:?}",
        String::from_utf8_lossy(&answer)
    ))
}

/// A client that sends its headers a byte every 50 ms is cut off after `header-read-timeout` (300ms), not served
/// for as long as it keeps sending.
#[tokio::test]
async fn headers_sent_a_byte_at_a_time_are_cut_off_after_the_header_read_timeout() {
    let srv = server("  header-read-timeout: 300ms\n").await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let (took, _) = trickle(
        &mut s,
        b"POST /v1/queue.stats HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        b'a',
    )
    .await
    .expect("the server closes a connection whose headers never end");
    assert!(
        took >= Duration::from_millis(250),
        "closed after {took:?}, before the timeout"
    );
}

/// A client that sends its body a byte every 50 ms gets a 400 naming `limits.body-read-timeout` (400ms) and the
/// connection is closed, instead of holding a request (and its part of the body) open for as long as it likes.
#[tokio::test]
async fn a_body_sent_a_byte_at_a_time_is_refused_after_the_body_read_timeout() {
    let srv = server("  body-read-timeout: 400ms\n").await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let head = b"POST /v1/queue.produce HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 100000\r\n\r\n{\"queue_name\":\"q\",\"items\":[{\"utf8\":\"";
    let (took, answer) = trickle(&mut s, head, b'a')
        .await
        .expect("the server gives up on a body that never ends");
    assert!(
        took >= Duration::from_millis(350),
        "closed after {took:?}, before the timeout"
    );
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert!(answer.contains("limits.body-read-timeout"), "{answer:?}");
}

/// With `max-connections: 4`, four idle connections are all the server holds: a fifth is closed without being
/// served, and once one of the four goes a new connection is served again.
#[tokio::test]
async fn connections_beyond_max_connections_are_closed_unserved() {
    let srv = server("  max-connections: 4\n").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(srv.addr).await.expect("connect"));
    }
    let health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    // The fifth may be refused at once or closed after its request; either way it is not answered.
    let mut fifth = TcpStream::connect(srv.addr).await.expect("connect");
    let _ = fifth.write_all(health).await;
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(WAIT, fifth.read(&mut buf))
        .await
        .expect("the fifth connection is closed, not left hanging");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a fifth connection was served: {:?}",
        read.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    drop(held.pop());
    // The server notices the closed connection and takes new ones again.
    let served = lessor_testkit::eventually::poll_until(WAIT, Duration::from_millis(20), || async {
        let mut s = TcpStream::connect(srv.addr).await.map_err(|e| e.to_string())?;
        s.write_all(health).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .expect("a connection is served once one of the four is gone");
    assert!(served.starts_with("HTTP/1.1 200 "), "{served}");
}

/// A client that asks for a large answer and never reads it holds its connection (and the answer, up to
/// `limits.max-lease-bytes` of payload) only until `reply-write-timeout` (300ms) passes with no progress, not for
/// as long as it keeps the socket open: the server closes the connection, so the client later gets less than the
/// answer. The items stay leased and come back when their lease expires, as with any consumer that vanished.
#[tokio::test]
async fn an_answer_the_client_never_reads_is_dropped_after_the_reply_write_timeout() {
    let srv = server("  reply-write-timeout: 300ms\n").await;
    let client = lessor_client::Client::new(&format!("http://{}", srv.addr)).expect("client");
    lessor_testkit::server::create_queue(&client, "big", |_| {}).await;
    // 16 items of 1 MB: a 16 MB answer, far more than the socket buffers of both ends hold.
    for k in 0..4 {
        client
            .queue_produce(&lessor_client::proto::QueueProduceRequest {
                queue_name: "big".into(),
                request_timeout: "5s".into(),
                items: (0..4)
                    .map(|i| lessor_client::proto::QueueProduceItem {
                        reference: format!("{k}-{i}"),
                        bytes: vec![b'x'; 1_000_000],
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .expect("produce");
    }
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut s = socket.connect(srv.addr).await.expect("connect");
    // Protobuf, so the answer is ready to write as soon as the items are leased (encoding 21 MB of base64 JSON
    // takes a debug build long enough on a busy machine to blur when the write starts).
    let body = prost::Message::encode_to_vec(&lessor_client::proto::QueueLeaseRequest {
        queue_name: "big".into(),
        batch_size: 16,
        client_id: "sleepy".into(),
        request_timeout: "5s".into(),
    });
    let head = format!(
        "POST /v1/queue.lease HTTP/1.1\r\nHost: x\r\nContent-Type: application/protobuf\r\nAccept: application/protobuf\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("send");
    s.write_all(&body).await.expect("send");
    // Not reading: wait until the items are leased (the answer is then being written), then for several timeouts.
    lessor_testkit::eventually::poll_until(WAIT, Duration::from_millis(10), || async {
        let leased = srv
            .engine
            .queue_metrics()
            .into_iter()
            .find(|(name, _)| name == "big")
            .map_or(0, |(_, m)| {
                m.leased_now.load(std::sync::atomic::Ordering::Relaxed)
            });
        if leased == 16 {
            Ok(())
        } else {
            Err(format!("{leased} leased"))
        }
    })
    .await
    .expect("the lease is served");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection was still open after {WAIT:?} ({got} bytes read)"
    );
    assert!(
        got < 16_000_000,
        "the whole answer was delivered ({got} bytes): it was held until the client read it"
    );
    // The server still serves, and the items come back once their lease expires (not checked here: the
    // lease lifecycle tests do).
    assert!(client.health().await.is_ok());
}
