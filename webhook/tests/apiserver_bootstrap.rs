//! `serve --self-signed` against a real kube-apiserver, as the ServiceAccount deploy/base
//! creates and with exactly the RBAC deploy/base grants it (never as admin): the first
//! start creates the Secret and patches `caBundle`, two replicas started together converge
//! on one CA, a restart reuses the Secret and writes nothing, renewal and CA rollover near
//! expiry, a stale replace is a `Conflict`, and every verb the Role grants is needed.
//!
//! The tests share one API server, so each installs deploy/base's objects under names of
//! its own: its own namespace instead of `egress-gate`, and the cluster-scoped
//! MutatingWebhookConfiguration, ClusterRole and ClusterRoleBinding suffixed with the
//! test's name (the ClusterRole's `resourceNames` follow). Rules and verbs are untouched.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

mod real;
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use egress_gate_apiserver::ApiServer;
use egress_gate_certs::{
    BootstrapParams, BundleOutcome, CertPolicy, ClusterStore, SecretOutcome, ServiceIdentity,
    StoreError, StoredSecret, ensure_certificates,
};
use egress_webhook::bootstrap::KubeStore;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

/// `--secret-name`'s default, as deploy/base's Role names it.
const SECRET: &str = "egress-webhook-tls";
/// The ServiceAccount and Service deploy/base installs.
const ACCOUNT: &str = "egress-webhook";
const DAY: Duration = Duration::from_secs(86_400);

/// One test's copy of deploy/base's webhook objects, and a token of its ServiceAccount.
struct Install {
    /// Stands in for `egress-gate`.
    namespace: String,
    /// Stands in for the MutatingWebhookConfiguration `egress-gate`.
    config: String,
    /// A token of the `egress-webhook` ServiceAccount in `namespace`.
    token: String,
}

/// A verb on a resource, to leave out of the installed RBAC.
type Grant = (&'static str, &'static str);

/// Installs deploy/base's ServiceAccount, RBAC and MutatingWebhookConfiguration for
/// `owner`, leaving out `without` (a resource, verb) when given.
async fn install(server: &ApiServer, owner: &str, without: Option<Grant>) -> Install {
    let namespace = server.namespace(owner).await;
    let config = format!("egress-gate-{owner}");
    let suffix = |name: &Value| json!(format!("{}-{owner}", name.as_str().unwrap()));
    let client = server.client();
    let params = PostParams::default();
    for mut object in real::base_objects() {
        let kind = object["kind"].as_str().unwrap().to_string();
        if object["metadata"].get("namespace").is_some() {
            object["metadata"]["namespace"] = json!(namespace);
        }
        for subject in object["subjects"].as_array_mut().into_iter().flatten() {
            subject["namespace"] = json!(namespace);
        }
        if let Some((resource, verb)) = without {
            strip_verb(&mut object, resource, verb);
        }
        match kind.as_str() {
            "ServiceAccount" if object["metadata"]["name"] == ACCOUNT => {
                let sa: ServiceAccount = serde_json::from_value(object).unwrap();
                Api::namespaced(client.clone(), &namespace)
                    .create(&params, &sa)
                    .await
                    .unwrap();
            }
            "Role" => {
                let role: Role = serde_json::from_value(object).unwrap();
                Api::namespaced(client.clone(), &namespace)
                    .create(&params, &role)
                    .await
                    .unwrap();
            }
            "RoleBinding" => {
                let binding: RoleBinding = serde_json::from_value(object).unwrap();
                Api::namespaced(client.clone(), &namespace)
                    .create(&params, &binding)
                    .await
                    .unwrap();
            }
            "ClusterRole" => {
                object["metadata"]["name"] = suffix(&object["metadata"]["name"]);
                for rule in object["rules"].as_array_mut().unwrap() {
                    if let Some(names) = rule.get_mut("resourceNames") {
                        assert_eq!(*names, json!(["egress-gate"]));
                        *names = json!([config]);
                    }
                }
                let role: ClusterRole = serde_json::from_value(object).unwrap();
                Api::all(client.clone())
                    .create(&params, &role)
                    .await
                    .unwrap();
            }
            "ClusterRoleBinding" => {
                object["metadata"]["name"] = suffix(&object["metadata"]["name"]);
                object["roleRef"]["name"] = suffix(&object["roleRef"]["name"]);
                let binding: ClusterRoleBinding = serde_json::from_value(object).unwrap();
                Api::all(client.clone())
                    .create(&params, &binding)
                    .await
                    .unwrap();
            }
            "MutatingWebhookConfiguration" => {
                object["metadata"]["name"] = json!(config);
                object["webhooks"][0]["clientConfig"]["service"]["namespace"] = json!(namespace);
                let mwc: MutatingWebhookConfiguration = serde_json::from_value(object).unwrap();
                Api::all(client.clone())
                    .create(&params, &mwc)
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
    let token = server
        .service_account_token(&namespace, ACCOUNT)
        .await
        .unwrap();
    // RBAC reaches the authorizer through an informer: wait until the account may read
    // what every variant grants (the cluster-wide Service list, for discovery).
    let as_account = server.client_with_token(&token);
    real::until("the RBAC to reach the authorizer", || async {
        let services: Api<k8s_openapi::api::core::v1::Service> = Api::all(as_account.clone());
        services
            .list(&kube::api::ListParams::default().limit(1))
            .await
            .ok()
    })
    .await;
    Install {
        namespace,
        config,
        token,
    }
}

/// Removes `verb` on `resource` from a Role or ClusterRole's rules.
fn strip_verb(object: &mut Value, resource: &str, verb: &str) {
    let Some(rules) = object["rules"].as_array_mut() else {
        return;
    };
    for rule in rules.iter_mut() {
        if rule["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == resource)
        {
            let verbs = rule["verbs"].as_array_mut().unwrap();
            verbs.retain(|v| v != verb);
        }
    }
    rules.retain(|rule| !rule["verbs"].as_array().unwrap().is_empty());
}

fn params(install: &Install) -> BootstrapParams {
    BootstrapParams {
        secret_name: SECRET.into(),
        webhook_config_name: install.config.clone(),
        identity: ServiceIdentity::new(ACCOUNT, &install.namespace),
        policy: CertPolicy::default(),
    }
}

/// The Secret as stored, read as admin.
async fn stored_secret(server: &ApiServer, install: &Install) -> Secret {
    let api: Api<Secret> = Api::namespaced(server.client(), &install.namespace);
    api.get(SECRET).await.unwrap()
}

fn secret_text(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// The configuration as stored, read as admin.
async fn stored_config(server: &ApiServer, install: &Install) -> MutatingWebhookConfiguration {
    let api: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    api.get(&install.config).await.unwrap()
}

fn ca_bundle(config: &MutatingWebhookConfiguration) -> String {
    let hook = &config.webhooks.as_ref().unwrap()[0];
    String::from_utf8(hook.client_config.ca_bundle.as_ref().unwrap().0.clone()).unwrap()
}

/// The field managers that wrote an object.
fn managers(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Vec<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect()
}

/// `egress-webhook serve --self-signed` as the ServiceAccount.
struct SelfSigned {
    child: Child,
    addr: SocketAddr,
}

impl SelfSigned {
    fn start(server: &ApiServer, install: &Install) -> Self {
        let kubeconfig = server.kubeconfig_with_token(&install.token).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_egress-webhook"))
            .args(["serve", "--self-signed", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0", "--log-format", "json"])
            .args(["--namespace", &install.namespace])
            .args(["--webhook-config-name", &install.config])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "serving admission reviews"
                {
                    let _ = tx.send(Ok(v["listen"].as_str().unwrap().parse().unwrap()));
                }
                log.push(line);
            }
            let _ = tx.send(Err(log.join("\n")));
        });
        match rx.recv_timeout(Duration::from_secs(30)).unwrap() {
            Ok(addr) => Self { child, addr },
            Err(log) => panic!("serve --self-signed did not start:\n{log}"),
        }
    }

    /// The certificate it presents to a client that trusts `bundle_pem` and asks for the
    /// Service name, as the API server does.
    async fn presented(&self, install: &Install, bundle_pem: &str) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = format!("{ACCOUNT}.{}.svc", install.namespace);
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(name).unwrap(), tcp)
            .await
            .expect("the served certificate verifies against the caBundle");
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned()
    }
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test]
async fn first_start_creates_the_secret_and_patches_the_ca_bundle_then_a_restart_reuses_it() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let install = install(server, "first", None).await;
    let before = stored_config(server, &install).await;
    assert!(
        before.webhooks.as_ref().unwrap()[0]
            .client_config
            .ca_bundle
            .is_none(),
        "deploy/base ships no caBundle"
    );

    let webhook = SelfSigned::start(server, &install);
    let secret = stored_secret(server, &install).await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()["app.kubernetes.io/part-of"],
        "egress-gate"
    );
    assert_eq!(managers(&secret.metadata), ["egress-webhook"]);
    let config = stored_config(server, &install).await;
    let bundle = ca_bundle(&config);
    assert_eq!(bundle, secret_text(&secret, "ca.crt"));
    assert!(managers(&config.metadata).contains(&"egress-webhook".to_string()));
    // The patch touched caBundle only: the rest is as installed.
    let hook = &config.webhooks.as_ref().unwrap()[0];
    let installed = &before.webhooks.as_ref().unwrap()[0];
    assert_eq!(hook.client_config.service, installed.client_config.service);
    assert_eq!(hook.rules, installed.rules);
    assert_eq!(hook.namespace_selector, installed.namespace_selector);
    assert_eq!(hook.failure_policy, installed.failure_policy);
    // What it serves is what the Secret holds, and verifies for the Service name.
    let served = webhook.presented(&install, &bundle).await;
    assert_eq!(served, der_of(&secret_text(&secret, "tls.crt")));
    drop(webhook);

    // A restart serves the same certificate and writes nothing.
    let webhook = SelfSigned::start(server, &install);
    assert_eq!(webhook.presented(&install, &bundle).await, served);
    let secret_after = stored_secret(server, &install).await;
    let config_after = stored_config(server, &install).await;
    assert_eq!(
        secret_after.metadata.resource_version,
        secret.metadata.resource_version
    );
    assert_eq!(
        config_after.metadata.resource_version,
        config.metadata.resource_version
    );
}

#[tokio::test]
async fn two_replicas_started_at_the_same_moment_converge_on_one_ca() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let install = install(server, "replicas", None).await;
    let (a, b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| SelfSigned::start(server, &install));
        let b = scope.spawn(|| SelfSigned::start(server, &install));
        (a.join().unwrap(), b.join().unwrap())
    });
    let secret = stored_secret(server, &install).await;
    let bundle = ca_bundle(&stored_config(server, &install).await);
    assert_eq!(bundle, secret_text(&secret, "ca.crt"));
    assert_eq!(
        CertificateDer::pem_slice_iter(bundle.as_bytes()).count(),
        1,
        "one CA"
    );
    let stored = der_of(&secret_text(&secret, "tls.crt"));
    assert_eq!(a.presented(&install, &bundle).await, stored);
    assert_eq!(b.presented(&install, &bundle).await, stored);

    // The same race through the library, many times over, with both outcomes reported.
    for round in 0..5 {
        let install = self::install(server, &format!("race{round}"), None).await;
        let client = server.client_with_token(&install.token);
        let (x, y) = (
            KubeStore::new(client.clone(), &install.namespace),
            KubeStore::new(client, &install.namespace),
        );
        let params = params(&install);
        let now = SystemTime::now();
        let (x, y) = tokio::join!(
            ensure_certificates(&x, &params, now),
            ensure_certificates(&y, &params, now)
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x.cert_pem, y.cert_pem);
        assert_eq!(x.ca_bundle_pem, y.ca_bundle_pem);
        let outcomes = [x.secret, y.secret];
        assert!(outcomes.contains(&SecretOutcome::Created), "{outcomes:?}");
        assert_eq!(
            ca_bundle(&stored_config(server, &install).await),
            x.ca_bundle_pem
        );
    }
}

#[tokio::test]
async fn renewal_and_ca_rollover_near_expiry_go_through_the_api_server() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let install = install(server, "rotation", None).await;
    let store = KubeStore::new(server.client_with_token(&install.token), &install.namespace);
    let params = params(&install);
    let policy = CertPolicy::default();
    let t0 = SystemTime::now();
    let first = ensure_certificates(&store, &params, t0).await.unwrap();
    assert_eq!(first.secret, SecretOutcome::Created);
    assert_eq!(first.bundle, BundleOutcome::Patched);

    // Inside the serving certificate's renewal window: a new certificate, the same CA.
    let renew_at = t0 + policy.serving_validity - policy.renew_before + DAY;
    let renewed = ensure_certificates(&store, &params, renew_at)
        .await
        .unwrap();
    assert!(
        matches!(renewed.secret, SecretOutcome::Updated(_)),
        "{:?}",
        renewed.secret
    );
    assert_ne!(renewed.cert_pem, first.cert_pem);
    assert_eq!(renewed.ca_bundle_pem, first.ca_bundle_pem);
    assert_eq!(renewed.bundle, BundleOutcome::Unchanged);
    let secret = stored_secret(server, &install).await;
    assert_eq!(secret_text(&secret, "tls.crt"), renewed.cert_pem);

    // Inside the CA's rollover window: a new CA, and the bundle trusts both until the old
    // one expires.
    let rollover_at = t0 + policy.ca_validity - policy.ca_rollover_before + DAY;
    let rolled = ensure_certificates(&store, &params, rollover_at)
        .await
        .unwrap();
    assert_eq!(rolled.bundle, BundleOutcome::Patched);
    let bundle = ca_bundle(&stored_config(server, &install).await);
    assert_eq!(bundle, rolled.ca_bundle_pem);
    let cas: Vec<_> = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .map(Result::unwrap)
        .collect();
    assert_eq!(cas.len(), 2, "old and new CA during the rollover");
    assert!(cas.contains(&der_of(&first.ca_bundle_pem)));
}

#[tokio::test]
async fn stale_replaces_second_creates_and_a_missing_configuration_map_to_their_errors() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let install = install(server, "conflict", None).await;
    let store = KubeStore::new(server.client_with_token(&install.token), &install.namespace);
    ensure_certificates(&store, &params(&install), SystemTime::now())
        .await
        .unwrap();
    let read = store.get_secret(SECRET).await.unwrap().unwrap();
    // Another writer (a peer replica) changes the Secret after our read. (An update that
    // changes nothing keeps the resourceVersion, so it must change something.)
    let mut peer = read.clone();
    peer.data.insert("peer".into(), b"renewed".to_vec());
    store.replace_secret(SECRET, &peer).await.unwrap();
    match store.replace_secret(SECRET, &read).await {
        Err(StoreError::Conflict) => {}
        other => panic!("a replace on a stale resourceVersion: {other:?}"),
    }
    let gone = StoredSecret {
        data: read.data.clone(),
        resource_version: None,
    };
    match store.create_secret(SECRET, &gone.data).await {
        Err(StoreError::AlreadyExists) => {}
        other => panic!("a second create: {other:?}"),
    }
    // Without the configuration (deleted, or not installed yet): reported, not fatal.
    // RBAC grants `get` by name, so the missing object is a 404 rather than a 403.
    let configs: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    configs
        .delete(&install.config, &kube::api::DeleteParams::default())
        .await
        .unwrap();
    match store.get_ca_bundle(&install.config).await {
        Err(StoreError::NotFound) => {}
        other => panic!("reading a missing configuration: {other:?}"),
    }
    let material = ensure_certificates(&store, &params(&install), SystemTime::now())
        .await
        .unwrap();
    assert_eq!(material.bundle, BundleOutcome::ConfigMissing);
}

/// Every verb deploy/base grants for the certificates is needed: without any one of them
/// the first start or the renewal fails, naming what was refused.
#[tokio::test]
async fn each_verb_deploy_base_grants_for_the_certificates_is_needed() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let needed: [(Grant, &str); 5] = [
        (("secrets", "get"), "reading Secret"),
        (("secrets", "create"), "creating Secret"),
        (("secrets", "update"), "replacing Secret"),
        (
            ("mutatingwebhookconfigurations", "get"),
            "reading MutatingWebhookConfiguration",
        ),
        (
            ("mutatingwebhookconfigurations", "patch"),
            "patching caBundle",
        ),
    ];
    let policy = CertPolicy::default();
    for (i, ((resource, verb), action)) in needed.into_iter().enumerate() {
        let install = install(server, &format!("without{i}"), Some((resource, verb))).await;
        let store = KubeStore::new(server.client_with_token(&install.token), &install.namespace);
        let params = params(&install);
        let t0 = SystemTime::now();
        let renew_at = t0 + policy.serving_validity - policy.renew_before + DAY;
        let result = match ensure_certificates(&store, &params, t0).await {
            Ok(_) => ensure_certificates(&store, &params, renew_at).await,
            Err(e) => Err(e),
        };
        let error = match result {
            Err(e) => e.to_string(),
            Ok(m) => panic!("bootstrap worked without {verb} on {resource}: {m:?}"),
        };
        assert!(
            error.contains(action) && error.contains("forbidden"),
            "without {verb} on {resource}: {error}"
        );
    }
}
