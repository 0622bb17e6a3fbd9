//! Databases for the PostgreSQL tests: the server named by `LESSOR_TEST_DATABASE_URL`, a fresh database per test
//! ([`TestDatabase`]), and private clusters run by `scripts/pg-test-cluster.sh` ([`Cluster`]) for tests that stop
//! and restart PostgreSQL itself.
//!
//! A test that needs a database and finds none calls [`database_or_skip`]: it skips with a message on a developer
//! machine, and fails under CI (see [`crate::skip_or_fail`]), so a CI that lost its database cannot pass.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The variable naming the PostgreSQL server the tests use.
pub const DATABASE_URL_VAR: &str = "LESSOR_TEST_DATABASE_URL";

/// The server to create test databases on, from `LESSOR_TEST_DATABASE_URL` (None when unset or blank).
pub fn admin_url() -> Option<String> {
    std::env::var(DATABASE_URL_VAR)
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// The test database's URL, or `None` after printing why the test skips. Under CI (see [`crate::in_ci`]) a missing
/// database fails the test instead.
pub fn database_or_skip() -> Option<String> {
    let url = admin_url();
    if url.is_none() {
        crate::skip_or_fail(&format!("{DATABASE_URL_VAR} is not set"));
    }
    url
}

/// `url` naming database `db` instead of its own (URI or key=value form).
pub fn with_dbname(url: &str, db: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value: a later key overrides an earlier one.
        return format!("{url} dbname={db}");
    };
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end + 3..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + 3 + i);
    format!("{}/{db}{query}", &base[..authority_end])
}

/// Connects to `url`; the connection task runs on the current runtime.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// Ends every other client connection to the server at `url` with `pg_terminate_backend` (as an operator or a
/// failover would), the servers' pooled and listening connections included; returns how many were ended.
///
/// # Panics
/// When the server cannot be reached.
pub async fn terminate_connections(url: &str) -> i64 {
    let c = connect(url).await;
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("pg_terminate_backend on {url}: {e}"));
    row.get(0)
}

/// Runs `sql` on a connection of its own, closed afterwards.
pub async fn execute(url: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let r = client.batch_execute(sql).await;
    drop(client);
    let _ = task.await;
    r
}

/// A fresh database, dropped (with whatever still connects to it) when this value is dropped.
pub struct TestDatabase {
    admin: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `<prefix>_<pid>_<n>_<stamp>` on the server of `LESSOR_TEST_DATABASE_URL` (panics when unset: check
    /// [`admin_url`] first to skip).
    pub async fn create(prefix: &str) -> TestDatabase {
        static N: AtomicU64 = AtomicU64::new(0);
        let admin = admin_url().expect("LESSOR_TEST_DATABASE_URL");
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() % 1_000_000_000);
        let name = format!(
            "{prefix}_{}_{}_{stamp}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        execute(&admin, &format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let url = with_dbname(&admin, &name);
        TestDatabase { admin, name, url }
    }

    /// The connection string of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort, on a thread of its own: this runs inside the test's runtime, which cannot block on itself.
        // FORCE ends the connections a stopping server may still hold.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
            if let Err(e) = rt.block_on(execute(&admin, &sql)) {
                eprintln!("warning: {sql}: {e}");
            }
        });
        let _ = dropper.join();
    }
}

/// A private PostgreSQL cluster run by `scripts/pg-test-cluster.sh`, stopped and removed on drop.
pub struct Cluster {
    dir: PathBuf,
    port: u16,
    db: String,
}

impl Cluster {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg-test-cluster.sh")
    }

    /// Runs a script command (`start`, `stop`, `halt`, `restart`, `url`) on this cluster; panics on failure.
    pub fn run(&self, cmd: &str) -> String {
        let out = Command::new("bash")
            .arg(Self::script())
            .arg(cmd)
            .env("LESSOR_PG_DIR", &self.dir)
            .env("LESSOR_PG_PORT", self.port.to_string())
            .env("LESSOR_PG_DB", &self.db)
            .output()
            .expect("run pg-test-cluster.sh");
        assert!(
            out.status.success(),
            "pg-test-cluster.sh {cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The cluster's directory (its data directory is `data/` inside, owned by the OS user the server runs as).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Sends `signal` (`STOP`, `CONT`...) to the cluster's postmaster and every process it started (its backends
    /// and workers): `STOP` then `CONT` looks to clients like a network stall.
    ///
    /// # Panics
    /// When the cluster is not running or `kill` of the postmaster fails.
    pub fn signal(&self, signal: &str) {
        let pidfile = self.dir.join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pidfile)
            .expect("postmaster.pid")
            .lines()
            .next()
            .expect("a pid")
            .trim()
            .to_string();
        let children = Command::new("pgrep").args(["-P", &pid]).output().expect("pgrep");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(&pid)
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid} (the postmaster)");
        // Backends come and go: one listed by pgrep may have exited by now, which needs no signal and must not
        // fail the test (kill exits non-zero when any of its pids is gone), so the children are signalled one by
        // one and a vanished one is skipped.
        for child in String::from_utf8_lossy(&children.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// Starts a new cluster in a temp dir tagged `tag`, on `port` (or the next free one), with database `db`;
    /// returns it with its URL. Pick `port` above 61000: ports in Linux's ephemeral range (32768-60999) can be
    /// held by the local end of any client connection when the server (re)binds.
    pub fn start(tag: &str, port: u16, db: &str) -> (Cluster, String) {
        let dir = std::env::temp_dir().join(format!("lessor-pg-{tag}-{}", std::process::id()));
        let c = Cluster {
            dir,
            port,
            db: db.to_string(),
        };
        let out = c.run("start");
        let url = out
            .trim()
            .strip_prefix("export LESSOR_TEST_DATABASE_URL=")
            .unwrap_or_else(|| panic!("unexpected output: {out}"))
            .to_string();
        (c, url)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Self::script())
            .arg("stop")
            .env("LESSOR_PG_DIR", &self.dir)
            .output();
    }
}

/// Whether the script can start a local server without installing one.
pub fn postgres_installed() -> bool {
    let in_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("initdb").is_file()));
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().any(|d| d.path().join("bin/initdb").is_file()))
        .unwrap_or(false);
    in_path || debian
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_replace_the_url_path() {
        assert_eq!(
            with_dbname("postgres://u@h:5/a?x=1", "b"),
            "postgres://u@h:5/b?x=1"
        );
        assert_eq!(with_dbname("postgres://u@h:5", "b"), "postgres://u@h:5/b");
        assert_eq!(
            with_dbname("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_dbname("host=h dbname=a", "b"), "host=h dbname=a dbname=b");
    }
}
