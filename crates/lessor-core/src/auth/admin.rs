//! Administration of the auth model: namespaces, users, API keys, roles, role bindings, and the bootstrap a server
//! runs at start. Authorisation of these calls is the caller's (the server checks the route's permission first);
//! this module validates input and keeps the records and their indexes consistent.
//!
//! Every change is one [`Commit`]: its preconditions make uniqueness and cascades hold even with several servers on
//! one store (two servers creating the same username: one wins, the other gets "already exists").

use super::error::AuthError;
use super::key::{self, NewKey};
use super::model::{ApiKey, Namespace, Role, RoleBinding, User, ANONYMOUS};
use super::permission::{is_standard_role, Permission, PermissionSet, ADMIN, STANDARD_ROLES};
use super::records::{self, decode, encode, key as rkey, prefix, tag};
use super::service::Auth;
use super::store::{CheckFailed, Commit};
use crate::time::Ts;
use crate::types::DEFAULT_NAMESPACE;
use crate::validate;

/// Longest namespace name.
pub const MAX_NAMESPACE_NAME: usize = 256;
/// Longest namespace description.
pub const MAX_DESCRIPTION: usize = 2000;
/// Longest username, role name and key name.
pub const MAX_NAME: usize = 128;
/// Longest email and external id.
pub const MAX_CONTACT: usize = 256;
/// Default of a list's limit.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// Most role bindings a single delete cascades through in one commit (a user's keys and bindings).
pub const MAX_CASCADE: usize = 10_000;

/// A namespace as created or updated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceSpec {
    /// Name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Tag for keys scoped to the namespace (empty: none).
    pub api_key_tag: String,
}

/// An API key request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpec {
    /// The user the key belongs to.
    pub user_id: String,
    /// Free text.
    pub name: String,
    /// Namespace the key is limited to (empty: none).
    pub namespace_scope: String,
    /// Expiry (zero: never).
    pub expires_at: Ts,
    /// Tag (empty: the namespace's, else `live`).
    pub tag: String,
}

/// What a server's start did to the auth data.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootstrapReport {
    /// The open-door binding (anonymous → Admin in `_system`) was created now.
    pub opened_door: bool,
    /// An existing open-door binding was removed, because the configuration closes the door.
    pub closed_door: bool,
    /// Whether anonymous requests are allowed everything after the bootstrap.
    pub door_open: bool,
    /// The bootstrap administrator was created now (its key went to the writer).
    pub created_admin: bool,
}

/// Marker of the one-time open-door binding.
const OPEN_DOOR_MARKER: &str = "open-door";
/// Marker of the one-time bootstrap administrator.
const ADMIN_MARKER: &str = "bootstrap-admin";
/// Name of the bootstrap administrator.
pub const BOOTSTRAP_ADMIN: &str = "admin";

fn check_text(field: &str, value: &str, max: usize) -> Result<(), AuthError> {
    if value.len() > max {
        return Err(AuthError::invalid(
            field,
            format!("cannot be greater than '{max}' characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(AuthError::invalid(
            field,
            format!("'{}' cannot contain control characters", value.escape_debug()),
        ));
    }
    Ok(())
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), AuthError> {
    if value.trim().is_empty() {
        return Err(AuthError::invalid(field, "cannot be empty"));
    }
    check_text(field, value, max)?;
    if value.chars().any(char::is_whitespace) {
        return Err(AuthError::invalid(
            field,
            format!("'{value}' cannot contain whitespace"),
        ));
    }
    Ok(())
}

/// Checks a namespace name given by a client (reserved names refused).
fn check_namespace_name(name: &str) -> Result<(), AuthError> {
    check_name("name", name, MAX_NAMESPACE_NAME)?;
    if name.contains('~') || name.contains(':') {
        return Err(AuthError::invalid(
            "name",
            format!("'{name}' cannot contain '~' or ':' characters"),
        ));
    }
    if name.starts_with('_') {
        return Err(AuthError::Invalid(format!(
            "namespace name is reserved; '{name}' names starting with '_' are reserved"
        )));
    }
    Ok(())
}

fn check_tag(field: &str, tag: &str) -> Result<(), AuthError> {
    if !tag.is_empty() && !key::valid_tag(tag) {
        return Err(AuthError::invalid(
            field,
            format!("'{tag}' must be 1-16 characters of [a-z0-9]"),
        ));
    }
    Ok(())
}

fn list_limit(limit: i32) -> Result<usize, AuthError> {
    validate::list_limit(i64::from(limit), DEFAULT_LIST_LIMIT).map_err(|e| AuthError::Invalid(e.to_string()))
}

/// The namespace a request names, `_system` when empty.
fn namespace_or_system(ns: &str) -> &str {
    if ns.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        ns
    }
}

/// A new record id: the creation time in microseconds then 64 random bits, hex, so ids sort by creation.
fn new_id(now: Ts) -> Result<String, AuthError> {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).map_err(|e| AuthError::StorageFailed(format!("no OS randomness: {e}")))?;
    Ok(format!("{:013x}{:016x}", now.0.max(0), u64::from_be_bytes(r)))
}

fn parse_permissions(perms: &[String]) -> Result<PermissionSet, AuthError> {
    if perms.is_empty() {
        return Err(AuthError::required(
            "permissions",
            "a role needs at least one permission",
        ));
    }
    let mut set = PermissionSet::EMPTY;
    for p in perms {
        let parsed: Permission = p.parse().map_err(|e| AuthError::invalid("permissions", e))?;
        set.insert(parsed);
    }
    Ok(set)
}

impl Auth {
    async fn commit(&self, c: Commit) -> Result<Result<(), CheckFailed>, AuthError> {
        let r = self.store().commit(c).await?;
        if r.is_ok() {
            self.invalidate();
        }
        Ok(r)
    }

    async fn get_record<T: serde::de::DeserializeOwned>(&self, at: &[u8]) -> Result<Option<T>, AuthError> {
        match self.store().get(at).await? {
            Some(b) => Ok(Some(decode(at, &b)?)),
            None => Ok(None),
        }
    }

    async fn scan_records<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<T>, AuthError> {
        let rows = self.store().scan(prefix, from, limit).await?;
        rows.iter()
            .map(|(k, v)| decode(k, v).map_err(AuthError::from))
            .collect()
    }

    async fn exists(&self, at: &[u8]) -> Result<bool, AuthError> {
        Ok(self.store().get(at).await?.is_some())
    }

    async fn any_under(&self, p: &[u8]) -> Result<bool, AuthError> {
        Ok(!self.store().scan(p, &[], 1).await?.is_empty())
    }

    // ---- namespaces ----------------------------------------------------------------------------------------

    /// A namespace.
    pub async fn namespace(&self, name: &str) -> Result<Option<Namespace>, AuthError> {
        self.get_record(&rkey(tag::NAMESPACE, &[name])).await
    }

    /// Whether a namespace exists (`_system` always does once bootstrapped).
    pub async fn namespace_exists(&self, name: &str) -> Result<bool, AuthError> {
        self.exists(&rkey(tag::NAMESPACE, &[namespace_or_system(name)]))
            .await
    }

    /// Creates a namespace.
    pub async fn namespace_create(&self, spec: NamespaceSpec) -> Result<(), AuthError> {
        check_namespace_name(&spec.name)?;
        check_text("description", &spec.description, MAX_DESCRIPTION)?;
        check_tag("api_key_tag", &spec.api_key_tag)?;
        let now = self.now();
        let ns = Namespace {
            name: spec.name,
            description: spec.description,
            api_key_tag: spec.api_key_tag,
            created_at: now,
            updated_at: now,
        };
        let at = rkey(tag::NAMESPACE, &[&ns.name]);
        let mut c = Commit::default();
        c.absent(at.clone()).put(at, encode(&ns));
        self.commit(c).await?.map_err(|_| {
            AuthError::Invalid(format!("namespace already exists; '{}' already exists", ns.name))
        })
    }

    /// Replaces a namespace's description and key tag, keeping its creation time.
    pub async fn namespace_update(&self, spec: NamespaceSpec) -> Result<(), AuthError> {
        check_namespace_name(&spec.name)?;
        check_text("description", &spec.description, MAX_DESCRIPTION)?;
        check_tag("api_key_tag", &spec.api_key_tag)?;
        let at = rkey(tag::NAMESPACE, &[&spec.name]);
        let Some(mut ns) = self.get_record::<Namespace>(&at).await? else {
            return Err(namespace_not_found(&spec.name));
        };
        ns.description = spec.description;
        ns.api_key_tag = spec.api_key_tag;
        ns.updated_at = self.now();
        let mut c = Commit::default();
        c.present(at.clone()).put(at, encode(&ns));
        self.commit(c).await?.map_err(|_| namespace_not_found(&spec.name))
    }

    /// Namespaces in name order from `pivot` (inclusive).
    pub async fn namespace_list(&self, pivot: &str, limit: i32) -> Result<Vec<Namespace>, AuthError> {
        let limit = list_limit(limit)?;
        let from = if pivot.is_empty() {
            Vec::new()
        } else {
            rkey(tag::NAMESPACE, &[pivot])
        };
        self.scan_records(&prefix(tag::NAMESPACE, &[]), &from, limit)
            .await
    }

    /// Deletes a namespace that has no role bindings, roles or queues (`has_queues`, from the engine), checked in
    /// that order.
    pub async fn namespace_delete(&self, name: &str, has_queues: bool) -> Result<(), AuthError> {
        check_namespace_name(name)?;
        let at = rkey(tag::NAMESPACE, &[name]);
        if !self.exists(&at).await? {
            return Err(namespace_not_found(name));
        }
        if self.any_under(&prefix(tag::BINDING, &[name])).await? {
            return Err(AuthError::Invalid(format!(
                "namespace has role bindings; '{name}' has role bindings, delete them first"
            )));
        }
        if self.any_under(&prefix(tag::ROLE, &[name])).await? {
            return Err(AuthError::Invalid(format!(
                "namespace has roles; '{name}' has roles, delete roles first"
            )));
        }
        if has_queues {
            return Err(AuthError::Invalid(format!(
                "namespace has queues; '{name}' has queues, delete queues first"
            )));
        }
        let mut c = Commit::default();
        c.present(at.clone()).delete(at);
        self.commit(c).await?.map_err(|_| namespace_not_found(name))?;
        // A role or binding created in the namespace on another server between the checks above and the commit
        // would outlive it (and come back to life if the name were reused): sweep once more, now that none can be
        // created (creating one needs the namespace).
        let mut sweep = Commit::default();
        for role in self
            .scan_records::<Role>(&prefix(tag::ROLE, &[name]), &[], MAX_CASCADE)
            .await?
        {
            sweep
                .delete(rkey(tag::ROLE, &[name, &role.name]))
                .delete(rkey(tag::ROLE_ID, &[&role.id, name, &role.name]));
        }
        for b in self
            .scan_records::<RoleBinding>(&prefix(tag::BINDING, &[name]), &[], MAX_CASCADE)
            .await?
        {
            binding_delete_writes(name, &b.user_id, &b.role_id, &mut sweep);
        }
        if !sweep.writes.is_empty() {
            self.commit(sweep).await?.ok();
        }
        Ok(())
    }

    // ---- users ---------------------------------------------------------------------------------------------

    /// Creates a user; returns its id.
    pub async fn user_create(
        &self,
        username: &str,
        email: &str,
        external_id: &str,
    ) -> Result<String, AuthError> {
        if username.trim().is_empty() {
            return Err(AuthError::required("username", "a user needs a name"));
        }
        check_name("username", username, MAX_NAME)?;
        check_text("email", email, MAX_CONTACT)?;
        check_text("external_id", external_id, MAX_CONTACT)?;
        let now = self.now();
        let user = User {
            id: new_id(now)?,
            username: username.to_string(),
            email: email.to_string(),
            external_id: external_id.to_string(),
            created_at: now,
            updated_at: now,
        };
        self.put_user(&user).await?;
        Ok(user.id)
    }

    async fn put_user(&self, user: &User) -> Result<(), AuthError> {
        let name_at = rkey(tag::USERNAME, &[&user.username]);
        let mut c = Commit::default();
        c.absent(name_at.clone())
            .put(name_at, user.id.as_bytes().to_vec())
            .put(rkey(tag::USER, &[&user.id]), encode(user));
        self.commit(c).await?.map_err(|_| {
            AuthError::Invalid(format!(
                "user already exists; username '{}' is taken",
                user.username
            ))
        })
    }

    /// A user.
    pub async fn user(&self, id: &str) -> Result<Option<User>, AuthError> {
        self.get_record(&rkey(tag::USER, &[id])).await
    }

    /// Users in id (creation) order from `pivot` (inclusive).
    pub async fn user_list(&self, pivot: &str, limit: i32) -> Result<Vec<User>, AuthError> {
        let limit = list_limit(limit)?;
        let from = if pivot.is_empty() {
            Vec::new()
        } else {
            rkey(tag::USER, &[pivot])
        };
        self.scan_records(&prefix(tag::USER, &[]), &from, limit).await
    }

    /// Deletes a user with its keys and role bindings, in one commit: its keys stop working at once.
    pub async fn user_delete(&self, id: &str) -> Result<(), AuthError> {
        if id.is_empty() {
            return Err(AuthError::required("id", "the id of the user to delete"));
        }
        let at = rkey(tag::USER, &[id]);
        let Some(user) = self.get_record::<User>(&at).await? else {
            return Err(user_not_found(id));
        };
        let mut c = Commit::default();
        c.present(at.clone())
            .delete(at)
            .delete(rkey(tag::USERNAME, &[&user.username]));
        self.user_leftovers(id, &mut c).await?;
        self.commit(c).await?.map_err(|_| user_not_found(id))?;
        // A key or binding created for the user between the scan above and the commit (on another server) would
        // survive it: it grants nothing (authentication needs the user), but would keep its role and namespace
        // from being deleted. Sweep once more now that no new one can be made.
        let mut sweep = Commit::default();
        self.user_leftovers(id, &mut sweep).await?;
        if !sweep.writes.is_empty() {
            self.commit(sweep).await?.ok();
        }
        Ok(())
    }

    /// Adds to `c` the removal of every key and role binding of user `id`.
    async fn user_leftovers(&self, id: &str, c: &mut Commit) -> Result<(), AuthError> {
        let keys = self
            .store()
            .scan(&prefix(tag::USER_KEY, &[id]), &[], MAX_CASCADE)
            .await?;
        for (k, _) in keys {
            let seg = records::segments(&k);
            if let [_, key_id] = seg.as_slice() {
                self.delete_key_writes(key_id, c).await?;
            }
        }
        let bindings = self
            .store()
            .scan(&prefix(tag::USER_BINDING, &[id]), &[], MAX_CASCADE)
            .await?;
        for (k, _) in bindings {
            let seg = records::segments(&k);
            if let [_, ns, role_id] = seg.as_slice() {
                binding_delete_writes(ns, id, role_id, c);
            }
        }
        Ok(())
    }

    // ---- api keys ------------------------------------------------------------------------------------------

    /// Mints a key for a user; returns its record and the secret (shown once, never stored).
    pub async fn key_create(&self, spec: KeySpec) -> Result<(ApiKey, String), AuthError> {
        if spec.user_id.is_empty() {
            return Err(AuthError::required("user_id", "the user the key is for"));
        }
        check_text("name", &spec.name, MAX_NAME)?;
        check_tag("key_tag", &spec.tag)?;
        if !spec.namespace_scope.is_empty() {
            check_text("namespace_scope", &spec.namespace_scope, MAX_NAMESPACE_NAME)?;
        }
        let now = self.now();
        if !spec.expires_at.is_zero() && spec.expires_at <= now {
            return Err(AuthError::invalid("expires_at", "must be in the future"));
        }
        let user_at = rkey(tag::USER, &[&spec.user_id]);
        if !self.exists(&user_at).await? {
            return Err(user_not_found(&spec.user_id));
        }
        let mut tag_name = spec.tag.clone();
        if tag_name.is_empty() && !spec.namespace_scope.is_empty() {
            if let Some(ns) = self.namespace(&spec.namespace_scope).await? {
                tag_name = ns.api_key_tag;
            }
        }
        if tag_name.is_empty() {
            tag_name = key::DEFAULT_TAG.to_string();
        }
        let minted = key::generate(&tag_name)
            .map_err(|e| AuthError::StorageFailed(format!("no OS randomness: {e}")))?;
        let record = ApiKey {
            id: new_id(now)?,
            user_id: spec.user_id,
            namespace_scope: spec.namespace_scope,
            name: spec.name,
            prefix: minted.prefix.clone(),
            hash: minted.hash.clone(),
            expires_at: spec.expires_at,
            last_used_at: Ts::ZERO,
            created_at: now,
        };
        self.put_key(&record, &minted).await?;
        Ok((record, minted.secret))
    }

    async fn put_key(&self, record: &ApiKey, minted: &NewKey) -> Result<(), AuthError> {
        let user_at = rkey(tag::USER, &[&record.user_id]);
        let mut c = Commit::default();
        c.present(user_at)
            .absent(rkey(tag::KEY_HASH, &[&minted.hash]))
            .put(
                rkey(tag::KEY_HASH, &[&minted.hash]),
                record.id.as_bytes().to_vec(),
            )
            .put(rkey(tag::USER_KEY, &[&record.user_id, &record.id]), Vec::new())
            .put(rkey(tag::KEY, &[&record.id]), encode(record));
        match self.commit(c).await? {
            Ok(()) => Ok(()),
            Err(CheckFailed { index: 0 }) => Err(user_not_found(&record.user_id)),
            Err(_) => Err(AuthError::StorageFailed("api key collision; try again".into())),
        }
    }

    /// Key records (never secrets), in id order from `pivot` (inclusive), only `user_id`'s when given.
    pub async fn key_list(&self, user_id: &str, pivot: &str, limit: i32) -> Result<Vec<ApiKey>, AuthError> {
        let limit = list_limit(limit)?;
        if user_id.is_empty() {
            let from = if pivot.is_empty() {
                Vec::new()
            } else {
                rkey(tag::KEY, &[pivot])
            };
            return self.scan_records(&prefix(tag::KEY, &[]), &from, limit).await;
        }
        let from = if pivot.is_empty() {
            Vec::new()
        } else {
            rkey(tag::USER_KEY, &[user_id, pivot])
        };
        let ids = self
            .store()
            .scan(&prefix(tag::USER_KEY, &[user_id]), &from, limit)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for (k, _) in ids {
            let seg = records::segments(&k);
            if let [_, id] = seg.as_slice() {
                if let Some(rec) = self.get_record::<ApiKey>(&rkey(tag::KEY, &[id])).await? {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    async fn delete_key_writes(&self, id: &str, c: &mut Commit) -> Result<(), AuthError> {
        let at = rkey(tag::KEY, &[id]);
        if let Some(rec) = self.get_record::<ApiKey>(&at).await? {
            c.delete(rkey(tag::KEY_HASH, &[&rec.hash]))
                .delete(rkey(tag::USER_KEY, &[&rec.user_id, id]));
        }
        c.delete(at);
        Ok(())
    }

    /// Revokes a key.
    pub async fn key_delete(&self, id: &str) -> Result<(), AuthError> {
        if id.is_empty() {
            return Err(AuthError::required("id", "the id of the api key to delete"));
        }
        let at = rkey(tag::KEY, &[id]);
        if !self.exists(&at).await? {
            return Err(key_not_found(id));
        }
        let mut c = Commit::default();
        c.present(at);
        self.delete_key_writes(id, &mut c).await?;
        self.commit(c).await?.map_err(|_| key_not_found(id))
    }

    /// Records a key's use (see [`Auth::authenticate`]).
    pub(super) async fn set_last_used(&self, id: &str, now: Ts) -> Result<(), AuthError> {
        let at = rkey(tag::KEY, &[id]);
        let Some(mut rec) = self.get_record::<ApiKey>(&at).await? else {
            return Ok(());
        };
        rec.last_used_at = now;
        let mut c = Commit::default();
        c.present(at.clone()).put(at, encode(&rec));
        // Silent, and not through `self.commit`: recording a use changes no permission, so no cache anywhere is
        // dropped for it.
        c.silent = true;
        let _ = self.store().commit(c).await?;
        Ok(())
    }

    // ---- roles ---------------------------------------------------------------------------------------------

    fn check_role_name(name: &str) -> Result<(), AuthError> {
        check_name("name", name, MAX_NAME)?;
        if name.contains(':') {
            return Err(AuthError::invalid("name", format!("'{name}' cannot contain ':'")));
        }
        Ok(())
    }

    fn refuse_standard(name: &str) -> Result<(), AuthError> {
        if is_standard_role(name) {
            return Err(AuthError::Invalid(format!(
                "cannot modify or delete standard role; '{name}' is a standard role"
            )));
        }
        Ok(())
    }

    /// A role.
    pub async fn role(&self, namespace: &str, name: &str) -> Result<Option<Role>, AuthError> {
        self.get_record(&rkey(tag::ROLE, &[namespace_or_system(namespace), name]))
            .await
    }

    /// Creates a role in a namespace (which must exist); returns its id.
    pub async fn role_create(
        &self,
        namespace: &str,
        name: &str,
        permissions: &[String],
    ) -> Result<String, AuthError> {
        let namespace = namespace_or_system(namespace);
        Self::check_role_name(name)?;
        Self::refuse_standard(name)?;
        let perms = parse_permissions(permissions)?;
        let ns_at = rkey(tag::NAMESPACE, &[namespace]);
        if !self.exists(&ns_at).await? {
            return Err(namespace_not_found(namespace));
        }
        let now = self.now();
        let role = Role {
            id: new_id(now)?,
            namespace: namespace.to_string(),
            name: name.to_string(),
            permissions: perms.names(),
            created_at: now,
            updated_at: now,
        };
        let at = rkey(tag::ROLE, &[namespace, name]);
        let mut c = Commit::default();
        c.present(ns_at)
            .absent(at.clone())
            .put(at, encode(&role))
            .put(rkey(tag::ROLE_ID, &[&role.id, namespace, name]), Vec::new());
        match self.commit(c).await? {
            Ok(()) => Ok(role.id),
            Err(CheckFailed { index: 0 }) => Err(namespace_not_found(namespace)),
            Err(_) => Err(AuthError::Invalid(format!(
                "role already exists; '{name}' already exists in namespace '{namespace}'"
            ))),
        }
    }

    /// Replaces a role's permissions.
    pub async fn role_update(
        &self,
        namespace: &str,
        name: &str,
        permissions: &[String],
    ) -> Result<(), AuthError> {
        let namespace = namespace_or_system(namespace);
        Self::check_role_name(name)?;
        Self::refuse_standard(name)?;
        let perms = parse_permissions(permissions)?;
        let at = rkey(tag::ROLE, &[namespace, name]);
        let Some(mut role) = self.get_record::<Role>(&at).await? else {
            return Err(role_not_found(namespace, name));
        };
        role.permissions = perms.names();
        role.updated_at = self.now();
        let mut c = Commit::default();
        c.present(at.clone()).put(at, encode(&role));
        self.commit(c).await?.map_err(|_| role_not_found(namespace, name))
    }

    /// Roles of a namespace in name order from `pivot` (inclusive).
    pub async fn role_list(&self, namespace: &str, pivot: &str, limit: i32) -> Result<Vec<Role>, AuthError> {
        let namespace = namespace_or_system(namespace);
        let limit = list_limit(limit)?;
        let from = if pivot.is_empty() {
            Vec::new()
        } else {
            rkey(tag::ROLE, &[namespace, pivot])
        };
        self.scan_records(&prefix(tag::ROLE, &[namespace]), &from, limit)
            .await
    }

    /// Deletes a role nobody is bound to.
    pub async fn role_delete(&self, namespace: &str, name: &str) -> Result<(), AuthError> {
        let namespace = namespace_or_system(namespace);
        Self::check_role_name(name)?;
        Self::refuse_standard(name)?;
        let at = rkey(tag::ROLE, &[namespace, name]);
        let Some(role) = self.get_record::<Role>(&at).await? else {
            return Err(role_not_found(namespace, name));
        };
        if self.any_under(&prefix(tag::ROLE_BINDING, &[&role.id])).await? {
            return Err(AuthError::Invalid(format!(
                "role has active bindings; '{name}' is bound to users, delete the bindings first"
            )));
        }
        let mut c = Commit::default();
        c.present(at.clone())
            .delete(at)
            .delete(rkey(tag::ROLE_ID, &[&role.id, namespace, name]));
        self.commit(c).await?.map_err(|_| role_not_found(namespace, name))
    }

    // ---- role bindings -------------------------------------------------------------------------------------

    /// Binds a user to a role of the namespace; returns the binding's id.
    pub async fn binding_create(
        &self,
        namespace: &str,
        role_name: &str,
        user_id: &str,
    ) -> Result<String, AuthError> {
        let namespace = namespace_or_system(namespace);
        if role_name.is_empty() {
            return Err(AuthError::required("role_name", "the role to bind"));
        }
        if user_id.is_empty() {
            return Err(AuthError::required("user_id", "the user to bind"));
        }
        let role_at = rkey(tag::ROLE, &[namespace, role_name]);
        let Some(role) = self.get_record::<Role>(&role_at).await? else {
            return Err(role_not_found(namespace, role_name));
        };
        let user_at = rkey(tag::USER, &[user_id]);
        if !self.exists(&user_at).await? {
            return Err(user_not_found(user_id));
        }
        let now = self.now();
        let binding = RoleBinding {
            id: new_id(now)?,
            namespace: namespace.to_string(),
            user_id: user_id.to_string(),
            role_id: role.id.clone(),
            created_at: now,
        };
        let at = rkey(tag::BINDING, &[namespace, user_id, &role.id]);
        let mut c = Commit::default();
        c.present(role_at)
            .present(user_at)
            .absent(at.clone())
            .put(at, encode(&binding))
            .put(
                rkey(tag::USER_BINDING, &[user_id, namespace, &role.id]),
                Vec::new(),
            )
            .put(
                rkey(tag::ROLE_BINDING, &[&role.id, namespace, user_id]),
                Vec::new(),
            );
        match self.commit(c).await? {
            Ok(()) => Ok(binding.id),
            Err(CheckFailed { index: 0 }) => Err(role_not_found(namespace, role_name)),
            Err(CheckFailed { index: 1 }) => Err(user_not_found(user_id)),
            Err(_) => Err(AuthError::Invalid(format!(
                "role binding already exists; user '{user_id}' is already bound to '{role_name}' in '{namespace}'"
            ))),
        }
    }

    /// Bindings of a namespace (only `user_id`'s when given), ordered by user then role, from `pivot` (a user
    /// id, inclusive).
    pub async fn binding_list(
        &self,
        namespace: &str,
        user_id: &str,
        pivot: &str,
        limit: i32,
    ) -> Result<Vec<RoleBinding>, AuthError> {
        let namespace = namespace_or_system(namespace);
        let limit = list_limit(limit)?;
        let scope = if user_id.is_empty() {
            prefix(tag::BINDING, &[namespace])
        } else {
            prefix(tag::BINDING, &[namespace, user_id])
        };
        let from = if pivot.is_empty() {
            Vec::new()
        } else {
            rkey(tag::BINDING, &[namespace, pivot])
        };
        self.scan_records(&scope, &from, limit).await
    }

    /// Removes a user's binding to a role of the namespace.
    pub async fn binding_delete(
        &self,
        namespace: &str,
        role_name: &str,
        user_id: &str,
    ) -> Result<(), AuthError> {
        let namespace = namespace_or_system(namespace);
        if role_name.is_empty() {
            return Err(AuthError::required("role_name", "the role of the binding"));
        }
        if user_id.is_empty() {
            return Err(AuthError::required("user_id", "the user of the binding"));
        }
        let Some(role) = self.role(namespace, role_name).await? else {
            return Err(role_not_found(namespace, role_name));
        };
        let at = rkey(tag::BINDING, &[namespace, user_id, &role.id]);
        let not_found = || {
            AuthError::NotFound(format!(
                "role binding does not exist; user '{user_id}' is not bound to '{role_name}' in '{namespace}'"
            ))
        };
        let mut c = Commit::default();
        c.present(at);
        binding_delete_writes(namespace, user_id, &role.id, &mut c);
        self.commit(c).await?.map_err(|_| not_found())
    }

    // ---- bootstrap -----------------------------------------------------------------------------------------

    /// What every start does: the `_system` namespace, the standard roles (created or brought up to date), and,
    /// with auth on, the door:
    /// - `open_door`: anonymous is bound to Admin in `_system` the first time only, so an operator who deletes
    ///   the binding keeps the door closed across restarts (Querator re-opens it at every start);
    /// - closed: any open-door binding is removed, and the first start creates the user `admin` bound to Admin
    ///   with a key handed to `write_admin_key` before it is stored (so a key that could not be written is never
    ///   live). Later starts, on any server of the store, do neither.
    ///
    /// `held_key` is a key the operator already holds from an earlier start (the key file): when the store has no
    /// bootstrap administrator (memory storage after a restart, or a wiped store), that key is registered for the
    /// new `admin` instead of minting one, and `write_admin_key` is not called, so the key file keeps working and
    /// is never rewritten. A `held_key` that is not a well-formed key is ignored.
    pub async fn bootstrap(
        &self,
        open_door: bool,
        held_key: Option<&str>,
        write_admin_key: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<BootstrapReport, AuthError> {
        let mut report = BootstrapReport::default();
        self.ensure_system_namespace().await?;
        for std_role in STANDARD_ROLES {
            self.sync_standard_role(std_role.name, std_role.permissions)
                .await?;
        }
        if !self.enabled() {
            report.door_open = true;
            return Ok(report);
        }
        let admin_role = self
            .role(DEFAULT_NAMESPACE, ADMIN.name)
            .await?
            .ok_or_else(|| AuthError::StorageFailed("standard role Admin missing".into()))?;
        let door_at = rkey(tag::BINDING, &[DEFAULT_NAMESPACE, ANONYMOUS, &admin_role.id]);
        if open_door {
            let marker = rkey(tag::MARKER, &[OPEN_DOOR_MARKER]);
            if !self.exists(&marker).await? {
                self.ensure_anonymous_user().await?;
                let now = self.now();
                let binding = RoleBinding {
                    id: new_id(now)?,
                    namespace: DEFAULT_NAMESPACE.to_string(),
                    user_id: ANONYMOUS.to_string(),
                    role_id: admin_role.id.clone(),
                    created_at: now,
                };
                let mut c = Commit::default();
                c.absent(marker.clone())
                    .put(marker, now.0.to_string().into_bytes())
                    .put(door_at.clone(), encode(&binding))
                    .put(
                        rkey(tag::USER_BINDING, &[ANONYMOUS, DEFAULT_NAMESPACE, &admin_role.id]),
                        Vec::new(),
                    )
                    .put(
                        rkey(tag::ROLE_BINDING, &[&admin_role.id, DEFAULT_NAMESPACE, ANONYMOUS]),
                        Vec::new(),
                    );
                report.opened_door = self.commit(c).await?.is_ok();
            }
        } else {
            if self.exists(&door_at).await? {
                let mut c = Commit::default();
                binding_delete_writes(DEFAULT_NAMESPACE, ANONYMOUS, &admin_role.id, &mut c);
                self.commit(c).await?.ok();
                report.closed_door = true;
            }
            report.created_admin = self
                .bootstrap_admin(&admin_role, held_key, write_admin_key)
                .await?;
        }
        report.door_open = self.exists(&door_at).await?;
        if report.door_open {
            tracing::warn!(
                "SYSTEM RUNNING IN OPEN DOOR MODE: requests without an API key are administrators; \
                 delete the anonymous Admin binding or set auth-backend.open-door: false"
            );
        }
        Ok(report)
    }

    async fn ensure_system_namespace(&self) -> Result<(), AuthError> {
        let at = rkey(tag::NAMESPACE, &[DEFAULT_NAMESPACE]);
        if self.exists(&at).await? {
            return Ok(());
        }
        let now = self.now();
        let ns = Namespace {
            name: DEFAULT_NAMESPACE.to_string(),
            description: "system namespace: its bindings apply in every namespace".to_string(),
            api_key_tag: String::new(),
            created_at: now,
            updated_at: now,
        };
        let mut c = Commit::default();
        c.absent(at.clone()).put(at, encode(&ns));
        // Another server creating it at the same moment is fine.
        self.commit(c).await?.ok();
        Ok(())
    }

    async fn sync_standard_role(&self, name: &str, perms: PermissionSet) -> Result<(), AuthError> {
        let at = rkey(tag::ROLE, &[DEFAULT_NAMESPACE, name]);
        let now = self.now();
        match self.get_record::<Role>(&at).await? {
            Some(mut role) => {
                if role.permission_set() == perms && role.permissions.len() == perms.iter().count() {
                    return Ok(());
                }
                role.permissions = perms.names();
                role.updated_at = now;
                let mut c = Commit::default();
                c.present(at.clone()).put(at, encode(&role));
                self.commit(c).await?.ok();
            }
            None => {
                let role = Role {
                    id: new_id(now)?,
                    namespace: DEFAULT_NAMESPACE.to_string(),
                    name: name.to_string(),
                    permissions: perms.names(),
                    created_at: now,
                    updated_at: now,
                };
                let mut c = Commit::default();
                c.absent(at.clone()).put(at, encode(&role)).put(
                    rkey(tag::ROLE_ID, &[&role.id, DEFAULT_NAMESPACE, name]),
                    Vec::new(),
                );
                self.commit(c).await?.ok();
            }
        }
        Ok(())
    }

    async fn ensure_anonymous_user(&self) -> Result<(), AuthError> {
        if self.exists(&rkey(tag::USER, &[ANONYMOUS])).await? {
            return Ok(());
        }
        let now = self.now();
        let user = User {
            id: ANONYMOUS.to_string(),
            username: ANONYMOUS.to_string(),
            email: String::new(),
            external_id: String::new(),
            created_at: now,
            updated_at: now,
        };
        match self.put_user(&user).await {
            Ok(()) | Err(AuthError::Invalid(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn bootstrap_admin(
        &self,
        admin_role: &Role,
        held_key: Option<&str>,
        write_admin_key: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<bool, AuthError> {
        let marker = rkey(tag::MARKER, &[ADMIN_MARKER]);
        if self.exists(&marker).await? {
            return Ok(false);
        }
        let now = self.now();
        let minted = match held_key.and_then(key::from_secret) {
            Some(held) => held,
            None => {
                let minted = key::generate(key::DEFAULT_TAG)
                    .map_err(|e| AuthError::StorageFailed(format!("no OS randomness: {e}")))?;
                write_admin_key(&minted.secret).map_err(AuthError::StorageFailed)?;
                minted
            }
        };
        let user = User {
            id: new_id(now)?,
            username: BOOTSTRAP_ADMIN.to_string(),
            email: String::new(),
            external_id: String::new(),
            created_at: now,
            updated_at: now,
        };
        let record = ApiKey {
            id: new_id(now)?,
            user_id: user.id.clone(),
            namespace_scope: String::new(),
            name: "bootstrap".to_string(),
            prefix: minted.prefix.clone(),
            hash: minted.hash.clone(),
            expires_at: Ts::ZERO,
            last_used_at: Ts::ZERO,
            created_at: now,
        };
        let binding = RoleBinding {
            id: new_id(now)?,
            namespace: DEFAULT_NAMESPACE.to_string(),
            user_id: user.id.clone(),
            role_id: admin_role.id.clone(),
            created_at: now,
        };
        let name_at = rkey(tag::USERNAME, &[BOOTSTRAP_ADMIN]);
        let mut c = Commit::default();
        c.absent(marker.clone())
            .absent(name_at.clone())
            .put(marker, now.0.to_string().into_bytes())
            .put(name_at, user.id.as_bytes().to_vec())
            .put(rkey(tag::USER, &[&user.id]), encode(&user))
            .put(
                rkey(tag::KEY_HASH, &[&minted.hash]),
                record.id.as_bytes().to_vec(),
            )
            .put(rkey(tag::USER_KEY, &[&user.id, &record.id]), Vec::new())
            .put(rkey(tag::KEY, &[&record.id]), encode(&record))
            .put(
                rkey(tag::BINDING, &[DEFAULT_NAMESPACE, &user.id, &admin_role.id]),
                encode(&binding),
            )
            .put(
                rkey(tag::USER_BINDING, &[&user.id, DEFAULT_NAMESPACE, &admin_role.id]),
                Vec::new(),
            )
            .put(
                rkey(tag::ROLE_BINDING, &[&admin_role.id, DEFAULT_NAMESPACE, &user.id]),
                Vec::new(),
            );
        match self.commit(c).await? {
            Ok(()) => Ok(true),
            Err(CheckFailed { index: 0 }) => Ok(false),
            Err(_) => Err(AuthError::StorageFailed(format!(
                "cannot create the bootstrap administrator: a user named '{BOOTSTRAP_ADMIN}' exists already"
            ))),
        }
    }
}

fn binding_delete_writes(ns: &str, user_id: &str, role_id: &str, c: &mut Commit) {
    c.delete(rkey(tag::BINDING, &[ns, user_id, role_id]))
        .delete(rkey(tag::USER_BINDING, &[user_id, ns, role_id]))
        .delete(rkey(tag::ROLE_BINDING, &[role_id, ns, user_id]));
}

fn namespace_not_found(name: &str) -> AuthError {
    AuthError::NotFound(format!("namespace does not exist; '{name}' was not found"))
}

fn user_not_found(id: &str) -> AuthError {
    AuthError::NotFound(format!("user does not exist; '{id}' was not found"))
}

fn key_not_found(id: &str) -> AuthError {
    AuthError::NotFound(format!("api key does not exist; '{id}' was not found"))
}

fn role_not_found(namespace: &str, name: &str) -> AuthError {
    AuthError::NotFound(format!(
        "role does not exist; '{name}' was not found in namespace '{namespace}'"
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::auth::memory::MemoryAuthStore;
    use crate::auth::service::AuthMode;
    use crate::time::ManualClock;

    fn auth() -> Auth {
        Auth::new(
            Arc::new(MemoryAuthStore::new()),
            Arc::new(ManualClock::starting_now()),
            AuthMode::Internal,
        )
    }

    #[tokio::test]
    async fn a_held_key_is_registered_instead_of_minting_one() {
        let held = key::generate(key::DEFAULT_TAG).unwrap().secret;
        let a = auth();
        let mut wrote = false;
        let report = a
            .bootstrap(false, Some(&format!("{held}\n")), |_| {
                wrote = true;
                Ok(())
            })
            .await
            .unwrap();
        assert!(report.created_admin && !wrote, "{report:?}, wrote {wrote}");
        let admin = a.authenticate(Some(&held)).await.unwrap();
        assert_eq!(admin.username, BOOTSTRAP_ADMIN);
        let again = a
            .bootstrap(false, Some(&held), |_| Err("no second admin".into()))
            .await
            .unwrap();
        assert!(!again.created_admin);
    }

    #[tokio::test]
    async fn a_malformed_held_key_is_ignored_and_a_new_one_written() {
        let a = auth();
        let mut written = String::new();
        let report = a
            .bootstrap(false, Some("my notes"), |k| {
                written = k.to_string();
                Ok(())
            })
            .await
            .unwrap();
        assert!(report.created_admin);
        assert!(key::well_formed(&written));
        a.authenticate(Some(&written)).await.unwrap();
    }
}
