//! `serve --self-signed`: the webhook looks after its own certificates.
//!
//! [`ensure_certificates`] makes the Secret and the webhook configuration agree with a fresh
//! certificate, and returns what to serve. Every replica calls it at start and again at
//! [`ServingMaterial::next_check`] (or on a timer); replicas never talk to each other: the
//! Secret is the one source of truth, and the API server's optimistic concurrency
//! (`AlreadyExists` on create, `Conflict` on a stale `resourceVersion`) picks one winner when
//! two act at once. The loser re-reads and serves the winner's certificate.
//!
//! Order of writes: the Secret first, then `caBundle`, then the caller starts serving the new
//! certificate. So the configuration trusts a certificate before any replica presents it.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::SystemTime;

use crate::CertError;
use crate::pki::ServiceIdentity;
use crate::renewal::{CertPolicy, Decision, StoredCerts, plan};

/// How often a create or replace that lost a race is retried before giving up. Two replicas
/// settle in one retry; the bound only guards against a store that always conflicts.
const MAX_ATTEMPTS: usize = 5;

/// The type of the Secret [`ClusterStore::create_secret`] creates.
pub const SECRET_TYPE: &str = "kubernetes.io/tls";

/// A Secret as read from the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredSecret {
    /// The Secret's `data`, decoded.
    pub data: BTreeMap<String, Vec<u8>>,
    /// `metadata.resourceVersion`, handed back on replace so a concurrent write is detected.
    pub resource_version: Option<String>,
}

/// What the cluster said when a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Create found the object already there (HTTP 409, reason `AlreadyExists`).
    #[error("already exists")]
    AlreadyExists,
    /// Replace was based on a stale `resourceVersion` (HTTP 409, reason `Conflict`).
    #[error("conflict: the object changed since it was read")]
    Conflict,
    /// The object does not exist (HTTP 404) where it must.
    #[error("not found")]
    NotFound,
    /// Anything else: RBAC, network, timeouts.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// The webhook's narrow view of the cluster. The webhook implements it with kube-rs against
/// its own namespace; tests implement it in memory.
///
/// Every method is one API call. Implementations must map the API server's answers to
/// [`StoreError::AlreadyExists`], [`StoreError::Conflict`] and [`StoreError::NotFound`]
/// as documented per method: the bootstrap's race handling depends on them.
pub trait ClusterStore: Sync {
    /// Reads the Secret `name`; `Ok(None)` when it does not exist.
    fn get_secret(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<StoredSecret>, StoreError>> + Send;

    /// Creates the Secret `name` of type [`SECRET_TYPE`] with `data`.
    /// [`StoreError::AlreadyExists`] when it exists (another replica was first).
    fn create_secret(
        &self,
        name: &str,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Replaces the data of Secret `name`, on condition that its `resourceVersion` is still
    /// `secret.resource_version` (a `PUT` carrying it). [`StoreError::Conflict`] when it
    /// changed, [`StoreError::NotFound`] when it is gone.
    fn replace_secret(
        &self,
        name: &str,
        secret: &StoredSecret,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the `caBundle` of the MutatingWebhookConfiguration `name`: the bytes (PEM, not
    /// base64) when every webhook in it carries the same bundle, `Ok(None)` when any has none
    /// or they differ. [`StoreError::NotFound`] when the configuration does not exist.
    fn get_ca_bundle(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, StoreError>> + Send;

    /// Sets `caBundle` of every webhook in the configuration `name` to `bundle` (PEM bytes;
    /// the API encodes them as base64).
    fn patch_ca_bundle(
        &self,
        name: &str,
        bundle: &[u8],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// What [`ensure_certificates`] needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapParams {
    /// The Secret holding the certificates (`--secret-name`, `egress-webhook-tls`).
    pub secret_name: String,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept in step
    /// (`--webhook-config-name`, `egress-gate`).
    pub webhook_config_name: String,
    /// The Service the API server calls (`--service-name` in `POD_NAMESPACE`).
    pub identity: ServiceIdentity,
    /// Validities and renewal windows.
    pub policy: CertPolicy,
}

/// What happened to the Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretOutcome {
    /// This replica created it.
    Created,
    /// It was fresh; nothing was written.
    Unchanged,
    /// This replica wrote the change `plan` decided.
    Updated(Decision),
    /// Another replica created or updated it during this call; its certificate is served.
    TakenFromPeer,
}

/// What happened to the webhook configuration's `caBundle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BundleOutcome {
    /// It already matched the Secret.
    Unchanged,
    /// It was patched to match the Secret.
    Patched,
    /// The configuration does not exist (not installed yet, or deleted); nothing to patch.
    /// The next call patches it once it is there.
    ConfigMissing,
}

/// What the webhook serves, and when to look again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingMaterial {
    /// The serving certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The CA bundle the configuration now trusts, PEM.
    pub ca_bundle_pem: String,
    /// When the serving certificate expires.
    pub not_after: SystemTime,
    /// When a renewal or rollover window opens or an old CA leaves the bundle: call
    /// [`ensure_certificates`] again then (the webhook also calls it periodically, so a
    /// change made by a peer is picked up).
    pub next_check: SystemTime,
    /// What happened to the Secret.
    pub secret: SecretOutcome,
    /// What happened to the configuration.
    pub bundle: BundleOutcome,
}

/// Why the certificates could not be ensured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// A cluster call failed; `action` says which.
    #[error("{action}: {source}")]
    Store {
        /// What was being done (`reading Secret egress-gate/egress-webhook-tls`).
        action: String,
        /// The store's error.
        source: StoreError,
    },
    /// Generating or reading certificates failed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// Every attempt lost a race; another writer keeps changing the Secret.
    #[error("Secret {0} kept changing under us after {MAX_ATTEMPTS} attempts")]
    Contended(String),
}

fn store_err(action: String) -> impl FnOnce(StoreError) -> BootstrapError {
    move |source| BootstrapError::Store { action, source }
}

/// Makes sure the Secret holds a fresh CA and serving certificate for `params.identity` at
/// `now`, and that the webhook configuration's `caBundle` trusts it; returns what to serve.
///
/// - Secret missing: generate a CA and certificate and create it; if another replica created
///   it first (`AlreadyExists`), read and use theirs.
/// - Secret present: [`plan`] decides; a renewal issues a new certificate under the same CA,
///   a rollover a new CA whose bundle keeps the old CA; the replace carries the
///   `resourceVersion` read, and on `Conflict` the Secret is read again and re-planned.
/// - Then `caBundle` is patched when it differs from the Secret's `ca.crt`.
pub async fn ensure_certificates<S: ClusterStore>(
    store: &S,
    params: &BootstrapParams,
    now: SystemTime,
) -> Result<ServingMaterial, BootstrapError> {
    params.policy.validate()?;
    params.identity.validate()?;
    let name = &params.secret_name;
    let secret_ref = format!("Secret {}/{name}", params.identity.namespace);
    let mut raced = false;

    let mut settled = None;
    for _ in 0..MAX_ATTEMPTS {
        let current = store
            .get_secret(name)
            .await
            .map_err(store_err(format!("reading {secret_ref}")))?;
        match current {
            None => {
                let fresh = StoredCerts::generate(&params.identity, &params.policy, now)?;
                match store.create_secret(name, &fresh.to_secret_data()).await {
                    Ok(()) => {
                        settled = Some((fresh, SecretOutcome::Created));
                        break;
                    }
                    Err(StoreError::AlreadyExists) => raced = true,
                    Err(e) => return Err(store_err(format!("creating {secret_ref}"))(e)),
                }
            }
            Some(secret) => {
                let stored = StoredCerts::from_secret_data(&secret.data);
                let decision = plan(&stored, &params.identity, &params.policy, now);
                if decision == Decision::Keep {
                    let outcome = if raced {
                        SecretOutcome::TakenFromPeer
                    } else {
                        SecretOutcome::Unchanged
                    };
                    settled = Some((stored, outcome));
                    break;
                }
                let next = stored.apply(decision, &params.identity, &params.policy, now)?;
                let replacement = StoredSecret {
                    data: next.to_secret_data(),
                    resource_version: secret.resource_version,
                };
                match store.replace_secret(name, &replacement).await {
                    Ok(()) => {
                        settled = Some((next, SecretOutcome::Updated(decision)));
                        break;
                    }
                    // Someone else wrote (or deleted) it since we read: read again.
                    Err(StoreError::Conflict | StoreError::NotFound) => raced = true,
                    Err(e) => return Err(store_err(format!("replacing {secret_ref}"))(e)),
                }
            }
        }
    }
    let Some((certs, secret_outcome)) = settled else {
        return Err(BootstrapError::Contended(secret_ref));
    };

    let bundle_pem = certs.bundle_pem();
    let config = &params.webhook_config_name;
    let bundle_outcome = match store.get_ca_bundle(config).await {
        Ok(current) if current.as_deref() == Some(bundle_pem.as_bytes()) => {
            BundleOutcome::Unchanged
        }
        Ok(_) => match store.patch_ca_bundle(config, bundle_pem.as_bytes()).await {
            Ok(()) => BundleOutcome::Patched,
            Err(StoreError::NotFound) => BundleOutcome::ConfigMissing,
            Err(e) => {
                return Err(store_err(format!(
                    "patching caBundle of MutatingWebhookConfiguration {config}"
                ))(e));
            }
        },
        Err(StoreError::NotFound) => BundleOutcome::ConfigMissing,
        Err(e) => {
            return Err(store_err(format!(
                "reading MutatingWebhookConfiguration {config}"
            ))(e));
        }
    };

    let (Some(serving), Some(next_check)) =
        (certs.serving.as_ref(), certs.next_check(&params.policy))
    else {
        // `plan` returned Keep or `apply` ran, so both exist; this guards a broken invariant
        // with an error instead of a panic.
        return Err(CertError::Invalid("settled state has no serving certificate".into()).into());
    };
    Ok(ServingMaterial {
        cert_pem: serving.cert_pem().to_owned(),
        key_pem: serving.key_pem().to_owned(),
        ca_bundle_pem: bundle_pem,
        not_after: serving.info().not_after,
        next_check,
        secret: secret_outcome,
        bundle: bundle_outcome,
    })
}
