//! Admission end to end through a real kube-apiserver (v1.36, `egress_gate_apiserver`):
//! `egress-webhook serve` registered with deploy/base's MutatingWebhookConfiguration (URL
//! form, test CA), pods created through the API.
//!
//! The tests share one API server (one per test binary); each registers its own webhook
//! configuration that selects only namespaces labelled with its name (`real::OWNER_LABEL`).

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

mod real;
mod support;

use egress_gate_apiserver::ApiServer;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

use real::{
    create_pod, injected, label_namespace, metric_sum, mutable_parts, opted_in_namespace, register,
    start_webhook, until, webhook_configuration,
};
use support::fixture;

/// A golden case as `golden.rs` lists it: the fixture pod and its expected file (the
/// configuration is whatever the webhook runs with at that point of the test).
struct Golden {
    pod: &'static str,
    expected: &'static str,
}

const fn case(pod: &'static str, expected: &'static str) -> Golden {
    Golden { pod, expected }
}

/// The default configuration's cases whose namespace has no Services.
const DEFAULT_CASES: &[Golden] = &[
    case("cnpg-full-recovery-job", "cnpg-full-recovery-job"),
    case("cnpg-pooler", "cnpg-pooler"),
    case("cnpg-opt-out", "cnpg-opt-out"),
    case("velero-install-server", "velero-install-server"),
    case("velero-helm-server", "velero-helm-server"),
    case("velero-node-agent", "velero-node-agent"),
    case("velero-helm-node-agent", "velero-helm-node-agent"),
    case("velero-exposer-pod", "velero-exposer-pod"),
    case("velero-maintenance-job", "velero-maintenance-job"),
    case("annotation-opt-in", "annotation-opt-in"),
    case("user-https-proxy", "user-https-proxy"),
    case("generate-name-pod", "generate-name-pod"),
];

fn fixtures_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config_fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures_dir().join(format!("configs/{name}.yaml"))).unwrap()
}

/// The fixture with its golden patch applied locally.
fn with_golden_patch(golden: &Golden) -> (Value, bool) {
    let path = fixtures_dir().join(format!("expected/{}.json", golden.expected));
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let patch: json_patch::Patch = serde_json::from_value(expected["patch"].clone()).unwrap();
    let mut pod = fixture(golden.pod);
    json_patch::patch(&mut pod, &patch).unwrap();
    (pod, !patch.0.is_empty())
}

fn namespace_of(pod: &Value) -> String {
    pod["metadata"]["namespace"].as_str().unwrap().to_string()
}

/// Creates the fixture for real and checks the stored pod is the fixture with exactly the
/// golden patch applied (both defaulted by the same API server: the locally patched pod is
/// sent as a server-side dry run). With `wait`, polls until it holds (a configuration
/// change or a new Service on its way to the webhook).
async fn check_golden(server: &ApiServer, golden: &Golden, wait: bool) {
    let raw = fixture(golden.pod);
    let ns = namespace_of(&raw);
    let (patched, mutates) = with_golden_patch(golden);
    // Both go through the webhook: the expected one must come back unchanged (the engine
    // adds nothing to its own output), so both are computed under the same configuration.
    let expected = || async { mutable_parts(&create_pod(server, &ns, &patched, true).await) };
    if wait {
        let deadline = std::time::Instant::now() + real::SETTLE;
        loop {
            let probe = mutable_parts(&create_pod(server, &ns, &raw, true).await);
            let expected = expected().await;
            if probe == expected {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: not mutated as golden within {:?}; last seen:\n{probe:#}\nexpected:\n{expected:#}",
                golden.expected,
                real::SETTLE
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let expected = expected().await;
    let created = create_pod(server, &ns, &raw, false).await;
    assert_eq!(
        mutable_parts(&created),
        expected,
        "{}: the API server stored something else than the fixture with its golden patch",
        golden.expected
    );
    assert_eq!(injected(&created), mutates, "{}", golden.expected);
    delete_now(server, &ns, created["metadata"]["name"].as_str().unwrap()).await;
}

/// Deletes a pod at once (no kubelet will ever confirm a graceful deletion).
async fn delete_now(server: &ApiServer, ns: &str, name: &str) {
    let api: Api<Pod> = Api::namespaced(server.client(), ns);
    api.delete(name, &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
}

/// The golden cases checked below, beyond [`DEFAULT_CASES`].
const LATER_CASES: [&str; 4] = [
    "cnpg-instance-http-proxy",
    "bare-pod",
    "cnpg-instance",
    "plain-app",
];

#[test]
fn every_golden_file_is_checked_through_the_api_server() {
    let mut checked: Vec<&str> = DEFAULT_CASES.iter().map(|c| c.expected).collect();
    checked.extend(LATER_CASES);
    checked.sort_unstable();
    let mut files: Vec<String> = std::fs::read_dir(fixtures_dir().join("expected"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_string()
        })
        .collect();
    files.sort_unstable();
    assert_eq!(
        checked, files,
        "a golden case added to golden.rs needs a place here too"
    );
}

#[tokio::test]
async fn every_fixture_comes_back_with_exactly_its_golden_patch() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let owner = "golden";
    for ns in ["db", "apps", "velero"] {
        opted_in_namespace(server, ns, owner).await;
    }

    // Without discovery, as golden.rs computes the patches.
    let webhook = start_webhook(server, "discovery: false\n");
    register(server, &webhook_configuration(owner, &webhook)).await;
    let mut first = true;
    for golden in DEFAULT_CASES {
        // The first mutating case waits for the configuration to reach the API server.
        let (_, mutates) = with_golden_patch(golden);
        check_golden(server, golden, first && mutates).await;
        first &= !mutates;
    }
    // The same webhook, its configuration file replaced: it reloads.
    std::fs::write(
        webhook.config_path(),
        config_fixture("http-proxy-and-extras"),
    )
    .unwrap();
    check_golden(
        server,
        &case("cnpg-instance", "cnpg-instance-http-proxy"),
        true,
    )
    .await;
    std::fs::write(webhook.config_path(), config_fixture("catch-all")).unwrap();
    check_golden(server, &case("bare-pod", "bare-pod"), true).await;
    drop(webhook);

    // Peer Services come from discovery, which watches the real API server.
    let webhook = start_webhook(server, "discovery: true\n");
    register(server, &webhook_configuration(owner, &webhook)).await;
    let services: Api<Service> = Api::namespaced(server.client(), "db");
    for name in ["pg-rw", "harbor-core"] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"ports": [{"port": 5432}]},
        }))
        .unwrap();
        services.create(&PostParams::default(), &svc).await.unwrap();
    }
    check_golden(server, &case("cnpg-instance", "cnpg-instance"), true).await;
    check_golden(server, &case("plain-app", "plain-app"), false).await;
    drop(webhook);
}

#[tokio::test]
async fn opted_out_namespaces_and_kube_system_are_left_alone() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let owner = "optout";
    let opted_in = server.namespace(owner).await;
    opted_in_namespace(server, &opted_in, owner).await;
    // Not opted in: the owner label alone, no injection label.
    let opted_out = server.namespace(owner).await;
    label_namespace(server, &opted_out, json!({real::OWNER_LABEL: owner})).await;
    // kube-system carries both labels, yet deploy/base excludes it by name.
    opted_in_namespace(server, "kube-system", owner).await;

    let webhook = start_webhook(server, "discovery: false\n");
    register(server, &webhook_configuration(owner, &webhook)).await;
    let mut pod = fixture("annotation-opt-in");
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    // The control: the same pod is injected where the namespace opts in.
    until(
        "the webhook to inject in the opted-in namespace",
        || async { injected(&create_pod(server, &opted_in, &pod, true).await).then_some(()) },
    )
    .await;
    let reviews = || async {
        let text = webhook.admin_get("/metrics").await.1;
        metric_sum(&text, "egress_webhook_reviews_total", &[])
    };
    let before = reviews().await;
    assert!(before >= 1.0);
    for ns in [opted_out.as_str(), "kube-system"] {
        let dry_run = create_pod(server, ns, &pod, true).await;
        let created = create_pod(server, ns, &pod, false).await;
        assert_eq!(mutable_parts(&created), mutable_parts(&dry_run));
        assert!(!injected(&created), "{ns}: pod injected");
        assert!(
            created["metadata"]["annotations"]
                .get("egress-gate.io/status")
                .is_none()
        );
        delete_now(server, ns, created["metadata"]["name"].as_str().unwrap()).await;
    }
    // The API server never even asked the webhook.
    assert_eq!(reviews().await, before);
}

/// The number of calls the API server made to webhook `name`, from its own metrics.
async fn api_server_calls(server: &ApiServer, name: &str) -> f64 {
    metric_sum(
        &server.metrics().await.unwrap(),
        "apiserver_admission_webhook_request_total",
        &[&format!("name=\"{name}\"")],
    )
}

fn env_value(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

#[tokio::test]
async fn a_container_added_by_a_later_webhook_is_injected_on_reinvocation() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let owner = "reinvoke";
    let ns = server.namespace(owner).await;
    opted_in_namespace(server, &ns, owner).await;
    let webhook = start_webhook(server, &config_fixture("catch-all"));
    let sidecar = real::Sidecar::start().await;
    register(server, &webhook_configuration(owner, &webhook)).await;
    register(server, &sidecar.configuration(owner)).await;

    let mut pod = fixture("bare-pod");
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    // Both configurations in force: the dry run shows the sidecar, injected.
    until("both webhooks to be called", || async {
        let probe = create_pod(server, &ns, &pod, true).await;
        let containers = probe["spec"]["containers"].as_array().unwrap().clone();
        (containers.len() == 2 && injected(&probe)).then_some(())
    })
    .await;

    let egress_name = format!("{owner}.pods.egress-gate.io");
    let calls_before = api_server_calls(server, &egress_name).await;
    let sidecar_before = api_server_calls(server, &format!("{owner}.sidecar.test")).await;
    let created = create_pod(server, &ns, &pod, false).await;
    let containers = created["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2);
    let proxy = env_value(&containers[0], "HTTPS_PROXY").unwrap();
    assert_eq!(containers[1]["name"], "sidecar");
    assert_eq!(
        env_value(&containers[1], "HTTPS_PROXY").as_deref(),
        Some(proxy.as_str()),
        "the sidecar was not injected on reinvocation"
    );
    assert_eq!(
        env_value(&containers[1], "NO_PROXY"),
        env_value(&containers[0], "NO_PROXY")
    );
    let status: Value = serde_json::from_str(
        created["metadata"]["annotations"]["egress-gate.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["containers"], json!(["main", "sidecar"]));
    // egress-gate was called twice (first pass, reinvocation), the sidecar webhook once.
    assert_eq!(
        api_server_calls(server, &egress_name).await - calls_before,
        2.0
    );
    assert_eq!(
        api_server_calls(server, &format!("{owner}.sidecar.test")).await - sidecar_before,
        1.0
    );
}

#[tokio::test]
async fn with_the_webhook_down_ignore_admits_unmutated_and_fail_refuses() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let owner = "failure";
    let ns = server.namespace(owner).await;
    opted_in_namespace(server, &ns, owner).await;
    let webhook = start_webhook(server, "discovery: false\n");
    let mwc = webhook_configuration(owner, &webhook);
    assert_eq!(
        mwc.webhooks.as_ref().unwrap()[0].failure_policy.as_deref(),
        Some("Ignore"),
        "deploy/base ships failurePolicy: Ignore"
    );
    register(server, &mwc).await;
    let mut pod = fixture("annotation-opt-in");
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    until("the webhook to inject", || async {
        injected(&create_pod(server, &ns, &pod, true).await).then_some(())
    })
    .await;

    // Stopped: nothing listens on its port any more.
    drop(webhook);
    let hook = format!("{owner}.pods.egress-gate.io");
    let fail_open = || async {
        metric_sum(
            &server.metrics().await.unwrap(),
            "apiserver_admission_webhook_fail_open_count",
            &[&format!("name=\"{hook}\"")],
        )
    };
    let before = fail_open().await;
    let created = create_pod(server, &ns, &pod, false).await;
    assert!(!injected(&created), "admitted, and not mutated");
    assert_eq!(
        mutable_parts(&created)["spec"]["containers"][0]["env"],
        pod["spec"]["containers"][0]["env"]
    );
    assert_eq!(fail_open().await - before, 1.0);

    // failurePolicy: Fail (docs/install.md's alternative): the pod is refused.
    let api: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(server.client());
    let patch: json_patch::Patch = serde_json::from_value(
        json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}]),
    )
    .unwrap();
    api.patch(
        &format!("egress-gate-{owner}"),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Json::<()>(patch),
    )
    .await
    .unwrap();
    let error = until("failurePolicy Fail to refuse pods", || async {
        real::try_create_pod(server, &ns, &pod, true).await.err()
    })
    .await;
    let message = error.to_string();
    assert!(
        message.contains(&format!("failed calling webhook \"{hook}\"")),
        "{message}"
    );
    let refused = real::try_create_pod(server, &ns, &pod, false).await;
    assert!(refused.is_err(), "created with the webhook down and Fail");
}

#[tokio::test]
async fn the_api_server_speaks_http2_and_its_metrics_agree_with_the_webhooks() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let owner = "metrics";
    let ns = server.namespace(owner).await;
    opted_in_namespace(server, &ns, owner).await;
    let webhook = start_webhook(server, "discovery: false\n");
    register(server, &webhook_configuration(owner, &webhook)).await;
    let in_ns = |name: &str| {
        let mut pod = fixture(name);
        pod["metadata"].as_object_mut().unwrap().remove("namespace");
        pod
    };
    until("the webhook to inject", || async {
        injected(&create_pod(server, &ns, &in_ns("annotation-opt-in"), true).await).then_some(())
    })
    .await;
    for name in [
        "cnpg-full-recovery-job",
        "velero-node-agent",
        "plain-app",
        "cnpg-pooler",
    ] {
        create_pod(server, &ns, &in_ns(name), false).await;
    }

    let ours = webhook.admin_get("/metrics").await.1;
    let theirs = server.metrics().await.unwrap();
    let hook = format!("name=\"{owner}.pods.egress-gate.io\"");
    let reviews = metric_sum(&ours, "egress_webhook_reviews_total", &[]);
    assert!(reviews >= 5.0, "{reviews}");
    assert_eq!(
        metric_sum(
            &theirs,
            "apiserver_admission_webhook_request_total",
            &[&hook, "code=\"200\""]
        ),
        reviews
    );
    assert_eq!(
        metric_sum(
            &theirs,
            "apiserver_admission_webhook_request_total",
            &[&hook]
        ),
        reviews,
        "calls that did not get a 200"
    );
    assert_eq!(
        metric_sum(
            &theirs,
            "apiserver_admission_webhook_admission_duration_seconds_count",
            &[&hook, "rejected=\"false\""]
        ),
        reviews
    );
    assert_eq!(
        metric_sum(
            &theirs,
            "apiserver_admission_webhook_rejection_count",
            &[&hook]
        ),
        0.0
    );
    // Patched vs unchanged: the two not-selected pods and nothing else came back unchanged.
    assert_eq!(
        metric_sum(
            &ours,
            "egress_webhook_reviews_total",
            &["result=\"unchanged\""]
        ),
        2.0
    );
    // Every request came over HTTP/2.
    assert_eq!(
        metric_sum(
            &ours,
            "egress_webhook_requests_total",
            &["protocol=\"HTTP/2.0\""]
        ),
        reviews
    );
    assert_eq!(
        metric_sum(
            &ours,
            "egress_webhook_requests_total",
            &["protocol=\"HTTP/1.1\""]
        ),
        0.0
    );
}
