//! The cluster-aware preview against a real kube-apiserver (issue 20, item 1): `egress-webhook
//! inject --kubeconfig` writes what the webhook serving that cluster writes for the same pod.
//!
//! One dedicated API server with an AKS-like Service range (`10.0.0.0/16`, where the
//! built-in default says kubeadm's `10.96.0.0/12`); the webhook runs `discovery: true` from
//! the same text the preview reads from the cluster's ConfigMap; the namespace has Services
//! the webhook learns through its watches.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

mod real;
mod support;

use std::process::{Command, Output};

use egress_gate_apiserver::ApiServer;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use real::{
    create_pod, label_namespace, mutable_parts, opted_in_namespace, register, start_webhook, until,
    webhook_configuration,
};
use support::fixture;

/// The configuration in the ConfigMap and in the webhook's file: discovery on, and an
/// entry of its own so the preview's use of the live configuration shows.
const CONFIG: &str = "discovery: true\nnoProxy: [.corp.example]\n";
/// The test's owner label value (see `real::OWNER_LABEL`).
const OWNER: &str = "preview";

/// NO_PROXY of a pod's first container.
fn no_proxy(pod: &Value) -> String {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "NO_PROXY")
        .and_then(|e| e["value"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Runs `egress-webhook inject` with `args` against nothing but what the arguments say.
fn inject(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egress-webhook"))
        .arg("inject")
        .args(args)
        .env_remove("POD_NAMESPACE")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

fn json_out(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

async fn create_service(server: &ApiServer, ns: &str, name: &str) {
    let svc: Service = serde_json::from_value(
        json!({"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}}),
    )
    .unwrap();
    Api::<Service>::namespaced(server.client(), ns)
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_preview_writes_the_patch_the_webhook_serving_the_cluster_writes() {
    let builder = ApiServer::builder().arg("--service-cluster-ip-range=10.0.0.0/16");
    let Some(server) = builder.start().unwrap() else {
        return;
    };
    let kubeconfig = server.kubeconfig().to_str().unwrap().to_string();

    // deploy/base's ConfigMap, in the webhook's namespace.
    label_namespace(&server, "egress-gate", json!({})).await;
    let map: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "egress-webhook-config"},
        "data": {"webhook.yaml": CONFIG},
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(server.client(), "egress-gate")
        .create(&PostParams::default(), &map)
        .await
        .unwrap();

    let webhook = start_webhook(&server, CONFIG);
    let mwc = webhook_configuration(OWNER, &webhook);
    let mwc_name = mwc.metadata.name.clone().unwrap();
    register(&server, &mwc).await;
    // The fixture's namespace, opted in; another that is not, where nothing is mutated.
    opted_in_namespace(&server, "db", OWNER).await;
    label_namespace(&server, "plain", json!({})).await;
    create_service(&server, "db", "pg-rw").await;
    create_service(&server, "db", "harbor-core").await;

    let raw = fixture("cnpg-instance");
    // The webhook is registered and its discovery has seen the Services.
    let served = until(
        "the webhook injects with harbor-core in NO_PROXY",
        || async {
            let pod = create_pod(&server, "db", &raw, true).await;
            no_proxy(&pod).contains("harbor-core").then_some(pod)
        },
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let pod_file = dir.path().join("pod.json");
    std::fs::write(&pod_file, raw.to_string()).unwrap();
    let pod_arg = pod_file.to_str().unwrap();
    let out = inject(&[
        "-f",
        pod_arg,
        "--kubeconfig",
        &kubeconfig,
        "--webhook-config-name",
        &mwc_name,
        "-o",
        "json",
    ]);
    let previewed = json_out(&out);
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains("Pod db/pg-1: injected (profile cnpg)"),
        "{report}"
    );

    // The same cluster defaults both: the previewed pod is created (dry run) in a
    // namespace the webhook does not see, and must be stored exactly as the webhook's.
    let mut in_plain = previewed.clone();
    in_plain["metadata"]["namespace"] = json!("plain");
    let stored_preview = create_pod(&server, "plain", &in_plain, true).await;
    assert_eq!(
        mutable_parts(&stored_preview),
        mutable_parts(&served),
        "the preview and the serving webhook disagree"
    );
    let entries = no_proxy(&previewed);
    for entry in [
        "10.0.0.1",
        "10.0.0.0/16",
        "harbor-core.db",
        "pg-rw",
        ".corp.example",
    ] {
        assert!(
            entries.split(',').any(|e| e == entry),
            "{entry} not in {entries}"
        );
    }
    assert!(!entries.contains("10.96."), "{entries}");

    // The offline preview of the same pod with the same file is what issue 20 reported:
    // kubeadm's ranges, no Services; and it says so.
    let config_file = dir.path().join("webhook.yaml");
    std::fs::write(&config_file, CONFIG).unwrap();
    let out = inject(&[
        "--offline",
        "-f",
        pod_arg,
        "--config",
        config_file.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let offline = no_proxy(&json_out(&out));
    assert!(
        offline.contains("10.96.0.0/12") && !offline.contains("harbor-core"),
        "{offline}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("discovery: true; offline"));

    // A namespace the webhook configuration does not select: reported, left alone, as the
    // API server leaves it.
    let mut elsewhere = raw.clone();
    elsewhere["metadata"]["namespace"] = json!("plain");
    std::fs::write(&pod_file, elsewhere.to_string()).unwrap();
    let out = inject(&[
        "-f",
        pod_arg,
        "--kubeconfig",
        &kubeconfig,
        "--webhook-config-name",
        &mwc_name,
        "-o",
        "json",
    ]);
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        report.contains(
            "Pod plain/pg-1: excluded: namespace plain's labels do not match the namespaceSelector"
        ),
        "{report}"
    );
    let untouched = json_out(&out);
    assert_eq!(untouched, elsewhere);
    let stored = create_pod(&server, "plain", &elsewhere, true).await;
    assert!(
        no_proxy(&stored).is_empty(),
        "the API server did not call the webhook either"
    );

    // An object that names no namespace lands in the kubeconfig context's, as with kubectl.
    let mut context: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&kubeconfig).unwrap()).unwrap();
    context["contexts"][0]["context"]["namespace"] = json!("db");
    let with_ns = dir.path().join("kubeconfig-db");
    std::fs::write(&with_ns, serde_yaml_ng::to_string(&context).unwrap()).unwrap();
    let mut anywhere = raw.clone();
    anywhere["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    std::fs::write(&pod_file, anywhere.to_string()).unwrap();
    let out = inject(&[
        "-f",
        pod_arg,
        "--kubeconfig",
        with_ns.to_str().unwrap(),
        "--webhook-config-name",
        &mwc_name,
    ]);
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        report.contains("Pod db/pg-1: injected (profile cnpg)"),
        "{report}"
    );

    // Without the ConfigMap's namespace the preview stops with a configuration error.
    let out = inject(&[
        "-f",
        pod_arg,
        "--kubeconfig",
        &kubeconfig,
        "--webhook-namespace",
        "elsewhere",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("ConfigMap elsewhere/egress-webhook-config not found")
    );
}
