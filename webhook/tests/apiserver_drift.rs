//! The pod drift detector (`serve --watch-pods`) against a real kube-apiserver: pods created
//! while the webhook is registered are injected; once the configuration is deleted, the
//! shipped `failurePolicy: Ignore` has nothing to call and the API server admits pods bare.
//! `egress_webhook_pods_uninjected` must count exactly those, and the log name each once.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

mod real;
mod support;

use egress_gate_apiserver::ApiServer;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

use real::{
    create_pod, injected, metric_sum, opted_in_namespace, register, until, webhook_configuration,
};
use support::{Webhook, fixture};

/// A CNPG instance pod named `name`, for whatever namespace it is created in.
fn instance(name: &str) -> Value {
    let mut pod = fixture("cnpg-instance");
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    pod["metadata"]["name"] = json!(name);
    pod
}

/// The drift gauges for `namespace` and profile `cnpg`: (selected, injected, uninjected).
async fn gauges(webhook: &Webhook, namespace: &str) -> (f64, f64, f64) {
    let text = webhook.admin_get("/metrics").await.1;
    let labels = [
        format!("namespace=\"{namespace}\""),
        "profile=\"cnpg\"".to_string(),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    (
        metric_sum(&text, "egress_webhook_pods_selected", &labels),
        metric_sum(&text, "egress_webhook_pods_injected", &labels),
        metric_sum(&text, "egress_webhook_pods_uninjected", &labels),
    )
}

#[tokio::test]
async fn pods_admitted_bare_are_counted_and_logged_once() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let owner = "drift";
    let ns = server.namespace(owner).await;
    opted_in_namespace(server, &ns, owner).await;
    // Not opted in: its bare pods never count.
    let outside = server.namespace(owner).await;

    let kubeconfig = server.kubeconfig().display().to_string();
    let webhook = Webhook::start_env(
        Some("discovery: false\n"),
        &["--namespace", "egress-gate", "--watch-pods"],
        &[("KUBERNETES_SERVICE_HOST", ""), ("KUBECONFIG", &kubeconfig)],
    );
    let mwc = webhook_configuration(owner, &webhook);
    register(server, &mwc).await;
    until("the webhook to be called", || async {
        injected(&create_pod(server, &ns, &instance("probe"), true).await).then_some(())
    })
    .await;
    for name in ["pg-1", "pg-2"] {
        assert!(injected(
            &create_pod(server, &ns, &instance(name), false).await
        ));
    }
    // A namespace whose every selected pod is injected, for `status` to pass on.
    let healthy = server.namespace(owner).await;
    opted_in_namespace(server, &healthy, owner).await;
    assert!(injected(
        &create_pod(server, &healthy, &instance("pg-1"), false).await
    ));
    // Not selected by any profile: never counted.
    let mut plain = fixture("plain-app");
    plain["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    create_pod(server, &ns, &plain, false).await;

    // Unregistered: the API server no longer calls anyone and admits pods as they are.
    let name = mwc.metadata.name.clone().unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(server.client());
    configs
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    until("the API server to stop calling the webhook", || async {
        (!injected(&create_pod(server, &ns, &instance("probe"), true).await)).then_some(())
    })
    .await;
    let bare = ["pg-3", "pg-4", "pg-5"];
    for name in bare {
        assert!(!injected(
            &create_pod(server, &ns, &instance(name), false).await
        ));
    }
    create_pod(server, &outside, &instance("pg-outside"), false).await;

    let seen = until(
        "the gauges to count 5 selected, 2 injected, 3 bare",
        || async {
            let g = gauges(&webhook, &ns).await;
            (g == (5.0, 2.0, 3.0)).then_some(g)
        },
    )
    .await;
    assert_eq!(seen, (5.0, 2.0, 3.0));
    assert_eq!(gauges(&webhook, &outside).await, (0.0, 0.0, 0.0));

    // One log line per bare pod, naming it; none for the injected ones or the outsider.
    let logged = |pod: &str| {
        webhook
            .logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["pod"] == pod && v["namespace"] == ns.as_str())
            .filter(|v| v["level"] == "WARN" && v["profile"] == "cnpg")
            .count()
    };
    // A label change is an update event; it must not log the pod again.
    let pods: Api<Pod> = Api::namespaced(server.client(), &ns);
    pods.patch(
        "pg-3",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for name in bare {
        assert_eq!(logged(name), 1, "{name}: {:#?}", webhook.logs());
    }
    for name in ["pg-1", "pg-2", "pg-outside"] {
        assert_eq!(logged(name), 0, "{name}");
    }

    // `egress-webhook status`, the real binary against the same API server.
    let install = install_for_status(server, &webhook).await;
    let (code, out) = status(server, &install, &ns);
    assert_eq!(code, Some(1), "{out}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with(ns.as_str()))
        .unwrap_or_else(|| panic!("no row for {ns}:\n{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(row, [ns.as_str(), "5", "2", "0", "3"], "{out}");
    for name in bare {
        assert!(
            out.contains(&format!("  {ns}/{name} (profile cnpg)")),
            "{out}"
        );
    }
    assert!(out.contains("1 ready endpoint(s)"), "{out}");
    assert!(out.contains("caBundle matches"), "{out}");
    assert!(
        out.contains("problem: 3 selected pod(s) were admitted without injection"),
        "{out}"
    );
    let (code, out) = status(server, &install, &healthy);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok: every selected pod goes through egress-gate"),
        "{out}"
    );
    // With no ready endpoint the same namespace fails: the webhook is down.
    let slices: Api<EndpointSlice> = Api::namespaced(server.client(), &install.namespace);
    slices
        .delete("egress-webhook-1", &DeleteParams::default())
        .await
        .unwrap();
    let (code, out) = status(server, &install, &healthy);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("has no ready endpoint"), "{out}");

    // Recreating a bare pod's replacement through the webhook fixes the count.
    pods.delete("pg-3", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    until("the gauges to count 2 bare", || async {
        (gauges(&webhook, &ns).await == (4.0, 2.0, 2.0)).then_some(())
    })
    .await;
}

/// What `status` checks, installed in a namespace of its own standing in for `egress-gate`.
struct StatusInstall {
    /// Stands in for `egress-gate`.
    namespace: String,
    /// The MutatingWebhookConfiguration `status` checks.
    config: String,
}

/// The webhook's ConfigMap, serving Secret, Service with one ready endpoint, and a
/// Service-form webhook configuration whose caBundle is the test CA. Its namespaceSelector
/// matches no namespace, so the API server never calls it.
async fn install_for_status(server: &ApiServer, webhook: &Webhook) -> StatusInstall {
    let namespace = server.namespace("drift-install").await;
    let client = server.client();
    let params = PostParams::default();
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "egress-webhook-config"},
        // The serving webhook's configuration: its defaults with `--namespace egress-gate`.
        "data": {"webhook.yaml": "discovery: false\nproxyURL: http://egress-proxy.egress-gate.svc.cluster.local:3128\n"},
    }))
    .unwrap();
    Api::namespaced(client.clone(), &namespace)
        .create(&params, &cm)
        .await
        .unwrap();
    let cert = egress_gate_certs::pki::encode_certificate_pem(&webhook.cert_der);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "egress-webhook-tls"},
        "type": "Opaque",
        "stringData": {"tls.crt": cert},
    }))
    .unwrap();
    Api::namespaced(client.clone(), &namespace)
        .create(&params, &secret)
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "egress-webhook"},
        "spec": {"ports": [{"port": 443, "targetPort": 8443}]},
    }))
    .unwrap();
    Api::namespaced(client.clone(), &namespace)
        .create(&params, &svc)
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "egress-webhook-1",
                     "labels": {"kubernetes.io/service-name": "egress-webhook"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.0.7"], "conditions": {"ready": true}}],
        "ports": [{"port": 8443}],
    }))
    .unwrap();
    Api::namespaced(client.clone(), &namespace)
        .create(&params, &slice)
        .await
        .unwrap();
    let config = format!("egress-gate-{namespace}");
    let mut mwc = serde_json::to_value(webhook_configuration("nobody", webhook)).unwrap();
    mwc["metadata"]["name"] = json!(config);
    mwc["webhooks"][0]["clientConfig"] = json!({
        "service": {"name": "egress-webhook", "namespace": namespace, "path": "/mutate", "port": 443},
        "caBundle": real::base64_encode(webhook.ca.pem().as_bytes()),
    });
    register(server, &serde_json::from_value(mwc).unwrap()).await;
    StatusInstall { namespace, config }
}

/// Runs `egress-webhook status -n NAMESPACE` against the install; exit code and output.
fn status(server: &ApiServer, install: &StatusInstall, namespace: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_egress-webhook"))
        .args(["status", "-n", namespace])
        .args(["--webhook-namespace", &install.namespace])
        .args(["--webhook-config-name", &install.config])
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("POD_NAMESPACE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Resident set size of process `pid`, in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The cost measurement of the pod watch (issue 16): the webhook's RSS with no pods, then
/// with `EGRESS_GATE_DRIFT_PODS` (default 50,000) selected pods spread over 50 opted-in
/// namespaces, created bare through the real API server (no kubelet needed). Prints the
/// figures and fails above 1 KiB per pod. A measurement, not a unit test: run it on its own
/// with `cargo test -p egress-webhook --test apiserver_drift -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement: minutes and a large etcd; run on its own with --ignored"]
async fn pod_watch_memory_per_pod() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let pods: usize = std::env::var("EGRESS_GATE_DRIFT_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let namespaces = 50;
    let kubeconfig = server.kubeconfig().display().to_string();
    let webhook = Webhook::start_env(
        Some("discovery: false\n"),
        &["--namespace", "egress-gate", "--watch-pods"],
        &[("KUBERNETES_SERVICE_HOST", ""), ("KUBECONFIG", &kubeconfig)],
    );
    until("the pod watch to sync", || async {
        (webhook.metric("egress_webhook_pod_watch_synced").await == Some(1.0)).then_some(())
    })
    .await;
    let mut names = Vec::new();
    for _ in 0..namespaces {
        let ns = server.namespace("cost").await;
        opted_in_namespace(server, &ns, "cost").await;
        names.push(ns);
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let pid = webhook.child.id();
    let before = rss_kib(pid);

    let started = std::time::Instant::now();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..pods {
        let permit = std::sync::Arc::clone(&gate).acquire_owned().await.unwrap();
        let api: Api<Pod> = Api::namespaced(server.client(), &names[i % namespaces]);
        tasks.spawn(async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("pg-{i}"), "labels": {
                    "cnpg.io/podRole": "instance", "cnpg.io/cluster": "pg",
                    "cnpg.io/instanceName": format!("pg-{i}")}},
                "spec": {"containers": [{"name": "postgres", "image": "pg"}]},
            }))
            .unwrap();
            api.create(&PostParams::default(), &pod).await.unwrap();
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let created = started.elapsed();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let text = webhook.admin_get("/metrics").await.1;
        let seen = metric_sum(
            &text,
            "egress_webhook_pods_uninjected",
            &["profile=\"cnpg\""],
        );
        if seen >= pods as f64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "watch saw {seen} of {pods}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    let per_pod = (after.saturating_sub(before) * 1024) as f64 / pods as f64;
    println!(
        "pod watch cost: RSS {before} KiB with 0 pods, {after} KiB with {pods} selected pods \
         ({per_pod:.0} bytes per pod); created in {created:?}"
    );
    assert!(per_pod < 1024.0, "{per_pod:.0} bytes per pod");
}
