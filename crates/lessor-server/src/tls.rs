//! HTTPS for the server: the `tls` section of the configuration turned into a rustls server configuration, and a
//! listener that hands the HTTP layer connections whose TLS handshake already finished.
//!
//! Handshakes run in tasks of their own, each bounded by [`HANDSHAKE_TIMEOUT`], so a client that stalls or fails
//! its handshake holds up no other connection and cannot keep a socket open forever; at most `limits.max-connections`
//! handshakes run at once (a connection accepted beyond that is closed at once), so clients that open sockets and
//! never handshake cannot hold an unbounded number of sockets and handshake states for ten seconds each. The HTTP layer only sees
//! finished handshakes, through the same `axum::serve` loop (router, graceful shutdown) as plain HTTP.
//!
//! Certificates and keys are PEM files. Every start-up error names the file and what is wrong with it.
//!
//! The files are read again while the server runs ([`TlsCertificates`]): every `tls.reload-interval` (a minute by
//! default) and on `SIGHUP`. Changed files that make a good configuration serve every connection accepted after
//! that; connections already open keep the configuration they started with. Changed files that do not (a key that
//! no longer matches because only the certificate was written so far, a truncated file) are reported once and the
//! previous configuration goes on serving, so certificates issued by an ACME client or a secret manager replace
//! the old ones without a restart and without a window in which handshakes fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lessor_proto::duration::parse_go_duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish its TLS handshake before its connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `tls.reload-interval`: how often the files are read again to see whether they changed.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// Longest `tls.reload-interval` accepted: a certificate renewed some days before it expires must be picked up
/// well within that.
pub const MAX_RELOAD_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// The `tls` section: serve HTTPS instead of HTTP.
///
/// ```yaml
/// tls:
///   cert-file: /etc/lessor/server.crt   # PEM chain, the server's certificate first
///   key-file: /etc/lessor/server.key    # PEM private key (PKCS#8, RSA or SEC1)
///   client-ca-file: /etc/lessor/ca.crt  # optional: ask clients for certificates signed by this CA
///   client-auth: required               # optional: required (default with client-ca-file) | optional
///   reload-interval: 1m                 # optional: how often the files are checked for changes (0: only SIGHUP)
/// ```
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsSection {
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; no client certificates are asked for
    /// without it.
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client certificate is required (the default once `client-ca-file` is set) or only checked when
    /// a client sends one.
    pub client_auth: Option<ClientAuth>,
    /// How often the files are read again (Go duration, default [`DEFAULT_RELOAD_INTERVAL`], at most
    /// [`MAX_RELOAD_INTERVAL`]; `0` reads them again only on `SIGHUP`).
    pub reload_interval: Option<String>,
}

/// `tls.client-auth`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// Every client must present a certificate signed by `client-ca-file`.
    Required,
    /// Clients may present one; when they do it must be signed by `client-ca-file`.
    Optional,
}

/// Why the TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("tls.{key}: cannot read '{path}': {source}")]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind the key needs, or a malformed one.
    #[error("tls.{key}: '{path}': {problem}")]
    Content {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The private key does not belong to the certificate, or rustls refused the pair.
    #[error("tls: key-file '{key_path}' does not match cert-file '{cert_path}': {problem}")]
    KeyMismatch {
        /// The certificate file.
        cert_path: String,
        /// The key file.
        key_path: String,
        /// rustls's reason.
        problem: String,
    },
    /// `client-auth` without `client-ca-file`.
    #[error("tls.client-auth: needs tls.client-ca-file (the CA that client certificates must chain to)")]
    ClientAuthWithoutCa,
    /// The client CA file was refused as a trust anchor.
    #[error("tls.client-ca-file: '{path}': {problem}")]
    ClientCa {
        /// The file.
        path: String,
        /// Why.
        problem: String,
    },
    /// `reload-interval` is not a Go duration between 0 and [`MAX_RELOAD_INTERVAL`].
    #[error("tls.reload-interval: '{value}' is invalid; {problem}")]
    ReloadInterval {
        /// The value given.
        value: String,
        /// Why it is refused.
        problem: String,
    },
}

/// The bytes of the files a configuration is built from: what a reload compares to tell whether they changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsSection {
    /// Checks what can be checked without reading files.
    ///
    /// # Errors
    /// [`TlsError::ClientAuthWithoutCa`].
    pub fn validate(&self) -> Result<(), TlsError> {
        if self.client_auth.is_some() && self.client_ca_file.is_none() {
            return Err(TlsError::ClientAuthWithoutCa);
        }
        self.reload_every()?;
        Ok(())
    }

    /// `reload-interval`: `None` when the files are read again only on `SIGHUP`.
    ///
    /// # Errors
    /// [`TlsError::ReloadInterval`].
    pub fn reload_every(&self) -> Result<Option<Duration>, TlsError> {
        let Some(value) = &self.reload_interval else {
            return Ok(Some(DEFAULT_RELOAD_INTERVAL));
        };
        let refused = |problem: String| TlsError::ReloadInterval {
            value: value.clone(),
            problem,
        };
        let d = parse_go_duration(value).map_err(|e| refused(e.to_string()))?;
        if d > MAX_RELOAD_INTERVAL {
            return Err(refused("at most 24h".into()));
        }
        Ok((!d.is_zero()).then_some(d))
    }

    /// Reads the files and builds the server's TLS configuration (HTTP/1.1 by ALPN).
    ///
    /// # Errors
    /// A file that cannot be read, holds no certificate or key, or a key that does not match the certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.validate()?;
        self.build(&self.read_files()?)
    }

    /// Reads the files and builds the configuration, for a server that picks up changed files while it runs.
    ///
    /// # Errors
    /// As [`TlsSection::server_config`].
    pub fn load(&self) -> Result<Arc<TlsCertificates>, TlsError> {
        self.validate()?;
        let files = self.read_files()?;
        let config = self.build(&files)?;
        Ok(Arc::new(TlsCertificates {
            section: self.clone(),
            current: RwLock::new(config),
            seen: Mutex::new(files),
        }))
    }

    fn read_files(&self) -> Result<Files, TlsError> {
        Ok(Files {
            cert: read_file("cert-file", &self.cert_file)?,
            key: read_file("key-file", &self.key_file)?,
            client_ca: match &self.client_ca_file {
                Some(p) => Some(read_file("client-ca-file", p)?),
                None => None,
            },
        })
    }

    /// The configuration the files' bytes make (the paths only name them in errors).
    fn build(&self, files: &Files) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = parse_certs("cert-file", &self.cert_file, &files.cert)?;
        let key = parse_key("key-file", &self.key_file, &files.key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Content {
                key: "cert-file",
                path: shown(&self.cert_file),
                problem: e.to_string(),
            })?;
        let builder = match (&self.client_ca_file, &files.client_ca) {
            (Some(ca_path), Some(ca_pem)) => {
                let mut roots = RootCertStore::empty();
                for cert in parse_certs("client-ca-file", ca_path, ca_pem)? {
                    roots.add(cert).map_err(|e| TlsError::ClientCa {
                        path: shown(ca_path),
                        problem: e.to_string(),
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = match self.client_auth.unwrap_or(ClientAuth::Required) {
                    ClientAuth::Required => verifier,
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                };
                let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                    path: shown(ca_path),
                    problem: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::KeyMismatch {
                cert_path: shown(&self.cert_file),
                key_path: shown(&self.key_file),
                problem: e.to_string(),
            })?;
        // The router speaks HTTP/1.1 only; saying so lets HTTP/2-capable clients settle on it at once.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: shown(path),
        source,
    })
}

/// Every certificate of a PEM file's bytes; an error when there is none.
fn parse_certs(key: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Content {
            key,
            path: shown(path),
            problem: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            key,
            path: shown(path),
            problem: "no certificate in file (expected a PEM 'BEGIN CERTIFICATE' block)".into(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file's bytes (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn parse_key(key: &'static str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Content {
        key,
        path: shown(path),
        problem: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no private key in file (expected a PEM 'BEGIN PRIVATE KEY', 'BEGIN RSA PRIVATE KEY' or \
                 'BEGIN EC PRIVATE KEY' block)"
                    .into()
            }
            e => format!("malformed PEM: {e}"),
        },
    })
}

/// What [`TlsCertificates::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were when last read: nothing was rebuilt.
    Unchanged,
    /// The files changed and the configuration they make now serves new connections.
    Replaced,
}

/// The server's TLS configuration, replaced while the server runs when its files change (see the module docs).
#[derive(Debug)]
pub struct TlsCertificates {
    section: TlsSection,
    /// What new connections are handshaken with. Read once per accepted connection: a plain lock whose readers
    /// only clone an `Arc` is cheap next to a handshake.
    current: RwLock<Arc<ServerConfig>>,
    /// The files as last read, whether they made a good configuration or not: files that did not are reported once,
    /// not at every check, and files that did are not rebuilt.
    seen: Mutex<Files>,
}

impl TlsCertificates {
    /// The configuration new connections use.
    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Reads the files again and, when they changed since they were last read (or `force`, for an operator's
    /// explicit request), builds a configuration from them and serves new connections with it. Reads files: call
    /// it off the async runtime's threads.
    ///
    /// # Errors
    /// Files that cannot be read or do not make a configuration (as at start-up); the previous configuration goes
    /// on serving. The same broken files give [`Reload::Unchanged`] at the next check unless `force`d.
    pub fn reload(&self, force: bool) -> Result<Reload, TlsError> {
        let files = self.section.read_files()?;
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *seen == files && !force {
                return Ok(Reload::Unchanged);
            }
            *seen = files.clone();
        }
        let config = self.section.build(&files)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        Ok(Reload::Replaced)
    }

    /// Checks the files every `reload-interval` and on `SIGHUP` (Unix) until dropped, logging what each check
    /// found and counting reloads in `metrics`.
    ///
    /// The `SIGHUP` handler is in place when this returns, before the future first runs: a server whose listener
    /// is up must never meet the signal's default action (ending the process).
    pub(crate) fn watch(
        self: Arc<Self>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> impl std::future::Future<Output = ()> + Send {
        // Validated at start-up; an interval that no longer parses cannot happen, and would only stop the polling.
        let every = self.section.reload_every().ok().flatten();
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "tls: cannot listen for SIGHUP; certificate files are checked only every tls.reload-interval");
                None
            }
        };
        async move {
            let mut tick = every.map(|d| {
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            loop {
                let ticked = async {
                    match tick.as_mut() {
                        Some(t) => {
                            t.tick().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(unix)]
                let signalled = async {
                    let received = match hangup.as_mut() {
                        Some(s) => s.recv().await.is_some(),
                        None => false,
                    };
                    if !received {
                        std::future::pending::<()>().await;
                    }
                };
                #[cfg(not(unix))]
                let signalled = std::future::pending::<()>();
                let force = tokio::select! {
                    () = ticked => false,
                    () = signalled => true,
                };
                let me = Arc::clone(&self);
                match tokio::task::spawn_blocking(move || me.reload(force)).await {
                    Ok(Ok(Reload::Replaced)) => {
                        metrics.tls_reloads.inc();
                        tracing::info!(cert_file = %shown(&self.section.cert_file), "tls: certificate files read again; new connections use them");
                    }
                    Ok(Ok(Reload::Unchanged)) => {}
                    Ok(Err(e)) => {
                        metrics.tls_reload_failures.inc();
                        tracing::warn!(error = %e, "tls: changed certificate files cannot be used; the previous certificate goes on serving");
                    }
                    Err(e) => tracing::warn!(error = %e, "tls: the certificate check did not finish"),
                }
            }
        }
    }
}

/// A listener that yields TLS connections whose handshake finished, for `axum::serve`.
///
/// A task accepts TCP connections and starts one handshake task per connection; finished handshakes queue here.
/// The accept task stops when this listener is dropped (when serving ends).
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS with `certificates` (the configuration current when each connection is accepted) on `listener`,
    /// with at most `max_handshakes` handshakes in progress. `on_tcp` runs on every accepted socket (e.g.
    /// `TCP_NODELAY`).
    ///
    /// # Errors
    /// The listener's local address cannot be read.
    pub fn new(
        listener: TcpListener,
        certificates: Arc<TlsCertificates>,
        on_tcp: fn(&TcpStream),
        max_handshakes: usize,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        // Handshakes take places of their own: a finished one then needs a place of the HTTP layer's accept loop,
        // which closes it when none is left, as it does plain connections.
        let places = Arc::new(tokio::sync::Semaphore::new(
            max_handshakes.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        ));
        // A small queue: handshakes that finished while the HTTP layer is busy wait here, the rest in their tasks.
        let (tx, ready) = mpsc::channel(64);
        let accept_task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: as axum does for plain HTTP, wait and go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let Ok(place) = places.clone().try_acquire_owned() else {
                    // Logged at debug only: a flood of connections must not become a flood of log lines.
                    tracing::debug!(%peer, "limits.max-connections handshakes in progress; connection closed");
                    drop(tcp);
                    continue;
                };
                on_tcp(&tcp);
                let acceptor = TlsAcceptor::from(certificates.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            // Fails only when serving has stopped; the connection is then closed. The place is
                            // held until the accept loop has the connection (which then takes one of its own),
                            // so connections waiting in the queue count too.
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            tracing::debug!(peer = %peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out")
                        }
                    }
                    drop(place);
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended, which it does only once this listener is gone: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
