//! Permissions, the sets roles grant, and the standard roles.
//!
//! The 29 permissions are Querator's (`transport/auth/auth.go`), spelled as its clients and stored roles spell them.
//! A role's permissions are kept as a [`PermissionSet`] (a bit set), so checking a request against everything a
//! principal may do in a namespace is one AND, not a string search.

use std::fmt;
use std::str::FromStr;

/// Declares [`Permission`], its names and [`Permission::ALL`] from one list, so a permission cannot be added to one
/// and forgotten in another.
macro_rules! permissions {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal ),+ $(,)?) => {
        /// One thing a principal may be allowed to do, checked per namespace.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum Permission {
            $( $(#[$doc])* $variant, )+
        }

        impl Permission {
            /// Every permission, in declaration order.
            pub const ALL: &'static [Permission] = &[$(Permission::$variant),+];

            /// Querator's name of the permission (`"queue.produce"`, ...).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Permission::$variant => $name,)+
                }
            }
        }

        impl FromStr for Permission {
            type Err = UnknownPermission;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok(Permission::$variant),)+
                    _ => Err(UnknownPermission(s.to_string())),
                }
            }
        }
    };
}

permissions! {
    /// `namespace.create`.
    NamespaceCreate = "namespace.create",
    /// `namespace.delete`.
    NamespaceDelete = "namespace.delete",
    /// `namespace.list`.
    NamespaceList = "namespace.list",
    /// `namespace.update`.
    NamespaceUpdate = "namespace.update",
    /// `queue.create`.
    QueueCreate = "queue.create",
    /// `queue.delete`.
    QueueDelete = "queue.delete",
    /// `queue.update` (also reload).
    QueueUpdate = "queue.update",
    /// `queue.list`.
    QueueList = "queue.list",
    /// `queue.produce` (also importing raw items).
    QueueProduce = "queue.produce",
    /// `queue.lease`.
    QueueLease = "queue.lease",
    /// `queue.complete`.
    QueueComplete = "queue.complete",
    /// `queue.retry`.
    QueueRetry = "queue.retry",
    /// `queue.stats` (also the read-only queue and storage views).
    QueueStats = "queue.stats",
    /// `queue.clear` (also deleting raw items).
    QueueClear = "queue.clear",
    /// `user.create`.
    UserCreate = "user.create",
    /// `user.delete`.
    UserDelete = "user.delete",
    /// `user.list`.
    UserList = "user.list",
    /// `apikey.create`.
    ApiKeyCreate = "apikey.create",
    /// `apikey.delete`.
    ApiKeyDelete = "apikey.delete",
    /// `apikey.list`.
    ApiKeyList = "apikey.list",
    /// `role.create`.
    RoleCreate = "role.create",
    /// `role.update`.
    RoleUpdate = "role.update",
    /// `role.delete`.
    RoleDelete = "role.delete",
    /// `role.list`.
    RoleList = "role.list",
    /// `rolebinding.create`.
    RoleBindingCreate = "rolebinding.create",
    /// `rolebinding.delete`.
    RoleBindingDelete = "rolebinding.delete",
    /// `rolebinding.list`.
    RoleBindingList = "rolebinding.list",
    /// `system.health`.
    SystemHealth = "system.health",
    /// `system.metrics`.
    SystemMetrics = "system.metrics",
}

impl Permission {
    /// The permission's bit in a [`PermissionSet`].
    const fn bit(self) -> u32 {
        1 << (self as u8)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of the permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPermission(pub String);

impl fmt::Display for UnknownPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}' is not a valid permission", self.0)
    }
}

impl std::error::Error for UnknownPermission {}

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PermissionSet(u32);

impl PermissionSet {
    /// No permission.
    pub const EMPTY: PermissionSet = PermissionSet(0);

    /// The set of the given permissions.
    pub const fn of(perms: &[Permission]) -> PermissionSet {
        let mut bits = 0;
        let mut i = 0;
        while i < perms.len() {
            bits |= perms[i].bit();
            i += 1;
        }
        PermissionSet(bits)
    }

    /// Whether `p` is in the set.
    pub const fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    /// Adds `p`.
    pub fn insert(&mut self, p: Permission) {
        self.0 |= p.bit();
    }

    /// Both sets together.
    pub const fn union(self, other: PermissionSet) -> PermissionSet {
        PermissionSet(self.0 | other.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.iter().copied().filter(move |p| self.contains(*p))
    }

    /// The names of the permissions in the set, as stored and sent on the wire.
    pub fn names(self) -> Vec<String> {
        self.iter().map(|p| p.as_str().to_string()).collect()
    }
}

impl FromIterator<Permission> for PermissionSet {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = PermissionSet::EMPTY;
        for p in iter {
            set.insert(p);
        }
        set
    }
}

/// Every queue permission.
const QUEUE: &[Permission] = &[
    Permission::QueueCreate,
    Permission::QueueDelete,
    Permission::QueueUpdate,
    Permission::QueueList,
    Permission::QueueProduce,
    Permission::QueueLease,
    Permission::QueueComplete,
    Permission::QueueRetry,
    Permission::QueueStats,
    Permission::QueueClear,
];

/// The queue permissions as a set: a principal with any of them in a namespace may learn which queues exist there.
pub const QUEUE_PERMISSIONS: PermissionSet = PermissionSet::of(QUEUE);

/// One of the roles every server keeps in `_system`, created or brought up to date at every start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardRole {
    /// The role's name; no other role may take it, in any namespace.
    pub name: &'static str,
    /// What it grants.
    pub permissions: PermissionSet,
}

/// `Admin`: everything.
pub const ADMIN: StandardRole = StandardRole {
    name: "Admin",
    permissions: PermissionSet::of(Permission::ALL),
};

/// `NamespaceOwner`: the queues, roles and bindings of a namespace, health and metrics.
pub const NAMESPACE_OWNER: StandardRole = StandardRole {
    name: "NamespaceOwner",
    permissions: PermissionSet::of(QUEUE).union(PermissionSet::of(&[
        Permission::RoleCreate,
        Permission::RoleUpdate,
        Permission::RoleDelete,
        Permission::RoleList,
        Permission::RoleBindingCreate,
        Permission::RoleBindingDelete,
        Permission::RoleBindingList,
        Permission::SystemHealth,
        Permission::SystemMetrics,
    ])),
};

/// `PublicViewer`: health and metrics.
pub const PUBLIC_VIEWER: StandardRole = StandardRole {
    name: "PublicViewer",
    permissions: PermissionSet::of(&[Permission::SystemHealth, Permission::SystemMetrics]),
};

/// The standard roles.
pub const STANDARD_ROLES: [StandardRole; 3] = [ADMIN, NAMESPACE_OWNER, PUBLIC_VIEWER];

/// Whether `name` is a standard role's name.
pub fn is_standard_role(name: &str) -> bool {
    STANDARD_ROLES.iter().any(|r| r.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_fit_the_set() {
        assert_eq!(Permission::ALL.len(), 29);
        for p in Permission::ALL {
            assert_eq!(p.as_str().parse::<Permission>(), Ok(*p));
        }
        assert!("queue.*".parse::<Permission>().is_err());
        assert_eq!(ADMIN.permissions.iter().count(), 29);
        assert_eq!(NAMESPACE_OWNER.permissions.iter().count(), 19);
        assert!(!NAMESPACE_OWNER.permissions.contains(Permission::UserCreate));
        assert_eq!(
            PUBLIC_VIEWER.permissions.names(),
            ["system.health", "system.metrics"]
        );
    }
}
