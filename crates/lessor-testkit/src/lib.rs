//! Lessor's one test harness, shared by every crate's test suites (a dev-dependency only; nothing here ships).
//!
//! - [`db`]: PostgreSQL for the tests: the server named by `LESSOR_TEST_DATABASE_URL`, a fresh database per test,
//!   private clusters for tests that stop and restart the database.
//! - [`rng`]: a small seeded random source whose seed is printed and can be set from the environment, so a failing
//!   run can be repeated.
//! - [`eventually`]: poll a condition until a deadline, failing with what was last seen.
//! - [`measure`]: a process's resident memory and a directory's disk usage, for resource tests.
//! - `hooked` (feature `hooks`): storage wrappers that run a test's hook around each call, to fail it, stop it at
//!   a gate until the test releases it, or note that it happened.
//! - `server` (feature `server`): a Lessor server inside the test process, on a port the OS picks.
//! - `process` (feature `server`): the real `lessor` binary as a child process, for tests that kill it.
//! - `tls` (feature `tls`): a private CA and certificates it signs, as PEM files, for the TLS tests.
//!
//! Tests that need something the machine may lack (a database, root) call [`skip_or_fail`]: on a developer machine
//! they skip with a message; under CI they fail, so a CI that lost its database cannot pass by skipping.

pub mod db;
pub mod eventually;
#[cfg(feature = "hooks")]
pub mod hooked;
pub mod measure;
#[cfg(feature = "server")]
pub mod process;
pub mod rng;
pub mod s3;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "tls")]
pub mod tls;

pub use db::{
    admin_url, connect, database_or_skip, execute, postgres_installed, terminate_connections, with_dbname,
    Cluster, TestDatabase,
};
pub use eventually::{eventually, poll_until};
pub use rng::Rng;

/// Whether this run is a CI run: the variable `CI` is set to anything but empty, `0` or `false` (CI services set
/// `CI=true`).
pub fn in_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

fn ci_value(v: Option<&str>) -> bool {
    v.is_some_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
}

/// Skips a test that cannot run here for `reason`, with a message, or fails it under CI (see [`in_ci`]), where
/// every test must run. The caller returns right after.
///
/// # Panics
/// Under CI, always.
pub fn skip_or_fail(reason: &str) {
    assert!(
        !in_ci(),
        "cannot run: {reason}; CI is set, and a CI run must run every test (unset CI to skip it locally)"
    );
    eprintln!("skipped: {reason}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_is_any_value_but_empty_zero_or_false() {
        assert!(ci_value(Some("true")));
        assert!(ci_value(Some("1")));
        assert!(ci_value(Some("yes")));
        assert!(!ci_value(None));
        assert!(!ci_value(Some("")));
        assert!(!ci_value(Some("0")));
        assert!(!ci_value(Some("FALSE")));
    }
}
