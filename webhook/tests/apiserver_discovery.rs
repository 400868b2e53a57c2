//! Discovery (`discovery: true`) against a real kube-apiserver: what the webhook's watches
//! see ends up in the NO_PROXY of the next pod created through the API.
//!
//! The webhook watches Services (peer names per namespace), the `kubernetes` Service (the
//! API server's ClusterIP), ServiceCIDRs and Nodes; it does not read Endpoints, so none are
//! created here.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

mod real;
mod support;

use egress_gate_apiserver::ApiServer;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

use real::{create_pod, opted_in_namespace, register, start_webhook, until, webhook_configuration};
use support::fixture;

/// A pod injected in any opted-in namespace (it opts in by annotation).
fn probe_pod() -> Value {
    let mut pod = fixture("annotation-opt-in");
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    pod
}

/// NO_PROXY of the first container of a pod created (dry run) in `ns` now, split.
async fn no_proxy(server: &ApiServer, ns: &str) -> Vec<String> {
    let pod = create_pod(server, ns, &probe_pod(), true).await;
    let env = pod["spec"]["containers"][0]["env"].as_array().cloned();
    env.into_iter()
        .flatten()
        .find(|e| e["name"] == "NO_PROXY")
        .and_then(|e| {
            e["value"]
                .as_str()
                .map(|v| v.split(',').map(str::to_string).collect())
        })
        .unwrap_or_default()
}

/// Waits until the next pod's NO_PROXY passes `check`.
async fn until_no_proxy(
    server: &ApiServer,
    ns: &str,
    what: &str,
    check: impl Fn(&[String]) -> bool,
) {
    until(what, || async {
        let entries = no_proxy(server, ns).await;
        check(&entries).then_some(())
    })
    .await;
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

async fn delete_service(server: &ApiServer, ns: &str, name: &str) {
    Api::<Service>::namespaced(server.client(), ns)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
}

fn has(entries: &[String], entry: &str) -> bool {
    entries.iter().any(|e| e == entry)
}

#[tokio::test]
async fn services_created_and_deleted_show_in_the_next_pods_no_proxy() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let owner = "services";
    let ns = server.namespace(owner).await;
    let other = server.namespace(owner).await;
    opted_in_namespace(server, &ns, owner).await;
    let webhook = start_webhook(server, "discovery: true\n");
    register(server, &webhook_configuration(owner, &webhook)).await;
    until_no_proxy(server, &ns, "the webhook to inject", |e| !e.is_empty()).await;

    create_service(server, &ns, "reports").await;
    // A Service elsewhere is no peer of this namespace's pods.
    create_service(server, &other, "elsewhere").await;
    let qualified = format!("reports.{ns}");
    until_no_proxy(server, &ns, "the new Service in NO_PROXY", |e| {
        has(e, "reports") && has(e, &qualified)
    })
    .await;
    let entries = no_proxy(server, &ns).await;
    assert!(
        !entries.iter().any(|e| e.starts_with("elsewhere")),
        "{entries:?}"
    );

    delete_service(server, &ns, "reports").await;
    until_no_proxy(server, &ns, "the deleted Service to leave NO_PROXY", |e| {
        !has(e, "reports") && !has(e, &qualified)
    })
    .await;
}

/// Its own API server: a Service range other than the default, and a restart that cuts
/// every watch the webhook holds.
#[tokio::test]
async fn the_kubernetes_service_and_service_cidr_are_used_and_watches_resume_after_a_restart() {
    let builder = ApiServer::builder().arg("--service-cluster-ip-range=10.100.0.0/16");
    let Some(server) = builder.start().unwrap() else {
        return;
    };
    let owner = "restart";
    let ns = server.namespace(owner).await;
    opted_in_namespace(&server, &ns, owner).await;
    let webhook = start_webhook(&server, "discovery: true\n");
    register(&server, &webhook_configuration(owner, &webhook)).await;

    // The `kubernetes` Service's ClusterIP and the cluster's ServiceCIDR replace the
    // built-in guesses (10.96.0.1, 10.96.0.0/12).
    until_no_proxy(
        &server,
        &ns,
        "the discovered API server address and range",
        |e| has(e, "10.100.0.1") && has(e, "10.100.0.0/16"),
    )
    .await;
    let entries = no_proxy(&server, &ns).await;
    assert!(
        !has(&entries, "10.96.0.0/12") && !has(&entries, "10.96.0.1"),
        "{entries:?}"
    );
    create_service(&server, &ns, "before").await;
    until_no_proxy(&server, &ns, "the first Service", |e| has(e, "before")).await;

    let mut server = server;
    let server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    // Changes right after the restart, while the webhook's watches reconnect.
    create_service(&server, &ns, "after").await;
    delete_service(&server, &ns, "before").await;
    until_no_proxy(&server, &ns, "the watches to resume", |e| {
        has(e, "after") && !has(e, "before")
    })
    .await;
    let entries = no_proxy(&server, &ns).await;
    assert!(
        has(&entries, "10.100.0.1") && has(&entries, "10.100.0.0/16"),
        "{entries:?}"
    );
    drop(webhook);
}
