//! Certificates for the egress-gate admission webhook.
//!
//! The API server calls the webhook over HTTPS and trusts it through the `caBundle` of the
//! MutatingWebhookConfiguration. This crate makes that trust work without cert-manager:
//!
//! - [`pki`]: a CA ([`CertificateAuthority`]) and serving certificates ([`ServingCert`]) for
//!   `<service>.<namespace>.svc` ([`ServiceIdentity`]), ECDSA P-256 by default, and reading
//!   certificates back from PEM ([`CertInfo`]).
//! - [`renewal`]: pure decisions at a given clock time: is the serving certificate due, is the
//!   CA due for rollover, which CAs stay in the bundle ([`plan`]).
//! - [`bundle`]: the `egress-webhook certs` command's work: PEM files or a
//!   `kubernetes.io/tls` Secret manifest plus the base64 `caBundle` ([`write_bundle`]).
//! - [`bootstrap`]: `serve --self-signed`: make sure the Secret exists and is fresh, and that
//!   the webhook configuration trusts it ([`ensure_certificates`]), behind the narrow
//!   [`ClusterStore`] seam that the webhook implements with kube-rs.
//!
//! Nothing here reads the clock: every decision takes `now`, so tests can stand at any time.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod bootstrap;
pub mod bundle;
mod duration;
mod error;
pub mod pki;
pub mod renewal;

pub use bootstrap::{
    BootstrapError, BootstrapParams, BundleOutcome, ClusterStore, SecretOutcome, ServingMaterial,
    StoreError, StoredSecret, ensure_certificates,
};
pub use bundle::{
    Bundle, BundleOutput, BundleRequest, BundleSummary, generate_bundle, write_bundle,
};
pub use duration::parse_duration;
pub use error::CertError;
pub use pki::{CertInfo, CertificateAuthority, KeyAlgorithm, ServiceIdentity, ServingCert};
pub use renewal::{CertPolicy, Decision, Reason, StoredCerts, plan};
