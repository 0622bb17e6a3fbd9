//! The access-control commands: `lessor namespace|user|apikey|role|rolebinding <action>`. Each is one call of the
//! client; output is a table by default and the reply's JSON with `--json` (commands whose reply is empty print a
//! line, or nothing with `--json`, as the queue commands do).

use clap::{Args, Subcommand};
use lessor_client::Client;
use lessor_proto::{self as pb, Timestamp};

use super::{api, print};

/// `lessor namespace ...`.
#[derive(Subcommand, Debug)]
pub enum NamespaceCmd {
    /// Create a namespace.
    Create(NamespaceArgs),
    /// List namespaces.
    List(Page),
    /// Replace a namespace's description and key tag (the creation time is kept).
    Update(NamespaceArgs),
    /// Delete a namespace that has no role bindings, roles or queues.
    Delete {
        /// Namespace name.
        name: String,
    },
}

/// Fields of a namespace.
#[derive(Args, Debug)]
pub struct NamespaceArgs {
    /// Namespace name (names starting with '_' are reserved).
    name: String,
    /// Free text.
    #[arg(long, default_value = "", hide_default_value = true)]
    description: String,
    /// Tag of API keys scoped to the namespace (1-16 of [a-z0-9]).
    #[arg(long, default_value = "", hide_default_value = true)]
    key_tag: String,
}

/// Paging of a list.
#[derive(Args, Debug)]
pub struct Page {
    /// Start at this name or id (inclusive).
    #[arg(long, default_value = "", hide_default_value = true)]
    pivot: String,
    /// Most entries to show (0: the server's default).
    #[arg(long, default_value_t = 0)]
    limit: i32,
}

/// `lessor user ...`.
#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Create a user; prints its id.
    Create {
        /// Unique user name.
        username: String,
        /// Contact address.
        #[arg(long, default_value = "", hide_default_value = true)]
        email: String,
        /// Id in an external directory.
        #[arg(long, default_value = "", hide_default_value = true)]
        external_id: String,
    },
    /// List users.
    List(Page),
    /// Delete a user with its API keys and role bindings.
    Delete {
        /// User id.
        id: String,
    },
}

/// `lessor apikey ...`.
#[derive(Subcommand, Debug)]
pub enum ApiKeyCmd {
    /// Mint an API key; the key is printed once and never again.
    Create {
        /// Id of the user the key authenticates as.
        #[arg(long)]
        user: String,
        /// Free text.
        #[arg(long, default_value = "", hide_default_value = true)]
        name: String,
        /// Only valid in this namespace.
        #[arg(long, short = 'n', default_value = "", hide_default_value = true)]
        namespace: String,
        /// Expiry time (RFC 3339).
        #[arg(long, conflicts_with = "expires_in")]
        expires_at: Option<String>,
        /// Expiry as a Go duration from now (e.g. 720h).
        #[arg(long)]
        expires_in: Option<String>,
        /// Key tag (qtr-<tag>-...; default: the namespace's, else live).
        #[arg(long, default_value = "", hide_default_value = true)]
        tag: String,
    },
    /// List API keys (never the keys themselves).
    List {
        /// Only this user's keys.
        #[arg(long, default_value = "", hide_default_value = true)]
        user: String,
        #[command(flatten)]
        page: Page,
    },
    /// Revoke an API key.
    Delete {
        /// Key id.
        id: String,
    },
}

/// `lessor role ...`.
#[derive(Subcommand, Debug)]
pub enum RoleCmd {
    /// Create a role; prints its id.
    Create(RoleArgs),
    /// List a namespace's roles.
    List {
        /// Namespace (default: _system).
        #[arg(long, short = 'n', default_value = "", hide_default_value = true)]
        namespace: String,
        #[command(flatten)]
        page: Page,
    },
    /// Replace a role's permissions.
    Update(RoleArgs),
    /// Delete a role nobody is bound to.
    Delete {
        /// Role name.
        name: String,
        /// Namespace (default: _system).
        #[arg(long, short = 'n', default_value = "", hide_default_value = true)]
        namespace: String,
    },
}

/// Fields of a role.
#[derive(Args, Debug)]
pub struct RoleArgs {
    /// Role name.
    name: String,
    /// Namespace (default: _system).
    #[arg(long, short = 'n', default_value = "", hide_default_value = true)]
    namespace: String,
    /// Permissions, comma-separated or repeated (e.g. queue.produce,queue.lease).
    #[arg(
        long = "permission",
        short = 'p',
        alias = "permissions",
        value_name = "PERMISSION",
        value_delimiter = ',',
        required = true
    )]
    permissions: Vec<String>,
}

/// Role and user names for a binding table, which the bindings carry only as ids. Best effort: a caller allowed to
/// list bindings may not be allowed to list roles or users, and then sees ids.
#[derive(Default)]
struct Names {
    roles: std::collections::HashMap<String, String>,
    users: std::collections::HashMap<String, String>,
}

impl Names {
    async fn fetch(c: &Client, namespace: &str) -> Names {
        let mut names = Names::default();
        let role_req = pb::RolesListRequest {
            namespace: namespace.to_string(),
            ..Default::default()
        };
        if let Ok(r) = c.roles_list(&role_req).await {
            names.roles.extend(r.items.into_iter().map(|r| (r.id, r.name)));
        }
        if let Ok(r) = c.users_list(&pb::UsersListRequest::default()).await {
            names
                .users
                .extend(r.items.into_iter().map(|u| (u.id, u.username)));
        }
        names
    }

    /// The role's name, or its id when unknown.
    fn role(&self, id: &str) -> String {
        self.roles.get(id).cloned().unwrap_or_else(|| id.to_string())
    }

    /// The user's name, or nothing when unknown.
    fn user(&self, id: &str) -> String {
        self.users.get(id).cloned().unwrap_or_default()
    }
}

/// `lessor rolebinding ...`.
#[derive(Subcommand, Debug)]
pub enum RoleBindingCmd {
    /// Bind a user to a role of a namespace; prints the binding's id.
    Create(BindingArgs),
    /// List a namespace's role bindings.
    List {
        /// Namespace (default: _system).
        #[arg(long, short = 'n', default_value = "", hide_default_value = true)]
        namespace: String,
        /// Only this user's bindings (user id).
        #[arg(long, default_value = "", hide_default_value = true)]
        user: String,
        #[command(flatten)]
        page: Page,
    },
    /// Remove a user's binding to a role.
    Delete(BindingArgs),
}

/// Which binding.
#[derive(Args, Debug)]
pub struct BindingArgs {
    /// Namespace (default: _system).
    #[arg(long, short = 'n', default_value = "", hide_default_value = true)]
    namespace: String,
    /// Role name (in that namespace).
    #[arg(long)]
    role: String,
    /// User id.
    #[arg(long)]
    user: String,
}

/// A timestamp for a table: whole seconds, empty when unset.
pub(super) fn when(t: &Option<Timestamp>) -> String {
    t.map(|t| Timestamp::new(t.seconds, 0).to_rfc3339())
        .unwrap_or_default()
}

/// Lays out rows under headers, each column as wide as its widest cell.
pub(super) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

/// Prints `done` unless `--json` (an empty reply has nothing to show).
pub(super) fn done(json: bool, what: String) {
    if !json {
        println!("{what}");
    }
}

fn expiry(expires_at: Option<String>, expires_in: Option<String>) -> Result<Option<Timestamp>, String> {
    if let Some(at) = expires_at {
        return Timestamp::parse_rfc3339(&at)
            .map(Some)
            .map_err(|e| format!("--expires-at: {e}"));
    }
    let Some(d) = expires_in else {
        return Ok(None);
    };
    let d = pb::duration::parse_go_duration(&d).map_err(|e| format!("--expires-in: {e}"))?;
    let at = std::time::SystemTime::now()
        .checked_add(d)
        .ok_or_else(|| "--expires-in: too far in the future".to_string())?;
    Ok(Some(Timestamp::from_system_time(at)))
}

/// `lessor namespace ...`.
pub async fn namespace(c: &Client, json: bool, cmd: NamespaceCmd) -> Result<(), String> {
    let info = |a: NamespaceArgs| pb::NamespaceInfo {
        name: a.name,
        description: a.description,
        api_key_tag: a.key_tag,
        created_at: None,
    };
    match cmd {
        NamespaceCmd::Create(a) => {
            let name = a.name.clone();
            c.namespaces_create(&info(a)).await.map_err(api)?;
            done(json, format!("created namespace '{name}'"));
        }
        NamespaceCmd::Update(a) => {
            let name = a.name.clone();
            c.namespaces_update(&info(a)).await.map_err(api)?;
            done(json, format!("updated namespace '{name}'"));
        }
        NamespaceCmd::Delete { name } => {
            c.namespaces_delete(&pb::NamespacesDeleteRequest { name: name.clone() })
                .await
                .map_err(api)?;
            done(json, format!("deleted namespace '{name}'"));
        }
        NamespaceCmd::List(p) => {
            let r = c
                .namespaces_list(&pb::NamespacesListRequest {
                    pivot: p.pivot,
                    limit: p.limit,
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                let rows = r
                    .items
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.api_key_tag.clone(),
                            when(&n.created_at),
                            n.description.clone(),
                        ]
                    })
                    .collect();
                table(&["NAME", "KEY TAG", "CREATED", "DESCRIPTION"], rows)
            });
        }
    }
    Ok(())
}

/// `lessor user ...`.
pub async fn user(c: &Client, json: bool, cmd: UserCmd) -> Result<(), String> {
    match cmd {
        UserCmd::Create {
            username,
            email,
            external_id,
        } => {
            let r = c
                .users_create(&pb::UserCreateRequest {
                    username: username.clone(),
                    email,
                    external_id,
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                format!("created user '{username}' with id {}", r.id)
            });
        }
        UserCmd::List(p) => {
            let r = c
                .users_list(&pb::UsersListRequest {
                    limit: p.limit,
                    pivot: p.pivot,
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                let rows = r
                    .items
                    .iter()
                    .map(|u| {
                        vec![
                            u.id.clone(),
                            u.username.clone(),
                            u.email.clone(),
                            u.external_id.clone(),
                            when(&u.created_at),
                        ]
                    })
                    .collect();
                table(&["ID", "USERNAME", "EMAIL", "EXTERNAL ID", "CREATED"], rows)
            });
        }
        UserCmd::Delete { id } => {
            c.users_delete(&pb::UsersDeleteRequest { id: id.clone() })
                .await
                .map_err(api)?;
            done(
                json,
                format!("deleted user {id} with its API keys and role bindings"),
            );
        }
    }
    Ok(())
}

/// `lessor apikey ...`.
pub async fn apikey(c: &Client, json: bool, cmd: ApiKeyCmd) -> Result<(), String> {
    match cmd {
        ApiKeyCmd::Create {
            user,
            name,
            namespace,
            expires_at,
            expires_in,
            tag,
        } => {
            let req = pb::APIKeyCreateRequest {
                user_id: user.clone(),
                name,
                namespace_scope: namespace,
                expires_at: expiry(expires_at, expires_in)?,
                key_tag: tag,
            };
            let r = c.apikeys_create(&req).await.map_err(api)?;
            print(json, &r, |r| {
                format!(
                    "created API key {} (prefix {}) for user {user}\n\n    {}\n\n\
                     This is the only time the key is shown: store it now. Send it as \
                     'Authorization: Bearer <key>', or to this CLI with --api-key or LESSOR_API_KEY.",
                    r.id, r.prefix, r.key
                )
            });
        }
        ApiKeyCmd::List { user, page } => {
            let r = c
                .apikeys_list(&pb::APIKeysListRequest {
                    user_id: user,
                    limit: page.limit,
                    pivot: page.pivot,
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                let rows = r
                    .items
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.prefix.clone(),
                            k.user_id.clone(),
                            k.namespace_scope.clone(),
                            k.name.clone(),
                            when(&k.expires_at),
                            when(&k.last_used_at),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "ID",
                        "PREFIX",
                        "USER",
                        "NAMESPACE",
                        "NAME",
                        "EXPIRES",
                        "LAST USED",
                    ],
                    rows,
                )
            });
        }
        ApiKeyCmd::Delete { id } => {
            c.apikeys_delete(&pb::APIKeysDeleteRequest { id: id.clone() })
                .await
                .map_err(api)?;
            done(json, format!("revoked API key {id}"));
        }
    }
    Ok(())
}

fn ns_label(ns: &str) -> &str {
    if ns.is_empty() {
        "_system"
    } else {
        ns
    }
}

/// `lessor role ...`.
pub async fn role(c: &Client, json: bool, cmd: RoleCmd) -> Result<(), String> {
    match cmd {
        RoleCmd::Create(a) => {
            let r = c
                .roles_create(&pb::RoleCreateRequest {
                    namespace: a.namespace.clone(),
                    name: a.name.clone(),
                    permissions: a.permissions,
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                format!(
                    "created role '{}' in '{}' with id {}",
                    a.name,
                    ns_label(&a.namespace),
                    r.id
                )
            });
        }
        RoleCmd::Update(a) => {
            c.roles_update(&pb::RoleUpdateRequest {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
                permissions: a.permissions,
            })
            .await
            .map_err(api)?;
            done(
                json,
                format!("updated role '{}' in '{}'", a.name, ns_label(&a.namespace)),
            );
        }
        RoleCmd::List { namespace, page } => {
            let r = c
                .roles_list(&pb::RolesListRequest {
                    namespace,
                    limit: page.limit,
                    pivot: page.pivot,
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                let rows = r
                    .items
                    .iter()
                    .map(|role| {
                        vec![
                            role.name.clone(),
                            role.id.clone(),
                            role.namespace.clone(),
                            role.permissions.join(","),
                        ]
                    })
                    .collect();
                table(&["NAME", "ID", "NAMESPACE", "PERMISSIONS"], rows)
            });
        }
        RoleCmd::Delete { name, namespace } => {
            c.roles_delete(&pb::RolesDeleteRequest {
                namespace: namespace.clone(),
                name: name.clone(),
            })
            .await
            .map_err(api)?;
            done(
                json,
                format!("deleted role '{name}' in '{}'", ns_label(&namespace)),
            );
        }
    }
    Ok(())
}

/// `lessor rolebinding ...`.
pub async fn rolebinding(c: &Client, json: bool, cmd: RoleBindingCmd) -> Result<(), String> {
    match cmd {
        RoleBindingCmd::Create(a) => {
            let r = c
                .rolebindings_create(&pb::RoleBindingCreateRequest {
                    namespace: a.namespace.clone(),
                    role_name: a.role.clone(),
                    user_id: a.user.clone(),
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                format!(
                    "bound user {} to '{}' in '{}' (binding {})",
                    a.user,
                    a.role,
                    ns_label(&a.namespace),
                    r.id
                )
            });
        }
        RoleBindingCmd::List {
            namespace,
            user,
            page,
        } => {
            let r = c
                .rolebindings_list(&pb::RoleBindingsListRequest {
                    namespace: namespace.clone(),
                    user_id_filter: user,
                    limit: page.limit,
                    pivot: page.pivot,
                })
                .await
                .map_err(api)?;
            let names = if json {
                Names::default()
            } else {
                Names::fetch(c, &namespace).await
            };
            print(json, &r, |r| {
                let rows = r
                    .items
                    .iter()
                    .map(|b| {
                        vec![
                            b.id.clone(),
                            b.namespace.clone(),
                            names.role(&b.role_id),
                            b.user_id.clone(),
                            names.user(&b.user_id),
                            when(&b.created_at),
                        ]
                    })
                    .collect();
                table(&["ID", "NAMESPACE", "ROLE", "USER", "USERNAME", "CREATED"], rows)
            });
        }
        RoleBindingCmd::Delete(a) => {
            c.rolebindings_delete(&pb::RoleBindingDeleteRequest {
                namespace: a.namespace.clone(),
                role_name: a.role.clone(),
                user_id: a.user.clone(),
            })
            .await
            .map_err(api)?;
            done(
                json,
                format!(
                    "removed the binding of user {} to '{}' in '{}'",
                    a.user,
                    a.role,
                    ns_label(&a.namespace)
                ),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_trim_trailing_space() {
        let t = table(
            &["NAME", "TAG"],
            vec![
                vec!["a".into(), "x".into()],
                vec!["longer-name".into(), String::new()],
            ],
        );
        assert_eq!(t, "NAME         TAG\na            x\nlonger-name");
    }

    #[test]
    fn command_line_is_consistent_and_takes_permissions_both_ways() {
        use clap::{CommandFactory, Parser};

        use crate::cli::{Cli, Command};

        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "lessor",
            "--api-key",
            "k",
            "role",
            "create",
            "r",
            "-n",
            "team",
            "-p",
            "queue.produce,queue.lease",
            "--permission",
            "queue.stats",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.api_key.as_deref(), Some("k"));
        let Command::Role(RoleCmd::Create(a)) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(a.namespace, "team");
        assert_eq!(a.permissions, ["queue.produce", "queue.lease", "queue.stats"]);
        // A role needs permissions; --expires-at and --expires-in exclude each other.
        assert!(Cli::try_parse_from(["lessor", "role", "create", "r"]).is_err());
        assert!(Cli::try_parse_from([
            "lessor",
            "apikey",
            "create",
            "--user",
            "u",
            "--expires-at",
            "2030-01-01T00:00:00Z",
            "--expires-in",
            "1h"
        ])
        .is_err());
    }

    #[test]
    fn expiry_from_a_time_or_a_duration() {
        assert_eq!(
            expiry(Some("2030-01-01T00:00:00Z".into()), None).expect("at"),
            Some(Timestamp::new(1_893_456_000, 0))
        );
        let later = expiry(None, Some("1h".into())).expect("in").expect("set");
        let now = Timestamp::now();
        assert!(later.seconds > now.seconds + 3500 && later.seconds <= now.seconds + 3600);
        assert_eq!(expiry(None, None).expect("none"), None);
        assert!(expiry(None, Some("soon".into())).is_err());
        assert!(expiry(Some("tomorrow".into()), None).is_err());
    }
}
