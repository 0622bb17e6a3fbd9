//! The commands of Lessor's extensions through the real `lessor` binary against an in-process server (memory
//! storage): `produce --priority --dedup-id`, `create`/`update` with the dedup window, max lease and retry backoff,
//! `info`, `extend`, `pause`/`resume`, `browse` and `redrive` with `list`/`get`/`cancel`, in tables and in `--json`.

use std::process::Output;

use serde_json::Value;

async fn lessor(endpoint: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
        .args(args)
        .env("LESSOR_ENDPOINT", endpoint)
        .env_remove("LESSOR_API_KEY")
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run lessor")
}

/// Runs a command that must succeed; returns its standard output.
async fn ok(endpoint: &str, args: &[&str]) -> String {
    let o = lessor(endpoint, args).await;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "lessor {args:?} failed: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Runs a `--json` command that must succeed; returns its output parsed.
async fn ok_json(endpoint: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ok(endpoint, &all).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lessor {args:?}: not JSON ({e}): {out}"))
}

/// Runs a command that must fail; returns its standard error.
async fn fails(endpoint: &str, args: &[&str]) -> String {
    let o = lessor(endpoint, args).await;
    assert!(
        !o.status.success(),
        "lessor {args:?} should fail: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn total(ep: &str, queue: &str) -> i64 {
    let s = ok_json(ep, &["stats", queue]).await;
    s["logicalQueues"][0]["partitions"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["total"].as_i64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_settings_priorities_dedup_extend_pause_and_browse() {
    let (srv, _c) = lessor_testkit::server::memory().await;
    let ep = srv.endpoint();
    let ep = ep.as_str();

    // ---- create and update with the extension settings
    ok(
        ep,
        &[
            "create",
            "jobs",
            "--lease-timeout",
            "30s",
            "--expire-timeout",
            "1h",
            "--dedup-window",
            "10m",
            "--max-lease-timeout",
            "20m",
            "--retry-backoff-base",
            "1s",
            "--retry-backoff-max",
            "1m",
            "--retry-backoff-factor",
            "3",
        ],
    )
    .await;
    let info = ok_json(ep, &["info", "jobs"]).await;
    assert_eq!(info["dedup_window"], "10m0s", "{info}");
    assert_eq!(info["max_lease_timeout"], "20m0s", "{info}");
    assert_eq!(
        info["retry_backoff"],
        serde_json::json!({"base": "1s", "max": "1m0s", "factor": 3.0}),
        "{info}"
    );
    // Updating one backoff setting keeps the others.
    ok(ep, &["update", "jobs", "--retry-backoff-jitter", "0.5"]).await;
    let info = ok_json(ep, &["info", "jobs"]).await;
    assert_eq!(
        info["retry_backoff"],
        serde_json::json!({"base": "1s", "max": "1m0s", "factor": 3.0, "jitter": 0.5}),
        "{info}"
    );
    let human = ok(ep, &["info", "jobs"]).await;
    assert!(
        human.contains("retry backoff: base 1s, max 1m0s, factor 3, jitter 0.5"),
        "{human}"
    );
    assert!(
        human.contains("dedup window:  10m0s") && human.contains("paused:        no"),
        "{human}"
    );
    // A zero base turns it off.
    ok(ep, &["update", "jobs", "--retry-backoff-base", "0s"]).await;
    let info = ok_json(ep, &["info", "jobs"]).await;
    assert!(info.get("retry_backoff").is_none(), "{info}");
    assert!(ok(ep, &["info", "jobs"]).await.contains("retry backoff: off"));
    let err = fails(
        ep,
        &[
            "update",
            "jobs",
            "--retry-backoff-factor",
            "0.5",
            "--retry-backoff-base",
            "1s",
        ],
    )
    .await;
    assert!(
        err.contains("400: retry_backoff.factor is invalid; must be between 1 and 100"),
        "{err}"
    );
    let err = fails(ep, &["create", "bad", "--dedup-window", "sometimes"]).await;
    assert!(
        err.contains("400: dedup_window is invalid; invalid duration 'sometimes'"),
        "{err}"
    );

    // ---- produce with priorities and dedup keys
    for (payload, priority, key) in [
        ("low", "0", ""),
        ("high", "7", "k-high"),
        ("high again", "7", "k-high"),
    ] {
        let mut args = vec!["produce", "jobs", "-p", payload, "--priority", priority];
        if !key.is_empty() {
            args.extend(["--dedup-id", key]);
        }
        ok(ep, &args).await;
    }
    assert_eq!(
        total(ep, "jobs").await,
        2,
        "the second k-high was acknowledged, not stored"
    );
    let err = fails(ep, &["produce", "jobs", "-p", "x", "--priority", "-1"]).await;
    assert!(
        err.contains("400: items[0].priority is invalid; must be between 0 and 9, got '-1'"),
        "{err}"
    );

    // ---- browse before leasing: both ready, priority shown
    let table = ok(ep, &["browse", "jobs"]).await;
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    assert!(
        header.starts_with("ID") && header.contains("STATE") && header.contains("HOLDER"),
        "{table}"
    );
    assert_eq!(lines.clone().count(), 2, "{table}");
    assert!(lines.all(|l| l.contains("ready")), "{table}");
    let page = ok(ep, &["browse", "jobs", "--limit", "1"]).await;
    assert!(page.contains("next pivot: "), "{page}");

    // ---- lease: the high-priority item first, with its priority
    let leased = ok_json(ep, &["lease", "jobs", "-c", "worker-9"]).await;
    let item = &leased["items"][0];
    assert_eq!(item["priority"], 7, "{leased}");
    let id = item["id"].as_str().expect("id").to_string();
    let partition = leased["partition"].as_i64().unwrap_or(0).to_string();
    let human = ok(ep, &["lease", "jobs"]).await;
    assert!(
        human.contains("low") && !human.contains("priority="),
        "priority 0 is not shown: {human}"
    );

    // ---- extend
    let out = ok(
        ep,
        &["extend", "jobs", &id, "-p", &partition, "--lease-timeout", "15m"],
    )
    .await;
    assert!(out.contains("extended 1 leases"), "{out}");
    let err = fails(
        ep,
        &["extend", "jobs", &id, "-p", &partition, "--lease-timeout", "21m"],
    )
    .await;
    assert!(
        err.contains("400: lease_timeout is invalid; cannot be greater than the queue's max_lease_timeout"),
        "{err}"
    );
    let leased = ok_json(ep, &["browse", "jobs", "--state", "leased", "--priority", "7"]).await;
    assert_eq!(leased["items"][0]["holder"], "worker-9", "{leased}");
    assert_eq!(leased["items"][0]["id"], id.as_str(), "{leased}");
    let table = ok(ep, &["browse", "jobs", "--state", "leased"]).await;
    assert!(table.contains("worker-9"), "{table}");

    // ---- pause and resume
    let out = ok(ep, &["pause", "jobs"]).await;
    assert!(out.contains("paused queue 'jobs'"), "{out}");
    assert_eq!(ok_json(ep, &["info", "jobs"]).await["paused"], true);
    ok(ep, &["produce", "jobs", "-p", "while paused"]).await;
    let err = fails(ep, &["lease", "jobs", "--timeout", "300ms"]).await;
    assert!(
        err.contains("454: request timeout"),
        "a paused queue serves no lease: {err}"
    );
    let out = ok(ep, &["resume", "jobs"]).await;
    assert!(out.contains("resumed queue 'jobs'"), "{out}");
    let got = ok(ep, &["lease", "jobs"]).await;
    assert!(got.contains("while paused"), "{got}");
    let err = fails(ep, &["pause", "nope"]).await;
    assert!(err.contains("400: queue does not exist"), "{err}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_start_wait_list_get_and_cancel() {
    let (srv, _c) = lessor_testkit::server::memory().await;
    let ep = srv.endpoint();
    let ep = ep.as_str();
    ok(ep, &["create", "dlq"]).await;
    ok(
        ep,
        &["create", "src", "--dead-queue", "dlq", "--max-attempts", "1"],
    )
    .await;
    for p in ["a", "b", "c"] {
        ok(ep, &["produce", "src", "-p", p, "--kind", "mail"]).await;
    }
    let leased = ok_json(ep, &["lease", "src", "-b", "3"]).await;
    let ids: Vec<String> = leased["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_string())
        .collect();
    let partition = leased["partition"].as_i64().unwrap_or(0).to_string();
    let mut retry = vec!["retry", "src", "-p", partition.as_str(), "--dead"];
    retry.extend(ids.iter().map(String::as_str));
    ok(ep, &retry).await;
    lessor_testkit::eventually("three dead items", std::time::Duration::from_secs(5), || async {
        match total(ep, "dlq").await {
            3 => Ok(()),
            n => Err(format!("{n}")),
        }
    })
    .await;

    let err = fails(ep, &["redrive", "src"]).await;
    assert!(
        err.contains("400: dead_queue is invalid; 'src' is not the dead_queue of any queue"),
        "{err}"
    );
    let err = fails(ep, &["redrive"]).await;
    assert!(err.contains("name the dead-letter queue"), "{err}");

    let out = ok(ep, &["redrive", "dlq", "--kind", "mail", "--max", "2", "--wait"]).await;
    let last = out.lines().last().unwrap_or_default();
    assert!(last.contains("completed") && last.contains("moved=2"), "{out}");
    let task_id = out
        .split_whitespace()
        .find(|w| w.starts_with("rd-"))
        .expect("a task id")
        .to_string();
    assert_eq!(total(ep, "dlq").await, 1);
    assert_eq!(total(ep, "src").await, 2);

    let listed = ok_json(ep, &["redrive", "list", "dlq"]).await;
    assert_eq!(listed["items"][0]["task_id"], task_id.as_str(), "{listed}");
    assert_eq!(
        listed["items"][0]["max_items"], "2",
        "int64 is a string in JSON: {listed}"
    );
    let table = ok(ep, &["redrive", "list"]).await;
    assert!(
        table.starts_with("TASK") && table.contains(&task_id) && table.contains("(sources)"),
        "{table}"
    );
    let got = ok_json(ep, &["redrive", "get", &task_id, "--dead-queue", "dlq"]).await;
    assert_eq!(
        (got["status"].as_str(), got["moved"].as_str()),
        (Some("completed"), Some("2")),
        "{got}"
    );
    let out = ok(ep, &["redrive", "cancel", &task_id]).await;
    assert!(out.contains(&task_id) && out.contains("completed"), "{out}");
    let err = fails(ep, &["redrive", "get", &task_id, "--dead-queue", "src"]).await;
    assert!(
        err.contains(&format!("400: task_id is invalid; no redrive task '{task_id}'")),
        "{err}"
    );

    // Without --wait: the task as started, to a named queue.
    ok(ep, &["create", "retry-here"]).await;
    let started = ok_json(ep, &["redrive", "dlq", "--to", "retry-here"]).await;
    assert_eq!(started["target_queue"], "retry-here", "{started}");
    assert!(
        started["task_id"].as_str().is_some_and(|t| t.starts_with("rd-")),
        "{started}"
    );
    srv.stop().await;
}

/// `lessor stats` asks for each partition's oldest waiting item and shows it (`-` when nothing waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_the_oldest_waiting_item() {
    let (srv, _c) = lessor_testkit::server::memory().await;
    let ep = srv.endpoint();
    let ep = ep.as_str();
    ok(ep, &["create", "aged"]).await;
    let table = ok(ep, &["stats", "aged"]).await;
    assert!(table.contains("OLDEST READY"), "{table}");
    assert!(
        table.lines().nth(1).is_some_and(|l| l.trim_end().ends_with('-')),
        "{table}"
    );
    ok(ep, &["produce", "aged", "-p", "x"]).await;
    let s = ok_json(ep, &["stats", "aged"]).await;
    let age = s["logicalQueues"][0]["partitions"][0]["oldest_ready_age"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(age.ends_with('s'), "a Go duration: {s}");
    srv.stop().await;
}

/// `lessor stats` asks for the per-tier figures and shows them as a second table; `lessor offload sweep` on a
/// server without object storage fails with the server's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_tiers_and_sweep_needs_object_storage() {
    let (srv, _c) = lessor_testkit::server::memory().await;
    let ep = srv.endpoint();
    let ep = ep.as_str();
    ok(ep, &["create", "tiered"]).await;
    ok(ep, &["produce", "tiered", "-p", "hello"]).await;
    ok(ep, &["produce", "tiered", "-p", "world!"]).await;
    let table = ok(ep, &["stats", "tiered"]).await;
    let header = table
        .lines()
        .position(|l| l.contains("MEMORY ITEMS/BYTES"))
        .unwrap_or_else(|| panic!("no tier table: {table}"));
    let row: Vec<&str> = table
        .lines()
        .nth(header + 1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // PARTITION, then items / bytes per tier: memory holds both (11 bytes), nothing on disk or in object storage.
    assert_eq!(
        row,
        ["0", "2", "/", "11", "B", "0", "/", "0", "B", "0", "/", "0", "B"],
        "{table}"
    );
    let s = ok_json(ep, &["stats", "tiered"]).await;
    let tiers = &s["logicalQueues"][0]["partitions"][0]["tiers"];
    assert_eq!(tiers["memory_items"], "2", "{s}");
    assert_eq!(tiers["memory_bytes"], "11", "{s}");
    let e = fails(ep, &["offload", "sweep"]).await;
    assert!(e.contains("400") && e.contains("no object storage; "), "{e}");
    srv.stop().await;
}
