//! Black-box tests of the access-control routes (namespaces, users, API keys, roles, role bindings): the real server
//! on port 0 with `auth-backend: internal`, driven through the client in JSON and in protobuf. They check the
//! create/list/update/delete cycles, Querator's error codes and messages for reserved names, duplicates, unknown ids
//! and blocked deletions, that listings never carry key material, that JSON replies hold only Querator's fields, and
//! that with the door closed a request needs a key, the bootstrap key works and a minted key is checked.
//!
//! The full cycle runs in JSON and protobuf on memory storage, and in protobuf on fjall (feature `fjall`) and on
//! PostgreSQL (feature `postgres`, when `LESSOR_TEST_DATABASE_URL` is set), where the records live in the queue
//! storage's own tables.

use lessor_client::routes::{
    ApiKeysCreate, ApiKeysDelete, ApiKeysList, NamespacesCreate, NamespacesDelete, NamespacesList,
    NamespacesUpdate, RoleBindingsCreate, RoleBindingsDelete, RoleBindingsList, RolesCreate, RolesDelete,
    RolesList, RolesUpdate, UsersCreate, UsersDelete, UsersList,
};
use lessor_client::{proto as pb, Client, ClientError, Encoding};
use lessor_server::{Config, RunningServer};

const MEMORY: &str = "queue-storage:\n  driver: memory\n\
                      partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n";
const INTERNAL: &str = "auth-backend:\n  driver: internal\n";
const OPEN_DOOR: &str = concat!(
    "queue-storage:\n  driver: memory\n",
    "partition-storage:\n  - name: m\n    driver: memory\n    affinity: 1\n",
    "auth-backend:\n  driver: internal\n"
);

/// Queue storage and partitions in one store of `driver` with `config` (a YAML flow mapping).
#[cfg(any(feature = "fjall", feature = "postgres"))]
fn storage(driver: &str, config: &str) -> String {
    format!(
        "queue-storage:\n  driver: {driver}\n  config: {config}\n\
         partition-storage:\n  - name: s\n    driver: {driver}\n    affinity: 1\n    config: {config}\n"
    )
}

async fn start(yaml: &str) -> (RunningServer, Client) {
    let config = Config::from_yaml(yaml).expect("config");
    lessor_testkit::server::start(&config, None).await
}

/// The code and message of a refusal.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (i32, String) {
    match r {
        Err(ClientError::Api { code, message, .. }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, ClientError>, code: i32, starts: &str) {
    let (c, m) = refusal(r);
    assert_eq!(c, code, "{m}");
    assert!(m.starts_with(starts), "'{m}' should start with '{starts}'");
}

fn ns(name: &str, description: &str, tag: &str) -> pb::NamespaceInfo {
    pb::NamespaceInfo {
        name: name.into(),
        description: description.into(),
        api_key_tag: tag.into(),
        created_at: None,
    }
}

async fn namespaces(c: &Client) -> Vec<pb::NamespaceInfo> {
    c.call::<NamespacesList>(&pb::NamespacesListRequest::default())
        .await
        .expect("namespaces.list")
        .items
}

/// Every route, with its create/list/delete cycle and refusals, in one encoding, over the given storage section.
async fn every_route(enc: Encoding, storage: &str) {
    let (srv, c) = start(&format!("{storage}{INTERNAL}")).await;
    let c = c.with_encoding(enc);

    // ---- namespaces
    c.call::<NamespacesCreate>(&ns("team-a", "the A team", "teama"))
        .await
        .expect("create namespace");
    assert_refused(
        c.call::<NamespacesCreate>(&ns("team-a", "", "")).await,
        400,
        "namespace already exists; ",
    );
    assert_refused(
        c.call::<NamespacesCreate>(&ns("_mine", "", "")).await,
        400,
        "namespace name is reserved; ",
    );
    assert_refused(
        c.call::<NamespacesCreate>(&ns("", "", "")).await,
        400,
        "name is invalid; ",
    );
    assert_refused(
        c.call::<NamespacesCreate>(&ns("team-b", "", "Not-A-Tag")).await,
        400,
        "api_key_tag is invalid; ",
    );
    let listed = namespaces(&c).await;
    let names: Vec<&str> = listed.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["_system", "team-a"]);
    let created = listed[1].created_at.expect("created_at is set");
    assert_eq!(listed[1].description, "the A team");
    assert_eq!(listed[1].api_key_tag, "teama");
    // Update replaces description and tag but keeps the creation time (Querator loses it).
    c.call::<NamespacesUpdate>(&ns("team-a", "renamed", ""))
        .await
        .expect("update namespace");
    let after = namespaces(&c).await;
    assert_eq!(after[1].description, "renamed");
    assert_eq!(after[1].api_key_tag, "");
    assert_eq!(after[1].created_at, Some(created));
    assert_refused(
        c.call::<NamespacesUpdate>(&ns("nope", "", "")).await,
        453,
        "namespace does not exist; ",
    );
    assert_refused(
        c.call::<NamespacesUpdate>(&ns("_system", "", "")).await,
        400,
        "namespace name is reserved; ",
    );
    // Paging: pivot is inclusive, limit caps the page.
    let page = c
        .call::<NamespacesList>(&pb::NamespacesListRequest {
            pivot: "team-a".into(),
            limit: 1,
        })
        .await
        .expect("page");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].name, "team-a");

    // ---- users
    let alice = c
        .call::<UsersCreate>(&pb::UserCreateRequest {
            username: "alice".into(),
            email: "alice@example.com".into(),
            external_id: "ext-1".into(),
        })
        .await
        .expect("create user")
        .id;
    assert!(!alice.is_empty());
    assert_refused(
        c.call::<UsersCreate>(&pb::UserCreateRequest {
            username: "alice".into(),
            ..Default::default()
        })
        .await,
        400,
        "user already exists; ",
    );
    assert_refused(
        c.call::<UsersCreate>(&pb::UserCreateRequest::default()).await,
        400,
        "username is required; ",
    );
    let users = c
        .call::<UsersList>(&pb::UsersListRequest::default())
        .await
        .expect("users.list")
        .items;
    let a = users.iter().find(|u| u.id == alice).expect("alice is listed");
    assert_eq!(
        (a.username.as_str(), a.email.as_str(), a.external_id.as_str()),
        ("alice", "alice@example.com", "ext-1")
    );
    assert!(a.created_at.is_some());

    // ---- api keys
    let minted = c
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: alice.clone(),
            name: "ci".into(),
            namespace_scope: "team-a".into(),
            expires_at: None,
            key_tag: "ci".into(),
        })
        .await
        .expect("create key");
    assert!(minted.key.starts_with("qtr-ci-"), "{}", minted.key);
    assert_eq!(minted.key.len(), "qtr-ci-".len() + 43);
    assert!(
        minted.key.starts_with(&minted.prefix),
        "{} / {}",
        minted.key,
        minted.prefix
    );
    assert!(minted.prefix.len() < minted.key.len());
    assert_refused(
        c.call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: "no-such-user".into(),
            ..Default::default()
        })
        .await,
        453,
        "user does not exist; ",
    );
    assert_refused(
        c.call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: alice.clone(),
            expires_at: Some(pb::Timestamp::new(1, 0)),
            ..Default::default()
        })
        .await,
        400,
        "expires_at is invalid; ",
    );
    let keys = c
        .call::<ApiKeysList>(&pb::APIKeysListRequest {
            user_id: alice.clone(),
            ..Default::default()
        })
        .await
        .expect("apikeys.list")
        .items;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].id, minted.id);
    assert_eq!(keys[0].prefix, minted.prefix);
    assert_eq!(keys[0].namespace_scope, "team-a");
    assert_eq!(keys[0].name, "ci");
    assert!(keys[0].created_at.is_some());
    assert_eq!(keys[0].expires_at, None);
    assert_refused(
        c.call::<ApiKeysDelete>(&pb::APIKeysDeleteRequest { id: "nope".into() })
            .await,
        453,
        "api key does not exist; ",
    );

    // ---- roles
    let role_id = c
        .call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: "team-a".into(),
            name: "producer".into(),
            permissions: vec!["queue.produce".into()],
        })
        .await
        .expect("create role")
        .id;
    assert!(!role_id.is_empty());
    assert_refused(
        c.call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: "team-a".into(),
            name: "producer".into(),
            permissions: vec!["queue.produce".into()],
        })
        .await,
        400,
        "role already exists; ",
    );
    assert_refused(
        c.call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: "team-a".into(),
            name: "Admin".into(),
            permissions: vec!["queue.produce".into()],
        })
        .await,
        400,
        "cannot modify or delete standard role; ",
    );
    assert_refused(
        c.call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: "team-a".into(),
            name: "bad".into(),
            permissions: vec!["queue.*".into()],
        })
        .await,
        400,
        "permissions is invalid; ",
    );
    assert_refused(
        c.call::<RolesCreate>(&pb::RoleCreateRequest {
            namespace: "ghost".into(),
            name: "r".into(),
            permissions: vec!["queue.produce".into()],
        })
        .await,
        453,
        "namespace does not exist; ",
    );
    c.call::<RolesUpdate>(&pb::RoleUpdateRequest {
        namespace: "team-a".into(),
        name: "producer".into(),
        permissions: vec!["queue.produce".into(), "queue.stats".into()],
    })
    .await
    .expect("update role");
    let roles = c
        .call::<RolesList>(&pb::RolesListRequest {
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("roles.list")
        .items;
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0].id, role_id);
    assert_eq!(roles[0].namespace, "team-a");
    let mut perms = roles[0].permissions.clone();
    perms.sort();
    assert_eq!(perms, ["queue.produce", "queue.stats"]);
    assert_refused(
        c.call::<RolesUpdate>(&pb::RoleUpdateRequest {
            namespace: "team-a".into(),
            name: "ghost".into(),
            permissions: vec!["queue.produce".into()],
        })
        .await,
        453,
        "role does not exist; ",
    );
    // An empty namespace is `_system`, which holds the standard roles.
    let system: Vec<String> = c
        .call::<RolesList>(&pb::RolesListRequest::default())
        .await
        .expect("system roles")
        .items
        .into_iter()
        .map(|r| r.name)
        .collect();
    for std_role in ["Admin", "NamespaceOwner", "PublicViewer"] {
        assert!(system.iter().any(|r| r == std_role), "{std_role} in {system:?}");
    }

    // ---- role bindings
    let binding = c
        .call::<RoleBindingsCreate>(&pb::RoleBindingCreateRequest {
            namespace: "team-a".into(),
            role_name: "producer".into(),
            user_id: alice.clone(),
        })
        .await
        .expect("create binding")
        .id;
    assert_refused(
        c.call::<RoleBindingsCreate>(&pb::RoleBindingCreateRequest {
            namespace: "team-a".into(),
            role_name: "producer".into(),
            user_id: alice.clone(),
        })
        .await,
        400,
        "role binding already exists; ",
    );
    assert_refused(
        c.call::<RoleBindingsCreate>(&pb::RoleBindingCreateRequest {
            namespace: "team-a".into(),
            role_name: "producer".into(),
            user_id: "nobody".into(),
        })
        .await,
        453,
        "user does not exist; ",
    );
    let list = |filter: &str| {
        let req = pb::RoleBindingsListRequest {
            namespace: "team-a".into(),
            user_id_filter: filter.into(),
            ..Default::default()
        };
        let c = c.clone();
        async move {
            c.call::<RoleBindingsList>(&req)
                .await
                .expect("rolebindings.list")
                .items
        }
    };
    let all = list("").await;
    assert_eq!(all.len(), 1);
    assert_eq!(
        (
            all[0].id.as_str(),
            all[0].user_id.as_str(),
            all[0].role_id.as_str()
        ),
        (binding.as_str(), alice.as_str(), role_id.as_str())
    );
    assert!(all[0].created_at.is_some());
    // The user filter is honoured (Querator ignores it).
    assert_eq!(list(&alice).await.len(), 1);
    assert!(list("someone-else").await.is_empty());

    // Deletions blocked by what depends on them, in Querator's order.
    assert_refused(
        c.call::<RolesDelete>(&pb::RolesDeleteRequest {
            namespace: "team-a".into(),
            name: "producer".into(),
        })
        .await,
        400,
        "role has active bindings; ",
    );
    let delete_team_a = pb::NamespacesDeleteRequest {
        name: "team-a".into(),
    };
    let delete_ns = || c.call::<NamespacesDelete>(&delete_team_a);
    assert_refused(delete_ns().await, 400, "namespace has role bindings; ");
    c.call::<RoleBindingsDelete>(&pb::RoleBindingDeleteRequest {
        namespace: "team-a".into(),
        role_name: "producer".into(),
        user_id: alice.clone(),
    })
    .await
    .expect("delete binding");
    assert!(list("").await.is_empty());
    assert_refused(
        c.call::<RoleBindingsDelete>(&pb::RoleBindingDeleteRequest {
            namespace: "team-a".into(),
            role_name: "producer".into(),
            user_id: alice.clone(),
        })
        .await,
        453,
        "role binding does not exist; ",
    );
    assert_refused(delete_ns().await, 400, "namespace has roles; ");
    c.call::<RolesDelete>(&pb::RolesDeleteRequest {
        namespace: "team-a".into(),
        name: "producer".into(),
    })
    .await
    .expect("delete role");
    assert_refused(
        c.call::<RolesDelete>(&pb::RolesDeleteRequest {
            namespace: "team-a".into(),
            name: "producer".into(),
        })
        .await,
        453,
        "role does not exist; ",
    );
    assert_refused(
        c.call::<RolesDelete>(&pb::RolesDeleteRequest {
            namespace: String::new(),
            name: "Admin".into(),
        })
        .await,
        400,
        "cannot modify or delete standard role; ",
    );
    // A queue in the namespace blocks it too.
    c.queues_create(&pb::QueueInfo {
        queue_name: "a-jobs".into(),
        namespace: "team-a".into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    })
    .await
    .expect("queue in team-a");
    assert_refused(delete_ns().await, 400, "namespace has queues; ");
    c.queues_delete(&pb::QueuesDeleteRequest {
        queue_name: "a-jobs".into(),
        force: false,
    })
    .await
    .expect("delete queue");
    delete_ns().await.expect("delete namespace");
    assert_refused(delete_ns().await, 453, "namespace does not exist; ");
    assert_refused(
        c.call::<NamespacesDelete>(&pb::NamespacesDeleteRequest {
            name: "_system".into(),
        })
        .await,
        400,
        "namespace name is reserved; ",
    );
    assert_eq!(namespaces(&c).await.len(), 1);

    // ---- deletions of keys and users
    c.call::<ApiKeysDelete>(&pb::APIKeysDeleteRequest {
        id: minted.id.clone(),
    })
    .await
    .expect("delete key");
    assert_refused(
        c.call::<ApiKeysDelete>(&pb::APIKeysDeleteRequest { id: minted.id })
            .await,
        453,
        "api key does not exist; ",
    );
    // A user goes with its keys.
    let second = c
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: alice.clone(),
            ..Default::default()
        })
        .await
        .expect("second key");
    assert!(second.key.starts_with("qtr-live-"), "{}", second.key);
    c.call::<UsersDelete>(&pb::UsersDeleteRequest { id: alice.clone() })
        .await
        .expect("delete user");
    assert_refused(
        c.call::<UsersDelete>(&pb::UsersDeleteRequest { id: alice.clone() })
            .await,
        453,
        "user does not exist; ",
    );
    let keys = c
        .call::<ApiKeysList>(&pb::APIKeysListRequest::default())
        .await
        .expect("keys")
        .items;
    assert!(keys.iter().all(|k| k.user_id != alice), "{keys:?}");
    srv.stop().await;
}

#[tokio::test]
async fn every_route_in_json() {
    every_route(Encoding::Json, MEMORY).await;
}

#[tokio::test]
async fn every_route_in_protobuf() {
    every_route(Encoding::Protobuf, MEMORY).await;
}

#[cfg(feature = "fjall")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_on_fjall() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = serde_json::to_string(&dir.path().display().to_string()).expect("path");
    every_route(
        Encoding::Protobuf,
        &storage("fjall", &format!("{{storage-dir: {path}}}")),
    )
    .await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_on_postgres() {
    if lessor_testkit::db::database_or_skip().is_none() {
        return;
    }
    let db = lessor_testkit::TestDatabase::create("lessor_auth").await;
    let url = serde_json::to_string(db.url()).expect("url");
    every_route(
        Encoding::Protobuf,
        &storage("postgres", &format!("{{connection-string: {url}}}")),
    )
    .await;
}

/// The fields a strict protojson decoder of each Querator message accepts.
fn assert_only_fields(v: &serde_json::Value, allowed: &[&str]) {
    let obj = v.as_object().expect("an object");
    for k in obj.keys() {
        assert!(allowed.contains(&k.as_str()), "unexpected field '{k}' in {v}");
    }
}

/// JSON replies carry only Querator's field names (a strict decoder rejects anything else) and no key material.
#[tokio::test]
async fn json_replies_hold_only_querator_fields() {
    let (srv, c) = start(OPEN_DOOR).await;
    let raw = |path: &'static str, body: &'static str| {
        let c = c.clone();
        async move {
            let (status, _h, bytes) = c
                .raw(path, Some("application/json"), Some("application/json"), body)
                .await
                .expect("raw");
            assert_eq!(
                status.as_u16(),
                200,
                "{path}: {}",
                String::from_utf8_lossy(&bytes)
            );
            serde_json::from_slice::<serde_json::Value>(&bytes).expect("json")
        }
    };
    raw(
        "/v1/namespaces.create",
        r#"{"name":"n1","description":"d","api_key_tag":"nt"}"#,
    )
    .await;
    let user = raw(
        "/v1/users.create",
        r#"{"username":"u1","email":"e","external_id":"x"}"#,
    )
    .await;
    assert_only_fields(&user, &["id"]);
    let uid = user["id"].as_str().expect("id").to_string();
    let body: &'static str = Box::leak(
        format!(r#"{{"user_id":"{uid}","namespace_scope":"n1","expires_at":"2999-01-01T00:00:00Z"}}"#)
            .into_boxed_str(),
    );
    let key = raw("/v1/apikeys.create", body).await;
    assert_only_fields(&key, &["id", "key", "prefix"]);
    // The namespace's tag applies to keys scoped to it.
    assert!(key["key"].as_str().expect("key").starts_with("qtr-nt-"), "{key}");
    raw(
        "/v1/roles.create",
        r#"{"namespace":"n1","name":"r","permissions":["queue.lease"]}"#,
    )
    .await;
    let bind: &'static str =
        Box::leak(format!(r#"{{"namespace":"n1","role_name":"r","user_id":"{uid}"}}"#).into_boxed_str());
    raw("/v1/rolebindings.create", bind).await;

    let list = raw("/v1/namespaces.list", "{}").await;
    for item in list["items"].as_array().expect("items") {
        assert_only_fields(item, &["name", "description", "created_at", "api_key_tag"]);
        assert!(item.get("created_at").is_some(), "{item}");
    }
    let list = raw("/v1/users.list", "{}").await;
    for item in list["items"].as_array().expect("items") {
        assert_only_fields(
            item,
            &[
                "id",
                "username",
                "external_id",
                "email",
                "created_at",
                "updated_at",
            ],
        );
    }
    let list = raw("/v1/apikeys.list", "{}").await;
    let text = list.to_string();
    assert!(
        !text.contains(key["key"].as_str().expect("key")),
        "a listing leaks the key: {text}"
    );
    for item in list["items"].as_array().expect("items") {
        assert_only_fields(
            item,
            &[
                "id",
                "user_id",
                "namespace_scope",
                "name",
                "prefix",
                "expires_at",
                "last_used_at",
                "created_at",
            ],
        );
        assert_eq!(item["expires_at"], "2999-01-01T00:00:00Z");
    }
    let list = raw("/v1/roles.list", r#"{"namespace":"n1"}"#).await;
    for item in list["items"].as_array().expect("items") {
        assert_only_fields(item, &["id", "namespace", "name", "permissions", "created_at"]);
    }
    let list = raw("/v1/rolebindings.list", r#"{"namespace":"n1"}"#).await;
    assert_eq!(list["items"].as_array().expect("items").len(), 1);
    for item in list["items"].as_array().expect("items") {
        assert_only_fields(item, &["id", "namespace", "user_id", "role_id", "created_at"]);
    }
    // The proto names are accepted on input (protojson), e.g. NamespaceInfo's `createdAt` and `userIdFilter`.
    raw(
        "/v1/namespaces.update",
        r#"{"name":"n1","createdAt":"2020-01-01T00:00:00Z"}"#,
    )
    .await;
    let filtered = raw(
        "/v1/rolebindings.list",
        r#"{"namespace":"n1","userIdFilter":"nobody"}"#,
    )
    .await;
    assert_eq!(filtered, serde_json::json!({}));
    srv.stop().await;
}

/// With `auth-backend: none` nothing is checked, but the routes work on the queue storage, with `_system` and the
/// standard roles there.
#[tokio::test]
async fn routes_work_without_an_auth_backend() {
    let (srv, c) = lessor_testkit::server::memory().await;
    let roles = c
        .call::<RolesList>(&pb::RolesListRequest::default())
        .await
        .expect("roles.list")
        .items;
    assert!(roles.iter().any(|r| r.name == "Admin"), "{roles:?}");
    c.call::<NamespacesCreate>(&ns("team-a", "", ""))
        .await
        .expect("create namespace");
    let names: Vec<String> = namespaces(&c).await.into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["_system", "team-a"]);
    // Any key is accepted (and ignored) with auth off, as Querator's `none`.
    let any = c.clone().with_api_key("qtr-live-whatever");
    assert_eq!(namespaces(&any).await.len(), 2);
    srv.stop().await;
}

/// With the door closed, a request needs a key: the bootstrap key written at the first start works, a minted key is
/// authenticated and authorised by its bindings, and bad keys get Querator's 401s.
#[tokio::test]
async fn closed_door_needs_a_key_and_the_bootstrap_key_works() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("admin.key");
    let yaml = format!(
        "{OPEN_DOOR}  open-door: false\n  bootstrap-key-file: {}\n",
        key_file.display()
    );
    let (srv, anonymous) = start(&yaml).await;
    for enc in [Encoding::Json, Encoding::Protobuf] {
        let anon = anonymous.clone().with_encoding(enc);
        assert_refused(
            anon.call::<NamespacesList>(&pb::NamespacesListRequest::default())
                .await,
            401,
            "authentication required",
        );
        assert_refused(
            anon.call::<UsersCreate>(&pb::UserCreateRequest {
                username: "intruder".into(),
                ..Default::default()
            })
            .await,
            401,
            "authentication required",
        );
    }
    let text = std::fs::read_to_string(&key_file).expect("bootstrap key file");
    let admin_key = text.trim_end_matches('\n');
    assert!(!admin_key.contains('\n'), "one line");
    assert!(admin_key.starts_with("qtr-live-"), "{admin_key}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let admin = anonymous.clone().with_api_key(admin_key);
    let users = admin
        .call::<UsersList>(&pb::UsersListRequest::default())
        .await
        .expect("the bootstrap key works")
        .items;
    assert!(users.iter().any(|u| u.username == "admin"), "{users:?}");

    // A key for a user with no binding authenticates but may do nothing.
    let bob = admin
        .call::<UsersCreate>(&pb::UserCreateRequest {
            username: "bob".into(),
            ..Default::default()
        })
        .await
        .expect("bob")
        .id;
    let bob_key = admin
        .call::<ApiKeysCreate>(&pb::APIKeyCreateRequest {
            user_id: bob.clone(),
            ..Default::default()
        })
        .await
        .expect("bob's key")
        .key;
    let as_bob = anonymous.clone().with_api_key(bob_key.clone());
    assert_refused(
        as_bob.call::<UsersList>(&pb::UsersListRequest::default()).await,
        403,
        "access denied",
    );
    // Bound to Admin in `_system`, bob may list users at once (the server that made the change drops its cache).
    admin
        .call::<RoleBindingsCreate>(&pb::RoleBindingCreateRequest {
            namespace: String::new(),
            role_name: "Admin".into(),
            user_id: bob.clone(),
        })
        .await
        .expect("bind bob");
    as_bob
        .call::<UsersList>(&pb::UsersListRequest::default())
        .await
        .expect("bob is an admin now");
    // Revoked: the key stops working.
    let bob_key_id = admin
        .call::<ApiKeysList>(&pb::APIKeysListRequest {
            user_id: bob.clone(),
            ..Default::default()
        })
        .await
        .expect("bob's keys")
        .items
        .into_iter()
        .next()
        .expect("one key")
        .id;
    admin
        .call::<ApiKeysDelete>(&pb::APIKeysDeleteRequest { id: bob_key_id })
        .await
        .expect("revoke");
    assert_refused(
        as_bob.call::<UsersList>(&pb::UsersListRequest::default()).await,
        401,
        "api key does not exist",
    );
    // Malformed and unknown keys.
    assert_refused(
        anonymous
            .clone()
            .with_api_key("not-a-key")
            .call::<UsersList>(&pb::UsersListRequest::default())
            .await,
        401,
        "api key is invalid",
    );
    let unknown = format!("qtr-live-{}", "A".repeat(43));
    assert_refused(
        anonymous
            .clone()
            .with_api_key(unknown)
            .call::<UsersList>(&pb::UsersListRequest::default())
            .await,
        401,
        "api key does not exist",
    );
    srv.stop().await;
}

/// The access-control routes.
const AUTH_ROUTES: &[&str] = &[
    "/v1/namespaces.create",
    "/v1/namespaces.update",
    "/v1/namespaces.list",
    "/v1/namespaces.delete",
    "/v1/users.create",
    "/v1/users.list",
    "/v1/users.delete",
    "/v1/apikeys.create",
    "/v1/apikeys.list",
    "/v1/apikeys.delete",
    "/v1/roles.create",
    "/v1/roles.update",
    "/v1/roles.list",
    "/v1/roles.delete",
    "/v1/rolebindings.create",
    "/v1/rolebindings.list",
    "/v1/rolebindings.delete",
];

/// A JSON object from the access-control messages' field names (and one unknown), with values chosen to hit the
/// rules: reserved and standard names, bad permissions, extreme limits and timestamps, control characters, long text.
fn auth_jsonish() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let key = prop_oneof![
        Just("name"),
        Just("description"),
        Just("created_at"),
        Just("createdAt"),
        Just("api_key_tag"),
        Just("pivot"),
        Just("limit"),
        Just("id"),
        Just("username"),
        Just("email"),
        Just("external_id"),
        Just("user_id"),
        Just("namespace_scope"),
        Just("expires_at"),
        Just("key_tag"),
        Just("namespace"),
        Just("permissions"),
        Just("role_name"),
        Just("user_id_filter"),
        Just("zzz"),
    ];
    let value = prop_oneof![
        Just("\"fz\"".to_string()),
        Just("\"team\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"_system\"".to_string()),
        Just("\"Admin\"".to_string()),
        Just("\"anonymous\"".to_string()),
        Just("\"a b\"".to_string()),
        Just("\"a\\u0000b\"".to_string()),
        Just("\"x:y~z\"".to_string()),
        Just(format!("\"{}\"", "a".repeat(3000))),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("2147483647".to_string()),
        Just("99999999999".to_string()),
        Just("\"0001-01-01T00:00:00Z\"".to_string()),
        Just("\"9999-12-31T23:59:59.999999999Z\"".to_string()),
        Just("\"2999-01-01T00:00:00Z\"".to_string()),
        Just("[\"queue.produce\",\"queue.lease\"]".to_string()),
        Just("[\"nope\"]".to_string()),
        Just("[]".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("{}".to_string()),
    ];
    proptest::collection::vec((key, value), 0..6).prop_map(|fields| {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", body.join(","))
    })
}

/// Hostile and malformed bodies on every access-control route, in both encodings, with auth on (open door, so the
/// handlers run): never a 5xx, always a decodable error envelope in the encoding asked for, and the server still
/// answers afterwards.
#[test]
fn hostile_input_on_every_auth_route_is_a_clean_4xx() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (srv, c) = rt.block_on(start(OPEN_DOOR));
    #[derive(Debug, Clone)]
    enum Body {
        Bytes(Vec<u8>),
        Json(String),
    }
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Body::Bytes),
        auth_jsonish().prop_map(Body::Json),
    ];
    let accepts = [Some("application/json"), Some("application/protobuf")];
    let strategy = (0..AUTH_ROUTES.len(), 0..accepts.len(), body);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 1024,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&strategy, |(route, accept, body)| {
        let path = AUTH_ROUTES[route];
        let accept = accepts[accept];
        let (ct, bytes) = match &body {
            Body::Bytes(b) => ("application/protobuf", b.clone()),
            Body::Json(t) => ("application/json", t.clone().into_bytes()),
        };
        let (status, headers, reply) = rt
            .block_on(c.raw(path, Some(ct), accept, bytes))
            .expect("the server answers");
        let what = format!("POST {path} ({ct} -> {accept:?}) with {body:?}");
        let status = status.as_u16();
        prop_assert!(
            status == 200 || (400..500).contains(&status),
            "{}: status {} body {:?}",
            what,
            status,
            String::from_utf8_lossy(&reply)
        );
        let got_ct = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let enc = if accept == Some("application/protobuf") {
            Encoding::Protobuf
        } else {
            Encoding::Json
        };
        prop_assert_eq!(got_ct.as_str(), enc.content_type(), "{}", what);
        if status != 200 {
            let envelope: Result<pb::Reply, _> = pb::decode(enc, &reply);
            prop_assert!(envelope.is_ok(), "{}: not an envelope: {:?}", what, reply);
            let envelope = envelope.expect("checked");
            prop_assert_eq!(i32::from(status), envelope.code, "{}", what);
            prop_assert!(!envelope.message.is_empty(), "{}", what);
            prop_assert!(!envelope.message.contains("panicked"), "{}", what);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rt.block_on(async {
        let names = namespaces(&c).await;
        assert!(names.iter().any(|n| n.name == "_system"), "{names:?}");
        srv.stop().await;
    });
}

/// With auth on, a queue is created only in a namespace that exists (its roles and bindings can then govern it);
/// with auth off, any namespace name is accepted, as before.
#[tokio::test]
async fn queues_are_created_in_existing_namespaces_only_with_auth_on() {
    let queue = |name: &str, namespace: &str| pb::QueueInfo {
        queue_name: name.into(),
        namespace: namespace.into(),
        lease_timeout: "1m".into(),
        expire_timeout: "1h".into(),
        requested_partitions: 1,
        ..Default::default()
    };
    let (srv, c) = start(OPEN_DOOR).await;
    assert_refused(
        c.queues_create(&queue("q1", "nowhere")).await,
        453,
        "namespace does not exist; 'nowhere' was not found",
    );
    c.call::<NamespacesCreate>(&ns("somewhere", "", ""))
        .await
        .expect("create namespace");
    c.queues_create(&queue("q1", "somewhere"))
        .await
        .expect("queue in an existing namespace");
    c.queues_create(&queue("q2", ""))
        .await
        .expect("the default namespace _system exists");
    srv.stop().await;

    let (srv, c) = lessor_testkit::server::memory().await;
    c.queues_create(&queue("q3", "anywhere"))
        .await
        .expect("auth off: any namespace");
    srv.stop().await;
}
