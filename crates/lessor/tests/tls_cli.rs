//! HTTPS through the real binary: `lessor server --config` with a `tls` section requiring client certificates,
//! and the client commands with `--tls-ca`, `--tls-cert` and `--tls-key` (and their `LESSOR_TLS_*` variables).
//!
//! * With the CA and a client certificate, `create`, `produce` and `lease` work over `https://`.
//! * Without the client certificate, or without the CA, the command fails with a TLS error and changes nothing.
//! * A bad `--tls-ca` file is named in the error before anything is sent.
//! * A server whose key does not match its certificate does not start, and says which files.
//! * `SIGHUP` makes the server read its certificate files again: renewed files serve new connections, and the
//!   signal does not stop it.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use lessor_client::TlsConfig;
use lessor_testkit::process::ServerCommand;
use lessor_testkit::tls::TestCa;

fn lessor(endpoint: &str, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lessor"));
    cmd.arg("--endpoint").arg(endpoint).args(args);
    for var in [
        "LESSOR_TLS_CA",
        "LESSOR_TLS_CERT",
        "LESSOR_TLS_KEY",
        "LESSOR_ENDPOINT",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run lessor")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_speak_https_with_the_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "main");
    let server = ca.server("server", &["127.0.0.1"]);
    let alice = ca.client("alice", "alice");
    let config = dir.path().join("lessor.yaml");
    std::fs::write(
        &config,
        format!(
            "queue-storage: {{ driver: memory }}\npartition-storage:\n  - {{ name: m, driver: memory }}\n\
             tls:\n  cert-file: {}\n  key-file: {}\n  client-ca-file: {}\n  client-auth: required\n",
            server.cert.display(),
            server.key.display(),
            ca.ca_file().display()
        ),
    )
    .unwrap();
    let tls = TlsConfig::new()
        .add_ca_file(ca.ca_file())
        .unwrap()
        .identity_files(&alice.cert, &alice.key)
        .unwrap();
    let srv = ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), dir.path().join("server.log"))
        .config(&config)
        .https(tls)
        .start()
        .await;
    let endpoint = srv.endpoint().to_string();
    assert!(endpoint.starts_with("https://"), "{endpoint}");

    let (ca_s, cert_s, key_s) = (
        ca.ca_file().display().to_string(),
        alice.cert.display().to_string(),
        alice.key.display().to_string(),
    );
    let flags = ["--tls-ca", &ca_s, "--tls-cert", &cert_s, "--tls-key", &key_s];
    let with = |args: &[&str]| -> Vec<String> { flags.iter().chain(args).map(|s| s.to_string()).collect() };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lessor(&endpoint, &args, &[])
    };
    let o = run(with(&["create", "jobs", "--partitions", "1"]));
    assert!(o.status.success(), "{}", text(&o));
    let o = run(with(&["produce", "jobs", "--payload", "hello over tls"]));
    assert!(o.status.success(), "{}", text(&o));

    // The same through the environment variables.
    let o = lessor(
        &endpoint,
        &["--json", "lease", "jobs", "--timeout", "5s"],
        &[
            ("LESSOR_TLS_CA", &ca.ca_file()),
            ("LESSOR_TLS_CERT", &alice.cert),
            ("LESSOR_TLS_KEY", &alice.key),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    // The JSON carries the payload in base64: "hello over tls".
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("aGVsbG8gb3ZlciB0bHM="),
        "{}",
        text(&o)
    );

    // No client certificate: refused by the server.
    let o = run(vec![
        "--tls-ca".into(),
        ca_s.clone(),
        "produce".into(),
        "jobs".into(),
        "-p".into(),
        "x".into(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("transport error"), "{}", text(&o));
    // No CA: the server is not trusted.
    let o = run(vec![
        "--tls-cert".into(),
        cert_s.clone(),
        "--tls-key".into(),
        key_s.clone(),
        "produce".into(),
        "jobs".into(),
        "-p".into(),
        "x".into(),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    // A certificate without its key is refused by the flags.
    let o = run(vec!["--tls-cert".into(), cert_s.clone(), "list".into()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("--tls-key"), "{}", text(&o));
    // A CA file that holds no certificate is named.
    let o = run(vec!["--tls-ca".into(), key_s.clone(), "list".into()]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&key_s) && text(&o).contains("no certificate"),
        "{}",
        text(&o)
    );
    // Nothing the refused commands sent arrived: the one item is leased, and no other is there to lease.
    let o = run(with(&["--json", "lease", "jobs", "--timeout", "1s"]));
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("\"bytes\""),
        "{}",
        text(&o)
    );
    drop(srv);

    // A key that does not belong to the certificate stops the server at start-up, naming both files.
    let other = ca.server("other", &["127.0.0.1"]);
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!(
            "tls:\n  cert-file: {}\n  key-file: {}\n",
            server.cert.display(),
            other.key.display()
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(["server", "--address", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&bad)
        .env_remove("LESSOR_CONFIG")
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("does not match") && out.contains("main-server.crt") && out.contains("main-other.key"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_the_server_read_renewed_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let first_ca = TestCa::new(dir.path(), "first");
    let second_ca = TestCa::new(dir.path(), "second");
    let live = first_ca.server("live", &["127.0.0.1"]);
    let config = dir.path().join("lessor.yaml");
    // No periodic check: only the signal reads the files again.
    std::fs::write(
        &config,
        format!(
            "queue-storage: {{ driver: memory }}\npartition-storage:\n  - {{ name: m, driver: memory }}\n\
             tls:\n  cert-file: {}\n  key-file: {}\n  reload-interval: 0s\n",
            live.cert.display(),
            live.key.display(),
        ),
    )
    .unwrap();
    let srv = ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), dir.path().join("server.log"))
        .config(&config)
        .https(TlsConfig::new().add_ca_file(first_ca.ca_file()).unwrap())
        .start()
        .await;
    let trusting = |ca: &TestCa| {
        lessor_client::Client::new(srv.endpoint())
            .unwrap()
            .with_tls(&TlsConfig::new().add_ca_file(ca.ca_file()).unwrap())
            .unwrap()
    };
    assert!(trusting(&second_ca).health().await.is_err());

    let renewed = second_ca.server("renewed", &["127.0.0.1"]);
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    std::fs::copy(&renewed.key, &live.key).unwrap();
    // Not read again without the signal.
    assert!(trusting(&first_ca).health().await.is_ok(), "{}", srv.log_tail());
    let hup = Command::new("kill")
        .args(["-HUP", &srv.pid().to_string()])
        .output()
        .expect("run kill");
    assert!(hup.status.success(), "{}", text(&hup));
    // Bounded: the reload runs as soon as the server's task sees the signal.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while trusting(&second_ca).health().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served after SIGHUP; log:\n{}",
            srv.log_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(trusting(&first_ca).health().await.is_err());
    assert!(
        srv.log_tail().contains("certificate files read again"),
        "{}",
        srv.log_tail()
    );
}
