//! `serve --self-signed`: the certs crate's bootstrap logic, talking to the cluster through
//! kube-rs. The Secret and the MutatingWebhookConfiguration are the only objects touched.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use egress_gate_certs::bootstrap::SECRET_TYPE;
use egress_gate_certs::{
    BootstrapError, BootstrapParams, ClusterStore, ServingMaterial, StoreError, StoredSecret,
    ensure_certificates,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// Field manager recorded on the objects the webhook writes.
const FIELD_MANAGER: &str = "egress-webhook";
/// Longest wait between two checks of the Secret, so a certificate a peer replica renewed
/// (or an admin replaced) is picked up even when no renewal is due here.
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Wait before retrying after a failed check (API server unreachable, RBAC missing).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// Longest one check may wait for the API server. kube-rs sets no read timeout, so without
/// this a connection that died silently would hold the check, and with it every later
/// renewal, forever. Above the API server's own request timeout (60 s by default), so a slow
/// but working server is never cut short.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(90);

/// [`ClusterStore`] over kube-rs: Secrets in the webhook's namespace and the cluster-scoped
/// webhook configuration.
pub struct KubeStore {
    /// Secrets in the webhook's own namespace.
    secrets: Api<Secret>,
    /// MutatingWebhookConfigurations.
    configs: Api<MutatingWebhookConfiguration>,
}

impl KubeStore {
    /// A store for `namespace` using `client`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            configs: Api::all(client),
        }
    }
}

impl KubeStore {
    async fn webhook_config(&self, name: &str) -> Result<MutatingWebhookConfiguration, StoreError> {
        self.configs
            .get_opt(name)
            .await
            .map_err(map_error)?
            .ok_or(StoreError::NotFound)
    }
}

fn map_error(e: kube::Error) -> StoreError {
    match e {
        kube::Error::Api(status) if status.is_already_exists() => StoreError::AlreadyExists,
        kube::Error::Api(status) if status.is_conflict() => StoreError::Conflict,
        kube::Error::Api(status) if status.is_not_found() => StoreError::NotFound,
        other => StoreError::Other(Box::new(other)),
    }
}

fn secret(
    name: &str,
    data: &BTreeMap<String, Vec<u8>>,
    resource_version: Option<String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "egress-gate".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.to_string()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Default::default()
    }
}

impl ClusterStore for KubeStore {
    async fn get_secret(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
        let found = self.secrets.get_opt(name).await.map_err(map_error)?;
        Ok(found.map(|s| StoredSecret {
            data: s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
            resource_version: s.metadata.resource_version,
        }))
    }

    async fn create_secret(
        &self,
        name: &str,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), StoreError> {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        self.secrets
            .create(&params, &secret(name, data, None))
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn replace_secret(&self, name: &str, stored: &StoredSecret) -> Result<(), StoreError> {
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let object = secret(name, &stored.data, stored.resource_version.clone());
        self.secrets
            .replace(name, &params, &object)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn get_ca_bundle(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let config = self.webhook_config(name).await?;
        let bundles: Vec<Option<Vec<u8>>> = config
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| w.client_config.ca_bundle.map(|b| b.0))
            .collect();
        match bundles.first() {
            Some(Some(first)) if bundles.iter().all(|b| b.as_ref() == Some(first)) => {
                Ok(Some(first.clone()))
            }
            _ => Ok(None),
        }
    }

    async fn patch_ca_bundle(&self, name: &str, bundle: &[u8]) -> Result<(), StoreError> {
        let config = self.webhook_config(name).await?;
        let encoded = serde_json::to_value(ByteString(bundle.to_vec()))
            .map_err(|e| StoreError::Other(Box::new(e)))?;
        // Strategic merge on the webhooks list (merge key `name`) touches only caBundle.
        let webhooks: Vec<_> = config
            .webhooks
            .unwrap_or_default()
            .iter()
            .map(|w| json!({"name": w.name, "clientConfig": {"caBundle": encoded}}))
            .collect();
        let patch = Patch::Strategic(json!({ "webhooks": webhooks }));
        self.configs
            .patch(
                name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &patch,
            )
            .await
            .map_err(map_error)?;
        Ok(())
    }
}

/// One check: ensure the certificates at the current time, within [`CHECK_TIMEOUT`].
pub async fn ensure(
    store: &KubeStore,
    params: &BootstrapParams,
) -> Result<ServingMaterial, BootstrapError> {
    ensure_within(store, params, CHECK_TIMEOUT).await
}

/// [`ensure`] with another time limit.
pub async fn ensure_within(
    store: &KubeStore,
    params: &BootstrapParams,
    limit: Duration,
) -> Result<ServingMaterial, BootstrapError> {
    let check = ensure_certificates(store, params, SystemTime::now());
    match tokio::time::timeout(limit, check).await {
        Ok(result) => result,
        Err(_) => Err(BootstrapError::Store {
            action: format!(
                "checking Secret {}/{}",
                params.identity.namespace, params.secret_name
            ),
            source: StoreError::Other(Box::new(Stalled(limit))),
        }),
    }
}

/// The API server did not finish answering in time.
#[derive(Debug, thiserror::Error)]
#[error("no answer from the API server within {0:?}")]
struct Stalled(Duration);

/// How long to wait before the next check after `material`.
pub fn next_wait(material: &ServingMaterial, now: SystemTime) -> Duration {
    material
        .next_check
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .clamp(Duration::from_secs(1), MAX_CHECK_INTERVAL)
}
