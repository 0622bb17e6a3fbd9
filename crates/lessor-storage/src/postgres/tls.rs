//! TLS for PostgreSQL connections, through rustls, driven by libpq's `sslmode` and `sslrootcert` parameters of the
//! connection string.
//!
//! | `sslmode` | what happens |
//! | --- | --- |
//! | `disable` | plain text |
//! | `prefer` (the default, as libpq) | TLS without verification when the server offers it, plain text otherwise |
//! | `require` | TLS or no connection; the certificate is not verified (libpq: with `sslrootcert` it is `verify-ca`) |
//! | `verify-ca` | TLS; the certificate must chain to `sslrootcert`; the host name is not checked |
//! | `verify-full` | TLS; chain to `sslrootcert` and the certificate must name the host connected to |
//!
//! The driver (tokio-postgres) knows only `disable`, `prefer` and `require` and no `sslrootcert`, so
//! [`split`] takes both parameters out of the string before the driver parses it, and the verification is done
//! here by the rustls connector ([`RustlsConnect`]). `prefer` and `require` protect against passive eavesdropping
//! only: without verification an active attacker can pose as the server.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use lessor_core::error::{StorageError, StorageErrorKind};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::Socket;

/// libpq's `sslmode` (`allow` is not supported: it only differs from `prefer` in which attempt comes first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text.
    Disable,
    /// TLS without verification when the server offers it.
    Prefer,
    /// TLS without verification, or no connection.
    Require,
    /// TLS, certificate chained to `sslrootcert`, any host name.
    VerifyCa,
    /// TLS, certificate chained to `sslrootcert` and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, StorageError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(config_err(format!(
                    "connection-string: invalid sslmode; '{other}' is not one of (disable, prefer, require, \
                     verify-ca, verify-full)"
                )))
            }
        })
    }

    /// What the driver is told: it only decides whether TLS is attempted and whether it is mandatory.
    pub(crate) fn driver_mode(self) -> DriverSslMode {
        match self {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverSslMode::Require,
        }
    }
}

/// The TLS parameters of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsParams {
    /// `sslmode` (default `prefer`).
    pub mode: SslMode,
    /// `sslrootcert`: the CA certificates (PEM) that verify the server.
    pub root_cert: Option<PathBuf>,
}

fn config_err(msg: String) -> StorageError {
    StorageError::new(StorageErrorKind::Config, msg)
}

/// Takes `sslmode` and `sslrootcert` out of a connection string (URI or key=value form); returns the rest for the
/// driver, and the TLS parameters.
///
/// # Errors
/// An `sslmode` outside libpq's list (`allow` included: it is not supported).
pub fn split(conn: &str) -> Result<(String, TlsParams), StorageError> {
    let mut mode = None;
    let mut root_cert = None;
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        split_uri(conn, &mut mode, &mut root_cert)
    } else {
        split_key_values(conn, &mut mode, &mut root_cert)
    };
    let mode = match mode {
        None => SslMode::Prefer,
        Some(m) => SslMode::parse(&m)?,
    };
    // libpq: `require` with a root certificate verifies the chain, as verify-ca.
    let mode = if mode == SslMode::Require && root_cert.is_some() {
        SslMode::VerifyCa
    } else {
        mode
    };
    Ok((
        rest,
        TlsParams {
            mode,
            root_cert: root_cert.map(PathBuf::from),
        },
    ))
}

fn take(key: &str, value: String, mode: &mut Option<String>, root: &mut Option<String>) -> bool {
    match key {
        "sslmode" => *mode = Some(value),
        "sslrootcert" => *root = Some(value),
        _ => return false,
    }
    true
}

fn split_uri(conn: &str, mode: &mut Option<String>, root: &mut Option<String>) -> String {
    let Some((base, query)) = conn.split_once('?') else {
        return conn.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            !take(&percent_decode(k), percent_decode(v), mode, root)
        })
        .collect();
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes our keys from a `key=value` string, leaving every other pair exactly as written. Values may be quoted
/// with `'` and use `\` escapes, as libpq allows. A string that does not tokenize is returned unchanged for the
/// driver to report.
fn split_key_values(conn: &str, mode: &mut Option<String>, root: &mut Option<String>) -> String {
    let b = conn.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &conn[start..i];
        i = skip_ws(i);
        if i >= b.len() || b[i] != b'=' {
            return conn.to_string();
        }
        i = skip_ws(i + 1);
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return conn.to_string(),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8_lossy(&value).into_owned();
        if take(key, value, mode, root) {
            spans.push((start, i));
        }
    }
    let mut out = String::with_capacity(conn.len());
    let mut last = 0;
    for (s, e) in spans {
        out.push_str(&conn[last..s]);
        last = e;
    }
    out.push_str(&conn[last..]);
    out.trim().to_string()
}

/// The rustls connector for the driver, or an error naming the setting or the file.
///
/// # Errors
/// `verify-ca`/`verify-full` without `sslrootcert`, or a root certificate file that cannot be read or holds no
/// certificate.
pub(crate) fn connector(params: &TlsParams) -> Result<RustlsConnect, StorageError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match params.mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(NoVerification(provider.clone())),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let Some(path) = &params.root_cert else {
                return Err(config_err(format!(
                    "connection-string: sslmode={} needs sslrootcert=<file> (the CA certificate, PEM)",
                    if params.mode == SslMode::VerifyCa {
                        "verify-ca"
                    } else {
                        "verify-full"
                    }
                )));
            };
            let roots = read_roots(path)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| {
                    config_err(format!(
                        "connection-string: sslrootcert '{}': {e}",
                        path.display()
                    ))
                })?;
            if params.mode == SslMode::VerifyCa {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(format!("postgres TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(RustlsConnect {
        config: Arc::new(config),
    })
}

fn read_roots(path: &Path) -> Result<RootCertStore, StorageError> {
    let at = || format!("connection-string: sslrootcert '{}'", path.display());
    let pem = std::fs::read(path).map_err(|e| config_err(format!("{}: cannot read: {e}", at())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_err(format!("{}: malformed PEM: {e}", at())))?;
    if certs.is_empty() {
        return Err(config_err(format!("{}: no certificate in file", at())));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| config_err(format!("{}: {e}", at())))?;
    }
    Ok(roots)
}

/// `prefer` and `require`: encryption without authentication, as libpq. Handshake signatures are still checked,
/// so the session keys are bound to the certificate the server showed.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full WebPKI check except the host name. WebPKI checks the chain before the name, so a
/// name error means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The driver's TLS connector over rustls: one per pool, cloned per connection.
#[derive(Clone)]
pub(crate) struct RustlsConnect {
    config: Arc<ClientConfig>,
}

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnectOne, io::Error> {
        // Only verify-full looks at the name; for the other modes a host that is no DNS name or IP address (it
        // never is for TCP, but be safe) still connects, under a placeholder name that sends no SNI.
        let name = ServerName::try_from(domain.to_string())
            .or_else(|_| ServerName::try_from("postgres".to_string()))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectOne {
            config: self.config.clone(),
            name,
        })
    }
}

/// One connection's handshake.
pub(crate) struct RustlsConnectOne {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnectOne {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub(crate) struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM channel binding (tls-server-end-point) is not offered; SCRAM authentication works without it.
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_uri_and_the_rest_stays() {
        let (rest, p) =
            split("postgres://u@h:5/db?sslmode=verify-full&connect_timeout=5&sslrootcert=%2Fetc%2Fca.crt")
                .expect("split");
        assert_eq!(rest, "postgres://u@h:5/db?connect_timeout=5");
        assert_eq!(p.mode, SslMode::VerifyFull);
        assert_eq!(p.root_cert.as_deref(), Some(Path::new("/etc/ca.crt")));
        let (rest, p) = split("postgres://u@h/db?sslmode=disable").expect("split");
        assert_eq!((rest.as_str(), p.mode), ("postgres://u@h/db", SslMode::Disable));
        let (rest, p) = split("postgres://u@h/db").expect("split");
        assert_eq!(
            (rest.as_str(), p.mode, p.root_cert),
            ("postgres://u@h/db", SslMode::Prefer, None)
        );
    }

    #[test]
    fn tls_parameters_leave_key_value_strings() {
        let (rest, p) =
            split("host=h sslmode = verify-ca  sslrootcert='/my dir/ca\\'s.crt' dbname=x").expect("split");
        assert_eq!(
            rest.split_whitespace().collect::<Vec<_>>(),
            ["host=h", "dbname=x"]
        );
        assert_eq!(p.mode, SslMode::VerifyCa);
        assert_eq!(p.root_cert.as_deref(), Some(Path::new("/my dir/ca's.crt")));
        // libpq: require with a root certificate verifies the chain.
        let (_, p) = split("host=h sslmode=require sslrootcert=/ca.crt").expect("split");
        assert_eq!(p.mode, SslMode::VerifyCa);
    }

    #[test]
    fn unknown_modes_and_missing_roots_are_config_errors() {
        let e = split("postgres://h/db?sslmode=allow").expect_err("allow");
        assert_eq!(e.kind, StorageErrorKind::Config);
        assert!(e.to_string().contains("'allow'"), "{e}");
        let (_, p) = split("host=h sslmode=verify-full").expect("split");
        let e = connector(&p).err().expect("no root cert");
        assert!(e.to_string().contains("sslrootcert"), "{e}");
        let (_, p) = split("host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.crt").expect("split");
        let e = connector(&p).err().expect("missing file");
        assert!(e.to_string().contains("/nonexistent/ca.crt"), "{e}");
    }
}
