//! Server certificates for the TLS listeners: read the PEM files named in the config into a
//! rustls server config. Called at start and on every reload, so a certificate that
//! cert-manager rotated in place takes effect without a restart.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// Why a listener's certificate could not be loaded; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Reads `certFile` and `keyFile` and builds the server side of rustls (ring provider,
/// rustls' safe default protocol versions, no client certificates).
pub fn load_server_config(t: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let err = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        TlsError(format!("{what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(&t.cert_file)
        .map_err(|e| err("cannot read certFile", &t.cert_file, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("bad certFile", &t.cert_file, &e))?;
    if certs.is_empty() {
        return Err(err("no certificate in", &t.cert_file, &"empty"));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| err("cannot read keyFile", &t.key_file, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("certificate and key do not match: {e}")))?;
    Ok(Arc::new(config))
}
