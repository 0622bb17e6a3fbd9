//! Black-box tests of the dashboard's server side: the files at `/ui` and their security headers, `ui: false`,
//! `/v1/queue.history` (samples after traffic, the same errors and permission checks as `queue.stats`),
//! `/v1/queues.overview` (every figure of the overview in one request, filtered like `queues.list`), the
//! `oldest_ready_age` of `queue.stats` (only when asked), and `/v1/auth.whoami`.
//!
//! A real server on port 0 over memory storage (the history sampler runs on a timer; the oldest-age tests move a
//! manual clock instead of sleeping).

use std::time::Duration;

use lessor_client::routes::{
    ApiKeysCreate, AuthWhoami, NamespacesCreate, QueueHistory, QueuesOverview, RoleBindingsCreate,
    RolesCreate, ServerInfo, UsersCreate,
};
use lessor_client::{proto as pb, Client, ClientError};
use lessor_core::time::ManualClock;
use lessor_server::{Config, RunningServer};
use lessor_testkit::eventually::poll_until;

async fn start(config: &Config) -> (RunningServer, Client) {
    lessor_testkit::server::start(config, None).await
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
        .get(url)
        .send()
        .await
        .expect("GET")
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn ui_files_are_served_with_security_headers_and_no_inline_code() {
    let (srv, _c) = start(&Config::memory()).await;
    let base = srv.endpoint();
    let r = get(&format!("{base}/ui")).await;
    assert_eq!(r.status().as_u16(), 308);
    assert_eq!(header(&r, "location"), "/ui/");
    let mut total = 0;
    for (path, ct) in [
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ] {
        let r = get(&format!("{base}{path}")).await;
        assert_eq!(r.status().as_u16(), 200, "{path}");
        assert!(header(&r, "content-type").starts_with(ct), "{path}");
        let csp = header(&r, "content-security-policy");
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(header(&r, "x-frame-options"), "DENY", "{path}");
        assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
        assert!(header(&r, "set-cookie").is_empty(), "{path}");
        let body = r.text().await.expect("body");
        total += body.len();
        if path == "/ui/" {
            // Every script and style is a file of its own: the CSP forbids inline ones.
            assert!(!body.contains("<script>"), "inline script in index.html");
            assert!(!body.contains("<style"), "inline style in index.html");
            assert!(!body.contains(" style="), "style attribute in index.html");
            assert!(!body.contains(" onclick="), "inline handler in index.html");
        }
    }
    assert!(total < 300_000, "first load is {total} bytes");
    srv.stop().await;
}

#[tokio::test]
async fn ui_false_leaves_the_dashboard_out_and_unknown_keys_are_refused() {
    let mut config = Config::memory();
    config.ui = Some(false);
    let (srv, _c) = start(&config).await;
    let r = get(&format!("{}/ui/", srv.endpoint())).await;
    // No dashboard route with ui: false, so Querator's answer to a GET outside /health and /metrics.
    assert_eq!(r.status().as_u16(), 400, "no dashboard route with ui: false");
    let r = get(&format!("{}/health", srv.endpoint())).await;
    assert_eq!(r.status().as_u16(), 200);
    srv.stop().await;

    assert!(!Config::from_yaml("ui: false\n").expect("ui: false").ui_enabled());
    assert!(Config::from_yaml("ui: true\n").expect("ui: true").ui_enabled());
    assert!(Config::from_yaml("address: 127.0.0.1:0\n")
        .expect("no ui key")
        .ui_enabled());
    let e = Config::from_yaml("ui: maybe\n").expect_err("ui must be a boolean");
    assert!(e.to_string().contains("ui"), "{e}");
    let e = Config::from_yaml("uii: false\n").expect_err("unknown key");
    assert!(e.to_string().contains("uii"), "{e}");
}

fn produce(queue: &str, payloads: &[&str]) -> pb::QueueProduceRequest {
    pb::QueueProduceRequest {
        queue_name: queue.into(),
        request_timeout: "5s".into(),
        items: payloads
            .iter()
            .map(|p| pb::QueueProduceItem {
                utf8: (*p).into(),
                ..Default::default()
            })
            .collect(),
    }
}

#[tokio::test]
async fn server_info_summarises_the_configuration_without_secrets() {
    let (srv, c) = start(&Config::memory()).await;
    let info = c
        .call::<ServerInfo>(&pb::ServerInfoRequest {})
        .await
        .expect("server.info");
    assert_eq!(info.version, lessor_server::VERSION);
    assert_eq!(info.queue_storage, "memory");
    assert_eq!(info.partition_storage.len(), 1);
    assert_eq!(info.partition_storage[0].name, "memory-0");
    assert_eq!(info.partition_storage[0].driver, "memory");
    assert_eq!(info.auth_backend, "none");
    assert!(!info.tls);
    srv.stop().await;

    // A PostgreSQL connection string (with its password) never shows.
    #[cfg(feature = "postgres")]
    {
        let config = lessor_testkit::server::postgres_config("postgres://u:s3cret@127.0.0.1:1/db");
        let options = lessor_server::ServeOptions::from_config(&config);
        let json = String::from_utf8(lessor_proto::encode(
            lessor_proto::Encoding::Json,
            &options.summary,
        ))
        .expect("utf-8");
        assert!(!json.contains("s3cret") && !json.contains("127.0.0.1"), "{json}");
        assert!(json.contains("postgres"), "{json}");
    }
}

#[tokio::test]
async fn queue_history_records_rates_and_depths_after_traffic() {
    let (srv, c) = start(&Config::memory()).await;
    lessor_testkit::server::create_queue(&c, "hist", |_| {}).await;
    c.queue_produce(&produce("hist", &["a", "b", "c"]))
        .await
        .expect("produce");
    let req = pb::QueueHistoryRequest {
        queue_name: "hist".into(),
    };
    let seen = poll_until(Duration::from_secs(15), Duration::from_millis(250), || async {
        let h = c.call::<QueueHistory>(&req).await.expect("history");
        let produced: i64 = h.samples.iter().map(|s| s.produced).sum();
        let last_ready = h.samples.last().map(|s| s.ready).unwrap_or(0);
        if produced == 3 && last_ready == 3 {
            Ok(h)
        } else {
            Err(format!("produced {produced}, ready {last_ready}"))
        }
    })
    .await
    .expect("a sample with the 3 produced items");
    assert_eq!(seen.interval_ms, 2000);
    assert!(seen.samples.windows(2).all(|w| w[0].time_ms < w[1].time_ms));

    let missing = c
        .call::<QueueHistory>(&pb::QueueHistoryRequest {
            queue_name: "nope".into(),
        })
        .await;
    match missing {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(code, 400);
            assert!(message.starts_with("queue does not exist"), "{message}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
    srv.stop().await;
}

/// A key for a new user `user` who may do everything with the queues of `namespace` and nothing elsewhere.
async fn namespace_key(admin: &Client, namespace: &str, user: &str) -> String {
    admin
        .call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: namespace.into(),
            name: "operator".into(),
            permissions: [
                "queue.list",
                "queue.stats",
                "queue.create",
                "queue.update",
                "queue.delete",
                "queue.clear",
                "queue.produce",
                "queue.lease",
                "queue.complete",
                "queue.retry",
            ]
            .iter()
            .map(|p| (*p).to_string())
            .collect(),
        })
        .await
        .expect("role");
    let id = admin
        .call::<UsersCreate>(&pb::UserCreateRequest {
            username: user.into(),
            ..Default::default()
        })
        .await
        .expect("user")
        .id;
    admin
        .call::<RoleBindingsCreate>(&pb::RoleBindingCreateRequest {
            namespace: namespace.into(),
            role_name: "operator".into(),
            user_id: id.clone(),
        })
        .await
        .expect("binding");
    admin
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: id,
            ..Default::default()
        })
        .await
        .expect("key")
        .key
}

#[tokio::test]
async fn queue_history_is_checked_like_queue_stats() {
    let yaml = "queue-storage:\n  driver: memory\n\
                partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n\
                auth-backend:\n  driver: internal\n";
    let (srv, admin) = start(&Config::from_yaml(yaml).expect("config")).await;
    for name in ["team-a", "team-b"] {
        admin
            .call::<NamespacesCreate>(&pb::NamespaceInfo {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("namespace");
    }
    lessor_testkit::server::create_queue(&admin, "qa", |q| q.namespace = "team-a".into()).await;
    lessor_testkit::server::create_queue(&admin, "qb", |q| q.namespace = "team-b".into()).await;
    let key = namespace_key(&admin, "team-a", "alice").await;
    let alice = Client::new(&srv.endpoint()).expect("client").with_api_key(key);
    let ask = |q: &str| pb::QueueHistoryRequest { queue_name: q.into() };
    alice
        .call::<QueueHistory>(&ask("qa"))
        .await
        .expect("own namespace");
    for q in ["qb", "nope"] {
        match alice.call::<QueueHistory>(&ask(q)).await {
            Err(ClientError::Api { code, .. }) => assert_eq!(code, 403, "{q}"),
            other => panic!("{q}: expected 403, got {other:?}"),
        }
    }
    let bad = Client::new(&srv.endpoint())
        .expect("client")
        .with_api_key("not-a-key");
    match bad.call::<QueueHistory>(&ask("qa")).await {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, 401),
        other => panic!("expected 401, got {other:?}"),
    }
    srv.stop().await;
}

async fn post_json(
    base: &str,
    path: &str,
    key: Option<&str>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// The overview answers, in one request, what the dashboard used to assemble from `queues.list` plus a
/// `queue.stats` and a `queue.history` per queue: depths, dead-letter depth, rates, the oldest item's age, paused;
/// paged by pivot and limit.
#[tokio::test]
async fn queues_overview_reports_every_figure_in_one_request() {
    let clock = ManualClock::starting_now();
    let (srv, c) =
        lessor_testkit::server::start(&Config::memory(), Some(std::sync::Arc::new(clock.clone()))).await;
    lessor_testkit::server::create_queue(&c, "ov-dlq", |_| {}).await;
    lessor_testkit::server::create_queue(&c, "ov", |q| {
        q.dead_queue = "ov-dlq".into();
        q.lease_timeout = "5m".into();
    })
    .await;
    c.queue_produce(&produce("ov", &["a", "b", "c"]))
        .await
        .expect("produce");
    let mut later = produce("ov", &["later"]);
    later.items[0].enqueue_at = Some(pb::Timestamp::new(4_000_000_000, 0));
    c.queue_produce(&later).await.expect("produce scheduled");
    c.queue_produce(&produce("ov-dlq", &["x", "y"]))
        .await
        .expect("produce dlq");
    clock.advance(Duration::from_secs(30));
    c.queue_lease(&pb::QueueLeaseRequest {
        queue_name: "ov".into(),
        batch_size: 1,
        client_id: "w".into(),
        request_timeout: "5s".into(),
    })
    .await
    .expect("lease");
    c.call::<lessor_client::routes::QueuePause>(&pb::QueuePauseRequest {
        queue_name: "ov".into(),
    })
    .await
    .expect("pause");
    let ask = pb::QueuesOverviewRequest::default();
    let ov = c.call::<QueuesOverview>(&ask).await.expect("overview");
    let names: Vec<&str> = ov.items.iter().map(|q| q.queue_name.as_str()).collect();
    assert_eq!(names, ["ov", "ov-dlq"]);
    assert_eq!(ov.next_pivot, "");
    let q = &ov.items[0];
    assert_eq!((q.ready, q.leased, q.scheduled), (2, 1, 1), "{q:?}");
    assert_eq!((q.dead_queue.as_str(), q.dead_depth), ("ov-dlq", 2), "{q:?}");
    assert_eq!(
        q.oldest_ready_age, "30s",
        "the items waited 30 s on the manual clock: {q:?}"
    );
    assert!(q.paused, "{q:?}");
    assert_eq!(q.error, "");
    let dlq = &ov.items[1];
    assert_eq!((dlq.ready, dlq.dead_queue.as_str(), dlq.paused), (2, "", false));

    // Rates come from the history ring, sampled every 2 s.
    let rated = poll_until(Duration::from_secs(15), Duration::from_millis(250), || async {
        let ov = c.call::<QueuesOverview>(&ask).await.expect("overview");
        let q = ov.items[0].clone();
        if q.produce_rate > 0.0 && q.lease_rate > 0.0 {
            Ok(q)
        } else {
            Err(format!("{q:?}"))
        }
    })
    .await
    .expect("rates after the produce and the lease");
    assert!(
        rated.produce_rate <= 4.0 / 2.0,
        "4 items over at least one 2 s sample: {rated:?}"
    );
    // The latency chart's series: the leased item had waited 30 s (manual clock) since it was produced.
    let h = c
        .call::<QueueHistory>(&pb::QueueHistoryRequest {
            queue_name: "ov".into(),
        })
        .await
        .expect("history");
    let waits: Vec<i64> = h
        .samples
        .iter()
        .map(|s| s.lease_age_ms)
        .filter(|&ms| ms > 0)
        .collect();
    assert_eq!(waits, [30_000], "{h:?}");

    // Paged like queues.list: the pivot is the first name of the next page.
    let first = c
        .call::<QueuesOverview>(&pb::QueuesOverviewRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 1);
    assert_eq!(first.next_pivot, "ov-dlq");
    let second = c
        .call::<QueuesOverview>(&pb::QueuesOverviewRequest {
            pivot: first.next_pivot.clone(),
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("page 2");
    assert_eq!(second.items[0].queue_name, "ov-dlq");
    assert_eq!(second.next_pivot, "");
    let (code, body) = post_json(
        &srv.endpoint(),
        "/v1/queues.overview",
        None,
        serde_json::json!({"limit": 1001}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["message"], "limit is invalid; cannot be greater than '1000'",
        "{body}"
    );
    srv.stop().await;
}

/// `queue.stats` reports each partition's oldest item only when the request asks: the JSON a Querator client
/// gets carries only Querator's keys, which its strict protojson decoder needs.
#[tokio::test]
async fn queue_stats_reports_the_oldest_age_only_when_asked() {
    let clock = ManualClock::starting_now();
    let (srv, c) =
        lessor_testkit::server::start(&Config::memory(), Some(std::sync::Arc::new(clock.clone()))).await;
    lessor_testkit::server::create_queue(&c, "st", |_| {}).await;
    c.queue_produce(&produce("st", &["a"])).await.expect("produce");
    clock.advance(Duration::from_secs(7));
    let base = srv.endpoint();
    let (code, plain) = post_json(
        &base,
        "/v1/queue.stats",
        None,
        serde_json::json!({"queue_name": "st"}),
    )
    .await;
    assert_eq!(code, 200, "{plain}");
    let part = &plain["logicalQueues"][0]["partitions"][0];
    assert_eq!(part["total"], 1, "{plain}");
    assert!(part.get("oldest_ready_age").is_none(), "not asked for: {plain}");
    let (code, asked) = post_json(
        &base,
        "/v1/queue.stats",
        None,
        serde_json::json!({"queue_name": "st", "with_oldest_age": true}),
    )
    .await;
    assert_eq!(code, 200, "{asked}");
    assert_eq!(
        asked["logicalQueues"][0]["partitions"][0]["oldest_ready_age"], "7s",
        "{asked}"
    );
    srv.stop().await;
}

/// A key allowed only `queue.list` in its namespace (no `queue.stats`).
async fn list_only_key(admin: &Client, namespace: &str, user: &str) -> String {
    admin
        .call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: namespace.into(),
            name: "lister".into(),
            permissions: vec!["queue.list".to_string()],
        })
        .await
        .expect("role");
    let id = admin
        .call::<UsersCreate>(&pb::UserCreateRequest {
            username: user.into(),
            ..Default::default()
        })
        .await
        .expect("user")
        .id;
    admin
        .call::<RoleBindingsCreate>(&pb::RoleBindingCreateRequest {
            namespace: namespace.into(),
            role_name: "lister".into(),
            user_id: id.clone(),
        })
        .await
        .expect("binding");
    admin
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: id,
            ..Default::default()
        })
        .await
        .expect("key")
        .key
}

/// Two namespaces, each with a queue holding items, and a key scoped to team-a.
async fn two_tenants() -> (RunningServer, Client, String) {
    let yaml = "queue-storage:\n  driver: memory\n\
                partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n\
                auth-backend:\n  driver: internal\n";
    let (srv, admin) = start(&Config::from_yaml(yaml).expect("config")).await;
    for name in ["team-a", "team-b"] {
        admin
            .call::<NamespacesCreate>(&pb::NamespaceInfo {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("namespace");
    }
    lessor_testkit::server::create_queue(&admin, "qa-dlq", |q| q.namespace = "team-a".into()).await;
    lessor_testkit::server::create_queue(&admin, "qa", |q| {
        q.namespace = "team-a".into();
        q.dead_queue = "qa-dlq".into();
    })
    .await;
    lessor_testkit::server::create_queue(&admin, "qb", |q| q.namespace = "team-b".into()).await;
    // A queue of team-a whose dead letters go to team-b's queue.
    lessor_testkit::server::create_queue(&admin, "qa-x", |q| {
        q.namespace = "team-a".into();
        q.dead_queue = "qb".into();
    })
    .await;
    for q in ["qa", "qb"] {
        admin
            .queue_produce(&produce(q, &["1", "2"]))
            .await
            .expect("produce");
    }
    let unscoped = namespace_key(&admin, "team-a", "alice").await;
    let alice = Client::new(&srv.endpoint())
        .expect("client")
        .with_api_key(unscoped);
    let whoami = alice
        .call::<AuthWhoami>(&pb::AuthWhoamiRequest {})
        .await
        .expect("whoami");
    let scoped = admin
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: whoami.user_id,
            namespace_scope: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("scoped key")
        .key;
    (srv, admin, scoped)
}

/// With auth on, the overview is filtered as `queues.list` is: a namespace-scoped key sees its namespace's queues
/// (with figures, as it may read their stats) and is refused another namespace or `_system` exactly like
/// `queues.list`; a key without `queue.stats` gets the rows without figures.
#[tokio::test]
async fn queues_overview_is_filtered_like_queues_list() {
    let (srv, admin, scoped) = two_tenants().await;
    let base = srv.endpoint();
    let (code, own) = post_json(
        &base,
        "/v1/queues.overview",
        Some(&scoped),
        serde_json::json!({"namespace": "team-a"}),
    )
    .await;
    assert_eq!(code, 200, "{own}");
    let names: Vec<&str> = own["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|q| q["queue_name"].as_str())
        .collect();
    assert_eq!(names, ["qa", "qa-dlq", "qa-x"], "{own}");
    // The dead-letter queue in team-b is named (the definition says so) but its depth is not shown to A.
    assert_eq!(own["items"][2]["dead_queue"], "qb", "{own}");
    assert!(own["items"][2].get("dead_depth").is_none(), "{own}");
    assert_eq!(
        own["items"][0]["ready"], "2",
        "figures for a key with queue.stats: {own}"
    );
    for other in [serde_json::json!({"namespace": "team-b"}), serde_json::json!({})] {
        let (code, body) = post_json(&base, "/v1/queues.overview", Some(&scoped), other.clone()).await;
        let (list_code, list_body) = post_json(&base, "/v1/queues.list", Some(&scoped), other.clone()).await;
        assert_eq!(code, 403, "{other}: {body}");
        assert_eq!(
            (code, &body),
            (list_code, &list_body),
            "{other}: overview and list refuse alike"
        );
        assert!(!body.to_string().contains("qb"), "{body}");
    }
    // The administrator sees team-b.
    let theirs = admin
        .call::<QueuesOverview>(&pb::QueuesOverviewRequest {
            namespace: "team-b".into(),
            ..Default::default()
        })
        .await
        .expect("admin overview");
    assert_eq!(theirs.items.len(), 1);
    assert_eq!(
        (theirs.items[0].queue_name.as_str(), theirs.items[0].ready),
        ("qb", 2)
    );
    let admin_a = admin
        .call::<QueuesOverview>(&pb::QueuesOverviewRequest {
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("admin overview of team-a");
    let depths: Vec<(&str, i64)> = admin_a
        .items
        .iter()
        .map(|q| (q.queue_name.as_str(), q.dead_depth))
        .collect();
    assert_eq!(
        depths,
        [("qa", 0), ("qa-dlq", 0), ("qa-x", 2)],
        "the administrator may read qb"
    );
    // queue.list without queue.stats: the queues, no figures.
    let lister = list_only_key(&admin, "team-a", "lister").await;
    let (code, listed) = post_json(
        &base,
        "/v1/queues.overview",
        Some(&lister),
        serde_json::json!({"namespace": "team-a"}),
    )
    .await;
    assert_eq!(code, 200, "{listed}");
    let row = &listed["items"][0];
    assert_eq!(row["queue_name"], "qa", "{listed}");
    assert!(
        row.get("ready").is_none() && row.get("dead_depth").is_none(),
        "no figures: {listed}"
    );
    assert_eq!(row["dead_queue"], "qa-dlq", "{listed}");
    assert_eq!(row["stats_hidden"], true, "{listed}");
    assert!(own["items"][0].get("stats_hidden").is_none(), "{own}");
    let (code, _) = post_json(
        &base,
        "/v1/queues.overview",
        Some("qtr-not-a-real-key"),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(code, 401);
    srv.stop().await;
}

/// `auth.whoami` names the caller, its key's scope and its permissions, never a secret; a bad key is a 401; with
/// auth off it says so.
#[tokio::test]
async fn whoami_names_the_caller_without_secrets() {
    let (srv, _admin, scoped) = two_tenants().await;
    let base = srv.endpoint();
    let (code, me) = post_json(&base, "/v1/auth.whoami", Some(&scoped), serde_json::json!({})).await;
    assert_eq!(code, 200, "{me}");
    assert_eq!(me["auth_enabled"], true, "{me}");
    assert_eq!(me["username"], "alice", "{me}");
    assert_eq!(me["namespace_scope"], "team-a", "{me}");
    assert!(me["key_id"].as_str().is_some_and(|k| !k.is_empty()), "{me}");
    assert_eq!(me["namespaces"][0]["namespace"], "team-a", "{me}");
    let perms = me["namespaces"][0]["permissions"].to_string();
    assert!(
        perms.contains("queue.stats") && perms.contains("queue.produce"),
        "{me}"
    );
    assert_eq!(me["namespaces"].as_array().map(Vec::len), Some(1), "{me}");
    let raw = me.to_string();
    assert!(!raw.contains(&scoped), "the key itself never comes back: {raw}");
    assert!(!raw.contains("hash"), "{raw}");
    for bad in ["qtr-not-a-real-key", "garbage"] {
        let (code, body) = post_json(&base, "/v1/auth.whoami", Some(bad), serde_json::json!({})).await;
        assert_eq!(code, 401, "{bad}: {body}");
    }
    srv.stop().await;
    let (srv, c) = start(&Config::memory()).await;
    let open = c
        .call::<AuthWhoami>(&pb::AuthWhoamiRequest {})
        .await
        .expect("whoami without auth");
    assert!(!open.auth_enabled);
    assert_eq!(open.username, "");
    srv.stop().await;
}

/// POSTs `body` to `path` with the given headers and no others but those reqwest always sends; returns the status.
async fn post_with(base: &str, path: &str, headers: &[(&str, &str)], body: &str) -> u16 {
    let mut req = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("POST").status().as_u16()
}

/// With auth off (the default) or an open door, anonymous requests may do anything, so a request a page of another
/// site makes a visitor's browser send needs no credentials: `fetch(url, {method: 'POST', mode: 'no-cors', headers:
/// {'Content-Type': 'application/x-www-form-urlencoded'}, body: '{"queue_name":"jobs"}'})` is a CORS "simple
/// request" (no preflight), which the server read as JSON and obeyed, deleting the queue (found by review). Such
/// requests are refused by what the browser says of them (`Sec-Fetch-Site`, or an `Origin` other than the server's
/// own); the dashboard's own requests, and clients that are not browsers, are served as before.
#[tokio::test]
async fn requests_a_browser_sends_for_another_site_are_refused() {
    let (srv, c) = start(&Config::memory()).await;
    let base = srv.endpoint();
    let host = base.trim_start_matches("http://").to_string();
    c.queues_create(&pb::QueueInfo {
        queue_name: "jobs".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("create");
    let delete = r#"{"queue_name":"jobs"}"#;
    let form = ("content-type", "application/x-www-form-urlencoded");
    let forged: [&[(&str, &str)]; 5] = [
        // A current browser: fetch() or a form from another site.
        &[
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
            form,
        ],
        // A sibling host of the same site is another origin too.
        &[
            ("origin", "https://a.example"),
            ("sec-fetch-site", "same-site"),
            form,
        ],
        // An older browser without Sec-Fetch-*: only Origin tells.
        &[("origin", "https://evil.example"), form],
        // A sandboxed frame or a file:// page.
        &[("origin", "null")],
        // No Content-Type at all (a Blob body) is read as JSON as well.
        &[
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ],
    ];
    for headers in forged {
        assert_eq!(
            post_with(&base, "/v1/queues.delete", headers, delete).await,
            403,
            "{headers:?}"
        );
    }
    let info = c
        .queues_info(&pb::QueuesInfoRequest {
            queue_name: "jobs".into(),
        })
        .await
        .expect("the queue is still there");
    assert_eq!(info.queue_name, "jobs");
    // The dashboard's own calls (same origin), and curl, Querator's clients and this crate's (no Origin), still
    // work.
    let own_origin = format!("http://{host}");
    let json = ("content-type", "application/json");
    let list = r#"{"limit":10}"#;
    for headers in [
        &[
            ("origin", own_origin.as_str()),
            ("sec-fetch-site", "same-origin"),
            json,
        ][..],
        &[("origin", own_origin.as_str()), json][..],
        &[("sec-fetch-site", "none"), json][..],
        &[form][..],
        &[][..],
    ] {
        assert_eq!(
            post_with(&base, "/v1/queues.list", headers, list).await,
            200,
            "{headers:?}"
        );
    }
    srv.stop().await;
}
