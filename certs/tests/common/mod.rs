//! Helpers shared by the integration tests: a fixed clock and rustls verification.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

pub const DAY: Duration = Duration::from_secs(86_400);

/// 2027-01-15T08:00:00Z: an arbitrary fixed "now" so the tests never read the clock.
pub fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM")
}

/// Verifies `leaf_pem` for `name` at `at` the way a rustls client that trusts exactly
/// `bundle_pem` would (webpki path building, name and validity checks).
pub fn verify(
    bundle_pem: &str,
    leaf_pem: &str,
    name: &str,
    at: SystemTime,
) -> Result<(), rustls::Error> {
    let mut roots = RootCertStore::empty();
    for ca in certs_from_pem(bundle_pem) {
        roots
            .add(ca)
            .expect("CA certificate accepted as a trust anchor");
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .expect("verifier");
    let leaf = certs_from_pem(leaf_pem).remove(0);
    let name = ServerName::try_from(name.to_owned()).expect("server name");
    let now = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).expect("after 1970"));
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], now)
        .map(|_| ())
}
