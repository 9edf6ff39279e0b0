//! TLS with rustls (ring provider; TLS 1.2 and 1.3 only): the client-facing acceptor with a
//! certificate that can be reloaded without a restart, optional mutual TLS, and the
//! connector for TLS to the shards.
//!
//! Bad files are an error naming the file, never a panic. A reload that fails (unreadable,
//! unparsable, key not matching the certificate) is logged and the old certificate stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

/// A TLS set-up error, naming the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {why}")]
    File {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{what} {path} contains no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("certificate {cert} and key {key} do not form a usable pair: {why}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The one crypto provider slotgate uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider (clients such as redis-rs use it).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the server certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generated in memory for `localhost`/`127.0.0.1` (development only).
    SelfSigned,
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |why: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "private key",
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Loads a certificate chain and its key, checking that they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs("certificate", cert)?;
    let der = read_key(key)?;
    CertifiedKey::from_der(chain, der, &provider()).map_err(|e| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        why: e.to_string(),
    })
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, and its SHA-256 fingerprint.
pub fn self_signed() -> Result<(CertifiedKey, String), TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| TlsError::Config(format!("cannot generate a certificate: {e}")))?;
    let der = ck.cert.der().clone();
    let fingerprint = fingerprint(&der);
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let certified = CertifiedKey::from_der(vec![der], key, &provider())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok((certified, fingerprint))
}

/// `AB:CD:…` SHA-256 of a DER certificate, as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The server certificate, swappable at run time. New handshakes use the current one;
/// established connections are unaffected.
#[derive(Debug)]
pub struct ReloadableCert {
    source: CertSource,
    current: RwLock<Arc<CertifiedKey>>,
    /// SHA-256 of a generated self-signed certificate, logged at start-up.
    pub self_signed_fingerprint: Option<String>,
}

impl ReloadableCert {
    pub fn load(source: CertSource) -> Result<Arc<Self>, TlsError> {
        let (key, self_signed_fingerprint) = match &source {
            CertSource::Files { cert, key } => (load_certified_key(cert, key)?, None),
            CertSource::SelfSigned => {
                let (key, fp) = self_signed()?;
                (key, Some(fp))
            }
        };
        Ok(Arc::new(ReloadableCert {
            source,
            current: RwLock::new(Arc::new(key)),
            self_signed_fingerprint,
        }))
    }

    /// Re-reads the certificate files. On any error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let CertSource::Files { cert, key } = &self.source else {
            return Ok(());
        };
        let fresh = load_certified_key(cert, key)?;
        if let Ok(mut cur) = self.current.write() {
            *cur = Arc::new(fresh);
        }
        Ok(())
    }

    /// The certificate files to watch, if any.
    pub fn files(&self) -> Option<(PathBuf, PathBuf)> {
        match &self.source {
            CertSource::Files { cert, key } => Some((cert.clone(), key.clone())),
            CertSource::SelfSigned => None,
        }
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|k| k.clone())
    }
}

/// The rustls server configuration: TLS 1.2 and 1.3, the reloadable certificate, and client
/// certificates required when `client_ca` is given (like Redis's `tls-auth-clients yes`).
pub fn server_config(
    cert: Arc<ReloadableCert>,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(path) => {
            let roots = root_store("client CA", path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Config(format!("client CA {}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = Vec::new();
    Ok(Arc::new(config))
}

fn root_store(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(what, path)? {
        roots.add(c).map_err(|e| TlsError::File {
            what,
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// TLS towards the shards.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    /// SNI / certificate name; `None` means the shard's IP address.
    pub server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// The name to verify (and send as SNI) for the shard at `ip`: the configured one, or
    /// the address itself.
    pub fn name_for(&self, ip: std::net::IpAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(ip.into()))
    }
}

/// The client configuration for TLS to the shards: the CA that signed their certificates and,
/// optionally, a client certificate (for shards with `tls-auth-clients yes`).
pub fn upstream_config(
    ca: &Path,
    client_cert: Option<(&Path, &Path)>,
    server_name: Option<&str>,
) -> Result<UpstreamTls, TlsError> {
    let roots = root_store("upstream CA", ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => {
            let chain = read_certs("upstream client certificate", cert)?;
            let der = read_key(key)?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| TlsError::Pair {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                    why: e.to_string(),
                })?
        }
        None => builder.with_no_client_auth(),
    };
    let server_name = match server_name {
        Some(n) => Some(
            ServerName::try_from(n.to_string())
                .map_err(|e| TlsError::Config(format!("upstream TLS name '{n}': {e}")))?,
        ),
        None => None,
    };
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
    })
}

/// A TLS client for HTTPS (JWKS downloads): the system's root certificates plus, when given,
/// the CAs in `extra_ca` (a private identity provider's).
pub fn https_connector(extra_ca: Option<&Path>) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let mut roots = match extra_ca {
        Some(p) => root_store("CA file", p)?,
        None => RootCertStore::empty(),
    };
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        return Err(TlsError::Config(
            "no trusted root certificates: the system has none (install ca-certificates) \
             and no CA file was given"
                .into(),
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
