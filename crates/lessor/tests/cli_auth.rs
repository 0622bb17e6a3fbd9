//! The access-control commands of the `lessor` binary against a real server (in-process, port 0) whose door is
//! closed: `--api-key` and `LESSOR_API_KEY` carry the key, and `namespace`, `user`, `apikey`, `role` and
//! `rolebinding` create, list, update and delete what they say, in tables and in `--json`.

use std::process::Output;

use lessor_server::{Config, RunningServer};
use serde_json::Value;

/// Runs `lessor <args>` against `endpoint`, with `env_key` as `LESSOR_API_KEY` when given.
async fn lessor(endpoint: &str, env_key: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"));
    cmd.args(args)
        .env("LESSOR_ENDPOINT", endpoint)
        .env_remove("LESSOR_API_KEY")
        .env_remove("RUST_LOG");
    if let Some(k) = env_key {
        cmd.env("LESSOR_API_KEY", k);
    }
    cmd.output().await.expect("run lessor")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed; returns its standard output.
async fn ok(endpoint: &str, key: &str, args: &[&str]) -> String {
    let o = lessor(endpoint, Some(key), args).await;
    assert!(
        o.status.success(),
        "lessor {args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a `--json` command that must succeed; returns its output parsed.
async fn ok_json(endpoint: &str, key: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = ok(endpoint, key, &all).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("lessor {args:?}: not JSON ({e}): {out}"))
}

/// Runs a command that must fail; returns its standard error.
async fn fails(endpoint: &str, key: Option<&str>, args: &[&str]) -> String {
    let o = lessor(endpoint, key, args).await;
    assert!(!o.status.success(), "lessor {args:?} should fail: {}", stdout(&o));
    stderr(&o)
}

async fn closed_server(dir: &std::path::Path) -> (RunningServer, String) {
    let key_file = dir.join("admin.key");
    let yaml = format!(
        "queue-storage:\n  driver: memory\n\
         partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n\
         auth-backend:\n  driver: internal\n  open-door: false\n  bootstrap-key-file: {}\n",
        key_file.display()
    );
    let config = Config::from_yaml(&yaml).expect("config");
    let (srv, _client) = lessor_testkit::server::start(&config, None).await;
    let key = std::fs::read_to_string(&key_file).expect("bootstrap key");
    (srv, key.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_namespaces_users_keys_roles_and_bindings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (srv, admin) = closed_server(dir.path()).await;
    let ep = srv.endpoint();
    let ep = ep.as_str();

    // Without a key the door is closed.
    let err = fails(ep, None, &["namespace", "list"]).await;
    assert!(err.contains("401: authentication required"), "{err}");

    // ---- namespaces
    let out = ok(
        ep,
        &admin,
        &[
            "namespace",
            "create",
            "team-a",
            "--description",
            "the A team",
            "--key-tag",
            "teama",
        ],
    )
    .await;
    assert!(out.contains("created namespace 'team-a'"), "{out}");
    let err = fails(ep, Some(&admin), &["namespace", "create", "_hidden"]).await;
    assert!(err.contains("400: namespace name is reserved;"), "{err}");
    let table = ok(ep, &admin, &["namespace", "list"]).await;
    let mut lines = table.lines();
    let header = lines.next().expect("header");
    assert!(
        header.starts_with("NAME") && header.contains("KEY TAG"),
        "{table}"
    );
    let row = lines.find(|l| l.starts_with("team-a")).expect("team-a row");
    assert!(row.contains("teama") && row.contains("the A team"), "{row}");
    ok(
        ep,
        &admin,
        &[
            "namespace",
            "update",
            "team-a",
            "--description",
            "renamed",
            "--key-tag",
            "teama",
        ],
    )
    .await;
    let listed = ok_json(ep, &admin, &["namespace", "list"]).await;
    let team = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|n| n["name"] == "team-a")
        .expect("team-a")
        .clone();
    assert_eq!(team["description"], "renamed");
    assert_eq!(team["api_key_tag"], "teama");

    // ---- users
    let user = ok_json(
        ep,
        &admin,
        &["user", "create", "alice", "--email", "alice@example.com"],
    )
    .await;
    let alice = user["id"].as_str().expect("id").to_string();
    let out = ok(ep, &admin, &["user", "create", "bob"]).await;
    assert!(out.starts_with("created user 'bob' with id "), "{out}");
    let bob = out.trim().rsplit(' ').next().expect("id").to_string();
    let users = ok(ep, &admin, &["user", "list"]).await;
    assert!(
        users.contains("alice@example.com") && users.contains(&alice),
        "{users}"
    );

    // ---- api keys: the key is shown once, listings never show it
    let out = ok(
        ep,
        &admin,
        &[
            "apikey",
            "create",
            "--user",
            &alice,
            "--name",
            "laptop",
            "--expires-in",
            "720h",
        ],
    )
    .await;
    assert!(out.contains("only time the key is shown"), "{out}");
    let shown = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("qtr-live-"))
        .expect("the key on its own line")
        .to_string();
    let scoped = ok_json(
        ep,
        &admin,
        &["apikey", "create", "--user", &alice, "-n", "team-a"],
    )
    .await;
    let scoped_key = scoped["key"].as_str().expect("key").to_string();
    assert!(scoped_key.starts_with("qtr-teama-"), "{scoped}");
    let keys = ok(ep, &admin, &["apikey", "list", "--user", &alice]).await;
    assert!(keys.lines().next().expect("header").starts_with("ID"), "{keys}");
    assert_eq!(keys.lines().count(), 3, "{keys}");
    assert!(
        keys.contains("laptop") && keys.contains(scoped["prefix"].as_str().expect("prefix")),
        "{keys}"
    );
    assert!(
        !keys.contains(&shown) && !keys.contains(&scoped_key),
        "a listing shows a key: {keys}"
    );
    let keys_json = ok_json(ep, &admin, &["apikey", "list", "--user", &alice]).await;
    assert!(!keys_json.to_string().contains(&scoped_key));
    let bob_key = ok_json(ep, &admin, &["apikey", "create", "--user", &bob]).await;
    let bob_key = bob_key["key"].as_str().expect("key").to_string();

    // --api-key wins over LESSOR_API_KEY: bob has no binding, so he is denied although the env holds admin's key.
    let err = fails(ep, Some(&admin), &["--api-key", &bob_key, "user", "list"]).await;
    assert!(err.contains("403: access denied"), "{err}");

    // ---- roles
    let role = ok_json(
        ep,
        &admin,
        &[
            "role",
            "create",
            "producer",
            "-n",
            "team-a",
            "-p",
            "queue.produce,queue.lease",
            "--permission",
            "queue.stats",
        ],
    )
    .await;
    assert!(role["id"].as_str().is_some_and(|id| !id.is_empty()), "{role}");
    let err = fails(
        ep,
        Some(&admin),
        &["role", "create", "Admin", "-n", "team-a", "-p", "queue.lease"],
    )
    .await;
    assert!(
        err.contains("400: cannot modify or delete standard role;"),
        "{err}"
    );
    let roles = ok(ep, &admin, &["role", "list", "-n", "team-a"]).await;
    let row = roles
        .lines()
        .find(|l| l.starts_with("producer"))
        .expect("producer row");
    for p in ["queue.produce", "queue.lease", "queue.stats"] {
        assert!(row.contains(p), "{row}");
    }
    ok(
        ep,
        &admin,
        &[
            "role",
            "update",
            "producer",
            "-n",
            "team-a",
            "-p",
            "queue.produce",
        ],
    )
    .await;
    let roles = ok_json(ep, &admin, &["role", "list", "-n", "team-a"]).await;
    assert_eq!(
        roles["items"][0]["permissions"],
        serde_json::json!(["queue.produce"])
    );
    let system = ok(ep, &admin, &["role", "list"]).await;
    assert!(system.contains("NamespaceOwner"), "{system}");

    // ---- role bindings
    let out = ok(
        ep,
        &admin,
        &[
            "rolebinding",
            "create",
            "-n",
            "team-a",
            "--role",
            "producer",
            "--user",
            &alice,
        ],
    )
    .await;
    assert!(out.contains("bound user"), "{out}");
    ok(
        ep,
        &admin,
        &[
            "rolebinding",
            "create",
            "-n",
            "team-a",
            "--role",
            "producer",
            "--user",
            &bob,
        ],
    )
    .await;
    let all = ok_json(ep, &admin, &["rolebinding", "list", "-n", "team-a"]).await;
    assert_eq!(all["items"].as_array().expect("items").len(), 2, "{all}");
    let only = ok_json(
        ep,
        &admin,
        &["rolebinding", "list", "-n", "team-a", "--user", &alice],
    )
    .await;
    assert_eq!(only["items"].as_array().expect("items").len(), 1, "{only}");
    assert_eq!(only["items"][0]["user_id"], alice.as_str());
    let table = ok(ep, &admin, &["rolebinding", "list", "-n", "team-a"]).await;
    assert!(table.starts_with("ID") && table.contains(&bob), "{table}");
    // The table names the role and the user, which the bindings carry only as ids.
    let row = table
        .lines()
        .find(|l| l.contains(&alice))
        .expect("alice's binding");
    assert!(row.contains(" producer ") && row.contains(" alice "), "{row}");
    let err = fails(ep, Some(&admin), &["namespace", "delete", "team-a"]).await;
    assert!(err.contains("400: namespace has role bindings;"), "{err}");

    // ---- deletions
    for user in [&alice, &bob] {
        ok(
            ep,
            &admin,
            &[
                "rolebinding",
                "delete",
                "-n",
                "team-a",
                "--role",
                "producer",
                "--user",
                user,
            ],
        )
        .await;
    }
    let left = ok_json(ep, &admin, &["rolebinding", "list", "-n", "team-a"]).await;
    assert_eq!(left, serde_json::json!({}));
    ok(ep, &admin, &["role", "delete", "producer", "-n", "team-a"]).await;
    let err = fails(ep, Some(&admin), &["role", "delete", "producer", "-n", "team-a"]).await;
    assert!(err.contains("453: role does not exist;"), "{err}");
    let scoped_id = scoped["id"].as_str().expect("id");
    let out = ok(ep, &admin, &["apikey", "delete", scoped_id]).await;
    assert!(out.contains("revoked"), "{out}");
    let keys = ok_json(ep, &admin, &["apikey", "list", "--user", &alice]).await;
    assert_eq!(keys["items"].as_array().expect("items").len(), 1, "{keys}");
    ok(ep, &admin, &["user", "delete", &bob]).await;
    // Bob's key went with him.
    let err = fails(ep, Some(&bob_key), &["namespace", "list"]).await;
    assert!(err.contains("401: api key does not exist"), "{err}");
    ok(ep, &admin, &["user", "delete", &alice]).await;
    let users = ok(ep, &admin, &["user", "list"]).await;
    assert!(!users.contains("alice"), "{users}");
    ok(ep, &admin, &["namespace", "delete", "team-a"]).await;
    let names = ok_json(ep, &admin, &["namespace", "list"]).await;
    assert_eq!(names["items"].as_array().expect("items").len(), 1, "{names}");
    srv.stop().await;
}

/// `lessor whoami` names the key's user and what it may do, never the key; a bad key fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_names_the_key_without_secrets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (srv, admin) = closed_server(dir.path()).await;
    let ep = srv.endpoint();
    let table = ok(&ep, &admin, &["whoami"]).await;
    assert!(table.contains("user:  admin"), "{table}");
    assert!(
        table.contains("_system: ") && table.contains("queue.produce"),
        "{table}"
    );
    assert!(!table.contains(&admin), "the key is never printed: {table}");
    let me = ok_json(&ep, &admin, &["whoami"]).await;
    assert_eq!(me["username"], "admin", "{me}");
    assert_eq!(me["auth_enabled"], true, "{me}");
    let err = fails(&ep, Some("qtr-not-a-real-key"), &["whoami"]).await;
    assert!(err.contains("401") || err.to_lowercase().contains("key"), "{err}");
    srv.stop().await;
}
