//! Unit tests of the auth service on the in-RAM store: authorisation rules, scopes, cache invalidation and the
//! bootstrap. The same rules run on every backend in `lessor-storage`'s conformance suite.

use std::sync::Arc;
use std::time::Duration;

use super::memory::MemoryAuthStore;
use super::*;
use crate::time::{ManualClock, Ts};

const T0: Ts = Ts(1_800_000_000_000_000);

fn service() -> (Auth, Arc<ManualClock>, Arc<MemoryAuthStore>) {
    let clock = Arc::new(ManualClock::new(T0));
    let store = Arc::new(MemoryAuthStore::new());
    let auth = Auth::new(store.clone(), clock.clone(), AuthMode::Internal);
    (auth, clock, store)
}

fn perms(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| s.to_string()).collect()
}

async fn user_with_key(auth: &Auth, name: &str, scope: &str) -> (String, String) {
    let id = auth.user_create(name, "", "").await.unwrap();
    let (_, secret) = auth
        .key_create(KeySpec {
            user_id: id.clone(),
            namespace_scope: scope.into(),
            ..KeySpec::default()
        })
        .await
        .unwrap();
    (id, secret)
}

#[tokio::test]
async fn closed_door_bootstrap_creates_one_admin_and_denies_anonymous() {
    let (auth, _, _) = service();
    let mut written = None;
    let r = auth
        .bootstrap(false, None, |k| {
            written = Some(k.to_string());
            Ok(())
        })
        .await
        .unwrap();
    assert!(r.created_admin && !r.door_open);
    let key = written.expect("admin key written");
    let admin = auth.authenticate(Some(&key)).await.unwrap();
    assert_eq!(admin.username, "admin");
    auth.authorize(&admin, "anything", Permission::QueueDelete)
        .await
        .unwrap();
    let anon = auth.authenticate(None).await.unwrap();
    assert!(matches!(
        auth.authorize(&anon, "_system", Permission::QueueList).await,
        Err(AuthError::Unauthenticated)
    ));
    // A second start writes nothing and creates nobody.
    let again = auth
        .bootstrap(false, None, |_| panic!("second start must not write a key"))
        .await
        .unwrap();
    assert!(!again.created_admin);
    assert_eq!(auth.user_list("", 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn open_door_binding_is_made_once() {
    let (auth, _, _) = service();
    let r = auth.bootstrap(true, None, |_| Ok(())).await.unwrap();
    assert!(r.opened_door && r.door_open);
    let anon = Principal::anonymous();
    auth.authorize(&anon, "ns", Permission::QueueCreate)
        .await
        .unwrap();
    auth.binding_delete("_system", "Admin", "anonymous")
        .await
        .unwrap();
    assert!(auth
        .authorize(&anon, "ns", Permission::QueueCreate)
        .await
        .is_err());
    let r = auth.bootstrap(true, None, |_| Ok(())).await.unwrap();
    assert!(
        !r.opened_door && !r.door_open,
        "a restart must not reopen the door"
    );
}

#[tokio::test]
async fn namespace_bindings_scopes_and_the_system_cascade() {
    let (auth, _, _) = service();
    auth.bootstrap(false, None, |_| Ok(())).await.unwrap();
    for ns in ["team-a", "team-b"] {
        auth.namespace_create(NamespaceSpec {
            name: ns.into(),
            ..NamespaceSpec::default()
        })
        .await
        .unwrap();
        auth.role_create(ns, "worker", &perms(&["queue.produce", "queue.lease"]))
            .await
            .unwrap();
    }
    let (a, a_key) = user_with_key(&auth, "a", "").await;
    auth.binding_create("team-a", "worker", &a).await.unwrap();
    let pa = auth.authenticate(Some(&a_key)).await.unwrap();
    auth.authorize(&pa, "team-a", Permission::QueueProduce)
        .await
        .unwrap();
    assert!(matches!(
        auth.authorize(&pa, "team-a", Permission::QueueDelete).await,
        Err(AuthError::AccessDenied)
    ));
    assert!(matches!(
        auth.authorize(&pa, "team-b", Permission::QueueProduce).await,
        Err(AuthError::AccessDenied)
    ));

    // A user bound in both namespaces, with a key scoped to team-a, stays in team-a.
    let (c, c_key) = user_with_key(&auth, "c", "team-a").await;
    auth.binding_create("team-a", "worker", &c).await.unwrap();
    auth.binding_create("team-b", "worker", &c).await.unwrap();
    let pc = auth.authenticate(Some(&c_key)).await.unwrap();
    assert_eq!(pc.namespace_scope, "team-a");
    auth.authorize(&pc, "team-a", Permission::QueueLease)
        .await
        .unwrap();
    assert!(auth
        .authorize(&pc, "team-b", Permission::QueueLease)
        .await
        .is_err());

    // A _system binding applies everywhere.
    let (s, s_key) = user_with_key(&auth, "s", "").await;
    auth.binding_create("_system", "PublicViewer", &s).await.unwrap();
    let ps = auth.authenticate(Some(&s_key)).await.unwrap();
    auth.authorize(&ps, "team-b", Permission::SystemMetrics)
        .await
        .unwrap();
    assert!(auth
        .authorize(&ps, "team-b", Permission::QueueLease)
        .await
        .is_err());
}

#[tokio::test]
async fn revocation_expiry_and_cascades() {
    let (auth, clock, store) = service();
    auth.bootstrap(true, None, |_| Ok(())).await.unwrap();
    let (u, key) = user_with_key(&auth, "u", "").await;
    let p = auth.authenticate(Some(&key)).await.unwrap();
    assert_eq!(p.user_id, u);

    // Another server (a second service on the same store) deletes the user; this one notices through the
    // generation, without any local call.
    let other = Auth::new(store.clone(), clock.clone(), AuthMode::Internal);
    auth.refresh().await.unwrap();
    other.user_delete(&u).await.unwrap();
    assert!(auth.authenticate(Some(&key)).await.is_ok(), "still cached");
    assert!(auth.refresh().await.unwrap());
    assert!(matches!(
        auth.authenticate(Some(&key)).await,
        Err(AuthError::UnknownKey)
    ));
    assert!(auth.key_list(&u, "", 0).await.unwrap().is_empty());

    let id = auth.user_create("v", "", "").await.unwrap();
    let (_, secret) = auth
        .key_create(KeySpec {
            user_id: id,
            expires_at: T0.add(Duration::from_secs(60)),
            ..KeySpec::default()
        })
        .await
        .unwrap();
    auth.authenticate(Some(&secret)).await.unwrap();
    clock.advance(Duration::from_secs(61));
    assert!(matches!(
        auth.authenticate(Some(&secret)).await,
        Err(AuthError::ExpiredKey)
    ));
    assert!(matches!(
        auth.authenticate(Some("qtr-live-short")).await,
        Err(AuthError::InvalidKey)
    ));
}

#[tokio::test]
async fn admin_rules() {
    let (auth, clock, _) = service();
    auth.bootstrap(true, None, |_| Ok(())).await.unwrap();
    let reserved = auth
        .namespace_create(NamespaceSpec {
            name: "_mine".into(),
            ..NamespaceSpec::default()
        })
        .await
        .unwrap_err();
    assert!(
        reserved.to_string().starts_with("namespace name is reserved;"),
        "{reserved}"
    );
    auth.namespace_create(NamespaceSpec {
        name: "n".into(),
        ..NamespaceSpec::default()
    })
    .await
    .unwrap();
    let created = auth.namespace("n").await.unwrap().unwrap().created_at;
    clock.advance(Duration::from_secs(5));
    auth.namespace_update(NamespaceSpec {
        name: "n".into(),
        description: "d".into(),
        api_key_tag: "prod".into(),
    })
    .await
    .unwrap();
    let ns = auth.namespace("n").await.unwrap().unwrap();
    assert_eq!((ns.created_at, ns.description.as_str()), (created, "d"));

    // The namespace's tag goes into keys scoped to it.
    let u = auth.user_create("u", "", "").await.unwrap();
    let (rec, secret) = auth
        .key_create(KeySpec {
            user_id: u.clone(),
            namespace_scope: "n".into(),
            ..KeySpec::default()
        })
        .await
        .unwrap();
    assert!(secret.starts_with("qtr-prod-") && rec.prefix.starts_with("qtr-prod-"));

    let std_role = auth
        .role_create("n", "Admin", &perms(&["queue.lease"]))
        .await
        .unwrap_err();
    assert!(std_role
        .to_string()
        .starts_with("cannot modify or delete standard role;"));
    let bad = auth
        .role_create("n", "r", &perms(&["queue.*"]))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("permissions"), "{bad}");
    auth.role_create("n", "r", &perms(&["queue.lease"]))
        .await
        .unwrap();
    auth.binding_create("n", "r", &u).await.unwrap();
    let dup = auth.binding_create("n", "r", &u).await.unwrap_err();
    assert!(
        dup.to_string().starts_with("role binding already exists;"),
        "{dup}"
    );
    let bound = auth.role_delete("n", "r").await.unwrap_err();
    assert!(
        bound.to_string().starts_with("role has active bindings;"),
        "{bound}"
    );
    let busy = auth.namespace_delete("n", false).await.unwrap_err();
    assert!(
        busy.to_string().starts_with("namespace has role bindings;"),
        "{busy}"
    );

    // The binding list honours its user filter.
    let w = auth.user_create("w", "", "").await.unwrap();
    auth.binding_create("n", "r", &w).await.unwrap();
    assert_eq!(auth.binding_list("n", "", "", 0).await.unwrap().len(), 2);
    let only_w = auth.binding_list("n", &w, "", 0).await.unwrap();
    assert_eq!(only_w.len(), 1);
    assert_eq!(only_w[0].user_id, w);

    auth.binding_delete("n", "r", &u).await.unwrap();
    auth.binding_delete("n", "r", &w).await.unwrap();
    let roles = auth.namespace_delete("n", false).await.unwrap_err();
    assert!(roles.to_string().starts_with("namespace has roles;"), "{roles}");
    auth.role_delete("n", "r").await.unwrap();
    let queues = auth.namespace_delete("n", true).await.unwrap_err();
    assert!(
        queues.to_string().starts_with("namespace has queues;"),
        "{queues}"
    );
    auth.namespace_delete("n", false).await.unwrap();
    assert!(auth.namespace("n").await.unwrap().is_none());
}

/// A store that lets a "second server" create a role in namespace `n` just before the commit that deletes `n`,
/// after the namespace delete checked for roles: the race the post-delete sweep exists for.
#[derive(Debug)]
struct RacingStore {
    inner: Arc<MemoryAuthStore>,
    raced: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl AuthStore for RacingStore {
    async fn get(&self, key: &[u8]) -> Result<Option<bytes::Bytes>, crate::error::StorageError> {
        self.inner.get(key).await
    }
    async fn scan(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<(bytes::Bytes, bytes::Bytes)>, crate::error::StorageError> {
        self.inner.scan(prefix, from, limit).await
    }
    async fn commit(&self, c: Commit) -> Result<Result<(), CheckFailed>, crate::error::StorageError> {
        let deletes_namespace = c
            .writes
            .iter()
            .any(|w| matches!(w, Write::Delete(k) if *k == records::key(records::tag::NAMESPACE, &["n"])));
        if deletes_namespace && !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let other = Auth::new(
                self.inner.clone(),
                Arc::new(ManualClock::new(T0)),
                AuthMode::Internal,
            );
            other
                .role_create("n", "late", &perms(&["queue.lease"]))
                .await
                .expect("the racing role");
        }
        self.inner.commit(c).await
    }
    async fn generation(&self) -> Result<u64, crate::error::StorageError> {
        self.inner.generation().await
    }
}

#[tokio::test]
async fn namespace_delete_sweeps_a_role_created_meanwhile() {
    let inner = Arc::new(MemoryAuthStore::new());
    let store = Arc::new(RacingStore {
        inner: inner.clone(),
        raced: Default::default(),
    });
    let auth = Auth::new(store, Arc::new(ManualClock::new(T0)), AuthMode::Internal);
    auth.namespace_create(NamespaceSpec {
        name: "n".into(),
        ..NamespaceSpec::default()
    })
    .await
    .unwrap();
    auth.namespace_delete("n", false).await.unwrap();
    assert!(auth.namespace("n").await.unwrap().is_none());
    assert!(
        auth.role_list("n", "", 0).await.unwrap().is_empty(),
        "the role created during the delete is swept"
    );
    assert!(inner
        .scan(&records::prefix(records::tag::ROLE_ID, &[]), &[], 10)
        .await
        .unwrap()
        .is_empty());
}
