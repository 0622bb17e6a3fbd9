//! HTTPS, black-box: a real server (in process, port 0) with a `tls` section whose certificates the test makes.
//!
//! * A client that trusts the test CA produces and leases; one that does not, or speaks plain HTTP, gets nothing.
//! * `client-ca-file` with `client-auth: required` refuses clients without a certificate or with one from another
//!   CA and serves one with a good certificate; `optional` lets a client without a certificate in.
//! * A failed or stalled handshake does not hold up other clients, and a stalled one is closed after the
//!   handshake limit; sockets that never handshake hold at most `limits.max-connections` places.
//! * Bad files stop the server at start-up with the key, the file and the problem.
//! * Certificate files replaced while the server runs serve new connections without a restart (on the periodic
//!   check and when asked); changed files that do not make a good configuration leave the previous one serving.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use lessor_client::proto::{self as pb, QueueLeaseRequest, QueueProduceItem, QueueProduceRequest};
use lessor_client::{Client, ClientError, TlsConfig};
use lessor_server::tls::{ClientAuth, Reload, TlsCertificates, TlsError, TlsSection, HANDSHAKE_TIMEOUT};
use lessor_server::{Config, RunningServer, StartError};
use lessor_testkit::tls::{CertFiles, TestCa};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_config(server: &CertFiles, client_ca: Option<&Path>, auth: Option<ClientAuth>) -> Config {
    Config {
        tls: Some(TlsSection {
            cert_file: server.cert.clone(),
            key_file: server.key.clone(),
            client_ca_file: client_ca.map(Path::to_path_buf),
            client_auth: auth,
            reload_interval: None,
        }),
        ..Config::memory()
    }
}

async fn start(config: &Config) -> RunningServer {
    lessor_server::start(config, "127.0.0.1:0", None)
        .await
        .unwrap_or_else(|e| panic!("the TLS server did not start: {e}"))
}

fn client(srv: &RunningServer, tls: &TlsConfig) -> Client {
    Client::new(&srv.endpoint()).unwrap().with_tls(tls).unwrap()
}

/// Creates a queue, produces one item and leases it back.
async fn produce_and_lease(c: &Client, queue: &str) -> Result<(), ClientError> {
    c.queues_create(&pb::QueueInfo {
        queue_name: queue.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await?;
    c.queue_produce(&QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "5s".into(),
        items: vec![QueueProduceItem {
            utf8: "over tls".into(),
            ..Default::default()
        }],
    })
    .await?;
    let leased = c
        .queue_lease(&QueueLeaseRequest {
            queue_name: queue.into(),
            batch_size: 1,
            client_id: "w".into(),
            request_timeout: "5s".into(),
        })
        .await?;
    assert_eq!(leased.items.len(), 1);
    assert_eq!(leased.items[0].bytes, b"over tls".to_vec());
    Ok(())
}

fn assert_refused(r: Result<impl std::fmt::Debug, ClientError>, what: &str) {
    match r {
        Err(ClientError::Transport(_)) => {}
        other => panic!("{what}: expected a transport (TLS) failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_trusting_the_ca_works_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["localhost", "127.0.0.1"]);
    let srv = start(&tls_config(&server, None, None)).await;
    assert!(srv.endpoint().starts_with("https://"), "{}", srv.endpoint());

    let good = client(&srv, &TlsConfig::new().add_ca_file(ca.ca_file()).unwrap());
    produce_and_lease(&good, "tls-q").await.unwrap();
    assert_eq!(good.health().await.unwrap()["status"], "pass");

    // Not trusting the test CA (only the built-in public roots).
    let untrusting = Client::new(&srv.endpoint()).unwrap();
    assert_refused(untrusting.health().await, "no CA");
    // Trusting another CA.
    let other = TestCa::new(dir.path(), "other");
    let wrong = client(&srv, &TlsConfig::new().add_ca_file(other.ca_file()).unwrap());
    assert_refused(wrong.health().await, "another CA");
    // Plain HTTP to the HTTPS port.
    let plain = Client::new(&format!("http://{}", srv.addr)).unwrap();
    assert!(plain.health().await.is_err(), "plain HTTP must not be served");
    // A name the certificate does not have.
    let by_name = Client::new(&format!("https://127.0.0.2:{}", srv.addr.port()));
    if let Ok(c) = by_name {
        let c = c
            .with_tls(&TlsConfig::new().add_ca_file(ca.ca_file()).unwrap())
            .unwrap();
        // 127.0.0.2 may not be routable on every machine; either way it must not succeed.
        assert!(
            c.health().await.is_err(),
            "a certificate without 127.0.0.2 must not pass"
        );
    }
    // The first client still works after all those failures.
    produce_and_lease(&good, "tls-q2").await.unwrap();
    srv.stop().await;
}

#[tokio::test]
async fn required_client_certificates_refuse_clients_without_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["127.0.0.1"]);
    let clients = TestCa::new(dir.path(), "clients");
    let alice = clients.client("alice", "alice");
    let mallory = ca.client("mallory", "mallory"); // signed by the server's CA, not the client CA
    let srv = start(&tls_config(&server, Some(&clients.ca_file()), None)).await;
    let trust = TlsConfig::new().add_ca_file(ca.ca_file()).unwrap();

    assert_refused(client(&srv, &trust).health().await, "no client certificate");
    let bad = trust.clone().identity_files(&mallory.cert, &mallory.key).unwrap();
    assert_refused(client(&srv, &bad).health().await, "a certificate from another CA");
    let good = trust.clone().identity_files(&alice.cert, &alice.key).unwrap();
    assert!(good.has_identity());
    produce_and_lease(&client(&srv, &good), "mtls-q").await.unwrap();
    srv.stop().await;

    // The same with client-auth spelled out.
    let srv = start(&tls_config(
        &server,
        Some(&clients.ca_file()),
        Some(ClientAuth::Required),
    ))
    .await;
    assert_refused(client(&srv, &trust).health().await, "no client certificate");
    assert!(client(&srv, &good).health().await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn optional_client_certificates_let_clients_without_one_in() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["127.0.0.1"]);
    let clients = TestCa::new(dir.path(), "clients");
    let alice = clients.client("alice", "alice");
    let mallory = ca.client("mallory", "mallory");
    let srv = start(&tls_config(
        &server,
        Some(&clients.ca_file()),
        Some(ClientAuth::Optional),
    ))
    .await;
    let trust = TlsConfig::new().add_ca_file(ca.ca_file()).unwrap();
    produce_and_lease(&client(&srv, &trust), "opt-q").await.unwrap();
    let good = trust.clone().identity_files(&alice.cert, &alice.key).unwrap();
    assert!(client(&srv, &good).health().await.is_ok());
    let bad = trust.identity_files(&mallory.cert, &mallory.key).unwrap();
    assert_refused(client(&srv, &bad).health().await, "a certificate from another CA");
    srv.stop().await;
}

#[tokio::test]
async fn broken_and_stalled_handshakes_do_not_hold_up_others() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["127.0.0.1"]);
    let srv = start(&tls_config(&server, None, None)).await;
    let good = client(&srv, &TlsConfig::new().add_ca_file(ca.ca_file()).unwrap());

    // Clients that open a connection and never start a handshake.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(tokio::net::TcpStream::connect(srv.addr).await.unwrap());
    }
    // A client that sends garbage instead of a ClientHello: its connection is closed.
    let mut garbage = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a garbage handshake must be closed at once");
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
        "no HTTP over a failed handshake"
    );

    // Meanwhile a real client is served at once.
    let served = tokio::time::timeout(Duration::from_secs(5), produce_and_lease(&good, "busy-q")).await;
    served.expect("served while others stall").unwrap();

    // A stalled handshake is closed once the limit passes (and not long after).
    let t0 = std::time::Instant::now();
    let mut one = stalled.pop().unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(HANDSHAKE_TIMEOUT + Duration::from_secs(10), one.read(&mut byte)).await;
    match closed {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        other => panic!("the stalled connection was not closed: {other:?}"),
    }
    assert!(
        t0.elapsed() <= HANDSHAKE_TIMEOUT + Duration::from_secs(10),
        "closed after {:?}",
        t0.elapsed()
    );
    assert!(good.health().await.is_ok());
    srv.stop().await;
}

#[tokio::test]
async fn bad_certificate_files_stop_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["127.0.0.1"]);
    let other = ca.server("other", &["127.0.0.1"]);
    let start_err = |cfg: Config| async move {
        match lessor_server::start(&cfg, "127.0.0.1:0", None).await {
            Ok(_) => panic!("started with a bad tls section"),
            Err(e) => {
                assert!(matches!(e, StartError::Tls(_)), "{e:?}");
                e.to_string()
            }
        }
    };

    let missing = dir.path().join("missing.crt");
    let cfg = tls_config(
        &CertFiles {
            cert: missing.clone(),
            key: server.key.clone(),
        },
        None,
        None,
    );
    let e = start_err(cfg).await;
    assert!(
        e.starts_with("tls.cert-file: cannot read '") && e.contains("missing.crt"),
        "{e}"
    );

    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "just text\n").unwrap();
    let e = start_err(tls_config(
        &CertFiles {
            cert: empty.clone(),
            key: server.key.clone(),
        },
        None,
        None,
    ))
    .await;
    assert!(
        e.contains("tls.cert-file") && e.contains("empty.pem") && e.contains("no certificate"),
        "{e}"
    );

    let e = start_err(tls_config(
        &CertFiles {
            cert: server.cert.clone(),
            key: server.cert.clone(),
        },
        None,
        None,
    ))
    .await;
    assert!(e.contains("tls.key-file") && e.contains("no private key"), "{e}");

    let e = start_err(tls_config(
        &CertFiles {
            cert: server.cert.clone(),
            key: other.key.clone(),
        },
        None,
        None,
    ))
    .await;
    assert!(e.contains("does not match") && e.contains("server.crt"), "{e}");

    let e = start_err(tls_config(&server, Some(&empty), None)).await;
    assert!(e.contains("tls.client-ca-file") && e.contains("empty.pem"), "{e}");
}

#[tokio::test]
async fn shutdown_over_tls_answers_waiting_leases_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["127.0.0.1"]);
    let srv = start(&tls_config(&server, None, None)).await;
    let c = client(&srv, &TlsConfig::new().add_ca_file(ca.ca_file()).unwrap());
    c.queues_create(&pb::QueueInfo {
        queue_name: "q".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let waiting = c.clone();
    let waiter = tokio::spawn(async move {
        waiting
            .queue_lease(&QueueLeaseRequest {
                queue_name: "q".into(),
                batch_size: 1,
                client_id: "w".into(),
                request_timeout: "1m".into(),
            })
            .await
    });
    lessor_testkit::eventually("the lease is waiting", Duration::from_secs(5), || async {
        let s = c
            .queue_stats(&pb::QueueStatsRequest {
                queue_name: "q".into(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let waiting = s.logical_queues.first().map_or(0, |l| l.lease_waiting);
        if waiting == 1 {
            Ok(())
        } else {
            Err(format!("{waiting} waiting"))
        }
    })
    .await;
    let addr = srv.addr;
    let stopping = tokio::spawn(srv.stop());
    // The waiting request is answered over its TLS connection, not cut off.
    let err = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("answered")
        .unwrap()
        .expect_err("shutdown");
    assert_eq!(err.code(), Some(453), "{err:?}");
    assert!(err.message().unwrap_or("").contains("shutting down"), "{err:?}");
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stops")
        .unwrap();
    // Stopped means the port is closed: no new connection is accepted.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening after stop"
    );
}

/// Sockets that never start their handshake hold at most `limits.max-connections` places: with 2, a third socket
/// is closed at once instead of being held for the handshake timeout, and a real client is served again once the
/// stalled sockets go.
#[tokio::test]
async fn stalled_handshakes_are_bounded_by_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["127.0.0.1"]);
    let mut config = tls_config(&server, None, None);
    config.limits.max_connections = Some(2);
    let srv = start(&config).await;
    let stalled = [
        tokio::net::TcpStream::connect(srv.addr).await.unwrap(),
        tokio::net::TcpStream::connect(srv.addr).await.unwrap(),
    ];
    let mut third = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut byte = [0u8; 1];
    // Well under the handshake timeout: without the bound the third socket stays open for all of it.
    let read = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, third.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a third socket was held while two handshakes stalled: {read:?}"
    );
    drop(stalled);
    let good = client(&srv, &TlsConfig::new().add_ca_file(ca.ca_file()).unwrap());
    let served =
        lessor_testkit::eventually::poll_until(Duration::from_secs(5), Duration::from_millis(20), || async {
            good.health().await.map_err(|e| e.to_string())
        })
        .await;
    assert!(
        served.is_ok(),
        "not served once the stalled sockets went: {served:?}"
    );
    srv.stop().await;
}

/// Copies `from`'s certificate and key over `to`'s files, as a renewal does.
fn install(from: &CertFiles, to: &CertFiles) {
    std::fs::copy(&from.cert, &to.cert).unwrap();
    std::fs::copy(&from.key, &to.key).unwrap();
}

/// [`TlsCertificates::reload`] off the runtime's threads, as the server's own check runs it.
async fn reload(certs: &std::sync::Arc<TlsCertificates>, force: bool) -> Result<Reload, TlsError> {
    let certs = certs.clone();
    tokio::task::spawn_blocking(move || certs.reload(force))
        .await
        .unwrap()
}

#[tokio::test]
async fn certificate_files_replaced_while_serving_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first_ca = TestCa::new(dir.path(), "first");
    let second_ca = TestCa::new(dir.path(), "second");
    // The files the configuration names; renewals are copied over them.
    let live = first_ca.server("live", &["127.0.0.1"]);
    let mut config = tls_config(&live, None, None);
    // No periodic check: this test says when the files are read again.
    config.tls.as_mut().unwrap().reload_interval = Some("0".into());
    let srv = start(&config).await;
    let certs = srv.tls().expect("a TLS server").clone();
    let trusting = |ca: &TestCa| client(&srv, &TlsConfig::new().add_ca_file(ca.ca_file()).unwrap());

    produce_and_lease(&trusting(&first_ca), "q1").await.unwrap();
    assert_refused(
        trusting(&second_ca).health().await,
        "second CA before the renewal",
    );
    assert_eq!(reload(&certs, false).await.unwrap(), Reload::Unchanged);
    // A connection open across the renewal keeps the session it started with.
    let open = trusting(&first_ca);
    open.health().await.unwrap();

    // A renewal by another CA: new connections get the new certificate.
    install(&second_ca.server("renewed", &["127.0.0.1"]), &live);
    assert_eq!(reload(&certs, false).await.unwrap(), Reload::Replaced);
    produce_and_lease(&trusting(&second_ca), "q2").await.unwrap();
    assert_refused(trusting(&first_ca).health().await, "first CA after the renewal");
    open.health()
        .await
        .expect("the connection open across the renewal");

    // Half a renewal: the certificate written, its key not yet. Refused, and the previous pair goes on serving.
    let third = first_ca.server("third", &["127.0.0.1"]);
    std::fs::copy(&third.cert, &live.cert).unwrap();
    match reload(&certs, false).await {
        Err(e @ TlsError::KeyMismatch { .. }) => {
            assert!(e.to_string().contains("does not match"), "{e}")
        }
        other => panic!("a certificate without its key must be refused, got {other:?}"),
    }
    produce_and_lease(&trusting(&second_ca), "q3").await.unwrap();
    // Reported once: the same files are 'unchanged' at the next check, unless an operator asks (SIGHUP).
    assert_eq!(reload(&certs, false).await.unwrap(), Reload::Unchanged);
    assert!(
        reload(&certs, true).await.is_err(),
        "asked for, the broken pair is reported again"
    );
    // A file that cannot be read is refused the same way.
    std::fs::remove_file(&live.key).unwrap();
    assert!(matches!(reload(&certs, false).await, Err(TlsError::Read { .. })));
    produce_and_lease(&trusting(&second_ca), "q4").await.unwrap();
    // The key arrives: the pair is used.
    std::fs::copy(&third.key, &live.key).unwrap();
    assert_eq!(reload(&certs, false).await.unwrap(), Reload::Replaced);
    produce_and_lease(&trusting(&first_ca), "q5").await.unwrap();
    assert_refused(
        trusting(&second_ca).health().await,
        "second CA after the third certificate",
    );
    srv.stop().await;
}

#[tokio::test]
async fn the_periodic_check_picks_up_renewed_files_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let first_ca = TestCa::new(dir.path(), "first");
    let second_ca = TestCa::new(dir.path(), "second");
    let live = first_ca.server("live", &["127.0.0.1"]);
    let mut config = tls_config(&live, None, None);
    config.tls.as_mut().unwrap().reload_interval = Some("50ms".into());
    let srv = start(&config).await;
    let trusting = |ca: &TestCa| client(&srv, &TlsConfig::new().add_ca_file(ca.ca_file()).unwrap());
    produce_and_lease(&trusting(&first_ca), "q1").await.unwrap();

    install(&second_ca.server("renewed", &["127.0.0.1"]), &live);
    // Bounded: the check runs every 50 ms; ten seconds allows for a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while trusting(&second_ca).health().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    produce_and_lease(&trusting(&second_ca), "q2").await.unwrap();
    let metrics = trusting(&second_ca).metrics().await.unwrap();
    assert!(metrics.contains("lessor_tls_reloads_total 1\n"), "{metrics}");
    // A check that ran between the two copies saw a certificate without its key: that one counts as a failure,
    // so failures are 0 or 1 here, never more (the same files are reported once).
    assert!(
        metrics.contains("lessor_tls_reload_failures_total 0\n")
            || metrics.contains("lessor_tls_reload_failures_total 1\n"),
        "{metrics}"
    );
    srv.stop().await;
}
