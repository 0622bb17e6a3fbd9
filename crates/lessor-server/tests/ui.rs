//! Black-box tests of the dashboard's server side: the files at `/ui` and their security headers, `ui: false`,
//! and `/v1/queue.history` (samples after traffic, the same errors and permission checks as `queue.stats`).
//!
//! A real server on port 0 over memory storage with the system clock (the history sampler runs on a timer).

use std::time::Duration;

use lessor_client::routes::{
    ApiKeysCreate, NamespacesCreate, QueueHistory, RoleBindingsCreate, RolesCreate, ServerInfo, UsersCreate,
};
use lessor_client::{proto as pb, Client, ClientError};
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
    assert_eq!(r.status().as_u16(), 501, "no dashboard route with ui: false");
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
