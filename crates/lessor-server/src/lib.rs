//! Lessor's HTTP server: it reads the configuration, builds the storage backends and the engine, and serves
//! Querator's v1 API over JSON and protobuf.
//!
//! It is not: the queue logic (`lessor-core`), a backend (`lessor-storage`) or the wire types (`lessor-proto`).
//! The binary only parses flags and calls [`serve`]; tests call [`start`] on port 0 with an injected clock.
//!
//! # Layout
//! - [`config`]: the YAML file (seeds' format) mapped to store specifications of the storage crate's driver registry,
//!   and validation.
//! - [`error`]: [`error::ApiError`] and the one place errors become wire codes.
//! - [`http`]: routes, content negotiation, body limits, handlers.
//! - `admin`: the handlers of the access-control routes (namespaces, users, API keys, roles, role bindings).
//! - [`convert`]: wire messages to and from core types.
//! - [`metrics`]: `/metrics` (request latency per route, per-queue gauges and counters).
//! - [`tls`]: HTTPS (the `tls` section, rustls, handshakes off the accept path).
//! - [`inflight`]: the server-wide bound on request bytes held in memory (`limits.max-inflight-bytes`).

mod admin;
mod backup;
pub mod config;
pub mod convert;
pub mod error;
pub mod history;
pub mod http;
pub mod inflight;
pub mod metrics;
pub mod tls;
pub mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use lessor_core::auth::{Auth, AuthError, AuthMode};
use lessor_core::engine::Engine;
use lessor_core::time::{SharedClock, SystemClock};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use config::{Config, ConfigError};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid or its stores cannot be opened.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A queue declared in the file was refused (an invalid definition, not an outage).
    #[error("queues: '{queue}': {source}")]
    DeclareQueue {
        /// The queue.
        queue: String,
        /// The engine's reason.
        #[source]
        source: lessor_core::error::QueueError,
    },
    /// The auth bootstrap failed (the key file cannot be written, the storage refused it).
    #[error("auth-backend: {source}")]
    AuthBootstrap {
        /// Why.
        #[source]
        source: AuthError,
    },
    /// The `tls` section's files cannot be used (the error names the file and the problem).
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The listen address cannot be bound.
    #[error("address: cannot listen on '{address}': {source}")]
    Listen {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serving stopped with an error.
    #[error("serving failed: {source}")]
    Serve {
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What [`serve`] needs besides the engine: the request limits of the configuration that the HTTP layer applies,
/// and the auth service.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Largest produce body, in bytes (`limits.max-produce-body`).
    pub max_produce_body: usize,
    /// Largest produce body for queues placed only on `offload_stores` (`limits.max-offload-produce-body`).
    pub max_offload_produce_body: usize,
    /// The partition stores that offload payloads to object storage.
    pub offload_stores: Vec<String>,
    /// Authentication and authorisation; `None`: every request may do everything (`auth-backend: none`).
    pub auth: Option<Auth>,
    /// Whether the dashboard is served at `/ui` (`ui`, on by default).
    pub ui: bool,
    /// The configuration summary `server.info` answers (no secrets).
    pub summary: lessor_proto::ServerInfoResponse,
    /// Body bytes of requests read and not yet answered, server-wide (`limits.max-inflight-bytes`).
    pub max_inflight_bytes: u64,
    /// How long a body that does not fit under `max_inflight_bytes` waits for room (`limits.inflight-wait`).
    pub inflight_wait: std::time::Duration,
    /// How long a client may take to send a request's headers (`limits.header-read-timeout`).
    pub header_read_timeout: std::time::Duration,
    /// How long a client may take to send a request's body (`limits.body-read-timeout`).
    pub body_read_timeout: std::time::Duration,
    /// How long writing a reply may make no progress before the connection is closed
    /// (`limits.reply-write-timeout`).
    pub reply_write_timeout: std::time::Duration,
    /// Connections served at once (`limits.max-connections`).
    pub max_connections: usize,
    /// Most queues with per-queue series in `/metrics` (`limits.metrics-max-queues`).
    pub metrics_max_queues: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_produce_body: config::DEFAULT_MAX_PRODUCE_BODY,
            max_offload_produce_body: config::DEFAULT_MAX_PRODUCE_BODY,
            offload_stores: Vec::new(),
            auth: None,
            ui: true,
            summary: lessor_proto::ServerInfoResponse::default(),
            max_inflight_bytes: inflight::DEFAULT_MAX_INFLIGHT_BYTES,
            inflight_wait: inflight::DEFAULT_INFLIGHT_WAIT,
            header_read_timeout: config::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: config::DEFAULT_BODY_READ_TIMEOUT,
            reply_write_timeout: config::DEFAULT_REPLY_WRITE_TIMEOUT,
            max_connections: config::DEFAULT_MAX_CONNECTIONS,
            metrics_max_queues: config::DEFAULT_METRICS_MAX_QUEUES,
        }
    }
}

impl ServeOptions {
    /// The options a configuration asks for, without auth (see [`build_auth`]). (`limits.max-requests-per-queue`
    /// is the engine's; [`build_engine`] applies it.)
    pub fn from_config(config: &Config) -> Self {
        ServeOptions {
            max_produce_body: config.max_produce_body(),
            max_offload_produce_body: config.max_offload_produce_body(),
            offload_stores: config.offload_store_names(),
            auth: None,
            ui: config.ui_enabled(),
            summary: summary(config),
            max_inflight_bytes: config.max_inflight_bytes(),
            inflight_wait: config.inflight_wait(),
            header_read_timeout: config.header_read_timeout(),
            body_read_timeout: config.body_read_timeout(),
            reply_write_timeout: config.reply_write_timeout(),
            max_connections: config.max_connections(),
            metrics_max_queues: config.metrics_max_queues(),
        }
    }
}

/// What `server.info` tells about a configuration: drivers, store names and weights, auth backend, TLS, limits;
/// never a store's settings (paths, connection strings) nor a key.
fn summary(config: &Config) -> lessor_proto::ServerInfoResponse {
    let specs = config.store_specs().ok();
    lessor_proto::ServerInfoResponse {
        version: String::new(),
        queue_storage: specs
            .as_ref()
            .map(|s| s.queues.driver().name.to_string())
            .unwrap_or_default(),
        partition_storage: specs
            .map(|s| {
                s.partitions
                    .iter()
                    .map(|p| lessor_proto::StoreSummary {
                        name: p.name.clone(),
                        driver: p.spec.driver().name.to_string(),
                        affinity: p.affinity,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        auth_backend: if config.auth_backend.internal() {
            "internal"
        } else {
            "none"
        }
        .to_string(),
        tls: config.tls.is_some(),
        max_produce_body: i64::try_from(config.max_produce_body()).unwrap_or(i64::MAX),
    }
}

/// How often a server polls the auth store's generation, so that a key or user deleted through another server
/// stops working here within this period.
pub const AUTH_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The auth service the configuration asks for, over the engine's queue storage, bootstrapped: `_system` and the
/// standard roles, the open door, or the first start's admin user and key file. With `auth-backend: none` it checks
/// nobody (every request may do everything, as Querator's `none`) but still keeps its records in the queue storage,
/// with `_system` and the standard roles, so the namespace, user, key, role and binding routes work and the data is
/// there when the server is switched to `internal`. When the storage is down (a database not reachable yet), the
/// bootstrap keeps trying in the background, as queue declarations do; requests fail with 454 until it can read keys.
///
/// # Errors
/// A bootstrap key file that cannot be written, or a bootstrap the storage refuses.
pub async fn build_auth(config: &Config, engine: &Engine) -> Result<Option<Auth>, StartError> {
    let mode = if config.auth_backend.internal() {
        AuthMode::Internal
    } else {
        AuthMode::Disabled
    };
    let auth = Auth::new(engine.auth_store(), engine.clock().clone(), mode);
    let open_door = config.auth_backend.open_door();
    let key_file = config.auth_backend.bootstrap_key_file.clone().unwrap_or_default();
    match bootstrap(&auth, open_door, &key_file).await {
        Ok(()) => {}
        Err(AuthError::Transient(e)) => {
            tracing::warn!(error = %e, "auth bootstrap waits for the storage; retrying in the background");
            let auth = auth.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    match bootstrap(&auth, open_door, &key_file).await {
                        Err(AuthError::Transient(_)) => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "auth bootstrap failed");
                            break;
                        }
                        Ok(()) => break,
                    }
                }
            });
        }
        Err(source) => return Err(StartError::AuthBootstrap { source }),
    }
    Ok(Some(auth))
}

async fn bootstrap(auth: &Auth, open_door: bool, key_file: &str) -> Result<(), AuthError> {
    let path = std::path::Path::new(key_file);
    // A key file left by an earlier start is the operator's admin credential: when the store has lost the admin
    // (memory storage restarted, a wiped store), that key is registered again instead of a new one overwriting the
    // file. Two tries: a key file that another server of the same store writes to the same path while this one
    // mints its own is adopted on the second, instead of being overwritten with a key the store never takes.
    for _ in 0..2 {
        let held = if open_door || key_file.is_empty() {
            None
        } else {
            read_key_file(path)
        };
        // Set by the writer below, which runs inside the bootstrap future (so shared through a mutex, not a cell).
        let written: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        let raced = std::sync::atomic::AtomicBool::new(false);
        let result = auth
            .bootstrap(open_door, held.as_deref(), |key| match write_key_file(path, key) {
                Ok(()) => {
                    *written.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key.to_string());
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    raced.store(true, std::sync::atomic::Ordering::Relaxed);
                    Err(format!(
                        "bootstrap-key-file '{key_file}' exists and does not hold an API key; move it away or \
                         point bootstrap-key-file elsewhere"
                    ))
                }
                Err(e) => Err(format!("cannot write bootstrap-key-file '{key_file}': {e}")),
            })
            .await;
        if raced.load(std::sync::atomic::Ordering::Relaxed) && held.is_none() && read_key_file(path).is_some()
        {
            continue;
        }
        let report = result?;
        let written = written
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(key) = written {
            // Another server of the same store created the admin first (with a key file elsewhere): the key written
            // here was never stored, so the file would only mislead.
            if !report.created_admin && auth.authenticate(Some(&key)).await.is_err() {
                let _ = std::fs::remove_file(path);
                tracing::warn!(file = %key_file, "another server created the user 'admin' first; its key is in that server's bootstrap-key-file");
            }
        }
        if report.created_admin {
            tracing::info!(file = %key_file, "created user 'admin' bound to Admin; its API key is in the bootstrap key file");
        }
        if report.closed_door {
            tracing::info!("open-door: false removed the anonymous Admin binding");
        }
        return Ok(());
    }
    Err(AuthError::StorageFailed(format!(
        "bootstrap-key-file '{key_file}' kept changing during start-up"
    )))
}

/// The key in a bootstrap key file, when it exists and holds one.
fn read_key_file(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    lessor_core::auth::key::from_secret(&text).map(|k| k.secret)
}

/// Writes `key` alone on one line to `path`, readable by its owner only, atomically (a crash leaves no file or the
/// whole key, never half a key). An existing file is replaced only when it is empty (created ahead by the operator
/// to set its owner); otherwise the answer is [`std::io::ErrorKind::AlreadyExists`], so a key another server just
/// wrote there is never overwritten.
fn write_key_file(path: &std::path::Path, key: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    // A name of this process's own: servers sharing the directory must not write the same temporary file.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("admin.key"),
        std::process::id()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp)?;
    #[cfg(unix)]
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(key.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    let placed = match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => std::fs::rename(&tmp, path),
        Ok(_) => Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists)),
        // A hard link is placed only if nothing is there yet, atomically; where links are not supported, rename.
        Err(_) => match std::fs::hard_link(&tmp, path) {
            Ok(()) => std::fs::remove_file(&tmp),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
            Err(_) => std::fs::rename(&tmp, path),
        },
    };
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed?;
    std::fs::File::open(dir)?.sync_all()
}

/// The version reported by `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Builds the engine from the configuration and declares the configured queues.
///
/// # Errors
/// An invalid configuration, a store that cannot be opened, or a declared queue the engine refuses.
pub async fn build_engine(config: &Config, clock: SharedClock) -> Result<Engine, StartError> {
    let engine = config.build_engine(clock).await?;
    let mut pending = Vec::new();
    for q in config.declared_queues()? {
        let name = q.name.clone();
        match engine.declare_queue(q.clone()).await {
            Ok(()) => {}
            // The store is down (a database not reachable yet): start anyway, as with every other storage outage,
            // and keep declaring in the background. Queues declared later in the file may name this one as their
            // dead-letter queue, so the rest wait in order behind it.
            Err(e) if !pending.is_empty() || is_outage(&e) => {
                tracing::warn!(queue = %name, error = %e, "declared queue not written yet; retrying in the background");
                pending.push(q);
            }
            Err(source) => return Err(StartError::DeclareQueue { queue: name, source }),
        }
    }
    if !pending.is_empty() {
        let engine = engine.clone();
        tokio::spawn(async move {
            for q in pending {
                loop {
                    match engine.declare_queue(q.clone()).await {
                        Ok(()) => {
                            tracing::info!(queue = %q.name, "declared queue written");
                            break;
                        }
                        Err(e) if is_outage(&e) => {
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await
                        }
                        Err(e) => {
                            tracing::error!(queue = %q.name, error = %e, "declared queue rejected");
                            break;
                        }
                    }
                }
            }
        });
    }
    // Items other servers sharing a store make ready wake the consumers waiting here at once.
    engine.watch_notices();
    // Redrive tasks left running by a stopped (or killed) server, here or on another server sharing the store,
    // carry on: looked for now and every few seconds, in the background (a store that is down must not stop the
    // server from starting).
    {
        let engine = engine.clone();
        tokio::spawn(async move {
            loop {
                match engine.resume_redrives().await {
                    Ok(n) if n > 0 => tracing::info!(tasks = n, "redrive tasks resumed"),
                    Ok(_) => {}
                    Err(lessor_core::error::QueueError::ShuttingDown) => return,
                    Err(e) => tracing::warn!(error = %e, "redrive tasks not checked; will retry"),
                }
                // Rebalance tasks likewise: the watcher loads the queue, whose task resumes the moves before it
                // serves anything.
                match engine.resume_rebalances().await {
                    Ok(n) if n > 0 => tracing::info!(tasks = n, "rebalance tasks resumed"),
                    Ok(_) => {}
                    Err(lessor_core::error::QueueError::ShuttingDown) => return,
                    Err(e) => tracing::warn!(error = %e, "rebalance tasks not checked; will retry"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
        });
    }
    Ok(engine)
}

/// Whether an error means the storage is unreachable for now (retrying later may work).
fn is_outage(e: &lessor_core::error::QueueError) -> bool {
    matches!(e, lessor_core::error::QueueError::Transient(_))
}

/// Serves on `listener` until `shutdown` resolves, then stops the engine (waiting requests get "shutting down",
/// in-flight storage calls finish) and lets in-flight HTTP exchanges complete.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut TcpStream| set_nodelay(tcp));
    serve_on(listener, None, engine, options, shutdown).await
}

/// [`serve`] over TLS: the same router and shutdown, on connections whose handshake finished (see [`tls`]).
/// Build `tls` with [`tls::TlsSection::load`]; its files are read again while serving (`tls.reload-interval`,
/// `SIGHUP`).
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<tls::TlsCertificates>,
    engine: Engine,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tls::TlsListener::new(listener, tls.clone(), set_nodelay, options.max_connections)?;
    serve_on(listener, Some(tls), engine, options, shutdown).await
}

/// Replies are small and latency matters: never let Nagle hold a reply back waiting for an ACK.
fn set_nodelay(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
}

async fn serve_on<L>(
    listener: L,
    tls: Option<Arc<tls::TlsCertificates>>,
    engine: Engine,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let state = match options.auth.clone() {
        Some(auth) => http::AppState::with_auth(engine.clone(), auth, options.max_produce_body),
        None => http::AppState::with_limits(engine.clone(), options.max_produce_body),
    }
    .with_server_info(options.summary.clone())
    .with_offload_limit(options.max_offload_produce_body, &options.offload_stores)
    .with_inflight(inflight::Inflight::new(
        options.max_inflight_bytes,
        options.inflight_wait,
    ))
    .with_body_read_timeout(options.body_read_timeout);
    state.metrics.set_max_queues(options.metrics_max_queues);
    let history = state.history.clone();
    let state_metrics = state.metrics.clone();
    let mut app = http::router(state);
    if options.ui {
        app = app.merge(ui::router());
    }
    // The rings behind `queue.history`, sampled for as long as the server runs.
    let history_engine = engine.clone();
    let sampler = tokio::spawn(async move { history.run(history_engine, history::INTERVAL).await });
    let _stop_sampler = AbortOnDrop(Some(sampler));
    // Revocations made through other servers on the same store reach this one within one poll.
    let watcher =
        options.auth.clone().filter(Auth::enabled).map(|auth| {
            tokio::spawn(async move { auth.watch(AUTH_POLL, std::future::pending::<()>()).await })
        });
    let _stop_watcher = AbortOnDrop(watcher);
    // Certificate files replaced while the server runs are picked up without a restart.
    let tls_watcher = tls.map(|certs| tokio::spawn(certs.watch(state_metrics)));
    let _stop_tls_watcher = AbortOnDrop(tls_watcher);
    accept_loop(listener, app, &options, async move {
        shutdown.await;
        tracing::info!("shutting down");
        engine.shutdown().await;
    })
    .await;
    Ok(())
}

/// Most bytes of request head (request line and headers) a connection buffers; a larger head is refused with 431.
/// Querator's clients send well under 1 KiB; hyper's default (about 400 KiB) times `limits.max-connections` would
/// let slow clients hold gigabytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Serves `app` on the connections of `listener` until `shutdown` resolves, then lets the open connections finish
/// their requests and waits for them.
///
/// This replaces `axum::serve`, which sets no timer on hyper's connections and so has no header-read timeout and no
/// bound on connections: a client sending its headers a byte at a time, on as many connections as it likes, was
/// served forever. Here each connection has `header_read_timeout` (which also closes idle kept-alive connections)
/// and takes one of `max_connections` places, given back when it closes; a connection accepted with no place left
/// is closed at once, which the client sees as a closed connection rather than a hang. A reply whose write makes
/// no progress for `reply_write_timeout` (the client reads nothing: stopped, gone without a reset, or hostile)
/// closes its connection too: hyper has no write timeout, so such a client held its connection and its answer
/// (a lease answer may carry `limits.max-lease-bytes`) for as long as it kept the socket open. Only HTTP/1.1 is served, as
/// Querator does (TLS already offers nothing else through ALPN).
async fn accept_loop<L>(
    mut listener: L,
    app: axum::Router,
    options: &ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let places = options.max_connections.clamp(1, u32::MAX as usize);
    let open = Arc::new(tokio::sync::Semaphore::new(places));
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let Ok(place) = open.clone().try_acquire_owned() else {
            // Logged at debug only: a flood of connections must not become a flood of log lines.
            tracing::debug!(
                ?peer,
                limit = places,
                "limits.max-connections reached; connection closed"
            );
            drop(io);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        // Only writes are timed here: reads are hyper's (header-read-timeout) and the body reader's.
        let mut io = tokio_io_timeout::TimeoutStream::new(io);
        io.set_write_timeout(Some(options.reply_write_timeout));
        let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(Box::pin(io)), service);
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(e) = served {
                        tracing::trace!(?peer, error = %e, "connection ended");
                    }
                }
                // The guard `wait_for` returns is dropped at once: it is not `Send`.
                () = async { let _ = closing.wait_for(|c| *c).await; } => {
                    // Finish the request in progress, if any, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(place);
        });
    }
    let _ = closing.send(true);
    // Every connection gives its place back when it ends: holding them all means all have ended.
    let all = u32::try_from(places).unwrap_or(u32::MAX);
    let _ = open.acquire_many(all).await;
}

/// Aborts a background task when dropped (when [`serve`] returns, however it returns).
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// A server running in the background (tests, `lessor bench`).
pub struct RunningServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The engine (for tests that inspect it).
    pub engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    tls: Option<Arc<tls::TlsCertificates>>,
}

impl RunningServer {
    /// `http://<addr>`, or `https://<addr>` when the configuration has a `tls` section.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The TLS configuration the server serves (and reloads), when it has a `tls` section.
    pub fn tls(&self) -> Option<&Arc<tls::TlsCertificates>> {
        self.tls.as_ref()
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        self.stop_now().await;
    }

    async fn stop_now(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Starts a server on `address` (use port 0 for tests) in the background, with the configuration's limits.
///
/// # Errors
/// See [`StartError`].
pub async fn start(
    config: &Config,
    address: &str,
    clock: Option<SharedClock>,
) -> Result<RunningServer, StartError> {
    let clock = clock.unwrap_or_else(|| Arc::new(SystemClock));
    // Certificate problems are found before any store is opened.
    let tls = config.tls.as_ref().map(tls::TlsSection::load).transpose()?;
    let engine = build_engine(config, clock).await?;
    let listen_error = |source| StartError::Listen {
        address: address.to_string(),
        source,
    };
    let listener = TcpListener::bind(address).await.map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    let (tx, rx) = oneshot::channel::<()>();
    let mut options = ServeOptions::from_config(config);
    options.auth = build_auth(config, &engine).await?;
    let stopped = async move {
        let _ = rx.await;
    };
    let task = match tls.clone() {
        None => tokio::spawn(serve(listener, engine.clone(), options, stopped)),
        Some(tls) => tokio::spawn(serve_tls(listener, tls, engine.clone(), options, stopped)),
    };
    Ok(RunningServer {
        addr,
        engine,
        stop: Some(tx),
        task: Some(task),
        tls,
    })
}
