//! Command-line parsing and the client commands. Output is readable by default and JSON with `--json`; API errors
//! print their code and message. The access-control commands (namespaces, users, API keys, roles, role bindings)
//! are in [`auth`]; the commands of Lessor's extension routes (extend, pause, resume, browse, redrive) in
//! [`extensions`]; backup, restore and offline migration in [`backup`].

mod auth;
mod backup;
mod extensions;
mod rebalance;

use std::io::Read;

use clap::{Args, Parser, Subcommand};
use lessor_client::{Client, ClientError};
use lessor_proto::{self as pb, Timestamp};
use lessor_server::{Config, StartError};

/// Lessor: a durable, partitioned, lease-based work-queue server.
#[derive(Parser, Debug)]
#[command(name = "lessor", version)]
pub struct Cli {
    /// Server to talk to (client commands).
    #[arg(
        long,
        global = true,
        env = "LESSOR_ENDPOINT",
        default_value = "http://127.0.0.1:2319"
    )]
    endpoint: String,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// API key sent as `Authorization: Bearer <key>` (client commands and bench).
    #[arg(long, global = true, env = "LESSOR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// TLS options of the client commands (for `https://` endpoints).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Extra CA certificate(s) to trust, PEM (besides the built-in public roots).
    #[arg(long = "tls-ca", global = true, env = "LESSOR_TLS_CA", value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate chain, PEM, for servers that ask for one (with --tls-key).
    #[arg(
        long = "tls-cert",
        global = true,
        env = "LESSOR_TLS_CERT",
        value_name = "FILE",
        requires = "key"
    )]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key, PEM (with --tls-cert).
    #[arg(
        long = "tls-key",
        global = true,
        env = "LESSOR_TLS_KEY",
        value_name = "FILE",
        requires = "cert"
    )]
    pub key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The client's TLS configuration, files read and checked.
    ///
    /// # Errors
    /// A file that cannot be read or holds no certificate or key, naming the flag and the file.
    pub fn config(&self) -> Result<lessor_client::TlsConfig, ClientError> {
        let mut tls = lessor_client::TlsConfig::new();
        if let Some(ca) = &self.ca {
            tls = tls.add_ca_file(ca)?;
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity_files(cert, key)?;
        }
        Ok(tls)
    }

    /// A client for `endpoint` with these options.
    ///
    /// # Errors
    /// An invalid endpoint or TLS file.
    pub fn client(&self, endpoint: &str) -> Result<Client, ClientError> {
        Client::new(endpoint)?.with_tls(&self.config()?)
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Server(ServerArgs),
    /// Drive a server with load and report throughput and latency.
    Bench(crate::bench::BenchArgs),
    /// Draw `bench --json-out` results as an SVG bar chart.
    BenchChart(crate::bench::chart::ChartArgs),
    /// Produce one item (payload from --payload or stdin).
    Produce {
        /// Queue name.
        queue: String,
        /// The payload; read from stdin when absent.
        #[arg(short, long)]
        payload: Option<String>,
        /// Encoding tag.
        #[arg(long, default_value = "")]
        encoding: String,
        /// Kind tag.
        #[arg(long, default_value = "")]
        kind: String,
        /// Reference.
        #[arg(long, default_value = "")]
        reference: String,
        /// Deliver later (RFC 3339).
        #[arg(long)]
        enqueue_at: Option<String>,
        /// Priority, 0 (default, lowest) to 9; higher is leased first.
        #[arg(
            long,
            default_value_t = 0,
            hide_default_value = true,
            allow_negative_numbers = true
        )]
        priority: i32,
        /// Idempotency key: within the queue's dedup window, the same key is stored once.
        #[arg(long, default_value = "", hide_default_value = true)]
        dedup_id: String,
        /// Request timeout.
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Lease items.
    Lease {
        /// Queue name.
        queue: String,
        /// Consumer id (random by default).
        #[arg(short, long)]
        client_id: Option<String>,
        /// Items wanted.
        #[arg(short, long, default_value_t = 1)]
        batch_size: i32,
        /// How long to wait for an item.
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Complete leased items.
    Complete {
        /// Queue name.
        queue: String,
        /// Ids from the lease.
        ids: Vec<String>,
        /// Partition from the lease.
        #[arg(short, long)]
        partition: i32,
        /// Request timeout.
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Retry leased items (now, later, or dead).
    Retry {
        /// Queue name.
        queue: String,
        /// Ids from the lease.
        ids: Vec<String>,
        /// Partition from the lease.
        #[arg(short, long)]
        partition: i32,
        /// Retry at this time (RFC 3339) instead of now.
        #[arg(long)]
        retry_at: Option<String>,
        /// Give up: dead-letter the items.
        #[arg(long)]
        dead: bool,
    },
    /// Extend the leases of held items (heartbeat).
    Extend(extensions::ExtendArgs),
    /// Pause a queue: produce is still accepted, leases wait until it is resumed.
    Pause {
        /// Queue name.
        queue: String,
    },
    /// Resume a paused queue.
    Resume {
        /// Queue name.
        queue: String,
    },
    /// List a partition's items by state, without leasing them.
    Browse(extensions::BrowseArgs),
    /// Move items out of a dead-letter queue (a server-side task), or list, show and cancel such tasks.
    Redrive(extensions::RedriveArgs),
    /// Move partitions between stores or change their number while serving (a server-side task), or list and
    /// show such tasks.
    Rebalance(rebalance::RebalanceArgs),
    /// Object storage of large payloads: run the sweeper of orphaned objects now.
    #[command(subcommand)]
    Offload(extensions::OffloadCmd),
    /// Create a queue.
    Create(QueueArgs),
    /// Update the given fields of a queue.
    Update(QueueArgs),
    /// Delete a queue and its items.
    Delete {
        /// Queue name.
        queue: String,
        /// Also when other queues name it as their dead-letter queue: their `dead_queue` is cleared (their dead
        /// items are then deleted). Without it such a delete is refused.
        #[arg(long)]
        force: bool,
    },
    /// List queues.
    List {
        /// Start at this name (inclusive).
        #[arg(long, default_value = "")]
        pivot: String,
        /// Most queues to show.
        #[arg(long, default_value_t = 100)]
        limit: i32,
    },
    /// Show a queue's definition.
    Info {
        /// Queue name.
        queue: String,
    },
    /// Show a queue's statistics.
    Stats {
        /// Queue name.
        queue: String,
    },
    /// Remove items from a queue.
    Clear {
        /// Queue name.
        queue: String,
        /// Remove ready items.
        #[arg(long)]
        queue_items: bool,
        /// Remove scheduled items.
        #[arg(long)]
        scheduled: bool,
        /// With --queue-items, remove leased items too.
        #[arg(long)]
        destructive: bool,
    },
    /// Back up a running server (or some of its queues) to a file or to S3-compatible object storage.
    Backup(backup::BackupArgs),
    /// Restore queues from a backup into the server (re-run the same command to resume an interrupted restore).
    Restore(backup::RestoreArgs),
    /// Copy every queue, item and auth record from one storage configuration to another (servers stopped).
    Migrate(backup::MigrateArgs),
    /// Manage namespaces.
    #[command(subcommand)]
    Namespace(auth::NamespaceCmd),
    /// Manage users.
    #[command(subcommand)]
    User(auth::UserCmd),
    /// Manage API keys.
    #[command(subcommand, name = "apikey")]
    ApiKey(auth::ApiKeyCmd),
    /// Manage roles.
    #[command(subcommand)]
    Role(auth::RoleCmd),
    /// Manage role bindings.
    #[command(subcommand)]
    Rolebinding(auth::RoleBindingCmd),
    /// Show who the API key is: user, key id, namespace scope and permissions per namespace (no secret).
    Whoami,
}

/// `lessor server` flags.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// YAML configuration file.
    #[arg(long, env = "LESSOR_CONFIG")]
    config: Option<String>,
    /// Listen address (overrides the file).
    #[arg(long, env = "LESSOR_ADDRESS")]
    address: Option<String>,
    /// Data directory used when no configuration file is given.
    #[arg(long, env = "LESSOR_DATA_DIR", default_value = lessor_server::config::DEFAULT_DATA_DIR)]
    data_dir: String,
    /// Log level (overrides the file).
    #[arg(long, env = "LESSOR_LOG_LEVEL")]
    log_level: Option<String>,
}

/// Queue fields for create and update.
#[derive(Args, Debug)]
struct QueueArgs {
    /// Queue name.
    queue: String,
    /// Lease timeout (Go duration). Create defaults to 1m.
    #[arg(long)]
    lease_timeout: Option<String>,
    /// Expire timeout (Go duration). Create defaults to 24h.
    #[arg(long)]
    expire_timeout: Option<String>,
    /// Max attempts (0 = unlimited).
    #[arg(long)]
    max_attempts: Option<i32>,
    /// Dead-letter queue.
    #[arg(long)]
    dead_queue: Option<String>,
    /// Reference.
    #[arg(long)]
    reference: Option<String>,
    /// Partitions.
    #[arg(long)]
    partitions: Option<i32>,
    /// How long a dedup_id is remembered (Go duration; default 5m).
    #[arg(long)]
    dedup_window: Option<String>,
    /// Longest lease an extension may set (Go duration; default: the expire timeout; "0s" resets).
    #[arg(long)]
    max_lease_timeout: Option<String>,
    /// Retry backoff: delay before the second attempt (Go duration; "0s" turns backoff off).
    #[arg(long)]
    retry_backoff_base: Option<String>,
    /// Retry backoff: longest delay (Go duration).
    #[arg(long)]
    retry_backoff_max: Option<String>,
    /// Retry backoff: growth per attempt (1-100; 0 means 2).
    #[arg(long)]
    retry_backoff_factor: Option<f64>,
    /// Retry backoff: random fraction of each delay (0-1).
    #[arg(long)]
    retry_backoff_jitter: Option<f64>,
}

impl QueueArgs {
    fn sets_backoff(&self) -> bool {
        self.retry_backoff_base.is_some()
            || self.retry_backoff_max.is_some()
            || self.retry_backoff_factor.is_some()
            || self.retry_backoff_jitter.is_some()
    }

    /// `current` with the backoff flags given laid over it: the wire replaces the whole policy, so an update of one
    /// setting must send the others as they are.
    fn backoff(&self, current: Option<pb::RetryBackoff>) -> pb::RetryBackoff {
        let mut b = current.unwrap_or_default();
        if let Some(v) = &self.retry_backoff_base {
            // A zero base turns backoff off: send the empty policy rather than the other settings without a base.
            if lessor_proto::duration::parse_go_duration(v).is_ok_and(|d| d.is_zero()) {
                return pb::RetryBackoff::default();
            }
            b.base = v.clone();
        }
        if let Some(v) = &self.retry_backoff_max {
            b.max = v.clone();
        }
        if let Some(v) = self.retry_backoff_factor {
            b.factor = v;
        }
        if let Some(v) = self.retry_backoff_jitter {
            b.jitter = v;
        }
        b
    }
}

fn api(e: ClientError) -> String {
    match (e.code(), e.message()) {
        (Some(code), Some(msg)) => format!("{code}: {msg}"),
        _ => e.to_string(),
    }
}

fn timestamp(field: &str, s: &Option<String>) -> Result<Option<Timestamp>, String> {
    s.as_deref()
        .map(|v| Timestamp::parse_rfc3339(v).map_err(|e| format!("--{field}: {e}")))
        .transpose()
}

fn print<T: serde::Serialize + std::fmt::Debug>(json: bool, v: &T, human: impl FnOnce(&T) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        println!("{}", human(v));
    }
}

/// Runs a command.
pub async fn run(cli: Cli) -> Result<(), String> {
    let json = cli.json;
    let cli = match cli.command {
        Command::Server(args) => return server(args).await.map_err(|e| e.to_string()),
        Command::Bench(mut args) => {
            args.tls = Some(Box::new(cli.tls.config().map_err(|e| e.to_string())?));
            return crate::bench::run(args).await;
        }
        Command::BenchChart(args) => return crate::bench::chart::run(args),
        Command::Migrate(args) => return backup::migrate(args, json).await,
        command => Cli { command, ..cli },
    };
    let mut c = cli.tls.client(&cli.endpoint).map_err(|e| e.to_string())?;
    if let Some(key) = cli.api_key.as_deref().filter(|k| !k.is_empty()) {
        c = c.with_api_key(key);
    }
    match cli.command {
        Command::Server(_) | Command::Bench(_) | Command::BenchChart(_) | Command::Migrate(_) => {
            unreachable!("handled above")
        }
        Command::Backup(args) => return backup::backup(&c, args, json).await,
        Command::Restore(args) => return backup::restore(&c, args, json).await,
        Command::Produce {
            queue,
            payload,
            encoding,
            kind,
            reference,
            enqueue_at,
            priority,
            dedup_id,
            timeout,
        } => {
            let payload = match payload {
                Some(p) => p.into_bytes(),
                None => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .map_err(|e| format!("reading stdin: {e}"))?;
                    b
                }
            };
            let req = pb::QueueProduceRequest {
                queue_name: queue.clone(),
                request_timeout: timeout,
                items: vec![pb::QueueProduceItem {
                    encoding,
                    kind,
                    reference,
                    enqueue_at: timestamp("enqueue-at", &enqueue_at)?,
                    bytes: payload,
                    utf8: String::new(),
                    dedup_id,
                    priority,
                }],
            };
            c.queue_produce(&req).await.map_err(api)?;
            if json {
                println!("{{\"code\":200}}");
            } else {
                println!("produced 1 item to '{queue}'");
            }
        }
        Command::Lease {
            queue,
            client_id,
            batch_size,
            timeout,
        } => {
            let client_id =
                client_id.unwrap_or_else(|| format!("cli-{}-{}", std::process::id(), now_nanos()));
            let req = pb::QueueLeaseRequest {
                queue_name: queue,
                batch_size,
                client_id,
                request_timeout: timeout,
            };
            let r = c.queue_lease(&req).await.map_err(api)?;
            print(json, &r, |r| {
                let mut s = format!("partition {} ({} items)", r.partition, r.items.len());
                for i in &r.items {
                    let deadline = i
                        .lease_deadline
                        .as_ref()
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default();
                    let priority = if i.priority != 0 {
                        format!("  priority={}", i.priority)
                    } else {
                        String::new()
                    };
                    s.push_str(&format!(
                        "\n{}  attempts={}  lease_deadline={}{}  {}",
                        i.id,
                        i.attempts,
                        deadline,
                        priority,
                        String::from_utf8_lossy(&i.bytes)
                    ));
                }
                s
            });
        }
        Command::Complete {
            queue,
            ids,
            partition,
            timeout,
        } => {
            let n = ids.len();
            let req = pb::QueueCompleteRequest {
                queue_name: queue,
                partition,
                request_timeout: timeout,
                ids,
            };
            c.queue_complete(&req).await.map_err(api)?;
            if !json {
                println!("completed {n} items");
            }
        }
        Command::Retry {
            queue,
            ids,
            partition,
            retry_at,
            dead,
        } => {
            let at = timestamp("retry-at", &retry_at)?;
            let n = ids.len();
            let items = ids
                .into_iter()
                .map(|id| pb::QueueRetryItem {
                    id,
                    retry_at: at,
                    dead,
                })
                .collect();
            c.queue_retry(&pb::QueueRetryRequest {
                queue_name: queue,
                partition,
                items,
            })
            .await
            .map_err(api)?;
            if !json {
                println!("retried {n} items");
            }
        }
        Command::Create(a) => {
            let retry_backoff = a.sets_backoff().then(|| a.backoff(None));
            let lease = a.lease_timeout.unwrap_or_else(|| "1m".into());
            let info = pb::QueueInfo {
                queue_name: a.queue.clone(),
                lease_timeout: lease,
                expire_timeout: a.expire_timeout.unwrap_or_else(|| "24h".into()),
                max_attempts: a.max_attempts.unwrap_or(0),
                dead_queue: a.dead_queue.unwrap_or_default(),
                reference: a.reference.unwrap_or_default(),
                requested_partitions: a.partitions.unwrap_or(1),
                dedup_window: a.dedup_window.unwrap_or_default(),
                max_lease_timeout: a.max_lease_timeout.unwrap_or_default(),
                retry_backoff,
                ..Default::default()
            };
            c.queues_create(&info).await.map_err(api)?;
            if !json {
                println!("created queue '{}'", a.queue);
            }
        }
        Command::Update(a) => {
            let retry_backoff = if a.sets_backoff() {
                let current = c
                    .queues_info(&pb::QueuesInfoRequest {
                        queue_name: a.queue.clone(),
                    })
                    .await
                    .map_err(api)?;
                Some(a.backoff(current.retry_backoff))
            } else {
                None
            };
            let info = pb::QueueInfo {
                queue_name: a.queue.clone(),
                lease_timeout: a.lease_timeout.unwrap_or_default(),
                expire_timeout: a.expire_timeout.unwrap_or_default(),
                max_attempts: a.max_attempts.unwrap_or(0),
                dead_queue: a.dead_queue.unwrap_or_default(),
                reference: a.reference.unwrap_or_default(),
                requested_partitions: a.partitions.unwrap_or(0),
                dedup_window: a.dedup_window.unwrap_or_default(),
                max_lease_timeout: a.max_lease_timeout.unwrap_or_default(),
                retry_backoff,
                ..Default::default()
            };
            c.queues_update(&info).await.map_err(api)?;
            if !json {
                println!("updated queue '{}'", a.queue);
            }
        }
        Command::Delete { queue, force } => {
            c.queues_delete(&pb::QueuesDeleteRequest {
                queue_name: queue.clone(),
                force,
            })
            .await
            .map_err(api)?;
            if !json {
                println!("deleted queue '{queue}'");
            }
        }
        Command::List { pivot, limit } => {
            let r = c
                .queues_list(&pb::QueuesListRequest {
                    pivot,
                    limit,
                    ..Default::default()
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                let mut s = format!(
                    "{:<32} {:>10} {:>10} {:>8} {:>5} DEAD_QUEUE",
                    "NAME", "LEASE", "EXPIRE", "ATTEMPTS", "PARTS"
                );
                for q in &r.items {
                    s.push_str(&format!(
                        "\n{:<32} {:>10} {:>10} {:>8} {:>5} {}",
                        q.queue_name,
                        q.lease_timeout,
                        q.expire_timeout,
                        q.max_attempts,
                        q.requested_partitions,
                        q.dead_queue
                    ));
                }
                s
            });
        }
        Command::Info { queue } => {
            let r = c
                .queues_info(&pb::QueuesInfoRequest { queue_name: queue })
                .await
                .map_err(api)?;
            print(json, &r, |q| {
                let or = |v: &str, default: &str| {
                    if v.is_empty() {
                        default.to_string()
                    } else {
                        v.to_string()
                    }
                };
                let backoff = match &q.retry_backoff {
                    Some(b) if !b.base.is_empty() => format!(
                        "base {}, max {}, factor {}, jitter {}",
                        b.base,
                        or(&b.max, "-"),
                        if b.factor == 0.0 { 2.0 } else { b.factor },
                        b.jitter
                    ),
                    _ => "off".to_string(),
                };
                format!(
                    "name:          {}\nlease timeout: {}\nexpire timeout:{}\nmax attempts:  {}\ndead queue:    {}\npartitions:    {}\nreference:     {}\npaused:        {}\ndedup window:  {}\nmax lease:     {}\nretry backoff: {}",
                    q.queue_name,
                    q.lease_timeout,
                    q.expire_timeout,
                    q.max_attempts,
                    q.dead_queue,
                    q.requested_partitions,
                    q.reference,
                    if q.paused { "yes" } else { "no" },
                    or(&q.dedup_window, "5m0s (default)"),
                    or(&q.max_lease_timeout, "the expire timeout"),
                    backoff
                )
            });
        }
        Command::Stats { queue } => {
            let r = c
                .queue_stats(&pb::QueueStatsRequest {
                    queue_name: queue,
                    with_oldest_age: true,
                    with_tiers: true,
                })
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                let mut s = format!(
                    "{:>9} {:>10} {:>10} {:>10} {:>9} {:>12} {:>12}",
                    "PARTITION", "TOTAL", "LEASED", "SCHEDULED", "FAILURES", "AVG AGE", "OLDEST READY"
                );
                for l in &r.logical_queues {
                    for p in &l.partitions {
                        let oldest = if p.oldest_ready_age.is_empty() {
                            "-"
                        } else {
                            p.oldest_ready_age.as_str()
                        };
                        s.push_str(&format!(
                            "\n{:>9} {:>10} {:>10} {:>10} {:>9} {:>12} {:>12}",
                            p.partition,
                            p.total,
                            p.total_leased,
                            p.scheduled,
                            p.failures,
                            p.average_age,
                            oldest
                        ));
                    }
                    s.push_str(&format!("\nwaiting leases: {}", l.lease_waiting));
                    // Where the items are: items / payload bytes per tier (an item can count in several).
                    s.push_str(&format!(
                        "\n\n{:>9} {:>24} {:>24} {:>24}",
                        "PARTITION", "MEMORY ITEMS/BYTES", "DISK ITEMS/BYTES", "OBJECT ITEMS/BYTES"
                    ));
                    for p in &l.partitions {
                        let t = p.tiers.clone().unwrap_or_default();
                        let pair = |items: i64, bytes: i64| format!("{items} / {}", human_bytes(bytes));
                        s.push_str(&format!(
                            "\n{:>9} {:>24} {:>24} {:>24}",
                            p.partition,
                            pair(t.memory_items, t.memory_bytes),
                            pair(t.disk_items, t.disk_bytes),
                            pair(t.object_items, t.object_bytes)
                        ));
                    }
                }
                s
            });
        }
        Command::Clear {
            queue,
            queue_items,
            scheduled,
            destructive,
        } => {
            let req = pb::QueueClearRequest {
                queue_name: queue,
                queue: queue_items,
                scheduled,
                destructive,
            };
            c.queue_clear(&req).await.map_err(api)?;
            if !json {
                println!("cleared");
            }
        }
        Command::Extend(a) => extensions::extend(&c, json, a).await?,
        Command::Pause { queue } => extensions::pause(&c, json, queue, true).await?,
        Command::Resume { queue } => extensions::pause(&c, json, queue, false).await?,
        Command::Browse(a) => extensions::browse(&c, json, a).await?,
        Command::Redrive(a) => extensions::redrive(&c, json, a).await?,
        Command::Rebalance(a) => rebalance::rebalance(&c, json, a).await?,
        Command::Offload(cmd) => extensions::offload(&c, json, cmd).await?,
        Command::Namespace(cmd) => auth::namespace(&c, json, cmd).await?,
        Command::User(cmd) => auth::user(&c, json, cmd).await?,
        Command::ApiKey(cmd) => auth::apikey(&c, json, cmd).await?,
        Command::Role(cmd) => auth::role(&c, json, cmd).await?,
        Command::Rolebinding(cmd) => auth::rolebinding(&c, json, cmd).await?,
        Command::Whoami => {
            let r = c
                .call::<lessor_proto::routes::AuthWhoami>(&pb::AuthWhoamiRequest {})
                .await
                .map_err(api)?;
            print(json, &r, |r| {
                if !r.auth_enabled {
                    return "auth is off: every request runs as an administrator".to_string();
                }
                let or_none = |v: &str| {
                    if v.is_empty() {
                        "none".to_string()
                    } else {
                        v.to_string()
                    }
                };
                let mut s = format!(
                    "user:  {} ({})\nkey:   {}\nscope: {}",
                    r.username,
                    r.user_id,
                    or_none(&r.key_id),
                    or_none(&r.namespace_scope)
                );
                for n in &r.namespaces {
                    s.push_str(&format!("\n{}: {}", n.namespace, n.permissions.join(", ")));
                }
                s
            });
        }
    }
    Ok(())
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        % 1_000_000
}

async fn server(args: ServerArgs) -> Result<(), StartError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default_persistent(&args.data_dir),
    };
    if let Some(a) = args.address {
        config.address = Some(a);
    }
    if let Some(l) = args.log_level {
        config.logging.level = Some(l);
    }
    config.validate()?;
    init_logging(&config);
    let address = config.address().to_string();
    let tls = config
        .tls
        .as_ref()
        .map(lessor_server::tls::TlsSection::load)
        .transpose()?;
    let engine =
        lessor_server::build_engine(&config, std::sync::Arc::new(lessor_core::time::SystemClock)).await?;
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|source| StartError::Listen {
            address: address.clone(),
            source,
        })?;
    tracing::info!(address = %address, version = lessor_server::VERSION, tls = tls.is_some(), "lessor listening");
    let mut options = lessor_server::ServeOptions::from_config(&config);
    options.auth = lessor_server::build_auth(&config, &engine).await?;
    match tls {
        None => lessor_server::serve(listener, engine, options, shutdown_signal()).await,
        Some(tls) => lessor_server::serve_tls(listener, tls, engine, options, shutdown_signal()).await,
    }
    .map_err(|source| StartError::Serve { source })?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Sets up the log: level from the file (or `--log-level`), unless `RUST_LOG` is set, which wins entirely.
///
/// The storage engine's own crates (`fjall`, `lsm_tree`) log routine work at INFO ("Finished ingestion writer",
/// compactions); they are held at WARN by default so the server's log stays about the server. `RUST_LOG` can still
/// ask for them (`RUST_LOG=info,fjall=debug`).
///
/// Text logs are coloured only when stderr is a terminal, so a log file or a pipe gets no escape codes; the `color`
/// handler asks for colour regardless, `json` never has it.
fn init_logging(config: &Config) {
    use std::io::IsTerminal;

    let level = config
        .logging
        .level
        .clone()
        .unwrap_or_else(|| "info".into())
        .to_ascii_lowercase();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_directives(&level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.logging.handler.as_deref() {
        Some("json") => builder.json().init(),
        Some("color") => builder.with_ansi(true).init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// The log filter used when `RUST_LOG` is not set: `level` for everything, the storage engine's crates no more
/// verbose than WARN.
fn default_directives(level: &str) -> String {
    let quiet = if level == "error" { "error" } else { "warn" };
    format!("{level},fjall={quiet},lsm_tree={quiet}")
}

#[cfg(test)]
mod logging_tests {
    use super::default_directives;

    #[test]
    fn storage_engine_logs_are_held_at_warn() {
        assert_eq!(default_directives("debug"), "debug,fjall=warn,lsm_tree=warn");
        assert_eq!(default_directives("info"), "info,fjall=warn,lsm_tree=warn");
        // Never more verbose than the level asked for.
        assert_eq!(default_directives("error"), "error,fjall=error,lsm_tree=error");
        for level in ["trace", "debug", "info", "warn", "error"] {
            tracing_subscriber::EnvFilter::try_new(default_directives(level)).expect("a valid filter");
        }
    }
}

/// A byte count for people: `512 B`, `1.5 KiB`, `20.0 MiB`.
fn human_bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod human_bytes_tests {
    #[test]
    fn byte_counts_read_for_people() {
        assert_eq!(super::human_bytes(0), "0 B");
        assert_eq!(super::human_bytes(1023), "1023 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(20 << 20), "20.0 MiB");
    }
}
