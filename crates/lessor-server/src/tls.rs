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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// The `tls` section: serve HTTPS instead of HTTP.
///
/// ```yaml
/// tls:
///   cert-file: /etc/lessor/server.crt   # PEM chain, the server's certificate first
///   key-file: /etc/lessor/server.key    # PEM private key (PKCS#8, RSA or SEC1)
///   client-ca-file: /etc/lessor/ca.crt  # optional: ask clients for certificates signed by this CA
///   client-auth: required               # optional: required (default with client-ca-file) | optional
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
        Ok(())
    }

    /// Reads the files and builds the server's TLS configuration (HTTP/1.1 by ALPN).
    ///
    /// # Errors
    /// A file that cannot be read, holds no certificate or key, or a key that does not match the certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.validate()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs("cert-file", &self.cert_file)?;
        let key = read_key("key-file", &self.key_file)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Content {
                key: "cert-file",
                path: shown(&self.cert_file),
                problem: e.to_string(),
            })?;
        let builder = match &self.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(ca_path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs("client-ca-file", ca_path)? {
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

/// Every certificate of a PEM file; an error when there is none.
fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
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

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Content {
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
    /// Serves TLS with `config` on `listener`, with at most `max_handshakes` handshakes in progress. `on_tcp` runs
    /// on every accepted socket (e.g. `TCP_NODELAY`).
    ///
    /// # Errors
    /// The listener's local address cannot be read.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
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
        let acceptor = TlsAcceptor::from(config);
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
                let acceptor = acceptor.clone();
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
