//! Every `limits` value of the configuration file reaches the running server: the real `lessor` binary is started
//! as a child process with a YAML file, and each limit is observed from outside through its wire error.
//!
//! * `max-produce-body: 1000`: a produce of about 2,000 bytes gets Querator's 400 `request body exceeds 1000 limit`
//!   (the default, 5,000,000, would accept it), while a small one is still accepted.
//! * `max-requests-per-queue: 1`: bursts of concurrent produces on one queue get 454 `queue is overloaded` (with the
//!   default, 4096, the burst's 32 requests could never fill the queue's inbox).
//!
//! Both also read the server's log, which goes to a file: it must carry no ANSI colour codes (colour is for
//! terminals) and none of the storage engine's own INFO lines (held at WARN unless `RUST_LOG` asks).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lessor_client::proto::{QueueProduceItem, QueueProduceRequest};
use lessor_client::Client;

/// How long the server may take to answer `/health` with `pass`.
const STARTUP_LIMIT: Duration = Duration::from_secs(20);

/// A `lessor server --config FILE` child, killed and reaped on drop so a failing test leaves nothing behind.
struct Server {
    child: Child,
    client: Client,
    log: PathBuf,
}

impl Server {
    /// Writes `yaml` to a file in `dir`, starts the binary with it on a free port and waits until it is healthy.
    ///
    /// The port is found by binding port 0 and releasing it; if another process takes it first, the server exits
    /// with "cannot listen" and is started again on another port.
    async fn start(dir: &Path, yaml: &str) -> Server {
        let config = dir.join("lessor.yaml");
        std::fs::write(&config, yaml).expect("write the config file");
        for attempt in 0..5 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
                l.local_addr().expect("local addr").port()
            };
            let log = dir.join(format!("server-{attempt}.log"));
            let child = Command::new(env!("CARGO_BIN_EXE_lessor"))
                .arg("server")
                .arg("--config")
                .arg(&config)
                .arg("--address")
                .arg(format!("127.0.0.1:{port}"))
                .env_remove("LESSOR_CONFIG")
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log).expect("create the log")))
                .spawn()
                .expect("spawn lessor server");
            let client = Client::new(&format!("http://127.0.0.1:{port}")).expect("client");
            let mut server = Server { child, client, log };
            if server.wait_healthy().await {
                return server;
            }
        }
        panic!("could not start the server on a free port in 5 attempts");
    }

    /// Whether the server became healthy; `false` when it could not listen (the port was taken). Panics when it
    /// exits for another reason or takes too long.
    async fn wait_healthy(&mut self) -> bool {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                if log.contains("cannot listen on") {
                    return false;
                }
                panic!("the server exited during start-up ({status}); log:\n{log}");
            }
            if let Ok(Ok(doc)) = tokio::time::timeout(Duration::from_secs(2), self.client.health()).await {
                if doc.get("status").and_then(|s| s.as_str()) == Some("pass") {
                    return true;
                }
            }
            assert!(
                t0.elapsed() < STARTUP_LIMIT,
                "the server did not become healthy within {STARTUP_LIMIT:?}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Server {
    /// Stops the server and checks its log: written to a file, so no colour codes; the server's own INFO lines
    /// but not fjall's.
    fn stop_and_check_log(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).expect("read the log");
        assert!(
            log.contains("lessor listening"),
            "the server logs at INFO:\n{log}"
        );
        assert!(
            !log.contains('\u{1b}'),
            "ANSI escape codes in a log written to a file:\n{log}"
        );
        for line in log.lines() {
            let engine = line.contains(" fjall::") || line.contains(" fjall:") || line.contains(" lsm_tree");
            assert!(
                !(engine && line.contains(" INFO ")),
                "storage engine INFO line in the log: {line}"
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A produce of `items` payloads of `bytes` bytes each.
fn produce(queue: &str, items: usize, bytes: usize) -> QueueProduceRequest {
    QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "10s".into(),
        items: (0..items)
            .map(|_| QueueProduceItem {
                bytes: vec![b'x'; bytes],
                ..Default::default()
            })
            .collect(),
    }
}

#[tokio::test]
async fn max_produce_body_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        dir.path(),
        "queue-storage: { driver: memory }\n\
         partition-storage: [ { name: ram, driver: memory } ]\n\
         queues: [ { name: small, lease-timeout: 1m, expire-timeout: 1h } ]\n\
         limits: { max-produce-body: 1000 }\n",
    )
    .await;

    server
        .client
        .queue_produce(&produce("small", 1, 100))
        .await
        .expect("a body under the limit is accepted");

    let e = server
        .client
        .queue_produce(&produce("small", 1, 2_000))
        .await
        .expect_err("a body over the limit is refused");
    assert_eq!(e.code(), Some(400), "{e}");
    assert_eq!(e.message(), Some("request body exceeds 1000 limit"), "{e}");
    server.stop_and_check_log();
}

/// Needs fjall (a default feature of the binary) to keep the queue busy.
#[cfg(feature = "fjall")]
#[tokio::test]
async fn max_requests_per_queue_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // fjall with fsync on every write keeps the queue's task busy long enough for a burst to queue up behind it.
    let server = Server::start(
        dir.path(),
        &format!(
            "queue-storage: {{ driver: fjall, config: {{ storage-dir: '{d}' }} }}\n\
             partition-storage: [ {{ name: disk, driver: fjall, config: {{ storage-dir: '{d}', durability: sync }} }} ]\n\
             queues: [ {{ name: busy, lease-timeout: 1m, expire-timeout: 1h }} ]\n\
             limits: {{ max-requests-per-queue: 1 }}\n",
            d = data.display()
        ),
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut bursts = 0;
    let overloaded = loop {
        bursts += 1;
        let calls = (0..32).map(|_| {
            let client = server.client.clone();
            tokio::spawn(async move { client.queue_produce(&produce("busy", 100, 1_000)).await })
        });
        let mut overloaded: Option<lessor_client::ClientError> = None;
        for call in calls.collect::<Vec<_>>() {
            match call.await.expect("producer task") {
                Ok(()) => {}
                Err(e)
                    if e.code() == Some(454)
                        && e.message().is_some_and(|m| m.starts_with("queue is overloaded")) =>
                {
                    overloaded = Some(e)
                }
                Err(e) => panic!("unexpected produce error: {e}"),
            }
        }
        if let Some(e) = overloaded {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "{bursts} bursts of 32 concurrent produces never overloaded a queue limited to 1 waiting request"
        );
    };
    assert_eq!(
        overloaded.message(),
        Some("queue is overloaded; try again later"),
        "{overloaded}"
    );
    server.stop_and_check_log();
}
