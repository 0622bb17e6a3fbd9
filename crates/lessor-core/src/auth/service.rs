//! Authentication and authorisation: who a request runs as, and whether it may do what it asks, answered from a
//! cache so that an authenticated request costs no storage round trip once its key has been seen.
//!
//! # Caching and revocation
//! Two caches sit in front of the store: keys by hash (the principal, its expiry) and users' grants (for each
//! namespace, the union of the permissions of the roles the user is bound to there). Both are dropped as a whole
//! whenever the auth data may have changed:
//! - at once on the server that made the change;
//! - on every other server sharing the store within one poll of [`AuthStore::generation`] ([`Auth::watch`], every
//!   second by default), which is one tiny read per second per server, not per request;
//! - and after [`CACHE_TTL`] in any case, so a server whose watcher cannot reach the store stops trusting old
//!   answers.
//!
//! Auth changes are rare next to queue traffic, so dropping everything is simpler and safer than tracking which
//! entry each change touches. A lookup that started before a drop does not put its (possibly stale) answer into the
//! cache afterwards: entries carry the cache epoch they were read in.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::error::AuthError;
use super::key;
use super::model::{ApiKey, Principal, Role, User};
use super::permission::{Permission, PermissionSet};
use super::records::{self, tag};
use super::store::AuthStore;
use crate::error::StorageError;
use crate::time::{Clock, Ts};
use crate::types::DEFAULT_NAMESPACE;

/// How long a cached answer is trusted without hearing from the store.
pub const CACHE_TTL: Duration = Duration::from_secs(5 * 60);
/// Most keys (known or unknown) the cache holds; past it the cache starts over, so a flood of made-up keys costs
/// store reads, never memory.
pub const MAX_CACHED_KEYS: usize = 100_000;
/// Most users whose grants the cache holds.
pub const MAX_CACHED_USERS: usize = 100_000;
/// Most bindings read for one user's grants; a user with more is refused with `authorization check failed` rather
/// than judged on a partial list.
pub const MAX_BINDINGS_PER_USER: usize = 10_000;

/// Least time between two records of one key's use (`last_used_at`), see [`Auth::authenticate`].
pub const TOUCH_EVERY: Duration = Duration::from_secs(60 * 60);

/// How a server runs auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Querator's `none`: every request runs as an anonymous administrator.
    Disabled,
    /// Querator's `internal`: keys, roles and bindings from the auth store.
    Internal,
}

/// The auth service: shared by every request handler (cloning is cheap).
#[derive(Clone, Debug)]
pub struct Auth {
    pub(super) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) store: Arc<dyn AuthStore>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) mode: AuthMode,
    cache: RwLock<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    /// Bumped by every drop; an answer read in an older epoch is not cached.
    epoch: u64,
    /// The store's generation last seen by [`Auth::watch`].
    generation: Option<u64>,
    keys: HashMap<String, KeyEntry>,
    grants: HashMap<String, (Ts, Arc<Grants>)>,
}

#[derive(Debug, Clone)]
enum KeyEntry {
    Known {
        principal: Principal,
        expires_at: Ts,
        fetched: Ts,
    },
    Unknown {
        fetched: Ts,
    },
}

/// What a user may do, per namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Grants {
    by_namespace: HashMap<String, PermissionSet>,
}

impl Grants {
    /// The permissions granted in `namespace` by bindings there (not counting `_system`'s cascade).
    pub fn in_namespace(&self, namespace: &str) -> PermissionSet {
        self.by_namespace.get(namespace).copied().unwrap_or_default()
    }

    /// Every namespace where the user holds a permission, with what it holds there, in namespace order.
    pub fn namespaces(&self) -> Vec<(&str, PermissionSet)> {
        let mut out: Vec<(&str, PermissionSet)> = self
            .by_namespace
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(n, p)| (n.as_str(), *p))
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out
    }
}

impl Auth {
    /// The service over `store`, reading time from `clock`.
    pub fn new(store: Arc<dyn AuthStore>, clock: Arc<dyn Clock>, mode: AuthMode) -> Auth {
        Auth {
            inner: Arc::new(Inner {
                store,
                clock,
                mode,
                cache: RwLock::new(Cache::default()),
            }),
        }
    }

    /// Whether requests are checked at all.
    pub fn enabled(&self) -> bool {
        self.inner.mode == AuthMode::Internal
    }

    /// The store, for administration code in this module.
    pub(super) fn store(&self) -> &dyn AuthStore {
        self.inner.store.as_ref()
    }

    /// Now, on the service's clock.
    pub(super) fn now(&self) -> Ts {
        self.inner.clock.now()
    }

    /// The principal of a request carrying `token` (the part after `Bearer `; `None` or empty: no key).
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Principal, AuthError> {
        let token = token.map(str::trim).unwrap_or_default();
        if !self.enabled() || token.is_empty() {
            return Ok(Principal::anonymous());
        }
        if !key::well_formed(token) {
            return Err(AuthError::InvalidKey);
        }
        let hash = key::hash(token);
        let now = self.now();
        let (epoch, cached) = {
            let cache = self.read_cache();
            (cache.epoch, cache.keys.get(&hash).cloned())
        };
        let entry = match cached {
            Some(entry) if fresh(entry_fetched(&entry), now) => entry,
            _ => {
                let entry = self.load_key(&hash, now).await?;
                let mut cache = self.write_cache();
                if cache.epoch == epoch {
                    if cache.keys.len() >= MAX_CACHED_KEYS {
                        cache.keys.clear();
                    }
                    cache.keys.insert(hash, entry.clone());
                }
                entry
            }
        };
        match entry {
            KeyEntry::Unknown { .. } => Err(AuthError::UnknownKey),
            KeyEntry::Known {
                principal,
                expires_at,
                ..
            } => {
                if !expires_at.is_zero() && expires_at <= now {
                    return Err(AuthError::ExpiredKey);
                }
                Ok(principal)
            }
        }
    }

    /// Reads a key (and its user) from the store; records when it was used, in the background.
    async fn load_key(&self, hash: &str, now: Ts) -> Result<KeyEntry, AuthError> {
        let store = self.store();
        let unknown = KeyEntry::Unknown { fetched: now };
        let Some(id) = store.get(&records::key(tag::KEY_HASH, &[hash])).await? else {
            return Ok(unknown);
        };
        let id = String::from_utf8_lossy(&id).into_owned();
        let key_at = records::key(tag::KEY, &[&id]);
        let Some(bytes) = store.get(&key_at).await? else {
            return Ok(unknown);
        };
        let record: ApiKey = records::decode(&key_at, &bytes)?;
        if !key::same_hash(&record.hash, hash) {
            return Ok(unknown);
        }
        // A key whose user is gone is dead even if a racing user deletion missed it.
        let user_at = records::key(tag::USER, &[&record.user_id]);
        let Some(user) = store.get(&user_at).await? else {
            return Ok(unknown);
        };
        let user: User = records::decode(&user_at, &user)?;
        // Recording a use is a write per cache miss; a silent one (it moves no generation, so no server drops its
        // caches for it), and at most once per TOUCH_EVERY per key, so busy keys cost the store almost nothing.
        if record.last_used_at.is_zero() || now.since(record.last_used_at) >= TOUCH_EVERY {
            self.touch_key(record.id.clone(), now);
        }
        Ok(KeyEntry::Known {
            principal: Principal {
                user_id: user.id,
                username: user.username,
                namespace_scope: record.namespace_scope,
                key_id: record.id,
            },
            expires_at: record.expires_at,
            fetched: now,
        })
    }

    /// Sets a key's `last_used_at`, best effort and off the request path (only on cache misses, as Querator: the
    /// figure says "used since about then", not "used at exactly").
    fn touch_key(&self, id: String, now: Ts) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let auth = self.clone();
        handle.spawn(async move {
            if let Err(e) = auth.set_last_used(&id, now).await {
                tracing::debug!(key = %id, error = %e, "could not record api key use");
            }
        });
    }

    /// Whether `principal` may do `permission` in `namespace`: `Ok`, or [`AuthError::AccessDenied`]
    /// ([`AuthError::Unauthenticated`] for a request without a key), or [`AuthError::CheckFailed`] when the grants
    /// could not be read.
    pub async fn authorize(
        &self,
        principal: &Principal,
        namespace: &str,
        permission: Permission,
    ) -> Result<(), AuthError> {
        if self.allowed(principal, namespace, permission).await? {
            Ok(())
        } else if principal.is_anonymous() {
            Err(AuthError::Unauthenticated)
        } else {
            Err(AuthError::AccessDenied)
        }
    }

    /// Whether `principal` may do `permission` in `namespace` (without turning "no" into an error).
    pub async fn allowed(
        &self,
        principal: &Principal,
        namespace: &str,
        permission: Permission,
    ) -> Result<bool, AuthError> {
        if !self.enabled() {
            return Ok(true);
        }
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        let grants = self.grants(&principal.user_id).await.map_err(|e| {
            tracing::warn!(user = %principal.user_id, error = %e, "authorization check failed");
            AuthError::CheckFailed
        })?;
        let system = grants.in_namespace(DEFAULT_NAMESPACE);
        let scope = principal.namespace_scope.as_str();
        if !scope.is_empty() && scope != namespace {
            // A scoped key leaves its namespace only for `_system`, and there only through `_system` bindings.
            return Ok(namespace == DEFAULT_NAMESPACE && system.contains(permission));
        }
        Ok(grants.in_namespace(namespace).contains(permission)
            || (namespace != DEFAULT_NAMESPACE && system.contains(permission)))
    }

    /// Whether `principal` may do `permission` in some namespace (always, with auth off): a check that needs no
    /// namespace, for refusing a request before its body is read.
    pub async fn allowed_somewhere(
        &self,
        principal: &Principal,
        permission: Permission,
    ) -> Result<bool, AuthError> {
        if !self.enabled() {
            return Ok(true);
        }
        let grants = self.grants(&principal.user_id).await.map_err(|e| {
            tracing::warn!(user = %principal.user_id, error = %e, "authorization check failed");
            AuthError::CheckFailed
        })?;
        if grants.in_namespace(DEFAULT_NAMESPACE).contains(permission) {
            return Ok(true);
        }
        let scope = principal.namespace_scope.as_str();
        Ok(grants
            .namespaces()
            .iter()
            .any(|(ns, p)| (scope.is_empty() || *ns == scope) && p.contains(permission)))
    }

    /// A user's grants, from the cache or the store.
    pub async fn grants(&self, user_id: &str) -> Result<Arc<Grants>, StorageError> {
        let now = self.now();
        let epoch = {
            let cache = self.read_cache();
            if let Some((fetched, g)) = cache.grants.get(user_id) {
                if fresh(*fetched, now) {
                    return Ok(g.clone());
                }
            }
            cache.epoch
        };
        let grants = Arc::new(self.load_grants(user_id).await?);
        let mut cache = self.write_cache();
        if cache.epoch == epoch {
            if cache.grants.len() >= MAX_CACHED_USERS {
                cache.grants.clear();
            }
            cache.grants.insert(user_id.to_string(), (now, grants.clone()));
        }
        Ok(grants)
    }

    async fn load_grants(&self, user_id: &str) -> Result<Grants, StorageError> {
        let store = self.store();
        let bindings = store
            .scan(
                &records::prefix(tag::USER_BINDING, &[user_id]),
                &[],
                MAX_BINDINGS_PER_USER + 1,
            )
            .await?;
        if bindings.len() > MAX_BINDINGS_PER_USER {
            return Err(StorageError::other(format!(
                "user '{user_id}' has more than {MAX_BINDINGS_PER_USER} role bindings"
            )));
        }
        let mut grants = Grants::default();
        let mut roles: HashMap<String, PermissionSet> = HashMap::new();
        for (k, _) in bindings {
            let seg = records::segments(&k);
            let [_, namespace, role_id] = seg.as_slice() else {
                continue;
            };
            let perms = match roles.get(role_id) {
                Some(p) => *p,
                None => {
                    let p = match self.role_by_id(role_id).await? {
                        Some(role) => role.permission_set(),
                        // A binding whose role is gone grants nothing.
                        None => PermissionSet::EMPTY,
                    };
                    roles.insert(role_id.clone(), p);
                    p
                }
            };
            let slot = grants.by_namespace.entry(namespace.clone()).or_default();
            *slot = slot.union(perms);
        }
        Ok(grants)
    }

    /// The role with id `id`.
    pub(super) async fn role_by_id(&self, id: &str) -> Result<Option<Role>, StorageError> {
        let found = self
            .store()
            .scan(&records::prefix(tag::ROLE_ID, &[id]), &[], 1)
            .await?;
        let Some((k, _)) = found.into_iter().next() else {
            return Ok(None);
        };
        let seg = records::segments(&k);
        let [_, namespace, name] = seg.as_slice() else {
            return Ok(None);
        };
        let at = records::key(tag::ROLE, &[namespace, name]);
        match self.store().get(&at).await? {
            Some(bytes) => Ok(Some(records::decode(&at, &bytes)?)),
            None => Ok(None),
        }
    }

    /// Drops every cached answer (after a change made here, or seen through the generation).
    pub fn invalidate(&self) {
        let mut cache = self.write_cache();
        cache.epoch += 1;
        cache.keys.clear();
        cache.grants.clear();
    }

    /// Reads the store's generation once and drops the caches if it moved since the last call. Returns whether it
    /// did.
    pub async fn refresh(&self) -> Result<bool, StorageError> {
        let generation = self.store().generation().await?;
        let mut cache = self.write_cache();
        let changed = cache.generation.is_some_and(|g| g != generation);
        cache.generation = Some(generation);
        if changed {
            cache.epoch += 1;
            cache.keys.clear();
            cache.grants.clear();
        }
        Ok(changed)
    }

    /// Polls the store's generation every `every` until `stop` resolves, so that a key or user deleted through
    /// another server stops working here within one period. Errors are logged and retried at the next tick.
    pub async fn watch(&self, every: Duration, stop: impl std::future::Future<Output = ()>) {
        if !self.enabled() {
            return;
        }
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "cannot read the auth generation; cached keys stay until their TTL");
                    }
                }
            }
        }
    }

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        // A panic while holding the lock leaves plain maps behind; they are still usable.
        self.inner
            .cache
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.inner
            .cache
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn entry_fetched(e: &KeyEntry) -> Ts {
    match e {
        KeyEntry::Known { fetched, .. } | KeyEntry::Unknown { fetched } => *fetched,
    }
}

fn fresh(fetched: Ts, now: Ts) -> bool {
    now.since(fetched) < CACHE_TTL && fetched <= now
}
