//! The postgres backend over TLS: a private throwaway cluster (never the shared test server) is given a
//! certificate made in the test and `ssl = on`, and the backend connects with each `sslmode`:
//!
//! * `require`: encrypted, nothing verified; `prefer`: encrypted when offered; `disable`: plain.
//! * `verify-ca`: the right CA passes whatever the host name; another CA fails.
//! * `verify-full`: the right CA and the host named by the certificate pass; a host name the certificate does not
//!   carry fails (`host=db.example hostaddr=127.0.0.1`: same server, other name).
//! * Before `ssl = on`, `require` is refused and `prefer` falls back to plain text.
//!
//! Whether a connection is encrypted is read on the server (`pg_stat_ssl`), not assumed.
#![cfg(feature = "postgres")]

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use lessor_core::error::StorageError;
use lessor_core::storage::PartitionStore;
use lessor_storage::postgres::{PgConfig, PgStore};
use lessor_testkit::tls::TestCa;
use lessor_testkit::{postgres_installed, Cluster};

/// Opens a partition through a fresh pool on `url` (which connects and runs the migrations), then closes it.
async fn open(url: &str) -> Result<(), StorageError> {
    let store = PgStore::new(&PgConfig::new(url).with_max_conns(1))?;
    let r = store.open("tls", 0).await.map(drop);
    store.close().await;
    r
}

/// Opens a store on `url` and asks the server whether the store's connection is encrypted. Each call names its
/// connection (`application_name`) so that connections of earlier calls, still closing, are not counted.
async fn encrypted(admin: &tokio_postgres::Client, url: &str) -> bool {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "lessor_tls_{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let named = if url.starts_with("postgres://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}application_name={name}")
    } else {
        format!("{url} application_name={name}")
    };
    let store = PgStore::new(&PgConfig::new(&named).with_max_conns(1)).expect("store");
    let p = store
        .open("tls", 0)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let seen: Vec<bool> = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&name],
        )
        .await
        .expect("pg_stat_ssl")
        .iter()
        .map(|r| r.get::<_, bool>(0))
        .collect();
    drop(p);
    store.close().await;
    assert_eq!(seen.len(), 1, "{url}: one connection expected, saw {seen:?}");
    seen[0]
}

fn with_params(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_encrypt_and_verify_as_libpq() {
    if lessor_testkit::database_or_skip().is_none() {
        return;
    }
    if !postgres_installed() {
        lessor_testkit::skip_or_fail("no local PostgreSQL can be started for a private TLS cluster");
        return;
    }
    let (cluster, url) = Cluster::start("tls", 63480, "lessor_tls");
    let admin = lessor_testkit::connect(&url).await;

    // Before TLS is on: require is refused, prefer (and the default) fall back to plain text.
    let e = open(&with_params(&url, "sslmode=require"))
        .await
        .expect_err("no TLS on the server");
    println!("require without server TLS: {e}");
    assert!(!encrypted(&admin, &with_params(&url, "sslmode=prefer")).await);
    assert!(!encrypted(&admin, &url).await);

    // Certificates owned by the OS user the server runs as (PostgreSQL refuses a key others can read).
    let tls_dir = cluster.dir().join("tls");
    std::fs::create_dir_all(&tls_dir).expect("tls dir");
    let ca = TestCa::new(&tls_dir, "pg");
    let server = ca.server("server", &["127.0.0.1"]);
    let other = TestCa::new(&tls_dir, "other");
    let owner = std::fs::metadata(cluster.dir().join("data")).expect("data dir");
    for f in [&tls_dir, &server.cert, &server.key] {
        std::os::unix::fs::chown(f, Some(owner.uid()), Some(owner.gid())).expect("chown");
    }
    std::fs::set_permissions(&server.key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", server.cert.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", server.key.display()),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let ssl_on = || async {
        let row = admin
            .query_one("SHOW ssl", &[])
            .await
            .map_err(|e| e.to_string())?;
        match row.get::<_, String>(0).as_str() {
            "on" => Ok(()),
            v => Err(format!("ssl = {v}")),
        }
    };
    if let Err(last) =
        lessor_testkit::poll_until(Duration::from_secs(10), Duration::from_millis(50), ssl_on).await
    {
        panic!(
            "ssl did not turn on: {last}; server log:\n{}",
            cluster_log(&cluster)
        );
    }

    let ca_file = ca.ca_file().display().to_string();
    let other_ca = other.ca_file().display().to_string();
    // Encrypted without verification.
    assert!(encrypted(&admin, &with_params(&url, "sslmode=require")).await);
    assert!(encrypted(&admin, &with_params(&url, "sslmode=prefer")).await);
    assert!(encrypted(&admin, &url).await, "the default is prefer, as libpq");
    assert!(!encrypted(&admin, &with_params(&url, "sslmode=disable")).await);

    // verify-ca: the chain counts, the name does not.
    let verify_ca = with_params(&url, &format!("sslmode=verify-ca&sslrootcert={ca_file}"));
    assert!(encrypted(&admin, &verify_ca).await);
    let by_other_name = format!(
        "host=db.example hostaddr=127.0.0.1 port={} user=postgres dbname=lessor_tls",
        port(&url)
    );
    assert!(
        encrypted(
            &admin,
            &format!("{by_other_name} sslmode=verify-ca sslrootcert={ca_file}")
        )
        .await
    );
    let e = open(&with_params(
        &url,
        &format!("sslmode=verify-ca&sslrootcert={other_ca}"),
    ))
    .await
    .expect_err("another CA");
    println!("verify-ca with another CA: {e}");
    // require with a root certificate verifies the chain, as in libpq.
    open(&with_params(
        &url,
        &format!("sslmode=require&sslrootcert={other_ca}"),
    ))
    .await
    .expect_err("require + sslrootcert of another CA");

    // verify-full: chain and name.
    assert!(
        encrypted(
            &admin,
            &with_params(&url, &format!("sslmode=verify-full&sslrootcert={ca_file}"))
        )
        .await
    );
    let e = open(&format!(
        "{by_other_name} sslmode=verify-full sslrootcert={ca_file}"
    ))
    .await
    .expect_err("the certificate does not name db.example");
    println!("verify-full with another name: {e}");
    open(&with_params(
        &url,
        &format!("sslmode=verify-full&sslrootcert={other_ca}"),
    ))
    .await
    .expect_err("another CA");
    drop(admin);
    drop(cluster);
}

fn port(url: &str) -> u16 {
    let after = url.rsplit_once(':').expect("port").1;
    after
        .split('/')
        .next()
        .expect("port")
        .parse()
        .expect("port number")
}

fn cluster_log(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.dir().join("server.log")).unwrap_or_default()
}
