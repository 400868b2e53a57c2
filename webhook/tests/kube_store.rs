//! [`KubeStore`] when the API server fails in ways a real one cannot be made to fail on
//! demand: an internal error (HTTP 500), and a response that never comes. A stand-in on
//! loopback answers every call that way.
//!
//! Everything else the bootstrap does (create, read, replace, `Conflict`, `AlreadyExists`,
//! `NotFound`, RBAC refusals, the caBundle patch and its field manager) is tested against
//! a real kube-apiserver in `apiserver_bootstrap.rs`.
// Helpers here are test code too: a panic in them is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use egress_gate_certs::{BootstrapParams, CertPolicy, ServiceIdentity};
use egress_webhook::bootstrap::{KubeStore, ensure, ensure_within};
use serde_json::json;
use tokio::net::TcpListener;

fn params() -> BootstrapParams {
    BootstrapParams {
        secret_name: "egress-webhook-tls".into(),
        webhook_config_name: "egress-gate".into(),
        identity: ServiceIdentity::new("egress-webhook", "egress-gate"),
        policy: CertPolicy::default(),
    }
}

/// Why a stand-in: a real API server answers 500 only when etcd or its own code breaks,
/// which a test cannot arrange for one call.
#[tokio::test]
async fn an_internal_error_is_reported_with_the_action_and_the_api_servers_message() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let app = Router::new().fallback(move |method: Method, uri: Uri| {
        let log = Arc::clone(&log);
        async move {
            log.lock().unwrap().push(format!("{method} {}", uri.path()));
            let body = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "etcdserver: request timed out", "reason": "InternalError",
                "code": 500,
            });
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    // Config::new keeps kube-rs's default retry policy, as the webhook's client has it (it
    // retries 429, 503 and 504; a 500 is final).
    let config = kube::Config::new(url.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();

    let error = ensure(&KubeStore::new(client, "egress-gate"), &params())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("reading Secret egress-gate/egress-webhook-tls")
            && error.contains("etcdserver: request timed out"),
        "{error}"
    );
    // It stopped at the first failure: nothing was created or patched.
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET /api/v1/namespaces/egress-gate/secrets/egress-webhook-tls"]
    );
}

/// Why a stand-in: a real API server answers within its request timeout or says 504; a
/// connection that stays open with no answer (a peer gone without a reset) cannot be
/// arranged with one. The check gives up after its time limit, naming the wait, so the
/// renewal loop retries instead of hanging for good.
#[tokio::test]
async fn a_check_that_gets_no_answer_gives_up_at_its_time_limit() {
    let app = Router::new().fallback(std::future::pending::<StatusCode>);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();

    let limit = std::time::Duration::from_millis(300);
    let started = std::time::Instant::now();
    let error = ensure_within(&KubeStore::new(client, "egress-gate"), &params(), limit)
        .await
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() >= limit);
    assert!(started.elapsed() < limit * 10, "{:?}", started.elapsed());
    assert_eq!(
        error,
        "checking Secret egress-gate/egress-webhook-tls: no answer from the API server within 300ms"
    );
}
