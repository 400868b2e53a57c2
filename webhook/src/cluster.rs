//! What the cluster-aware preview (`inject` without `--offline`) reads from a cluster, the
//! way `istioctl kube-inject` does: a client from the kubeconfig as kubectl finds it, the
//! webhook's live configuration from its ConfigMap, and which namespaces the webhook
//! configuration's `namespaceSelector` lets through. Discovery itself is the serving
//! webhook's own ([`crate::discovery::discover_once`]), run once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::engine::selector::LabelSelector;

/// The ConfigMap `deploy/base` generates for the webhook's configuration.
pub const DEFAULT_CONFIG_MAP: &str = "egress-webhook-config";
/// The key of that ConfigMap holding the file (`/etc/egress-gate/webhook.yaml`).
pub const CONFIG_MAP_KEY: &str = "webhook.yaml";
/// The MutatingWebhookConfiguration `deploy/base` installs.
pub const DEFAULT_WEBHOOK_CONFIGURATION: &str = "egress-gate";
/// The label the API server sets on every namespace to its name.
const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No kubeconfig could be read, or it names no usable context.
    #[error("no cluster to preview against: {0}")]
    NoClient(String),
    /// The API server did not answer, or refused a request.
    #[error("{what}: {source}")]
    Api {
        /// What was being read.
        what: String,
        /// kube's error.
        source: kube::Error,
    },
    /// The webhook's ConfigMap is absent or lacks the configuration key.
    #[error("{0}")]
    NoConfig(String),
}

/// Where to find the cluster, as kubectl's `--kubeconfig` and `--context`.
#[derive(Clone, Debug, Default)]
pub struct ClusterTarget {
    /// A kubeconfig file; otherwise `KUBECONFIG`, then `~/.kube/config`, then the
    /// in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// A context of that kubeconfig instead of its current one.
    pub context: Option<String>,
}

/// A client for `target`, found the way kubectl finds its cluster.
pub async fn client(target: &ClusterTarget) -> Result<kube::Client, ClusterError> {
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match (&target.kubeconfig, &target.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| ClusterError::NoClient(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| ClusterError::NoClient(format!("{}: {e}", path.display())))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| ClusterError::NoClient(e.to_string()))?,
        (None, None) => kube::Config::infer()
            .await
            .map_err(|e| ClusterError::NoClient(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| ClusterError::NoClient(e.to_string()))
}

/// The webhook configuration file as the cluster's ConfigMap holds it.
pub async fn live_config(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<String, ClusterError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let what = format!("reading ConfigMap {namespace}/{name}");
    let found = api
        .get_opt(name)
        .await
        .map_err(|source| ClusterError::Api { what, source })?;
    let Some(map) = found else {
        return Err(ClusterError::NoConfig(format!(
            "ConfigMap {namespace}/{name} not found: is egress-gate installed in {namespace} \
             (--webhook-namespace)? Give --config FILE or --offline to preview without it"
        )));
    };
    map.data
        .and_then(|mut d| d.remove(CONFIG_MAP_KEY))
        .ok_or_else(|| {
            ClusterError::NoConfig(format!(
                "ConfigMap {namespace}/{name} has no key {CONFIG_MAP_KEY}"
            ))
        })
}

/// Which namespaces the webhook configuration's `namespaceSelector` leaves out, and why:
/// the API server never calls the webhook for pods created there.
#[derive(Debug, Default)]
pub struct NamespaceGate {
    /// The selector of the configuration's pod webhook; `None` when it is not installed.
    selector: Option<LabelSelector>,
    /// The configuration's name, for messages.
    configuration: String,
    /// Every namespace's labels, as the API server holds them.
    labels: BTreeMap<String, BTreeMap<String, String>>,
}

impl NamespaceGate {
    /// Reads the webhook configuration `name` and the namespaces' labels.
    pub async fn read(client: &kube::Client, name: &str) -> Result<Self, ClusterError> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let found = api
            .get_opt(name)
            .await
            .map_err(|source| ClusterError::Api {
                what: format!("reading MutatingWebhookConfiguration {name}"),
                source,
            })?;
        let selector = match found
            .and_then(|c| c.webhooks)
            .and_then(|w| w.into_iter().next())
        {
            Some(hook) => {
                let json = serde_json::to_value(hook.namespace_selector.unwrap_or_default())
                    .unwrap_or_default();
                Some(serde_json::from_value(json).map_err(|e| {
                    ClusterError::NoConfig(format!(
                        "MutatingWebhookConfiguration {name}: namespaceSelector: {e}"
                    ))
                })?)
            }
            None => None,
        };
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let list = namespaces
            .list(&Default::default())
            .await
            .map_err(|source| ClusterError::Api {
                what: "listing namespaces".into(),
                source,
            })?;
        let labels = list
            .items
            .into_iter()
            .filter_map(|ns| Some((ns.metadata.name?, ns.metadata.labels.unwrap_or_default())))
            .collect();
        Ok(Self {
            selector,
            configuration: name.to_string(),
            labels,
        })
    }

    /// Why the webhook is not called for pods in `namespace`; `None` when it is.
    pub fn excludes(&self, namespace: &str) -> Option<String> {
        let Some(selector) = &self.selector else {
            return Some(format!(
                "MutatingWebhookConfiguration {} is not installed, so no pod is sent to the webhook",
                self.configuration
            ));
        };
        let labels = match self.labels.get(namespace) {
            Some(l) => l.clone(),
            // A namespace that does not exist yet carries only its name once created.
            None => BTreeMap::from([(NAME_LABEL.to_string(), namespace.to_string())]),
        };
        (!selector.matches(&labels)).then(|| {
            format!(
                "namespace {namespace}'s labels do not match the namespaceSelector of MutatingWebhookConfiguration {} (opt it in with egress-gate.io/injection=enabled; kube-system and the webhook's own namespace are always left out)",
                self.configuration
            )
        })
    }
}
