//! TLS settings of a [`Client`](crate::Client) for `https://` endpoints: extra CA certificates to trust (a private
//! CA) and a client certificate for servers that ask for one (mutual TLS).
//!
//! Connections use rustls; the built-in public roots (Mozilla's, compiled in) are trusted as well as any CA added
//! here. Files are checked when they are added, so a wrong file fails with its name before any request is sent.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ClientError;

/// TLS settings: extra trusted CAs and an optional client identity. The default trusts the built-in roots only
/// and sends no client certificate.
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    pub(crate) cas: Vec<reqwest::Certificate>,
    pub(crate) identity: Option<reqwest::Identity>,
}

impl TlsConfig {
    /// No extra CA, no client certificate.
    pub fn new() -> TlsConfig {
        TlsConfig::default()
    }

    /// Also trusts every certificate of `pem` (one or more PEM `CERTIFICATE` blocks). `what` names the source in
    /// errors.
    ///
    /// # Errors
    /// [`ClientError::Tls`] when `pem` holds no certificate or a malformed one.
    pub fn add_ca_pem(mut self, pem: &[u8], what: &str) -> Result<TlsConfig, ClientError> {
        let certs = certificates(pem, what)?;
        for der in certs {
            let cert = reqwest::Certificate::from_der(&der).map_err(|e| tls_err(what, &e.to_string()))?;
            self.cas.push(cert);
        }
        Ok(self)
    }

    /// [`TlsConfig::add_ca_pem`] with the contents of the file at `path`.
    ///
    /// # Errors
    /// [`ClientError::Tls`] naming the file when it cannot be read or holds no certificate.
    pub fn add_ca_file(self, path: impl AsRef<Path>) -> Result<TlsConfig, ClientError> {
        let (pem, what) = read(path.as_ref(), "CA file")?;
        self.add_ca_pem(&pem, &what)
    }

    /// Presents this client certificate (PEM chain, the client's own certificate first) with its private key
    /// (PEM: PKCS#8, RSA or SEC1) to servers that ask for one.
    ///
    /// # Errors
    /// [`ClientError::Tls`] when either holds no certificate or key.
    pub fn identity_pem(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsConfig, ClientError> {
        self.identity = Some(identity(cert_pem, key_pem, "client certificate", "client key")?);
        Ok(self)
    }

    /// [`TlsConfig::identity_pem`] with the contents of two files.
    ///
    /// # Errors
    /// [`ClientError::Tls`] naming the file that cannot be read or holds no certificate or key.
    pub fn identity_files(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsConfig, ClientError> {
        let (cert_pem, cert_what) = read(cert.as_ref(), "client certificate file")?;
        let (key_pem, key_what) = read(key.as_ref(), "client key file")?;
        self.identity = Some(identity(&cert_pem, &key_pem, &cert_what, &key_what)?);
        Ok(self)
    }

    /// Whether a client certificate is set.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// A reqwest client builder with these settings (rustls, built-in roots plus the extra CAs).
    pub(crate) fn builder(&self) -> reqwest::ClientBuilder {
        let mut b = reqwest::Client::builder().use_rustls_tls();
        for ca in &self.cas {
            b = b.add_root_certificate(ca.clone());
        }
        if let Some(id) = &self.identity {
            b = b.identity(id.clone());
        }
        b
    }
}

fn tls_err(what: &str, problem: &str) -> ClientError {
    ClientError::Tls {
        reason: format!("{what}: {problem}"),
    }
}

fn read(path: &Path, kind: &str) -> Result<(Vec<u8>, String), ClientError> {
    let what = format!("{kind} '{}'", path.display());
    let pem = std::fs::read(path).map_err(|e| tls_err(&what, &format!("cannot read: {e}")))?;
    Ok((pem, what))
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(what, &format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(
            what,
            "no certificate in file (expected a PEM 'BEGIN CERTIFICATE' block)",
        ));
    }
    Ok(certs)
}

fn identity(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_what: &str,
    key_what: &str,
) -> Result<reqwest::Identity, ClientError> {
    certificates(cert_pem, cert_what)?;
    PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => tls_err(key_what, "no private key in file"),
        e => tls_err(key_what, &format!("malformed PEM: {e}")),
    })?;
    // reqwest reads the identity from one PEM buffer holding the key and the chain.
    let mut both = key_pem.to_vec();
    both.push(b'\n');
    both.extend_from_slice(cert_pem);
    reqwest::Identity::from_pem(&both).map_err(|e| tls_err(cert_what, &e.to_string()))
}
