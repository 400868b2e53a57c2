//! `serve --self-signed` against the API server's HTTP contract: [`KubeStore`] over a real
//! kube-rs client, talking to a stand-in API server on loopback that answers as the real one
//! does for the calls the bootstrap makes (paths, verbs, `fieldManager`, strategic merge
//! patch, `resourceVersion` conflicts, `Status` bodies with `AlreadyExists`, `Conflict`,
//! `NotFound` and `Forbidden`). No cluster runs here; this pins what crosses the wire.
// Helpers here are test code too: a panic in them is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use egress_gate_certs::{
    BootstrapParams, BundleOutcome, CertPolicy, SecretOutcome, ServiceIdentity,
};
use egress_webhook::bootstrap::{KubeStore, ensure};
use serde_json::{Value, json};
use tokio::net::TcpListener;

// The names `deploy/base` installs, so the paths checked are the ones a cluster sees.
/// The webhook's namespace (`POD_NAMESPACE`).
const NAMESPACE: &str = "egress-gate";
/// `--secret-name`.
const SECRET: &str = "egress-webhook-tls";
/// `--webhook-config-name`.
const CONFIG: &str = "egress-gate";
/// The one webhook in that configuration.
const WEBHOOK: &str = "pods.egress-gate.io";

/// What the stand-in holds, and every request it saw.
#[derive(Default)]
struct ApiState {
    /// The Secret as stored (with `metadata.resourceVersion`), if created.
    secret: Option<Value>,
    /// The MutatingWebhookConfiguration, if installed.
    config: Option<Value>,
    /// Last resourceVersion handed out.
    version: u64,
    /// `METHOD path?query content-type` per request, in order.
    requests: Vec<String>,
    /// Answer every Secret call with 403, as without the Role.
    forbid_secrets: bool,
    /// Make the next replace stale, as if another replica wrote first.
    conflict_next_put: bool,
}

type Shared = Arc<Mutex<ApiState>>;

/// A `Status` failure body as the API server writes it.
fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

fn log(state: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap) {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    state
        .lock()
        .unwrap()
        .requests
        .push(format!("{method} {uri} {content_type}"));
}

/// Checks a Secret body as the API server's validation does for `kubernetes.io/tls`.
fn invalid_secret(secret: &Value) -> Option<String> {
    if secret["type"] != "kubernetes.io/tls" {
        return Some(format!(
            "type must be kubernetes.io/tls, got {}",
            secret["type"]
        ));
    }
    for key in ["tls.crt", "tls.key"] {
        match secret["data"][key].as_str().map(|v| BASE64.decode(v)) {
            Some(Ok(_)) => {}
            _ => return Some(format!("data[{key}]: required, base64")),
        }
    }
    None
}

async fn secret_collection(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    secrets(&state, method, &uri, &headers, None, &body)
}

async fn secret_named(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path((_ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    secrets(&state, method, &uri, &headers, Some(name), &body)
}

fn secrets(
    state: &Shared,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    named: Option<String>,
    body: &[u8],
) -> Response {
    log(state, &method, uri, headers);
    let mut s = state.lock().unwrap();
    if s.forbid_secrets {
        let message = format!(
            "secrets is forbidden: User \"system:serviceaccount:{NAMESPACE}:egress-webhook\" cannot {} resource \"secrets\"",
            method.as_str().to_lowercase()
        );
        return status(StatusCode::FORBIDDEN, "Forbidden", message);
    }
    match (method, named) {
        (Method::GET, Some(n)) => match &s.secret {
            Some(secret) if n == SECRET => axum::Json(secret.clone()).into_response(),
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("secrets \"{n}\" not found"),
            ),
        },
        (Method::POST, None) => {
            let mut secret: Value = serde_json::from_slice(body).unwrap();
            if let Some(problem) = invalid_secret(&secret) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", problem);
            }
            if s.secret.is_some() {
                let n = secret["metadata"]["name"].as_str().unwrap_or_default();
                let message = format!("secrets \"{n}\" already exists");
                return status(StatusCode::CONFLICT, "AlreadyExists", message);
            }
            s.version += 1;
            secret["metadata"]["resourceVersion"] = json!(s.version.to_string());
            secret["metadata"]["namespace"] = json!(NAMESPACE);
            s.secret = Some(secret.clone());
            (StatusCode::CREATED, axum::Json(secret)).into_response()
        }
        (Method::PUT, Some(n)) => {
            let mut secret: Value = serde_json::from_slice(body).unwrap();
            if s.conflict_next_put {
                // Another writer got there between this client's read and its write.
                s.conflict_next_put = false;
                s.version += 1;
                let v = s.version.to_string();
                if let Some(stored) = s.secret.as_mut() {
                    stored["metadata"]["resourceVersion"] = json!(v);
                }
            }
            let Some(stored) = &s.secret else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("secrets \"{n}\" not found"),
                );
            };
            if secret["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
                let message = format!(
                    "Operation cannot be fulfilled on secrets \"{n}\": the object has been modified; please apply your changes to the latest version and try again"
                );
                return status(StatusCode::CONFLICT, "Conflict", message);
            }
            if let Some(problem) = invalid_secret(&secret) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", problem);
            }
            s.version += 1;
            secret["metadata"]["resourceVersion"] = json!(s.version.to_string());
            s.secret = Some(secret.clone());
            axum::Json(secret).into_response()
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not here".into(),
        ),
    }
}

/// GET and strategic-merge PATCH of one MutatingWebhookConfiguration. The webhooks list
/// merges on `name`, as the type's patch strategy says.
async fn webhook_config(
    State(state): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    log(&state, &method, &uri, &headers);
    let mut s = state.lock().unwrap();
    let not_found = || {
        let message = format!(
            "mutatingwebhookconfigurations.admissionregistration.k8s.io \"{name}\" not found"
        );
        status(StatusCode::NOT_FOUND, "NotFound", message)
    };
    let Some(config) = s.config.as_mut().filter(|_| name == CONFIG) else {
        return not_found();
    };
    match method {
        Method::GET => axum::Json(config.clone()).into_response(),
        Method::PATCH => {
            let strategic = headers
                .get("content-type")
                .is_some_and(|v| v == "application/strategic-merge-patch+json");
            if !strategic {
                let message = "the body of the request was in an unknown format".to_string();
                return status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    message,
                );
            }
            let patch: Value = serde_json::from_slice(&body).unwrap();
            for change in patch["webhooks"].as_array().into_iter().flatten() {
                let webhooks = config["webhooks"].as_array_mut().unwrap();
                let Some(target) = webhooks.iter_mut().find(|w| w["name"] == change["name"]) else {
                    webhooks.push(change.clone());
                    continue;
                };
                for (key, value) in change["clientConfig"].as_object().into_iter().flatten() {
                    target["clientConfig"][key] = value.clone();
                }
            }
            axum::Json(config.clone()).into_response()
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not here".into(),
        ),
    }
}

/// The configuration as `deploy/base` installs it: no caBundle yet.
fn installed_config() -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG, "resourceVersion": "1"},
        "webhooks": [{
            "name": WEBHOOK,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "clientConfig": {"service": {"name": "egress-webhook", "namespace": NAMESPACE, "path": "/mutate", "port": 443}},
        }],
    })
}

/// A cluster where `kubectl apply -k deploy/base` has run and the webhook has not yet.
fn installed() -> ApiState {
    ApiState {
        config: Some(installed_config()),
        ..ApiState::default()
    }
}

/// Starts the stand-in; returns its state and a client for it.
async fn api_server(state: ApiState) -> (Shared, kube::Client) {
    let shared: Shared = Arc::new(Mutex::new(state));
    let app = Router::new()
        .route(
            "/api/v1/namespaces/{ns}/secrets",
            axum::routing::post(secret_collection),
        )
        .route(
            "/api/v1/namespaces/{ns}/secrets/{name}",
            get(secret_named).put(secret_named),
        )
        .route(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
            get(webhook_config).patch(webhook_config),
        )
        .with_state(shared.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut config = kube::Config::new(url.parse().unwrap());
    config.default_namespace = NAMESPACE.into();
    (shared, kube::Client::try_from(config).unwrap())
}

fn params() -> BootstrapParams {
    BootstrapParams {
        secret_name: SECRET.into(),
        webhook_config_name: CONFIG.into(),
        identity: ServiceIdentity::new("egress-webhook", NAMESPACE),
        policy: CertPolicy::default(),
    }
}

fn decoded(secret: &Value, key: &str) -> String {
    let bytes = BASE64
        .decode(secret["data"][key].as_str().unwrap())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn first_start_creates_the_secret_then_sets_the_ca_bundle() {
    let (api, client) = api_server(installed()).await;
    let store = KubeStore::new(client, NAMESPACE);

    let material = ensure(&store, &params()).await.unwrap();
    assert_eq!(material.secret, SecretOutcome::Created);
    assert_eq!(material.bundle, BundleOutcome::Patched);

    let s = api.lock().unwrap();
    let secret = s.secret.as_ref().unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(secret["metadata"]["name"], SECRET);
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "egress-gate"
    );
    assert_eq!(decoded(secret, "tls.crt"), material.cert_pem);
    assert_eq!(decoded(secret, "tls.key"), material.key_pem);

    let webhook = &s.config.as_ref().unwrap()["webhooks"][0];
    let bundle = BASE64
        .decode(webhook["clientConfig"]["caBundle"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(bundle).unwrap(), material.ca_bundle_pem);
    // The patch touched only caBundle: the service reference is still there.
    assert_eq!(webhook["clientConfig"]["service"]["path"], "/mutate");
    assert_eq!(webhook["sideEffects"], "None");

    let json = "application/json";
    let smp = "application/strategic-merge-patch+json";
    let secrets = format!("/api/v1/namespaces/{NAMESPACE}/secrets");
    let config =
        format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{CONFIG}");
    assert_eq!(
        s.requests,
        [
            format!("GET {secrets}/{SECRET} -"),
            format!("POST {secrets}?&fieldManager=egress-webhook {json}"),
            format!("GET {config} -"),
            // Read again to build the patch from the webhooks' names.
            format!("GET {config} -"),
            format!("PATCH {config}?&fieldManager=egress-webhook {smp}"),
        ]
    );
}

#[tokio::test]
async fn a_restart_serves_the_stored_certificate_and_writes_nothing() {
    let (api, client) = api_server(installed()).await;
    let first = ensure(&KubeStore::new(client.clone(), NAMESPACE), &params())
        .await
        .unwrap();
    let writes_before = api.lock().unwrap().requests.len();

    let again = ensure(&KubeStore::new(client, NAMESPACE), &params())
        .await
        .unwrap();
    assert_eq!(again.secret, SecretOutcome::Unchanged);
    assert_eq!(again.bundle, BundleOutcome::Unchanged);
    assert_eq!(again.cert_pem, first.cert_pem);
    let s = api.lock().unwrap();
    let later: Vec<&String> = s.requests[writes_before..].iter().collect();
    assert!(
        later.iter().all(|r| r.starts_with("GET ")),
        "a restart with a fresh Secret only reads: {later:?}"
    );
}

#[tokio::test]
async fn two_replicas_starting_together_serve_one_certificate() {
    let (api, client) = api_server(installed()).await;
    let a = KubeStore::new(client.clone(), NAMESPACE);
    let b = KubeStore::new(client, NAMESPACE);
    let params = params();
    let (first, second) = tokio::join!(ensure(&a, &params), ensure(&b, &params));
    let (first, second) = (first.unwrap(), second.unwrap());

    assert_eq!(first.cert_pem, second.cert_pem);
    assert_eq!(first.ca_bundle_pem, second.ca_bundle_pem);
    let outcomes = [first.secret, second.secret];
    assert!(outcomes.contains(&SecretOutcome::Created), "{outcomes:?}");
    let s = api.lock().unwrap();
    let stored = decoded(s.secret.as_ref().unwrap(), "tls.crt");
    assert_eq!(stored, first.cert_pem);
    let creates = s.requests.iter().filter(|r| r.starts_with("POST ")).count();
    assert!((1..=2).contains(&creates), "{:?}", s.requests);
}

#[tokio::test]
async fn missing_rbac_is_an_error_that_names_the_secret_and_the_refusal() {
    let (_api, client) = api_server(ApiState {
        config: Some(installed_config()),
        forbid_secrets: true,
        ..ApiState::default()
    })
    .await;
    let err = ensure(&KubeStore::new(client, NAMESPACE), &params())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reading Secret egress-gate/egress-webhook-tls") && err.contains("forbidden"),
        "{err}"
    );
}

#[tokio::test]
async fn a_configuration_not_installed_yet_is_reported_not_fatal() {
    let (api, client) = api_server(ApiState::default()).await;
    let material = ensure(&KubeStore::new(client, NAMESPACE), &params())
        .await
        .unwrap();
    assert_eq!(material.secret, SecretOutcome::Created);
    assert_eq!(material.bundle, BundleOutcome::ConfigMissing);
    assert!(api.lock().unwrap().secret.is_some());
}

#[tokio::test]
async fn a_replace_that_lost_a_race_is_read_again_and_retried() {
    let (api, client) = api_server(installed()).await;
    let store = KubeStore::new(client, NAMESPACE);
    let first = ensure(&store, &params()).await.unwrap();
    // A new name needs a new certificate, so the next check replaces the Secret; the
    // stand-in makes that first replace stale.
    api.lock().unwrap().conflict_next_put = true;
    let mut renamed = params();
    renamed.identity.extra_dns_names = vec!["webhook.example.com".into()];
    let renewed = ensure(&store, &renamed).await.unwrap();

    assert_ne!(renewed.cert_pem, first.cert_pem);
    assert!(
        matches!(renewed.secret, SecretOutcome::Updated(_)),
        "{:?}",
        renewed.secret
    );
    let s = api.lock().unwrap();
    assert_eq!(
        decoded(s.secret.as_ref().unwrap(), "tls.crt"),
        renewed.cert_pem
    );
    let puts = s.requests.iter().filter(|r| r.starts_with("PUT ")).count();
    assert_eq!(
        puts, 2,
        "one stale replace, then one on the new version: {:?}",
        s.requests
    );
}
