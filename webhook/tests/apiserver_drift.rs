//! The pod drift detector (`serve --watch-pods`) against a real kube-apiserver: pods created
//! while the webhook is registered are injected; once the configuration is deleted, the
//! shipped `failurePolicy: Ignore` has nothing to call and the API server admits pods bare.
//! `egress_webhook_pods_uninjected` must count exactly those, and the log name each once.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

mod real;
mod support;

use egress_gate_apiserver::ApiServer;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
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

    // Recreating a bare pod's replacement through the webhook fixes the count.
    pods.delete("pg-3", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    until("the gauges to count 2 bare", || async {
        (gauges(&webhook, &ns).await == (4.0, 2.0, 2.0)).then_some(())
    })
    .await;
}
