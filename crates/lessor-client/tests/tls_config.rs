//! [`TlsConfig`]: files are checked when added, and errors name the file and the problem, before any request.
#![allow(clippy::unwrap_used)]

use lessor_client::{Client, ClientError, TlsConfig};
use lessor_testkit::tls::TestCa;

fn reason(e: ClientError) -> String {
    match e {
        ClientError::Tls { reason } => reason,
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "t");
    let me = ca.client("me", "me");
    let other = ca.client("other", "other");

    let missing = dir.path().join("nope.crt");
    let r = reason(TlsConfig::new().add_ca_file(&missing).unwrap_err());
    assert!(r.contains("nope.crt") && r.contains("cannot read"), "{r}");
    let r = reason(TlsConfig::new().add_ca_file(&me.key).unwrap_err());
    assert!(r.contains("t-me.key") && r.contains("no certificate"), "{r}");
    let r = reason(TlsConfig::new().identity_files(&me.cert, &me.cert).unwrap_err());
    assert!(
        r.contains("client key file") && r.contains("no private key"),
        "{r}"
    );
    let r = reason(TlsConfig::new().identity_files(&me.key, &me.key).unwrap_err());
    assert!(
        r.contains("client certificate file") && r.contains("no certificate"),
        "{r}"
    );

    let good = TlsConfig::new()
        .add_ca_file(ca.ca_file())
        .unwrap()
        .identity_files(&me.cert, &me.key)
        .unwrap();
    assert!(good.has_identity());
    assert!(Client::new("https://127.0.0.1:1")
        .unwrap()
        .with_tls(&good)
        .is_ok());
    // A key that belongs to another certificate is refused when the client is built.
    let mixed = TlsConfig::new().identity_files(&me.cert, &other.key).unwrap();
    let e = Client::new("https://127.0.0.1:1").unwrap().with_tls(&mixed);
    assert!(matches!(e, Err(ClientError::Tls { .. })), "{e:?}");
}
