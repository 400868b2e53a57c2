//! The webhook's TLS: a rustls server configuration whose certificate can be swapped while
//! serving. Each new handshake picks up the pair in force; open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::metrics::gauge::Gauge;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate file is unreadable or holds no PEM certificate.
    #[error("certificate {path}: {message}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key file is unreadable, holds no PEM key, or the key type is unsupported.
    #[error("private key {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key does not belong to the certificate.
    #[error("private key {key} does not match certificate {cert}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Loads a certificate chain and its key from PEM files and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError::Certificate {
        path: cert.to_path_buf(),
        message: e.to_string(),
    })?;
    let key_pem = std::fs::read(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        message: e.to_string(),
    })?;
    pair_from_pem(&cert_pem, &key_pem, cert, key)
}

/// Builds a pair from PEM text; `cert_name` and `key_name` say where it came from in errors.
pub fn pair_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &Path,
    key_name: &Path,
) -> Result<CertifiedKey, TlsError> {
    let cert_error = |message: String| TlsError::Certificate {
        path: cert_name.to_path_buf(),
        message,
    };
    let key_error = |message: String| TlsError::Key {
        path: key_name.to_path_buf(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no PEM certificate found".into()));
    }
    let der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| key_error(e.to_string()))?;
    let signing = ring::sign::any_supported_type(&der).map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: cert_name.to_path_buf(),
        key: key_name.to_path_buf(),
    })?;
    Ok(certified)
}

/// The serving certificate in force, replaceable at run time.
#[derive(Debug)]
pub struct CertStore {
    /// The pair new handshakes use. A std lock: held only to clone or swap an `Arc`.
    current: RwLock<Arc<CertifiedKey>>,
    /// Set to the leaf's end of validity (Unix seconds) on every swap, once tracked.
    expiry: OnceLock<Gauge>,
}

impl CertStore {
    /// A store serving `initial`.
    pub fn new(initial: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(initial)),
            expiry: OnceLock::new(),
        })
    }

    /// Keeps `gauge` at the serving certificate's end of validity, in Unix seconds (the
    /// `certificate_expiry_timestamp_seconds` metric), from now and across swaps.
    pub fn track_expiry(&self, gauge: Gauge) {
        let gauge = self.expiry.get_or_init(|| gauge);
        set_expiry(gauge, &self.get());
    }

    /// Serves `next` from the next handshake on.
    pub fn replace(&self, next: CertifiedKey) {
        if let Some(gauge) = self.expiry.get() {
            set_expiry(gauge, &next);
        }
        let next = Arc::new(next);
        match self.current.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

/// Sets `gauge` to the end of validity of `pair`'s leaf certificate (left alone when the
/// leaf does not parse, which rustls would already have refused).
fn set_expiry(gauge: &Gauge, pair: &CertifiedKey) {
    let Some(leaf) = pair.cert.first() else {
        return;
    };
    if let Ok(info) = egress_gate_certs::CertInfo::from_der(leaf) {
        let secs = info
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        gauge.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// ALPN protocols offered, in preference order: the API server takes h2 when offered.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A server configuration for TLS 1.3 and 1.2 only, ALPN h2 and http/1.1, ring provider.
pub fn server_config(store: Arc<CertStore>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(store);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
