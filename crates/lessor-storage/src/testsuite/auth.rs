//! Conformance cases of the auth store ([`lessor_core::auth::AuthStore`]) and of the auth service running on it.
//!
//! The first cases check the key-value contract itself (order, prefix bounds, atomic conditional commits, the
//! generation); the `auth_service_*` cases run [`Auth`] on the backend's store, so the rules written once in
//! `lessor-core` are seen to hold on every backend. Stores may be shared between cases (one PostgreSQL database),
//! so every case works under its own key prefix and its own names, and asserts exact generations only on a store
//! of its own ([`TestBackend::private_auth`]).
//!
//! A case is a `pub async fn <name>(b: TestBackend)` here, listed in the `@auth_cases` list of
//! `conformance_tests!` (a unit test of the parent module checks that none is missing).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lessor_core::auth::records;
use lessor_core::auth::{
    Auth, AuthError, AuthMode, AuthStore, CheckFailed, Commit, KeySpec, NamespaceSpec, Permission,
};
use lessor_core::time::{ManualClock, Ts};

use super::{unique_queue, TestBackend, T0};

/// A key prefix (and name) unique to this case and run.
fn unique(case: &str) -> String {
    unique_queue(case)
}

fn k(prefix: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(tail);
    v
}

async fn put(s: &dyn AuthStore, key: Vec<u8>, value: &[u8]) {
    let mut c = Commit::default();
    c.put(key, value.to_vec());
    s.commit(c).await.expect("commit").expect("no checks");
}

fn keys(rows: &[(Bytes, Bytes)]) -> Vec<Vec<u8>> {
    rows.iter().map(|(k, _)| k.to_vec()).collect()
}

/// Get, put, overwrite and delete; a commit applies its writes in order (the last write of a key wins).
pub async fn auth_kv_get_put_delete(b: TestBackend) {
    let s = b.queues.auth();
    let p = unique("kv-crud").into_bytes();
    let a = k(&p, b"/a");
    assert_eq!(s.get(&a).await.expect("get"), None);
    put(s.as_ref(), a.clone(), b"one").await;
    assert_eq!(s.get(&a).await.expect("get"), Some(Bytes::from_static(b"one")));
    put(s.as_ref(), a.clone(), b"two").await;
    assert_eq!(s.get(&a).await.expect("get"), Some(Bytes::from_static(b"two")));
    // An empty value is a value, not an absence.
    let e = k(&p, b"/empty");
    put(s.as_ref(), e.clone(), b"").await;
    assert_eq!(s.get(&e).await.expect("get"), Some(Bytes::new()));

    let mut c = Commit::default();
    c.delete(a.clone()).delete(k(&p, b"/never-there"));
    s.commit(c).await.expect("commit").expect("no checks");
    assert_eq!(s.get(&a).await.expect("get"), None);

    // Put then delete of one key leaves it absent; delete then put leaves the put.
    let x = k(&p, b"/x");
    let y = k(&p, b"/y");
    put(s.as_ref(), y.clone(), b"old").await;
    let mut c = Commit::default();
    c.put(x.clone(), b"gone".to_vec())
        .delete(x.clone())
        .delete(y.clone())
        .put(y.clone(), b"new".to_vec());
    s.commit(c).await.expect("commit").expect("no checks");
    assert_eq!(s.get(&x).await.expect("get"), None);
    assert_eq!(s.get(&y).await.expect("get"), Some(Bytes::from_static(b"new")));
    // A key that is a prefix of another is its own key.
    assert_eq!(s.get(&p).await.expect("get"), None);
}

/// Scans return keys bytewise in ascending order (0x00 and 0xff included), stay inside the prefix, start at
/// `from`, and stop at `limit`.
pub async fn auth_kv_scan_order_and_bounds(b: TestBackend) {
    let s = b.queues.auth();
    // Ends with a separator, so no other run's prefix starts with this one.
    let p = format!("{}/", unique("kv-scan")).into_bytes();
    let tails: Vec<Vec<u8>> = vec![
        vec![0xff, 0xff, 0x00],
        vec![0x80],
        vec![0x00],
        vec![0xff],
        vec![0x00, 0x00],
        vec![0x7f],
        vec![0xff, 0xff],
        vec![0x01],
        vec![0xff, 0x00],
        vec![],
    ];
    let mut c = Commit::default();
    for (i, t) in tails.iter().enumerate() {
        c.put(k(&p, t), vec![u8::try_from(i).expect("few")]);
    }
    s.commit(c).await.expect("commit").expect("no checks");
    // Neighbours just outside the prefix on both sides.
    let mut before = p.clone();
    *before.last_mut().expect("non-empty") -= 1;
    let mut after = p.clone();
    *after.last_mut().expect("non-empty") += 1;
    put(s.as_ref(), before.clone(), b"out").await;
    put(s.as_ref(), after.clone(), b"out").await;

    let mut sorted: Vec<Vec<u8>> = tails.iter().map(|t| k(&p, t)).collect();
    sorted.sort();
    let all = s.scan(&p, &[], 100).await.expect("scan");
    assert_eq!(keys(&all), sorted, "bytewise order, nothing outside the prefix");
    assert_eq!(
        all[0].0.as_ref(),
        p.as_slice(),
        "the prefix itself is in its range"
    );
    let value_of = |t: &[u8]| {
        let i = tails.iter().position(|x| x == t).expect("a tail");
        vec![u8::try_from(i).expect("few")]
    };
    for (key, v) in &all {
        assert_eq!(
            v.to_vec(),
            value_of(&key[p.len()..]),
            "values travel with their keys"
        );
    }

    // limit
    assert_eq!(keys(&s.scan(&p, &[], 3).await.expect("scan")), sorted[..3]);
    assert!(s.scan(&p, &[], 0).await.expect("scan").is_empty());
    // from: inclusive, and keys that merely share a prefix with `from` come after it.
    let from = k(&p, &[0x7f]);
    let got = keys(&s.scan(&p, &from, 100).await.expect("scan"));
    let want: Vec<Vec<u8>> = sorted.iter().filter(|x| **x >= from).cloned().collect();
    assert_eq!(got, want);
    assert_eq!(got[0], from);
    // from before the prefix: the whole prefix; from past it: nothing.
    assert_eq!(keys(&s.scan(&p, &before, 100).await.expect("scan")), sorted);
    assert!(s.scan(&p, &after, 100).await.expect("scan").is_empty());
    // A prefix ending in 0xff bytes: its range ends where the bytes before them grow.
    let ff = k(&p, &[0xff, 0xff]);
    assert_eq!(
        keys(&s.scan(&ff, &[], 100).await.expect("scan")),
        vec![ff.clone(), k(&p, &[0xff, 0xff, 0x00])]
    );
    let zero = k(&p, &[0x00]);
    assert_eq!(
        keys(&s.scan(&zero, &[], 100).await.expect("scan")),
        vec![zero.clone(), k(&p, &[0x00, 0x00])]
    );

    // A prefix made only of 0xff bytes has no upper bound at all.
    let top = vec![0xffu8; 6];
    let mine = k(&top, &p);
    let mut c = Commit::default();
    c.put(k(&mine, &[0x00]), b"1".to_vec())
        .put(k(&mine, &[0xff]), b"2".to_vec())
        .put(mine.clone(), b"0".to_vec());
    s.commit(c).await.expect("commit").expect("no checks");
    let got = keys(&s.scan(&top, &mine, 3).await.expect("scan"));
    assert_eq!(got, vec![mine.clone(), k(&mine, &[0x00]), k(&mine, &[0xff])]);
    assert_eq!(keys(&s.scan(&mine, &[], 10).await.expect("scan")), got);
}

/// A commit whose check fails writes nothing and names the first failing check; Absent and Present mean what
/// they say.
pub async fn auth_kv_commit_is_atomic(b: TestBackend) {
    let s = b.queues.auth();
    let p = unique("kv-atomic").into_bytes();
    let (a, x, y, z) = (k(&p, b"a"), k(&p, b"x"), k(&p, b"y"), k(&p, b"z"));
    put(s.as_ref(), x.clone(), b"x0").await;
    let g0 = s.generation().await.expect("generation");

    // checks: Absent(a) holds, Present(z) fails, Absent(x) fails too: index 1 is reported.
    let mut c = Commit::default();
    c.absent(a.clone())
        .present(z.clone())
        .absent(x.clone())
        .put(a.clone(), b"a".to_vec())
        .put(y.clone(), b"y".to_vec())
        .delete(x.clone());
    assert_eq!(s.commit(c).await.expect("commit"), Err(CheckFailed { index: 1 }));
    assert_eq!(s.get(&a).await.expect("get"), None, "no write of a failed commit");
    assert_eq!(s.get(&y).await.expect("get"), None, "no write of a failed commit");
    assert_eq!(s.get(&x).await.expect("get"), Some(Bytes::from_static(b"x0")));
    let g1 = s.generation().await.expect("generation");
    if b.private_auth {
        assert_eq!(g1, g0, "a failed commit does not move the generation");
    } else {
        assert!(g1 >= g0, "the generation never goes back: {g0} -> {g1}");
    }

    // Absent on an existing key fails; Present on a missing key fails; the first check can fail too.
    let mut c = Commit::default();
    c.absent(x.clone()).put(y.clone(), b"y".to_vec());
    assert_eq!(s.commit(c).await.expect("commit"), Err(CheckFailed { index: 0 }));
    let mut c = Commit::default();
    c.present(x.clone())
        .present(a.clone())
        .put(y.clone(), b"y".to_vec());
    assert_eq!(s.commit(c).await.expect("commit"), Err(CheckFailed { index: 1 }));
    assert_eq!(s.get(&y).await.expect("get"), None);

    // All checks hold: every write lands.
    let mut c = Commit::default();
    c.present(x.clone())
        .absent(a.clone())
        .absent(z.clone())
        .put(a.clone(), b"a".to_vec())
        .put(y.clone(), b"y".to_vec())
        .delete(x.clone());
    assert_eq!(s.commit(c).await.expect("commit"), Ok(()));
    assert_eq!(s.get(&a).await.expect("get"), Some(Bytes::from_static(b"a")));
    assert_eq!(s.get(&y).await.expect("get"), Some(Bytes::from_static(b"y")));
    assert_eq!(s.get(&x).await.expect("get"), None);
    let g2 = s.generation().await.expect("generation");
    if b.private_auth {
        assert_eq!(g2, g1 + 1, "one successful commit, one step");
    } else {
        assert!(g2 > g1, "a successful commit moves the generation: {g1} -> {g2}");
    }
}

/// The generation grows with every successful commit and is the same number on every handle of the store, which
/// also sees the same data.
pub async fn auth_kv_generation_is_shared(b: TestBackend) {
    let s = b.queues.auth();
    let p = unique("kv-gen").into_bytes();
    let mut last = s.generation().await.expect("generation");
    for i in 0..3u8 {
        put(s.as_ref(), k(&p, &[i]), b"v").await;
        let g = s.generation().await.expect("generation");
        assert!(g > last, "commit {i}: {last} -> {g}");
        last = g;
    }
    // A commit without writes still counts (it is a successful commit), and never moves the number back.
    let mut c = Commit::default();
    c.present(k(&p, &[0]));
    s.commit(c).await.expect("commit").expect("holds");
    let g = s.generation().await.expect("generation");
    assert!(g > last, "{last} -> {g}");
    last = g;
    let Some(peer) = &b.peer else {
        return;
    };
    let t = peer.auth();
    let seen = t.generation().await.expect("peer generation");
    assert!(seen >= last, "the peer sees at least {last}, saw {seen}");
    if b.private_auth {
        assert_eq!(seen, last);
    }
    assert_eq!(
        t.get(&k(&p, &[1])).await.expect("peer get"),
        Some(Bytes::from_static(b"v"))
    );
    put(t.as_ref(), k(&p, b"peer"), b"w").await;
    let after = s.generation().await.expect("generation");
    assert!(
        after > seen,
        "a commit through the peer moves everyone's generation: {seen} -> {after}"
    );
    assert_eq!(
        s.get(&k(&p, b"peer")).await.expect("get"),
        Some(Bytes::from_static(b"w"))
    );
}

/// Many tasks (on two handles when the store has a peer) race to create one key: exactly one wins, and the value
/// is the winner's.
pub async fn auth_kv_concurrent_absent_race(b: TestBackend) {
    let p = unique("kv-race").into_bytes();
    let target = k(&p, b"/winner");
    let stores: Vec<Arc<dyn AuthStore>> = match &b.peer {
        Some(peer) => vec![b.queues.auth(), peer.auth()],
        None => vec![b.queues.auth()],
    };
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let s = stores[usize::from(i) % stores.len()].clone();
        let target = target.clone();
        let own = k(&p, &[b'/', b'o', i]);
        tasks.push(tokio::spawn(async move {
            let mut c = Commit::default();
            c.absent(target.clone()).put(target, vec![i]).put(own, vec![i]);
            (i, s.commit(c).await.expect("commit"))
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, r) = t.await.expect("task");
        match r {
            Ok(()) => winners.push(i),
            Err(CheckFailed { index }) => assert_eq!(index, 0),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    let s = b.queues.auth();
    assert_eq!(
        s.get(&target).await.expect("get"),
        Some(Bytes::from(vec![winners[0]]))
    );
    // The losers' other writes did not land either.
    let own = s.scan(&k(&p, b"/o"), &[], 100).await.expect("scan");
    assert_eq!(keys(&own), vec![k(&p, &[b'/', b'o', winners[0]])]);
}

// ---- the service -----------------------------------------------------------------------------------------

fn service(store: Arc<dyn AuthStore>) -> (Auth, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    (Auth::new(store, clock.clone(), AuthMode::Internal), clock)
}

async fn booted(b: &TestBackend) -> (Auth, Arc<ManualClock>) {
    let (auth, clock) = service(b.queues.auth());
    auth.bootstrap(false, None, |_| Ok(())).await.expect("bootstrap");
    (auth, clock)
}

fn ns_spec(name: &str) -> NamespaceSpec {
    NamespaceSpec {
        name: name.to_string(),
        description: format!("namespace {name}"),
        api_key_tag: String::new(),
    }
}

fn key_spec(user: &str, scope: &str, expires_at: Ts) -> KeySpec {
    KeySpec {
        user_id: user.to_string(),
        name: "test key".into(),
        namespace_scope: scope.to_string(),
        expires_at,
        tag: String::new(),
    }
}

fn perms(p: &[Permission]) -> Vec<String> {
    p.iter().map(|p| p.as_str().to_string()).collect()
}

/// The bootstrap creates `_system` and the three standard roles; with the door closed it creates the `admin`
/// user once (on a store of its own: exactly once, with a working key), and never again.
pub async fn auth_service_bootstrap(b: TestBackend) {
    let (auth, _clock) = service(b.queues.auth());
    let written: Arc<Mutex<Vec<String>>> = Arc::default();
    let w = written.clone();
    let first = auth
        .bootstrap(false, None, move |k| {
            w.lock().expect("lock").push(k.to_string());
            Ok(())
        })
        .await
        .expect("bootstrap");
    assert!(!first.door_open);
    assert!(auth.namespace_exists("_system").await.expect("exists"));
    assert!(
        auth.namespace_exists("").await.expect("exists"),
        "empty means _system"
    );
    let roles: Vec<String> = auth
        .role_list("_system", "", 100)
        .await
        .expect("roles")
        .into_iter()
        .map(|r| r.name)
        .collect();
    for name in ["Admin", "NamespaceOwner", "PublicViewer"] {
        assert!(roles.contains(&name.to_string()), "{name} in {roles:?}");
    }
    let admin_role = auth.role("_system", "Admin").await.expect("role").expect("Admin");
    assert_eq!(admin_role.permissions.len(), Permission::ALL.len());

    if b.private_auth {
        assert!(first.created_admin);
        let keys = written.lock().expect("lock").clone();
        assert_eq!(keys.len(), 1, "the key is written once");
        let who = auth.authenticate(Some(&keys[0])).await.expect("admin key works");
        assert_eq!(who.username, "admin");
        for ns in ["_system", "anything"] {
            auth.authorize(&who, ns, Permission::NamespaceDelete)
                .await
                .expect("the admin may do everything");
        }
    }
    // Later starts (here, or on any server of the store) create nothing.
    let again = Arc::new(Mutex::new(0));
    let a = again.clone();
    let second = auth
        .bootstrap(false, None, move |_| {
            *a.lock().expect("lock") += 1;
            Ok(())
        })
        .await
        .expect("bootstrap");
    assert!(!second.created_admin);
    assert_eq!(*again.lock().expect("lock"), 0, "no second key");
    let roles_again = auth.role_list("_system", "", 100).await.expect("roles");
    assert_eq!(
        roles_again.iter().filter(|r| r.name == "Admin").count(),
        1,
        "standard roles are not duplicated"
    );
    assert_eq!(
        auth.role("_system", "Admin")
            .await
            .expect("role")
            .expect("Admin")
            .id,
        admin_role.id,
        "the standard role keeps its id"
    );
    // Anonymous requests get nothing with the door closed.
    let anon = auth.authenticate(None).await.expect("anonymous");
    assert!(matches!(
        auth.authorize(&anon, "_system", Permission::UserList).await,
        Err(AuthError::Unauthenticated)
    ));
}

/// Deleting a user deletes its keys and bindings in one step: its keys stop authenticating at once.
pub async fn auth_service_user_delete_cascades(b: TestBackend) {
    let (auth, _clock) = booted(&b).await;
    let name = unique("user-cascade");
    let ns = unique("ns-cascade");
    auth.namespace_create(ns_spec(&ns)).await.expect("namespace");
    auth.role_create(&ns, "worker", &perms(&[Permission::QueueLease]))
        .await
        .expect("role");
    let uid = auth.user_create(&name, "u@example.com", "").await.expect("user");
    assert!(matches!(
        auth.user_create(&name, "", "").await,
        Err(AuthError::Invalid(m)) if m.starts_with("user already exists")
    ));
    auth.binding_create(&ns, "worker", &uid).await.expect("binding");
    let (rec, secret) = auth.key_create(key_spec(&uid, "", Ts::ZERO)).await.expect("key");
    let (_, secret2) = auth.key_create(key_spec(&uid, &ns, Ts::ZERO)).await.expect("key");
    let who = auth.authenticate(Some(&secret)).await.expect("key works");
    assert_eq!(
        (who.user_id.as_str(), who.username.as_str()),
        (uid.as_str(), name.as_str())
    );
    assert_eq!(who.key_id, rec.id);
    auth.authorize(&who, &ns, Permission::QueueLease)
        .await
        .expect("bound");
    assert_eq!(auth.key_list(&uid, "", 100).await.expect("keys").len(), 2);
    let listed = auth.user_list(&uid, 1).await.expect("users");
    assert_eq!(listed.first().map(|u| u.id.as_str()), Some(uid.as_str()));

    auth.user_delete(&uid).await.expect("delete");
    assert!(auth.user(&uid).await.expect("user").is_none());
    for s in [&secret, &secret2] {
        assert!(matches!(
            auth.authenticate(Some(s)).await,
            Err(AuthError::UnknownKey)
        ));
    }
    assert!(auth.key_list(&uid, "", 100).await.expect("keys").is_empty());
    assert!(auth
        .binding_list(&ns, &uid, "", 100)
        .await
        .expect("bindings")
        .is_empty());
    assert!(auth
        .binding_list(&ns, "", "", 100)
        .await
        .expect("bindings")
        .is_empty());
    // The key records and indexes are gone, not only hidden.
    let raw = b.queues.auth();
    assert_eq!(
        raw.get(&records::key(records::tag::KEY, &[&rec.id]))
            .await
            .expect("get"),
        None
    );
    assert_eq!(
        raw.get(&records::key(records::tag::KEY_HASH, &[&rec.hash]))
            .await
            .expect("get"),
        None
    );
    // The role is free to go, and the name to be taken again.
    auth.role_delete(&ns, "worker")
        .await
        .expect("role has no bindings left");
    assert!(matches!(
        auth.user_delete(&uid).await,
        Err(AuthError::NotFound(_))
    ));
    let again = auth
        .user_create(&name, "", "")
        .await
        .expect("the name is free again");
    assert_ne!(again, uid);
}

/// Expired keys get `ExpiredKey`, revoked keys `UnknownKey`, malformed ones `InvalidKey`.
pub async fn auth_service_key_expiry_and_revocation(b: TestBackend) {
    let (auth, clock) = booted(&b).await;
    let uid = auth
        .user_create(&unique("user-keys"), "", "")
        .await
        .expect("user");
    let (_, short) = auth
        .key_create(key_spec(&uid, "", T0.add(Duration::from_secs(60))))
        .await
        .expect("key");
    assert!(matches!(
        auth.key_create(key_spec(&uid, "", T0)).await,
        Err(AuthError::Invalid(m)) if m.starts_with("expires_at is invalid")
    ));
    auth.authenticate(Some(&short)).await.expect("not yet expired");
    clock.advance(Duration::from_secs(61));
    assert!(matches!(
        auth.authenticate(Some(&short)).await,
        Err(AuthError::ExpiredKey)
    ));

    let (rec, long) = auth.key_create(key_spec(&uid, "", Ts::ZERO)).await.expect("key");
    auth.authenticate(Some(&long)).await.expect("works");
    auth.key_delete(&rec.id).await.expect("revoke");
    auth.invalidate();
    assert!(matches!(
        auth.authenticate(Some(&long)).await,
        Err(AuthError::UnknownKey)
    ));
    assert!(matches!(
        auth.key_delete(&rec.id).await,
        Err(AuthError::NotFound(_))
    ));
    assert!(matches!(
        auth.authenticate(Some("qtr-nope")).await,
        Err(AuthError::InvalidKey)
    ));
    // A well-formed key nobody holds.
    let made_up = lessor_core::auth::key::generate("live")
        .expect("randomness")
        .secret;
    assert!(matches!(
        auth.authenticate(Some(&made_up)).await,
        Err(AuthError::UnknownKey)
    ));
}

/// Roles: create, update, delete; standard names refused; deletion refused while bound; duplicate bindings
/// refused.
pub async fn auth_service_roles(b: TestBackend) {
    let (auth, clock) = booted(&b).await;
    let ns = unique("ns-roles");
    auth.namespace_create(ns_spec(&ns)).await.expect("namespace");
    assert!(matches!(
        auth.role_create(&unique("ns-missing"), "r", &perms(&[Permission::QueueList]))
            .await,
        Err(AuthError::NotFound(_))
    ));
    let id = auth
        .role_create(&ns, "reader", &perms(&[Permission::QueueList]))
        .await
        .expect("role");
    assert!(matches!(
        auth.role_create(&ns, "reader", &perms(&[Permission::QueueList])).await,
        Err(AuthError::Invalid(m)) if m.starts_with("role already exists")
    ));
    for std in ["Admin", "NamespaceOwner", "PublicViewer"] {
        assert!(matches!(
            auth.role_create(&ns, std, &perms(&[Permission::QueueList])).await,
            Err(AuthError::Invalid(m)) if m.starts_with("cannot modify or delete standard role")
        ));
        assert!(matches!(
            auth.role_update("_system", std, &perms(&[Permission::QueueList]))
                .await,
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            auth.role_delete("_system", std).await,
            Err(AuthError::Invalid(_))
        ));
    }
    assert!(matches!(
        auth.role_create(&ns, "bad", &["queue.fly".to_string()]).await,
        Err(AuthError::Invalid(_))
    ));
    clock.advance(Duration::from_secs(5));
    auth.role_update(
        &ns,
        "reader",
        &perms(&[Permission::QueueList, Permission::QueueStats]),
    )
    .await
    .expect("update");
    let role = auth.role(&ns, "reader").await.expect("role").expect("exists");
    assert_eq!(role.id, id);
    assert_eq!(role.created_at, T0);
    assert_eq!(role.updated_at, T0.add(Duration::from_secs(5)));
    assert!(role.permission_set().contains(Permission::QueueStats));
    assert!(matches!(
        auth.role_update(&ns, "nobody", &perms(&[Permission::QueueList]))
            .await,
        Err(AuthError::NotFound(_))
    ));

    let uid = auth
        .user_create(&unique("user-roles"), "", "")
        .await
        .expect("user");
    auth.binding_create(&ns, "reader", &uid).await.expect("bind");
    assert!(matches!(
        auth.binding_create(&ns, "reader", &uid).await,
        Err(AuthError::Invalid(m)) if m.starts_with("role binding already exists")
    ));
    assert!(matches!(
        auth.binding_create(&ns, "reader", "no-such-user").await,
        Err(AuthError::NotFound(_))
    ));
    assert!(matches!(
        auth.role_delete(&ns, "reader").await,
        Err(AuthError::Invalid(m)) if m.starts_with("role has active bindings")
    ));
    auth.binding_delete(&ns, "reader", &uid).await.expect("unbind");
    assert!(matches!(
        auth.binding_delete(&ns, "reader", &uid).await,
        Err(AuthError::NotFound(_))
    ));
    auth.role_delete(&ns, "reader").await.expect("delete");
    assert!(auth.role(&ns, "reader").await.expect("role").is_none());
    assert!(auth.role_list(&ns, "", 100).await.expect("roles").is_empty());
    assert!(matches!(
        auth.role_delete(&ns, "reader").await,
        Err(AuthError::NotFound(_))
    ));
}

/// Namespaces: update keeps `created_at`; deletion is refused while bindings, roles or queues remain (in that
/// order); reserved and duplicate names are refused.
pub async fn auth_service_namespaces(b: TestBackend) {
    let (auth, clock) = booted(&b).await;
    let ns = unique("ns-life");
    auth.namespace_create(ns_spec(&ns)).await.expect("create");
    assert!(matches!(
        auth.namespace_create(ns_spec(&ns)).await,
        Err(AuthError::Invalid(m)) if m.starts_with("namespace already exists")
    ));
    assert!(matches!(
        auth.namespace_create(ns_spec("_mine")).await,
        Err(AuthError::Invalid(m)) if m.starts_with("namespace name is reserved")
    ));
    clock.advance(Duration::from_secs(10));
    let mut spec = ns_spec(&ns);
    spec.description = "changed".into();
    spec.api_key_tag = "tenant".into();
    auth.namespace_update(spec).await.expect("update");
    let got = auth.namespace(&ns).await.expect("get").expect("exists");
    assert_eq!(got.created_at, T0, "update keeps created_at");
    assert_eq!(got.updated_at, T0.add(Duration::from_secs(10)));
    assert_eq!(
        (got.description.as_str(), got.api_key_tag.as_str()),
        ("changed", "tenant")
    );
    assert!(matches!(
        auth.namespace_update(ns_spec(&unique("ns-none"))).await,
        Err(AuthError::NotFound(_))
    ));
    let listed = auth.namespace_list(&ns, 1).await.expect("list");
    assert_eq!(listed.first().map(|n| n.name.as_str()), Some(ns.as_str()));

    auth.role_create(&ns, "r", &perms(&[Permission::QueueList]))
        .await
        .expect("role");
    let uid = auth.user_create(&unique("user-ns"), "", "").await.expect("user");
    auth.binding_create(&ns, "r", &uid).await.expect("bind");
    assert!(matches!(
        auth.namespace_delete(&ns, false).await,
        Err(AuthError::Invalid(m)) if m.starts_with("namespace has role bindings")
    ));
    auth.binding_delete(&ns, "r", &uid).await.expect("unbind");
    assert!(matches!(
        auth.namespace_delete(&ns, false).await,
        Err(AuthError::Invalid(m)) if m.starts_with("namespace has roles")
    ));
    auth.role_delete(&ns, "r").await.expect("role delete");
    assert!(matches!(
        auth.namespace_delete(&ns, true).await,
        Err(AuthError::Invalid(m)) if m.starts_with("namespace has queues")
    ));
    auth.namespace_delete(&ns, false).await.expect("delete");
    assert!(!auth.namespace_exists(&ns).await.expect("exists"));
    assert!(matches!(
        auth.namespace_delete(&ns, false).await,
        Err(AuthError::NotFound(_))
    ));
}

/// Authorisation: bindings grant in their namespace only; a scoped key cannot leave its namespace; `_system`
/// bindings apply everywhere.
pub async fn auth_service_authorize_scopes(b: TestBackend) {
    let (auth, _clock) = booted(&b).await;
    let (a, other) = (unique("ns-a"), unique("ns-b"));
    for n in [&a, &other] {
        auth.namespace_create(ns_spec(n)).await.expect("namespace");
    }
    auth.role_create(&a, "producer", &perms(&[Permission::QueueProduce]))
        .await
        .expect("role");
    auth.role_create(&other, "producer", &perms(&[Permission::QueueProduce]))
        .await
        .expect("role");
    let uid = auth
        .user_create(&unique("user-scope"), "", "")
        .await
        .expect("user");
    auth.binding_create(&a, "producer", &uid).await.expect("bind a");
    auth.binding_create(&other, "producer", &uid)
        .await
        .expect("bind b");
    let (_, free) = auth.key_create(key_spec(&uid, "", Ts::ZERO)).await.expect("key");
    let (_, scoped) = auth
        .key_create(key_spec(&uid, &other, Ts::ZERO))
        .await
        .expect("key");

    let p = auth.authenticate(Some(&free)).await.expect("auth");
    auth.authorize(&p, &a, Permission::QueueProduce)
        .await
        .expect("bound in a");
    auth.authorize(&p, &other, Permission::QueueProduce)
        .await
        .expect("bound in b");
    assert!(matches!(
        auth.authorize(&p, &a, Permission::QueueDelete).await,
        Err(AuthError::AccessDenied)
    ));
    assert!(matches!(
        auth.authorize(&p, &unique("ns-c"), Permission::QueueProduce)
            .await,
        Err(AuthError::AccessDenied)
    ));
    let s = auth.authenticate(Some(&scoped)).await.expect("auth");
    assert_eq!(s.namespace_scope, other);
    auth.authorize(&s, &other, Permission::QueueProduce)
        .await
        .expect("inside its scope");
    assert!(
        matches!(
            auth.authorize(&s, &a, Permission::QueueProduce).await,
            Err(AuthError::AccessDenied)
        ),
        "a scoped key cannot use the user's grants in another namespace"
    );

    // A `_system` binding cascades into every namespace, but not past a key's scope (except into `_system`).
    let sys = auth.user_create(&unique("user-sys"), "", "").await.expect("user");
    auth.binding_create("_system", "NamespaceOwner", &sys)
        .await
        .expect("bind");
    let (_, sys_free) = auth.key_create(key_spec(&sys, "", Ts::ZERO)).await.expect("key");
    let (_, sys_scoped) = auth.key_create(key_spec(&sys, &a, Ts::ZERO)).await.expect("key");
    let q = auth.authenticate(Some(&sys_free)).await.expect("auth");
    for n in [a.as_str(), other.as_str(), "_system"] {
        auth.authorize(&q, n, Permission::QueueClear)
            .await
            .expect("cascade");
    }
    assert!(matches!(
        auth.authorize(&q, &a, Permission::UserCreate).await,
        Err(AuthError::AccessDenied)
    ));
    let r = auth.authenticate(Some(&sys_scoped)).await.expect("auth");
    auth.authorize(&r, &a, Permission::QueueClear)
        .await
        .expect("in scope, through _system");
    auth.authorize(&r, "_system", Permission::QueueClear)
        .await
        .expect("_system through _system");
    assert!(matches!(
        auth.authorize(&r, &other, Permission::QueueClear).await,
        Err(AuthError::AccessDenied)
    ));
    // Unbinding takes effect at once on this server.
    auth.binding_delete("_system", "NamespaceOwner", &sys)
        .await
        .expect("unbind");
    assert!(matches!(
        auth.authorize(&q, &a, Permission::QueueClear).await,
        Err(AuthError::AccessDenied)
    ));
}

/// The binding list of a namespace honours its user filter (Querator's ignores it).
pub async fn auth_service_binding_list_filter(b: TestBackend) {
    let (auth, _clock) = booted(&b).await;
    let ns = unique("ns-bindlist");
    auth.namespace_create(ns_spec(&ns)).await.expect("namespace");
    auth.role_create(&ns, "one", &perms(&[Permission::QueueList]))
        .await
        .expect("role");
    auth.role_create(&ns, "two", &perms(&[Permission::QueueStats]))
        .await
        .expect("role");
    let u1 = auth.user_create(&unique("user-bl1"), "", "").await.expect("user");
    let u2 = auth.user_create(&unique("user-bl2"), "", "").await.expect("user");
    auth.binding_create(&ns, "one", &u1).await.expect("bind");
    auth.binding_create(&ns, "two", &u1).await.expect("bind");
    auth.binding_create(&ns, "one", &u2).await.expect("bind");
    let of = |list: Vec<lessor_core::auth::RoleBinding>| {
        let mut v: Vec<String> = list.into_iter().map(|b| b.user_id).collect();
        v.sort();
        v
    };
    assert_eq!(
        of(auth.binding_list(&ns, &u1, "", 100).await.expect("list")),
        vec![u1.clone(), u1.clone()]
    );
    assert_eq!(
        of(auth.binding_list(&ns, &u2, "", 100).await.expect("list")),
        vec![u2.clone()]
    );
    let mut all = vec![u1.clone(), u1.clone(), u2.clone()];
    all.sort();
    assert_eq!(of(auth.binding_list(&ns, "", "", 100).await.expect("list")), all);
    assert!(auth
        .binding_list(&ns, "nobody", "", 100)
        .await
        .expect("list")
        .is_empty());
    let bindings = auth.binding_list(&ns, &u2, "", 100).await.expect("list");
    assert_eq!(bindings[0].namespace, ns);
}

/// Two servers on one store: a key deleted through one keeps working on the other only until that one polls the
/// generation ([`Auth::refresh`], what [`Auth::watch`] runs every second). Skipped on stores that one process
/// alone can open (no second handle).
pub async fn auth_service_cross_server_revocation(b: TestBackend) {
    let Some(peer) = &b.peer else {
        eprintln!("skipped: the store has a single handle");
        return;
    };
    let (a, _clock) = booted(&b).await;
    let (other, _clock_b) = service(peer.auth());
    other.refresh().await.expect("first poll");
    let uid = a.user_create(&unique("user-xsrv"), "", "").await.expect("user");
    let (rec, secret) = a.key_create(key_spec(&uid, "", Ts::ZERO)).await.expect("key");
    let (rec2, secret2) = a.key_create(key_spec(&uid, "", Ts::ZERO)).await.expect("key");
    assert_eq!(
        other
            .authenticate(Some(&secret))
            .await
            .expect("B sees the key")
            .user_id,
        uid
    );
    other.authenticate(Some(&secret2)).await.expect("B sees the key");

    a.key_delete(&rec.id).await.expect("revoke through A");
    assert!(matches!(
        a.authenticate(Some(&secret)).await,
        Err(AuthError::UnknownKey)
    ));
    other
        .authenticate(Some(&secret))
        .await
        .expect("B still trusts its cache before it polls");
    assert!(other.refresh().await.expect("poll"), "B sees the generation move");
    assert!(matches!(
        other.authenticate(Some(&secret)).await,
        Err(AuthError::UnknownKey)
    ));
    other
        .authenticate(Some(&secret2))
        .await
        .expect("the other key still works");

    // Deleting the user through B reaches A the same way.
    a.refresh().await.expect("first poll");
    a.authenticate(Some(&secret2)).await.expect("cached on A");
    other.user_delete(&uid).await.expect("delete through B");
    assert!(a.refresh().await.expect("poll"));
    assert!(matches!(
        a.authenticate(Some(&secret2)).await,
        Err(AuthError::UnknownKey)
    ));
    assert!(
        a.key_list(&uid, "", 10).await.expect("keys").is_empty(),
        "{}",
        rec2.id
    );
}

/// Polls `cond` until it holds (background work of the service, such as recording a key's use), failing after a
/// generous bound.
async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A key's use is recorded (`last_used_at`) at a cache miss, but not again within `TOUCH_EVERY`: a record is a
/// commit, every commit moves the generation and so drops every server's caches, and recording every miss made each
/// use cause the next miss.
pub async fn auth_service_key_use_is_recorded_sparingly(b: TestBackend) {
    use lessor_core::auth::service::TOUCH_EVERY;
    use lessor_core::time::Clock;

    let (auth, clock) = booted(&b).await;
    let store = b.queues.auth();
    let uid = auth
        .user_create(&unique("user-touch"), "", "")
        .await
        .expect("user");
    let (rec, secret) = auth.key_create(key_spec(&uid, "", Ts::ZERO)).await.expect("key");
    let last_used = |auth: Auth, uid: String, id: String| async move {
        auth.key_list(&uid, "", 10)
            .await
            .expect("keys")
            .into_iter()
            .find(|k| k.id == id)
            .map(|k| k.last_used_at)
    };
    clock.advance(Duration::from_secs(1));
    let first = clock.now();
    auth.authenticate(Some(&secret)).await.expect("key works");
    wait_for("the first use to be recorded", || {
        let seen = last_used(auth.clone(), uid.clone(), rec.id.clone());
        async move { seen.await == Some(first) }
    })
    .await;
    let g = store.generation().await.expect("generation");
    for _ in 0..3 {
        clock.advance(Duration::from_secs(60));
        auth.invalidate();
        auth.authenticate(Some(&secret)).await.expect("key works");
    }
    clock.advance(TOUCH_EVERY);
    let later = clock.now();
    auth.invalidate();
    auth.authenticate(Some(&secret)).await.expect("key works");
    wait_for("the later use to be recorded", || {
        let seen = last_used(auth.clone(), uid.clone(), rec.id.clone());
        async move { seen.await == Some(later) }
    })
    .await;
    let after = store.generation().await.expect("generation");
    if b.private_auth {
        assert_eq!(
            after, g,
            "recording a use is a silent commit: no server drops its caches for it"
        );
    } else {
        assert!(after >= g);
    }
}

/// A silent commit applies its writes but leaves the generation alone (on a shared store: never moves it back).
pub async fn auth_kv_silent_commit_keeps_the_generation(b: TestBackend) {
    let s = b.queues.auth();
    let p = unique("kv-silent").into_bytes();
    put(s.as_ref(), k(&p, b"a"), b"1").await;
    let g = s.generation().await.expect("generation");
    let mut c = Commit::default();
    c.present(k(&p, b"a")).put(k(&p, b"a"), b"2".to_vec());
    c.silent = true;
    s.commit(c).await.expect("commit").expect("holds");
    assert_eq!(
        s.get(&k(&p, b"a")).await.expect("get"),
        Some(Bytes::from_static(b"2"))
    );
    let after = s.generation().await.expect("generation");
    if b.private_auth {
        assert_eq!(after, g, "a silent commit does not move the generation");
    } else {
        assert!(after >= g);
    }
}
