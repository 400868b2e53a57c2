//! Helpers for the tests that run the webhook against a real kube-apiserver
//! (`egress_gate_apiserver`): the webhook configuration rendered from `deploy/base`,
//! namespaces opted in for one test, and polling until the API server shows a change.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use egress_gate_apiserver::ApiServer;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::Webhook;

/// The label each test puts on the namespaces its webhook configuration selects, so tests
/// sharing one API server never see each other's webhooks.
pub const OWNER_LABEL: &str = "egress-gate.test/owner";

/// How long a change may take to show: webhook configurations reach the API server's
/// admission chain through an informer, and the webhook's discovery through a watch.
pub const SETTLE: Duration = Duration::from_secs(30);

/// The objects `kubectl kustomize deploy/base` renders.
pub fn base_objects() -> Vec<Value> {
    let dir = egress_gate_manifests::repo_root().join("deploy/base");
    egress_gate_manifests::render(&dir).unwrap_or_else(|e| panic!("rendering deploy/base: {e}"))
}

/// `deploy/base`'s MutatingWebhookConfiguration, pointed at a webhook on loopback: the URL
/// form instead of the Service form (no Service can route to a test process), the test CA,
/// names unique to `owner`, and the namespace selector narrowed to `owner`'s namespaces.
/// Everything else (rules, failure policy, reinvocation, timeouts, exclusions) is as shipped.
pub fn webhook_configuration(owner: &str, webhook: &Webhook) -> MutatingWebhookConfiguration {
    let objects = base_objects();
    let mut mwc =
        egress_gate_manifests::find(&objects, "MutatingWebhookConfiguration", "egress-gate")
            .unwrap()
            .clone();
    mwc["metadata"]["name"] = json!(format!("egress-gate-{owner}"));
    let hooks = mwc["webhooks"].as_array_mut().unwrap();
    assert_eq!(hooks.len(), 1, "deploy/base registers one webhook");
    let hook = &mut hooks[0];
    hook["name"] = json!(format!("{owner}.pods.egress-gate.io"));
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate");
    hook["clientConfig"] = json!({
        "url": format!("https://{}/mutate", webhook.addr),
        "caBundle": base64_encode(webhook.ca.pem().as_bytes()),
    });
    hook["namespaceSelector"]["matchExpressions"]
        .as_array_mut()
        .unwrap()
        .push(json!({"key": OWNER_LABEL, "operator": "In", "values": [owner]}));
    serde_json::from_value(mwc).unwrap()
}

pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Creates (or replaces) a webhook configuration.
pub async fn register(server: &ApiServer, mwc: &MutatingWebhookConfiguration) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    let name = mwc.metadata.name.clone().unwrap();
    let _ = api.delete(&name, &DeleteParams::default()).await;
    api.create(&PostParams::default(), mwc).await.unwrap();
}

/// Changes one webhook configuration with a JSON merge patch.
pub async fn patch_configuration(server: &ApiServer, name: &str, patch: Value) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Creates namespace `name` (or labels it, if it exists) opted in for `owner`'s webhook.
pub async fn opted_in_namespace(server: &ApiServer, name: &str, owner: &str) {
    label_namespace(
        server,
        name,
        json!({"egress-gate.io/injection": "enabled", OWNER_LABEL: owner}),
    )
    .await;
}

/// Creates namespace `name` when absent and merges `labels` into its labels.
pub async fn label_namespace(server: &ApiServer, name: &str, labels: Value) {
    let api: Api<Namespace> = Api::all(server.client());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            )
            .await
            .unwrap();
        }
        Err(e) => panic!("namespace {name}: {e}"),
    }
}

/// Starts `egress-webhook serve` with `config`, talking to `server` as admin (its
/// kubeconfig), with `--namespace egress-gate` so a default proxyURL is the shipped one.
pub fn start_webhook(server: &ApiServer, config: &str) -> Webhook {
    let kubeconfig = server.kubeconfig().display().to_string();
    Webhook::start_env(
        Some(config),
        &["--namespace", "egress-gate"],
        &[("KUBERNETES_SERVICE_HOST", ""), ("KUBECONFIG", &kubeconfig)],
    )
}

/// Creates `pod` in `namespace` (server-side dry run when `dry_run`) and returns it as the
/// API server stored (or would store) it.
pub async fn create_pod(server: &ApiServer, namespace: &str, pod: &Value, dry_run: bool) -> Value {
    try_create_pod(server, namespace, pod, dry_run)
        .await
        .unwrap_or_else(|e| panic!("creating a pod in {namespace}: {e}"))
}

pub async fn try_create_pod(
    server: &ApiServer,
    namespace: &str,
    pod: &Value,
    dry_run: bool,
) -> Result<Value, kube::Error> {
    let api: Api<Pod> = Api::namespaced(server.client(), namespace);
    let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
    let params = PostParams {
        dry_run,
        ..PostParams::default()
    };
    let created = api.create(&params, &typed).await?;
    Ok(serde_json::to_value(created).unwrap())
}

/// What a mutation can change: labels, annotations and the spec.
pub fn mutable_parts(pod: &Value) -> Value {
    json!({
        "labels": pod["metadata"]["labels"],
        "annotations": pod["metadata"]["annotations"],
        "spec": pod["spec"],
    })
}

/// Whether the webhook injected this pod (it carries the client label).
pub fn injected(pod: &Value) -> bool {
    pod["metadata"]["labels"]["egress-gate.io/client"] == "true"
}

/// Polls `probe` until it returns `Some`, for up to [`SETTLE`].
pub async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {SETTLE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of every sample of `metric` whose labels include all of `labels`
/// (`name="value"` pairs), in Prometheus text.
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            (name == metric && labels.iter().all(|want| rest.contains(want)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A second mutating webhook, as another product in the cluster would run: it adds a
/// container named `sidecar` to every pod that has none. Served over TLS with HTTP/2 by
/// hyper, in the test's runtime.
pub struct Sidecar {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// The CA of its serving certificate, for the caBundle.
    pub ca: crate::support::TestCa,
    /// The accept loop; aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    pub async fn start() -> Self {
        use std::sync::Arc;

        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let ca = crate::support::TestCa::new("sidecar test CA");
        let (cert, key, _) = ca.serving();
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(sidecar_review);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        Self { addr, ca, task }
    }

    /// Its webhook configuration: named to sort after `egress-gate-<owner>`, so the API
    /// server calls egress-gate first and must reinvoke it for the added container.
    pub fn configuration(&self, owner: &str) -> MutatingWebhookConfiguration {
        serde_json::from_value(json!({
            "metadata": {"name": format!("zz-sidecar-{owner}")},
            "webhooks": [{
                "name": format!("{owner}.sidecar.test"),
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "timeoutSeconds": 5,
                "clientConfig": {
                    "url": format!("https://{}/mutate", self.addr),
                    "caBundle": base64_encode(self.ca.pem().as_bytes()),
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchLabels": {OWNER_LABEL: owner}},
            }],
        }))
        .unwrap()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn sidecar_review(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    use http_body_util::BodyExt;

    let body = request.into_body().collect().await.unwrap().to_bytes();
    let review: Value = serde_json::from_slice(&body).unwrap();
    let request = &review["request"];
    let has_sidecar = request["object"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "sidecar");
    let mut response = json!({"uid": request["uid"], "allowed": true});
    if !has_sidecar {
        let patch = json!([{"op": "add", "path": "/spec/containers/-",
            "value": {"name": "sidecar", "image": "registry.example/sidecar:1"}}]);
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64_encode(patch.to_string().as_bytes()));
    }
    let answer = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    Ok(hyper::Response::builder()
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            answer.to_string(),
        )))
        .unwrap())
}
