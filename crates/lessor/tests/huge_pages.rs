//! The `lessor` binary turns transparent huge pages off for its own process unless `MIMALLOC_ALLOW_THP` is set
//! (see `no_transparent_huge_pages` in `main.rs`, and docs/operations.md). Checked from outside, on the real binary:
//! the kernel reports the process's flag as `THP_enabled` in `/proc/PID/status` (Linux 5.0 and later).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lessor_testkit::process::{ServerCommand, ServerProcess};

/// `THP_enabled` of process `pid` (`"self"` for this one), or `None` on a kernel that does not report it.
fn thp_enabled(pid: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
}

async fn start(dir: &std::path::Path, allow: Option<&str>) -> ServerProcess {
    let cfg = dir.join("memory.yaml");
    std::fs::write(
        &cfg,
        "queue-storage: { driver: memory }\npartition-storage: [ { name: ram, driver: memory } ]\n",
    )
    .unwrap();
    let mut cmd = ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), dir.join("server.log"))
        .config(&cfg)
        .startup_limit(Duration::from_secs(30));
    cmd = match allow {
        Some(v) => cmd.env("MIMALLOC_ALLOW_THP", v),
        None => cmd.env_remove("MIMALLOC_ALLOW_THP"),
    };
    cmd.start().await
}

#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let Some(own) = thp_enabled("self") else {
        eprintln!("this kernel does not report THP_enabled: nothing to check");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), None).await;
    assert_eq!(
        thp_enabled(&server.pid().to_string()).as_deref(),
        Some("0"),
        "the server's THP flag (this test process: {own})"
    );
}

#[tokio::test]
async fn mimalloc_allow_thp_leaves_the_choice_to_the_operator() {
    // The flag is inherited: if this test process already runs with huge pages off, the child cannot show the
    // difference.
    if thp_enabled("self").as_deref() != Some("1") {
        eprintln!("this process has huge pages off (or the kernel does not say): nothing to compare");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Some("1")).await;
    assert_eq!(thp_enabled(&server.pid().to_string()).as_deref(), Some("1"));
}
