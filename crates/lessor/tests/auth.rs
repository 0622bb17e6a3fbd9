//! Multi-tenancy and access control through the real `lessor` binary, on every queue-storage backend (memory,
//! fjall, PostgreSQL), configured from a YAML file as an operator would, and spoken to in JSON over HTTP as a
//! Querator client would (no Lessor client code between the test and the wire).
//!
//! - closed door: the bootstrap key file (mode 0600, one line), 401 without a key, the key administers, and a
//!   restart leaves the file untouched (bytes and mtime), keeps the key working and creates no second admin;
//! - tenants: tenant A's key cannot list, read, produce to, lease from, complete, retry, clear, update or delete
//!   tenant B's queue, and every refusal is identical to the one for a queue that does not exist (no existence
//!   oracle); A can do all of it on its own queue, and lists only its own queues;
//! - a key scoped to a namespace stays there even when its user is bound elsewhere;
//! - revocation (key and user deletion) and expiry take effect with Querator's 401 messages;
//! - malformed `Authorization` headers get Querator's 401 messages, with `driver: internal` and `none`;
//! - open door: anonymous administers until the `anonymous → Admin` binding in `_system` is deleted, then gets 401,
//!   also after a restart;
//! - no API key, key hash or `Authorization` value ever shows up in a response (other than the one creating the key)
//!   or in the server's debug log;
//! - two servers on one PostgreSQL database: a key made through one works on the other, and deleting it through one
//!   makes the other refuse it within 5 s.
//!
//! Each scenario runs once per backend (modules `memory`, `fjall`, `postgres`); the PostgreSQL ones need
//! `LESSOR_TEST_DATABASE_URL` (each test makes a database of its own, so bootstrap state never leaks between tests)
//! and skip without it (or fail under CI).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
#[cfg(feature = "postgres")]
use std::time::Instant;
use std::time::{Duration, SystemTime};

use lessor_testkit::process::{ServerCommand, ServerProcess};
use lessor_testkit::{database_or_skip, eventually, TestDatabase};
use serde_json::{json, Value};

// ---- backends and servers ----------------------------------------------------------------------------------------

// A build without the fjall or postgres feature runs the memory scenarios only.
#[cfg_attr(not(all(feature = "fjall", feature = "postgres")), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    Fjall,
    Postgres,
}

impl Backend {
    /// Whether the auth data outlives the process.
    fn durable(self) -> bool {
        self != Backend::Memory
    }
}

/// One test's surroundings: a temp dir for configs, logs, data and the key file, and on PostgreSQL a database of
/// its own.
struct Env {
    backend: Backend,
    dir: tempfile::TempDir,
    db: Option<TestDatabase>,
}

impl Env {
    /// `None` when the backend needs a database and there is none (the test then skips, or fails under CI).
    async fn new(backend: Backend) -> Option<Env> {
        let db = match backend {
            Backend::Postgres => {
                database_or_skip()?;
                Some(TestDatabase::create("lessor_auth").await)
            }
            _ => None,
        };
        Some(Env {
            backend,
            dir: tempfile::tempdir().expect("temp dir"),
            db,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Where the closed-door configuration writes the admin key.
    fn key_file(&self) -> PathBuf {
        self.path("admin.key")
    }

    /// `auth-backend` with the door closed and the key file in the temp dir.
    fn closed_door(&self) -> String {
        format!(
            "{{ driver: internal, open-door: false, bootstrap-key-file: {} }}",
            quoted(&self.key_file())
        )
    }

    fn storage_yaml(&self) -> String {
        match self.backend {
            Backend::Memory => "queue-storage: { driver: memory }\n\
                                partition-storage: [ { name: ram, driver: memory } ]\n"
                .to_string(),
            Backend::Fjall => {
                let d = quoted(&self.path("data"));
                format!(
                    "queue-storage: {{ driver: fjall, config: {{ storage-dir: {d} }} }}\n\
                     partition-storage: [ {{ name: disk, driver: fjall, config: {{ storage-dir: {d} }} }} ]\n"
                )
            }
            Backend::Postgres => {
                let url = self.db.as_ref().expect("a database").url();
                let url = serde_json::to_string(url).expect("string");
                format!(
                    "queue-storage: {{ driver: postgres, config: {{ connection-string: {url}, max-conns: 4 }} }}\n\
                     partition-storage: [ {{ name: pg, driver: postgres, config: {{ connection-string: {url}, \
                     max-conns: 4 }} }} ]\n"
                )
            }
        }
    }

    /// Starts `lessor server` named `name` (its config and log files are `<name>.yaml` and `<name>.log`) with
    /// `auth` as its `auth-backend`, logging at debug level.
    async fn start(&self, name: &str, auth: &str) -> Server {
        let config = format!(
            "logging:\n  level: debug\n{}auth-backend: {auth}\n",
            self.storage_yaml()
        );
        let config_path = self.path(&format!("{name}.yaml"));
        std::fs::write(&config_path, config).expect("write the config");
        let log = self.path(&format!("{name}.log"));
        let process = ServerCommand::new(env!("CARGO_BIN_EXE_lessor"), &log)
            .config(&config_path)
            .startup_limit(Duration::from_secs(30))
            .start()
            .await;
        Server {
            endpoint: process.endpoint().to_string(),
            process,
            http: reqwest::Client::new(),
            log,
        }
    }

    /// Starts a closed-door server and returns it with the bootstrap admin key.
    async fn start_closed(&self, name: &str) -> (Server, String) {
        let server = self.start(name, &self.closed_door()).await;
        let key = admin_key(&self.key_file());
        (server, key)
    }
}

/// A path as a YAML (JSON) string.
fn quoted(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).expect("string")
}

/// The key in a bootstrap key file, after checking its shape: the key alone on one line.
fn admin_key(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let key = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("the key file ends with a newline: {text:?}"));
    assert!(!key.contains('\n'), "the key file holds one line: {text:?}");
    assert!(
        key.starts_with("qtr-live-") && key.len() == "qtr-live-".len() + 43,
        "the key file holds a key: {text:?}"
    );
    key.to_string()
}

/// How a request authenticates.
#[derive(Clone, Copy, Debug)]
enum Cred<'a> {
    /// No `Authorization` header.
    Anonymous,
    /// `Authorization: Bearer <key>`.
    Key(&'a str),
    /// `Authorization: <value>` exactly as given (bytes, so it may be invalid UTF-8 or not ASCII).
    Header(&'a [u8]),
}

/// A running `lessor server` (killed on drop) with an HTTP client of its own.
struct Server {
    process: ServerProcess,
    endpoint: String,
    http: reqwest::Client,
    log: PathBuf,
}

/// A JSON answer: the status and the decoded body.
#[derive(Debug, Clone)]
struct Answer {
    what: String,
    status: u16,
    body: Value,
    raw: String,
    www_authenticate: Option<String>,
}

impl Answer {
    /// The body of a 200.
    #[track_caller]
    fn ok(self) -> Value {
        assert_eq!(self.status, 200, "{}: {}", self.what, self.raw);
        self.body
    }

    /// The message of an error envelope.
    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }

    /// Asserts an error with `code` whose message's constant part (before the first `;`) is `constant`, and a
    /// well-formed envelope (`code` equal to the status, only the envelope's keys).
    #[track_caller]
    fn err(&self, code: u16, constant: &str) -> &Self {
        assert_eq!(self.status, code, "{}: {}", self.what, self.raw);
        let obj = self
            .body
            .as_object()
            .unwrap_or_else(|| panic!("{}: not an envelope: {}", self.what, self.raw));
        for k in obj.keys() {
            assert!(
                ["code", "code_text", "message", "details"].contains(&k.as_str()),
                "{}: extra key {k}: {}",
                self.what,
                self.raw
            );
        }
        assert_eq!(
            self.body["code"].as_u64(),
            Some(u64::from(code)),
            "{}: {}",
            self.what,
            self.raw
        );
        let head = self.message().split(';').next().unwrap_or("").trim();
        assert_eq!(head, constant, "{}: message {:?}", self.what, self.message());
        if code == 401 {
            assert_eq!(
                self.www_authenticate.as_deref(),
                Some("Bearer"),
                "{}: a 401 names the scheme",
                self.what
            );
        }
        self
    }

    /// Asserts the whole message.
    #[track_caller]
    fn message_is(&self, message: &str) -> &Self {
        assert_eq!(self.message(), message, "{}: {}", self.what, self.raw);
        self
    }
}

impl Server {
    /// `POST path` with `body` as JSON, answered in JSON.
    async fn call(&self, path: &str, cred: Cred<'_>, body: &Value) -> Answer {
        let what = format!("{path} {} as {cred:?}", short(&body.to_string()));
        let mut rb = self
            .http
            .post(format!("{}{path}", self.endpoint))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body.to_string());
        match cred {
            Cred::Anonymous => {}
            Cred::Key(k) => rb = rb.header("authorization", format!("Bearer {k}")),
            Cred::Header(h) => {
                let v = reqwest::header::HeaderValue::from_bytes(h).expect("a header value");
                rb = rb.header("authorization", v);
            }
        }
        let res = tokio::time::timeout(Duration::from_secs(30), rb.send())
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer within 30 s"))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = res.status().as_u16();
        let www_authenticate = res
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let raw = res.text().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let body = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {raw}"));
        Answer {
            what,
            status,
            body,
            raw,
            www_authenticate,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        self.process.kill();
    }
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

// ---- the admin API, as a Querator client calls it -----------------------------------------------------------------

/// Tenant namespaces.
const NS_A: &str = "tenant-a";
const NS_B: &str = "tenant-b";
/// The custom role each tenant gets in its namespace: NamespaceOwner's queue permissions.
const OWNER: &str = "owner";
const QUEUE_PERMISSIONS: [&str; 10] = [
    "queue.create",
    "queue.delete",
    "queue.update",
    "queue.list",
    "queue.produce",
    "queue.lease",
    "queue.complete",
    "queue.retry",
    "queue.stats",
    "queue.clear",
];

async fn create_namespace(s: &Server, admin: Cred<'_>, name: &str) {
    s.call(
        "/v1/namespaces.create",
        admin,
        &json!({"name": name, "description": format!("tenant {name}")}),
    )
    .await
    .ok();
}

/// Creates a user; returns its id.
async fn create_user(s: &Server, admin: Cred<'_>, username: &str) -> String {
    let r = s
        .call("/v1/users.create", admin, &json!({"username": username}))
        .await
        .ok();
    let id = r["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "users.create returns the id: {r}");
    id
}

async fn create_role(s: &Server, admin: Cred<'_>, namespace: &str, name: &str, permissions: &[&str]) {
    s.call(
        "/v1/roles.create",
        admin,
        &json!({"namespace": namespace, "name": name, "permissions": permissions}),
    )
    .await
    .ok();
}

async fn bind(s: &Server, admin: Cred<'_>, namespace: &str, role: &str, user_id: &str) {
    s.call(
        "/v1/rolebindings.create",
        admin,
        &json!({"namespace": namespace, "role_name": role, "user_id": user_id}),
    )
    .await
    .ok();
}

/// A new API key: its id and the secret.
struct NewKey {
    id: String,
    secret: String,
}

/// Creates a key for `user_id`, scoped to `scope` when not empty, expiring at `expires_at` when given.
async fn create_key(
    s: &Server,
    admin: Cred<'_>,
    user_id: &str,
    scope: &str,
    expires_at: Option<SystemTime>,
) -> NewKey {
    let mut req = json!({"user_id": user_id, "name": "test key", "namespace_scope": scope});
    if let Some(t) = expires_at {
        req["expires_at"] = json!(lessor_proto::Timestamp::from_system_time(t).to_rfc3339());
    }
    let r = s.call("/v1/apikeys.create", admin, &req).await.ok();
    let key = NewKey {
        id: r["id"].as_str().unwrap_or_default().to_string(),
        secret: r["key"].as_str().unwrap_or_default().to_string(),
    };
    assert!(
        !key.id.is_empty() && key.secret.starts_with("qtr-"),
        "apikeys.create returns the id and the key: {r}"
    );
    key
}

async fn create_queue(s: &Server, cred: Cred<'_>, name: &str, namespace: &str) -> Answer {
    s.call(
        "/v1/queues.create",
        cred,
        &json!({"queue_name": name, "namespace": namespace, "lease_timeout": "1m", "expire_timeout": "24h", "requested_partitions": 1}),
    )
    .await
}

/// Names of the queues `queues.list` shows for `namespace`.
async fn queue_names(s: &Server, cred: Cred<'_>, namespace: &str) -> Vec<String> {
    let r = s
        .call("/v1/queues.list", cred, &json!({"namespace": namespace}))
        .await
        .ok();
    r["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|q| q["queue_name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Sum of `total` and of `total_leased` over a queue's partitions.
async fn queue_totals(s: &Server, cred: Cred<'_>, queue: &str) -> (u64, u64) {
    let r = s
        .call("/v1/queue.stats", cred, &json!({"queue_name": queue}))
        .await
        .ok();
    let mut total = 0;
    let mut leased = 0;
    for lq in r["logicalQueues"].as_array().into_iter().flatten() {
        for p in lq["partitions"].as_array().into_iter().flatten() {
            total += p["total"].as_u64().unwrap_or(0);
            leased += p["total_leased"].as_u64().unwrap_or(0);
        }
    }
    (total, leased)
}

async fn produce(s: &Server, cred: Cred<'_>, queue: &str, payloads: &[&str]) {
    let items: Vec<Value> = payloads.iter().map(|p| json!({"utf8": p})).collect();
    s.call(
        "/v1/queue.produce",
        cred,
        &json!({"queue_name": queue, "request_timeout": "5s", "items": items}),
    )
    .await
    .ok();
}

/// Leases up to `n` items; returns the partition and the ids.
async fn lease(s: &Server, cred: Cred<'_>, queue: &str, n: usize) -> (i64, Vec<String>) {
    let r = s
        .call(
            "/v1/queue.lease",
            cred,
            &json!({"queue_name": queue, "batch_size": n, "client_id": "test", "request_timeout": "5s"}),
        )
        .await
        .ok();
    let ids = r["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["id"].as_str().unwrap_or_default().to_string())
        .collect();
    (r["partition"].as_i64().unwrap_or(0), ids)
}

/// The two tenants of the tenant tests, made by the bootstrap admin.
struct Tenants {
    admin: String,
    user_a: String,
    user_b: String,
    /// User a's key, scoped to namespace A.
    key_a: String,
    /// User b's key, not scoped.
    key_b: String,
}

async fn tenants(s: &Server, admin: String) -> Tenants {
    let a = Cred::Key(&admin);
    for ns in [NS_A, NS_B] {
        create_namespace(s, a, ns).await;
        create_role(s, a, ns, OWNER, &QUEUE_PERMISSIONS).await;
    }
    let user_a = create_user(s, a, "alice").await;
    let user_b = create_user(s, a, "bob").await;
    bind(s, a, NS_A, OWNER, &user_a).await;
    bind(s, a, NS_B, OWNER, &user_b).await;
    let key_a = create_key(s, a, &user_a, NS_A, None).await.secret;
    let key_b = create_key(s, a, &user_b, "", None).await.secret;
    Tenants {
        admin,
        user_a,
        user_b,
        key_a,
        key_b,
    }
}

// ---- scenarios -------------------------------------------------------------------------------------------------

/// Closed door: the first start writes the admin key (mode 0600, one line); no key → 401; the key administers; a
/// restart leaves the file alone and the key working, with one admin.
async fn closed_door(backend: Backend) {
    let Some(env) = Env::new(backend).await else {
        return;
    };
    let (mut server, admin) = env.start_closed("s1").await;
    let file = env.key_file();
    let meta = std::fs::metadata(&file).expect("the key file exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "key file mode");
    let bytes = std::fs::read(&file).expect("read the key file");
    let mtime = meta.modified().expect("mtime");

    // Without a key, every RPC is refused with 401 (reads and writes alike), whatever the queue.
    for (path, body) in [
        ("/v1/queues.list", json!({})),
        (
            "/v1/queues.create",
            json!({"queue_name": "q1", "lease_timeout": "1m", "expire_timeout": "1h", "requested_partitions": 1}),
        ),
        ("/v1/queue.stats", json!({"queue_name": "q1"})),
        ("/v1/users.list", json!({})),
        ("/v1/users.create", json!({"username": "intruder"})),
        ("/v1/namespaces.list", json!({})),
    ] {
        server
            .call(path, Cred::Anonymous, &body)
            .await
            .err(401, "authentication required")
            .message_is("authentication required");
    }
    // "Bearer " with nothing after it reaches the server as "Bearer" (HTTP trims the value): not the
    // `Bearer <key>` shape, so Querator's format error.
    server
        .call("/v1/queues.list", Cred::Header(b"Bearer "), &json!({}))
        .await
        .err(401, "invalid authorization header format");

    // The key administers: queues, users, keys.
    let k = Cred::Key(&admin);
    create_queue(&server, k, "q1", "").await.ok();
    assert_eq!(queue_names(&server, k, "").await, ["q1"]);
    let u = create_user(&server, k, "carol").await;
    create_key(&server, k, &u, "", None).await;
    let admins = count_users(&server, k, "admin").await;
    assert_eq!(admins, 1, "one bootstrap admin");

    // Restart: the file is left alone, the key still works, and there is still one admin.
    server.kill();
    let server = env.start("s2", &env.closed_door()).await;
    assert_eq!(
        std::fs::read(&file).expect("read the key file"),
        bytes,
        "key file bytes"
    );
    let meta = std::fs::metadata(&file).expect("the key file exists");
    assert_eq!(meta.modified().expect("mtime"), mtime, "key file mtime");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "key file mode");
    server
        .call("/v1/queues.list", Cred::Anonymous, &json!({}))
        .await
        .err(401, "authentication required");
    let r = server.call("/v1/users.list", k, &json!({})).await.ok();
    assert_eq!(count_named(&r, "admin"), 1, "one admin after the restart: {r}");
    if backend.durable() {
        assert_eq!(queue_names(&server, k, "").await, ["q1"]);
        assert_eq!(count_named(&r, "carol"), 1, "{r}");
    }
    assert_no_secrets(&server, &[&admin]);
}

async fn count_users(s: &Server, cred: Cred<'_>, username: &str) -> usize {
    let r = s.call("/v1/users.list", cred, &json!({})).await.ok();
    count_named(&r, username)
}

fn count_named(users_list: &Value, username: &str) -> usize {
    users_list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["username"] == username)
        .count()
}

/// The requests tenant A tries on a queue it may not use, built for a queue name, with real ids of B's items
/// where ids are needed.
fn foreign_requests(queue: &str, partition: i64, ids: &[String]) -> Vec<(&'static str, Value)> {
    vec![
        ("/v1/queues.info", json!({"queue_name": queue})),
        ("/v1/queue.stats", json!({"queue_name": queue})),
        ("/v1/storage/items.list", json!({"queue_name": queue})),
        ("/v1/storage/scheduled.list", json!({"queue_name": queue})),
        (
            "/v1/queue.produce",
            json!({"queue_name": queue, "request_timeout": "5s", "items": [{"utf8": "from a"}]}),
        ),
        (
            "/v1/queue.lease",
            json!({"queue_name": queue, "batch_size": 5, "client_id": "a", "request_timeout": "1s"}),
        ),
        (
            "/v1/queue.complete",
            json!({"queue_name": queue, "partition": partition, "request_timeout": "5s", "ids": [ids[0]]}),
        ),
        (
            "/v1/queue.retry",
            json!({"queue_name": queue, "partition": partition, "items": [{"id": ids[1], "dead": true}]}),
        ),
        (
            "/v1/queue.clear",
            json!({"queue_name": queue, "queue": true, "scheduled": true, "destructive": true}),
        ),
        ("/v1/queue.reload", json!({"queue_name": queue})),
        (
            "/v1/queues.update",
            json!({"queue_name": queue, "max_attempts": 9}),
        ),
        (
            "/v1/storage/items.import",
            json!({"queue_name": queue, "partition": partition, "items": [{"payload": "eA=="}]}),
        ),
        (
            "/v1/storage/items.delete",
            json!({"queue_name": queue, "partition": partition, "ids": [ids[0]]}),
        ),
        ("/v1/queues.delete", json!({"queue_name": queue})),
        // Lessor's extensions.
        (
            "/v1/queue.extend",
            json!({"queue_name": queue, "partition": partition, "request_timeout": "5s", "ids": [ids[0]], "lease_timeout": "1h"}),
        ),
        ("/v1/queue.pause", json!({"queue_name": queue})),
        ("/v1/queue.resume", json!({"queue_name": queue})),
        (
            "/v1/queue.browse",
            json!({"queue_name": queue, "partition": partition}),
        ),
        ("/v1/queue.history", json!({"queue_name": queue})),
        ("/v1/queue.redrive", json!({"dead_queue": queue})),
        ("/v1/redrive.list", json!({"dead_queue": queue})),
        (
            "/v1/redrive.get",
            json!({"task_id": "rd-000000000000-00000000", "dead_queue": queue}),
        ),
        (
            "/v1/redrive.cancel",
            json!({"task_id": "rd-000000000000-00000000", "dead_queue": queue}),
        ),
        (
            "/v1/queues.rebalance",
            json!({"queue_name": queue, "spread": true}),
        ),
        ("/v1/rebalance.list", json!({"queue_name": queue})),
        (
            "/v1/rebalance.get",
            json!({"task_id": "rb-000000000000-00000000", "queue_name": queue}),
        ),
        (
            "/v1/rebalance.cancel",
            json!({"task_id": "rb-000000000000-00000000", "queue_name": queue}),
        ),
    ]
}

/// Tenant A cannot touch tenant B's queue nor tell it from a missing one; A can do everything on its own.
async fn tenants_are_isolated(backend: Backend) {
    let Some(env) = Env::new(backend).await else {
        return;
    };
    let (server, admin) = env.start_closed("s").await;
    let t = tenants(&server, admin).await;
    let (a, b) = (Cred::Key(&t.key_a), Cred::Key(&t.key_b));
    create_queue(&server, a, "qa", NS_A).await.ok();
    create_queue(&server, b, "qb", NS_B).await.ok();
    // Neither may create queues in the other's namespace.
    create_queue(&server, a, "qa2", NS_B)
        .await
        .err(403, "access denied");
    create_queue(&server, b, "qb2", NS_A)
        .await
        .err(403, "access denied");

    // B's queue holds three items, two of them leased by B.
    produce(&server, b, "qb", &["b1", "b2", "b3"]).await;
    let (partition, ids) = lease(&server, b, "qb", 2).await;
    assert_eq!(ids.len(), 2, "b leased two items");

    // Every request of A on qb is refused exactly as the same request on a queue that does not exist.
    let missing = "no-such-queue";
    let theirs = foreign_requests("qb", partition, &ids);
    let nowhere = foreign_requests(missing, partition, &ids);
    for ((path, body), (_, body_missing)) in theirs.iter().zip(&nowhere) {
        let on_b = server.call(path, a, body).await;
        on_b.err(403, "access denied").message_is("access denied");
        let on_missing = server.call(path, a, body_missing).await;
        assert_eq!(
            (on_b.status, &on_b.raw),
            (on_missing.status, &on_missing.raw),
            "{path}: B's queue and a missing queue must look the same to A"
        );
    }
    // Listing B's namespace, or all queues, is refused too, and looks like listing a namespace that does not exist.
    let listed = server
        .call("/v1/queues.list", a, &json!({"namespace": NS_B}))
        .await;
    listed.err(403, "access denied");
    let nowhere = server
        .call("/v1/queues.list", a, &json!({"namespace": "no-such-namespace"}))
        .await;
    assert_eq!((listed.status, &listed.raw), (nowhere.status, &nowhere.raw));
    server
        .call("/v1/queues.list", a, &json!({}))
        .await
        .err(403, "access denied");

    // None of it touched qb.
    assert_eq!(queue_totals(&server, b, "qb").await, (3, 2), "qb is untouched");
    let info = server
        .call("/v1/queues.info", b, &json!({"queue_name": "qb"}))
        .await
        .ok();
    assert_eq!(
        info["max_attempts"].as_i64().unwrap_or(0),
        0,
        "qb not updated: {info}"
    );
    assert_eq!(info["namespace"], NS_B, "{info}");

    // A does all of it on qa.
    produce(&server, a, "qa", &["a1", "a2"]).await;
    let (p, ids) = lease(&server, a, "qa", 2).await;
    assert_eq!(ids.len(), 2, "a leased its two items");
    server
        .call(
            "/v1/queue.complete",
            a,
            &json!({"queue_name": "qa", "partition": p, "request_timeout": "5s", "ids": [ids[0]]}),
        )
        .await
        .ok();
    server
        .call(
            "/v1/queue.retry",
            a,
            &json!({"queue_name": "qa", "partition": p, "items": [{"id": ids[1]}]}),
        )
        .await
        .ok();
    assert_eq!(queue_totals(&server, a, "qa").await, (1, 0));
    // Lessor's extension routes work on A's own queue.
    let browsed = server
        .call(
            "/v1/queue.browse",
            a,
            &json!({"queue_name": "qa", "partition": p}),
        )
        .await
        .ok();
    assert_eq!(browsed["items"].as_array().map(Vec::len), Some(1), "{browsed}");
    server
        .call("/v1/queue.pause", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    server
        .call("/v1/queue.resume", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    server
        .call("/v1/redrive.list", a, &json!({"dead_queue": "qa"}))
        .await
        .ok();
    let listed = server
        .call("/v1/storage/items.list", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "{listed}");
    server
        .call("/v1/storage/scheduled.list", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    server
        .call(
            "/v1/queues.update",
            a,
            &json!({"queue_name": "qa", "max_attempts": 9}),
        )
        .await
        .ok();
    let info = server
        .call("/v1/queues.info", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    assert_eq!(info["max_attempts"], 9, "{info}");
    assert_eq!(info["namespace"], NS_A, "{info}");
    server
        .call("/v1/queue.reload", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    server
        .call(
            "/v1/storage/items.import",
            a,
            &json!({"queue_name": "qa", "items": [{"payload": "eA=="}]}),
        )
        .await
        .ok();
    assert_eq!(queue_totals(&server, a, "qa").await.0, 2);
    let listed = server
        .call("/v1/storage/items.list", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    let first = listed["items"][0]["id"].as_str().unwrap_or_default().to_string();
    server
        .call(
            "/v1/storage/items.delete",
            a,
            &json!({"queue_name": "qa", "ids": [first]}),
        )
        .await
        .ok();
    assert_eq!(queue_totals(&server, a, "qa").await.0, 1);
    server
        .call(
            "/v1/queue.clear",
            a,
            &json!({"queue_name": "qa", "queue": true, "scheduled": true, "destructive": true}),
        )
        .await
        .ok();
    assert_eq!(queue_totals(&server, a, "qa").await, (0, 0));
    // Each sees only its own namespace's queues.
    assert_eq!(queue_names(&server, a, NS_A).await, ["qa"]);
    assert_eq!(queue_names(&server, b, NS_B).await, ["qb"]);
    server
        .call("/v1/queues.delete", a, &json!({"queue_name": "qa"}))
        .await
        .ok();
    assert!(queue_names(&server, a, NS_A).await.is_empty());
    // The administrator sees both namespaces.
    let admin = Cred::Key(&t.admin);
    assert_eq!(queue_names(&server, admin, NS_B).await, ["qb"]);
    assert!(!t.user_a.is_empty() && !t.user_b.is_empty());
    assert_no_secrets(&server, &[&t.admin, &t.key_a, &t.key_b]);
}

/// A key scoped to namespace A cannot act in B even though its user is bound there; an unscoped key of the same
/// user can (so the refusal is the scope's doing).
async fn scoped_key_stays_in_its_namespace(backend: Backend) {
    let Some(env) = Env::new(backend).await else {
        return;
    };
    let (server, admin) = env.start_closed("s").await;
    let t = tenants(&server, admin).await;
    let admin = Cred::Key(&t.admin);
    bind(&server, admin, NS_B, OWNER, &t.user_a).await;
    let free = create_key(&server, admin, &t.user_a, "", None).await.secret;
    let (scoped, free, b) = (Cred::Key(&t.key_a), Cred::Key(&free), Cred::Key(&t.key_b));
    create_queue(&server, b, "qb", NS_B).await.ok();
    produce(&server, b, "qb", &["b1"]).await;

    // Through its binding in B, user a may use qb, with its unscoped key.
    assert_eq!(queue_totals(&server, free, "qb").await, (1, 0));
    assert_eq!(queue_names(&server, free, NS_B).await, ["qb"]);
    // Its scoped key may not.
    for (path, body) in [
        ("/v1/queue.stats", json!({"queue_name": "qb"})),
        ("/v1/queues.info", json!({"queue_name": "qb"})),
        (
            "/v1/queue.produce",
            json!({"queue_name": "qb", "request_timeout": "5s", "items": [{"utf8": "x"}]}),
        ),
        (
            "/v1/queue.lease",
            json!({"queue_name": "qb", "batch_size": 1, "client_id": "a", "request_timeout": "1s"}),
        ),
        ("/v1/queues.list", json!({"namespace": NS_B})),
        ("/v1/queues.delete", json!({"queue_name": "qb"})),
        (
            "/v1/queues.create",
            json!({"queue_name": "qa-in-b", "namespace": NS_B, "lease_timeout": "1m", "expire_timeout": "1h", "requested_partitions": 1}),
        ),
    ] {
        server
            .call(path, scoped, &body)
            .await
            .err(403, "access denied")
            .message_is("access denied");
    }
    assert_eq!(queue_totals(&server, b, "qb").await, (1, 0), "qb untouched");
    // In its own namespace the scoped key works.
    create_queue(&server, scoped, "qa", NS_A).await.ok();
    assert_eq!(queue_names(&server, scoped, NS_A).await, ["qa"]);
}

/// Deleting a key or its user revokes it at once; an expiring key works until its expiry, then fails.
async fn revocation_and_expiry(backend: Backend) {
    let Some(env) = Env::new(backend).await else {
        return;
    };
    let (server, admin) = env.start_closed("s").await;
    let admin = Cred::Key(&admin);
    let user = create_user(&server, admin, "dave").await;
    bind(&server, admin, "_system", "NamespaceOwner", &user).await;
    create_queue(&server, admin, "q1", "").await.ok();
    let list = json!({});

    // A deleted key is refused on the next request.
    let k1 = create_key(&server, admin, &user, "", None).await;
    server
        .call("/v1/queues.list", Cred::Key(&k1.secret), &list)
        .await
        .ok();
    server
        .call("/v1/apikeys.delete", admin, &json!({"id": k1.id}))
        .await
        .ok();
    server
        .call("/v1/queues.list", Cred::Key(&k1.secret), &list)
        .await
        .err(401, "api key does not exist")
        .message_is("api key does not exist");

    // A deleted user's keys are refused.
    let k2 = create_key(&server, admin, &user, "", None).await;
    let k3 = create_key(&server, admin, &user, "", None).await;
    for k in [&k2, &k3] {
        server
            .call("/v1/queues.list", Cred::Key(&k.secret), &list)
            .await
            .ok();
    }
    server
        .call("/v1/users.delete", admin, &json!({"id": user}))
        .await
        .ok();
    for k in [&k2, &k3] {
        server
            .call("/v1/queues.list", Cred::Key(&k.secret), &list)
            .await
            .err(401, "api key does not exist");
    }

    // A key past its expiry is refused with its own message; before that it works.
    let user = create_user(&server, admin, "erin").await;
    bind(&server, admin, "_system", "NamespaceOwner", &user).await;
    server
        .call(
            "/v1/apikeys.create",
            admin,
            &json!({"user_id": user, "expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await
        .err(400, "expires_at is invalid");
    let expiry = SystemTime::now() + Duration::from_secs(3);
    let k4 = create_key(&server, admin, &user, "", Some(expiry)).await;
    let key = Cred::Key(&k4.secret);
    server.call("/v1/queues.list", key, &list).await.ok();
    let refused = eventually("the key expires", Duration::from_secs(15), || async {
        let r = server.call("/v1/queues.list", key, &list).await;
        if r.status == 401 {
            Ok(r)
        } else {
            Err(format!("{} {}", r.status, r.raw))
        }
    })
    .await;
    assert!(
        SystemTime::now() >= expiry,
        "refused before its expiry: {}",
        refused.raw
    );
    refused
        .err(401, "api key has expired")
        .message_is("api key has expired");
}

/// Headers that are not `Bearer <key>` and keys that are not keys.
async fn malformed_credentials(backend: Backend) {
    let Some(env) = Env::new(backend).await else {
        return;
    };
    let (server, admin) = env.start_closed("s").await;
    let list = json!({});
    for (header, message) in [
        (&b"Bearer garbage"[..], "api key is invalid"),
        (b"Bearer qtr-live-short", "api key is invalid"),
        (
            b"Bearer qtr-BAD-0123456789012345678901234567890123456789012",
            "api key is invalid",
        ),
        (
            b"Bearer qtr-live-0123456789012345678901234567890123456789012!",
            "api key is invalid",
        ),
        (b"Basic xyz", "invalid authorization header format"),
        (b"Basic YWRtaW46c2VjcmV0", "invalid authorization header format"),
        (b"bearer garbage", "invalid authorization header format"),
        (b"garbage", "invalid authorization header format"),
        (
            b"Bearer qtr-live-\xc3\xbc\xc3\xbc",
            "invalid authorization header format",
        ),
        // Well formed, but nobody's.
        (
            b"Bearer qtr-live-0123456789012345678901234567890123456789012",
            "api key does not exist",
        ),
    ] {
        server
            .call("/v1/queues.list", Cred::Header(header), &list)
            .await
            .err(401, message)
            .message_is(message);
    }
    // The admin key with the wrong scheme is refused too, and then works as it should.
    server
        .call(
            "/v1/queues.list",
            Cred::Header(format!("Basic {admin}").as_bytes()),
            &list,
        )
        .await
        .err(401, "invalid authorization header format");
    server
        .call("/v1/queues.list", Cred::Key(&admin), &list)
        .await
        .ok();
    drop(server);

    // With auth off (`driver: none`), a header of the wrong shape is still refused, as Querator does; any bearer
    // token passes.
    let server = env.start("none", "{ driver: none }").await;
    server
        .call("/v1/queues.list", Cred::Header(b"Basic xyz"), &list)
        .await
        .err(401, "invalid authorization header format")
        .message_is("invalid authorization header format");
    server
        .call("/v1/queues.list", Cred::Header(b"Bearer garbage"), &list)
        .await
        .ok();
    server.call("/v1/queues.list", Cred::Anonymous, &list).await.ok();
}

/// Open door: anonymous administers until its Admin binding in `_system` is deleted; then 401, also after a
/// restart.
async fn open_door_closes(backend: Backend) {
    let Some(env) = Env::new(backend).await else {
        return;
    };
    let door = "{ driver: internal, open-door: true }";
    let mut server = env.start("s1", door).await;
    let anon = Cred::Anonymous;
    let user = create_user(&server, anon, "operator").await;
    bind(&server, anon, "_system", "Admin", &user).await;
    let key = create_key(&server, anon, &user, "", None).await.secret;
    create_queue(&server, anon, "q1", "").await.ok();
    let bindings = server
        .call("/v1/rolebindings.list", anon, &json!({"namespace": "_system"}))
        .await
        .ok();
    let anonymous_bound = bindings["items"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| b["user_id"] == "anonymous");
    assert!(
        anonymous_bound,
        "the open door is a binding of anonymous: {bindings}"
    );

    server
        .call(
            "/v1/rolebindings.delete",
            anon,
            &json!({"namespace": "_system", "role_name": "Admin", "user_id": "anonymous"}),
        )
        .await
        .ok();
    for (path, body) in [
        ("/v1/queues.list", json!({})),
        ("/v1/users.create", json!({"username": "late"})),
        ("/v1/queue.stats", json!({"queue_name": "q1"})),
    ] {
        server
            .call(path, anon, &body)
            .await
            .err(401, "authentication required");
    }
    // The operator's key still administers.
    assert_eq!(queue_names(&server, Cred::Key(&key), "").await, ["q1"]);

    if backend.durable() {
        // A restart with the same configuration does not reopen the door.
        server.kill();
        let server = env.start("s2", door).await;
        server
            .call("/v1/queues.list", anon, &json!({}))
            .await
            .err(401, "authentication required");
        assert_eq!(queue_names(&server, Cred::Key(&key), "").await, ["q1"]);
    }
}

/// No key, key hash or `Authorization` value appears in a response (but the one creating the key) or in the
/// server's debug log.
async fn secrets_stay_out_of_answers_and_logs(backend: Backend) {
    let Some(env) = Env::new(backend).await else {
        return;
    };
    let (server, admin) = env.start_closed("s").await;
    let k = Cred::Key(&admin);
    let user = create_user(&server, k, "frank").await;
    let created = server
        .call(
            "/v1/apikeys.create",
            k,
            &json!({"user_id": user, "name": "frank's"}),
        )
        .await
        .ok();
    let key = created["key"].as_str().unwrap_or_default().to_string();
    assert!(key.starts_with("qtr-"), "{created}");
    let unknown = "qtr-live-Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp9Oo8Nn7Mm6";
    let garbage = "garbage-token-Hj38dKq";
    let basic = "Basic c2VjcmV0LXVzZXI6aHVudGVyMg==";
    let secrets = [
        admin.as_str(),
        key.as_str(),
        unknown,
        garbage,
        "c2VjcmV0LXVzZXI6aHVudGVyMg",
    ];
    let mut answers = Vec::new();
    let creds: [(&str, Cred<'_>); 6] = [
        ("admin", k),
        ("frank", Cred::Key(&key)),
        ("unknown", Cred::Key(unknown)),
        ("garbage", Cred::Key(garbage)),
        ("basic", Cred::Header(basic.as_bytes())),
        ("anonymous", Cred::Anonymous),
    ];
    for (_, cred) in creds {
        for (path, body) in [
            (
                "/v1/queues.create",
                json!({"queue_name": "q1", "lease_timeout": "1m", "expire_timeout": "1h", "requested_partitions": 1}),
            ),
            ("/v1/queues.list", json!({})),
            ("/v1/queue.stats", json!({"queue_name": "q1"})),
            (
                "/v1/queue.produce",
                json!({"queue_name": "q1", "request_timeout": "5s", "items": [{"utf8": "x"}]}),
            ),
            (
                "/v1/queue.produce",
                json!({"queue_name": "nope", "request_timeout": "5s"}),
            ),
            ("/v1/users.list", json!({})),
            ("/v1/apikeys.list", json!({})),
            ("/v1/apikeys.list", json!({"user_id": user})),
            ("/v1/rolebindings.list", json!({})),
            ("/v1/apikeys.create", json!({"user_id": "nobody"})),
            ("/v1/no.such", json!({})),
        ] {
            answers.push(server.call(path, cred, &body).await);
        }
        // Bodies that do not decode.
        answers.push(server.call("/v1/queues.list", cred, &json!([1, 2])).await);
    }
    // The key list names the key by its prefix only.
    let listed = server
        .call("/v1/apikeys.list", k, &json!({"user_id": user}))
        .await
        .ok();
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1), "{listed}");
    let prefix = listed["items"][0]["prefix"].as_str().unwrap_or_default();
    assert!(key.starts_with(prefix) && prefix.len() < key.len(), "{listed}");
    let hashes = [hash(&admin), hash(&key)];
    for a in &answers {
        for s in secrets.iter().copied().chain(hashes.iter().map(String::as_str)) {
            assert!(
                !a.raw.contains(s),
                "{}: the answer carries a secret: {}",
                a.what,
                a.raw
            );
        }
    }
    assert!(
        answers.iter().any(|a| a.status == 401) && answers.iter().any(|a| a.status == 200),
        "the requests were both refused and served"
    );
    assert_no_secrets(&server, &secrets);
}

/// The stored form of a key (as the auth layer hashes it), which must not leak either.
fn hash(key: &str) -> String {
    lessor_core::auth::key::hash(key)
}

/// Asserts that the server's log holds none of `secrets` (nor their hashes), no `Authorization` value and no panic.
#[track_caller]
fn assert_no_secrets(server: &Server, secrets: &[&str]) {
    let log = server.log_text();
    assert!(!log.is_empty(), "the server logged nothing");
    for s in secrets {
        assert!(
            !log.contains(s),
            "the log holds a secret ({}...)",
            &s[..s.len().min(12)]
        );
        assert!(!log.contains(&hash(s)), "the log holds a key hash");
    }
    for line in log.lines() {
        let lower = line.to_ascii_lowercase();
        assert!(
            !lower.contains("bearer ") && !lower.contains("basic "),
            "the log holds an authorization value: {line}"
        );
        assert!(
            !lower.contains("panicked") && !lower.contains("stack backtrace"),
            "the server panicked: {line}"
        );
    }
}

macro_rules! on_backend {
    ($backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name($backend).await
            }
        )*
    };
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod memory {
            on_backend!(super::Backend::Memory; $($name),*);
        }
        #[cfg(feature = "fjall")]
        mod fjall {
            on_backend!(super::Backend::Fjall; $($name),*);
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            on_backend!(super::Backend::Postgres; $($name),*);
        }
    };
}

on_every_backend!(
    closed_door,
    tenants_are_isolated,
    scoped_key_stays_in_its_namespace,
    revocation_and_expiry,
    malformed_credentials,
    open_door_closes,
    secrets_stay_out_of_answers_and_logs,
);

// ---- several servers on one PostgreSQL database -----------------------------------------------------------------

/// A key made through server 1 works on server 2; deleting it (or its user) through server 1 makes server 2 refuse
/// it within 5 s, although server 2 had it cached.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_servers_share_keys_and_revocations() {
    let Some(env) = Env::new(Backend::Postgres).await else {
        return;
    };
    let (one, admin) = env.start_closed("one").await;
    let file = std::fs::read(env.key_file()).expect("key file");
    let two = env.start("two", &env.closed_door()).await;
    assert_eq!(
        std::fs::read(env.key_file()).expect("key file"),
        file,
        "the second server wrote no key"
    );
    let admin = Cred::Key(&admin);
    assert_eq!(
        count_users(&two, admin, "admin").await,
        1,
        "one admin for both servers"
    );
    let user = create_user(&one, admin, "gina").await;
    bind(&one, admin, "_system", "NamespaceOwner", &user).await;
    create_queue(&one, admin, "shared", "").await.ok();
    let list = json!({});

    // Revoking a key.
    let k = create_key(&one, admin, &user, "", None).await;
    let key = Cred::Key(&k.secret);
    assert_eq!(
        queue_names(&two, key, "").await,
        ["shared"],
        "server 2 knows the key (and caches it)"
    );
    two.call("/v1/queues.list", key, &list).await.ok();
    one.call("/v1/apikeys.delete", admin, &json!({"id": k.id}))
        .await
        .ok();
    let t0 = Instant::now();
    one.call("/v1/queues.list", key, &list)
        .await
        .err(401, "api key does not exist");
    let took = refused_within(&two, key, Duration::from_secs(5)).await;
    println!("server 2 refused the deleted key after {took:?}");
    assert!(t0.elapsed() >= took);

    // Deleting the user.
    let k = create_key(&one, admin, &user, "", None).await;
    let key = Cred::Key(&k.secret);
    two.call("/v1/queues.list", key, &list).await.ok();
    one.call("/v1/users.delete", admin, &json!({"id": user}))
        .await
        .ok();
    let took = refused_within(&two, key, Duration::from_secs(5)).await;
    println!("server 2 refused the deleted user's key after {took:?}");
}

/// Polls `server` with `key` until it answers 401 `api key does not exist`; fails unless that happens within
/// `limit`. Returns how long it took.
#[cfg(feature = "postgres")]
async fn refused_within(server: &Server, key: Cred<'_>, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let answer = eventually("the other server refuses the key", limit * 2, || async {
        let r = server.call("/v1/queues.list", key, &json!({})).await;
        if r.status == 200 {
            Err(format!("still accepted after {:?}", t0.elapsed()))
        } else {
            Ok(r)
        }
    })
    .await;
    let took = t0.elapsed();
    answer.err(401, "api key does not exist");
    assert!(
        took <= limit,
        "the other server refused the key only after {took:?}"
    );
    took
}

/// Two servers of one database starting at the same moment, with the door closed: one admin is created, and the
/// key file holds its key (never a key the store did not take), whether they share the key file's path or each
/// has its own (then the loser's file is removed).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_servers_starting_together_agree_on_one_admin_key() {
    let Some(env) = Env::new(Backend::Postgres).await else {
        return;
    };
    // The same path.
    let closed = env.closed_door();
    let (one, two) = tokio::join!(env.start("one", &closed), env.start("two", &closed));
    let key = admin_key(&env.key_file());
    for s in [&one, &two] {
        s.call("/v1/queues.list", Cred::Key(&key), &json!({})).await.ok();
    }
    drop((one, two));

    // Paths of their own, on a fresh database.
    let Some(env) = Env::new(Backend::Postgres).await else {
        return;
    };
    let own = |name: &str| {
        format!(
            "{{ driver: internal, open-door: false, bootstrap-key-file: {} }}",
            quoted(&env.path(&format!("{name}.key")))
        )
    };
    let (c1, c2) = (own("one"), own("two"));
    let (one, two) = tokio::join!(env.start("one", &c1), env.start("two", &c2));
    let files: Vec<PathBuf> = ["one.key", "two.key"]
        .iter()
        .map(|f| env.path(f))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(files.len(), 1, "one key file, the winner's: {files:?}");
    let key = admin_key(&files[0]);
    for s in [&one, &two] {
        s.call("/v1/queues.list", Cred::Key(&key), &json!({})).await.ok();
    }
}

/// A bootstrap key file that holds something else is never overwritten (the server refuses to start, naming the
/// file); an empty one, created ahead to set its owner, gets the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_key_file_is_never_clobbered() {
    let Some(env) = Env::new(Backend::Memory).await else {
        return;
    };
    std::fs::write(env.key_file(), "my notes\n").expect("write");
    let config = env.path("c.yaml");
    std::fs::write(
        &config,
        format!("{}auth-backend: {}\n", env.storage_yaml(), env.closed_door()),
    )
    .expect("write the config");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lessor"))
            .arg("server")
            .arg("--config")
            .arg(&config)
            .arg("--address")
            .arg("127.0.0.1:0")
            .env_remove("LESSOR_CONFIG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the server stops by itself")
    .expect("run the server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the server refused to start");
    assert!(
        format!("{stdout}{stderr}").contains("does not hold an API key"),
        "the error names the problem: {stdout}{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(env.key_file()).expect("read"),
        "my notes\n"
    );

    std::fs::write(env.key_file(), "").expect("truncate");
    std::fs::set_permissions(env.key_file(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (server, key) = env.start_closed("s").await;
    let mode = std::fs::metadata(env.key_file())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    server
        .call("/v1/queues.list", Cred::Key(&key), &json!({}))
        .await
        .ok();
}
