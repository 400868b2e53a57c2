//! Workload identity against a real kube-apiserver (issue 14): the pod watch feeds the
//! index, the proxy is not ready (and answers CONNECTs 503 with Retry-After) until the first
//! full list, and only labelled, addressed, unfinished pods claim addresses.
//!
//! Pods are created through the API and given loopback addresses through the status
//! subresource; there is no kubelet, so nothing else touches them. Needs the kube-apiserver
//! binary (see `egress-gate-apiserver`); without it these tests print one skip line.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use egress_gate_apiserver::ApiServer;
use egress_proxy::{Config, Server};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The webhook's client label, which the default `podSelector` selects.
const CLIENT_LABEL: &str = "egress-gate.io/client";

/// Starts the real server with `yaml` and the given Kubernetes client.
async fn proxy_with(yaml: &str, client: kube::Client) -> Proxy {
    let yaml = format!("listen: 127.0.0.1:0\nadminListen: 127.0.0.1:0\n{yaml}");
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind_with_client(&config, Some(client))
        .await
        .unwrap();
    Proxy {
        addr: server.proxy_addr().unwrap(),
        admin: server.admin_addr().unwrap(),
        tls: server.tls_addr().map(|a| a.unwrap()),
        handle: server.handle(),
        task: tokio::spawn(server.run()),
    }
}

/// Creates pod `name`, labelled as the webhook would when `client` is true.
async fn create_pod(pods: &Api<Pod>, name: &str, client: bool) {
    let labels = if client {
        json!({ CLIENT_LABEL: "true" })
    } else {
        json!({})
    };
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/c"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

/// Sets the pod's `status` fields through the status subresource, as the kubelet does.
async fn set_status(pods: &Api<Pod>, name: &str, status: serde_json::Value) {
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .unwrap();
}

async fn gauge(proxy: &Proxy, name: &str) -> f64 {
    metric(proxy.admin, &format!("egress_proxy_{name} ")).await
}

async fn gauge_is(proxy: &Proxy, name: &str, want: f64) {
    eventually(&format!("{name} == {want}"), || async {
        gauge(proxy, name).await == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_connects_answered_503_until_the_first_list() {
    // An API server that is not there: the watch keeps retrying and never lists.
    let config = kube::Config::new("https://127.0.0.1:1".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let proxy = proxy_with(&format!("identity: {{}}\n{}", policy(443)), client).await;
    let ready = admin_get(proxy.admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.ends_with("identity index not synced\n"), "{ready}");
    let answer = refusal(proxy.addr, &format!("CONNECT {ACCT}:443 HTTP/1.1\r\n\r\n")).await;
    assert!(
        answer.starts_with(
            "HTTP/1.1 503 Service Unavailable\r\nX-Egress-Gate-Reason: identity-not-synced\r\nRetry-After: 1\r\n"
        ),
        "{answer}"
    );
    assert_eq!(gauge(&proxy, "identity_synced").await, 0.0);
    eventually("staleness counted from the start", || async {
        gauge(&proxy, "identity_staleness_seconds").await >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_indexes_labelled_addressed_unfinished_pods() {
    let Some(api) = ApiServer::shared() else {
        return;
    };
    let ns = api.namespace("egh14-watch").await;
    let pods: Api<Pod> = Api::namespaced(api.client(), &ns);
    create_pod(&pods, "a", true).await;
    set_status(
        &pods,
        "a",
        json!({"podIP": "127.0.0.2", "podIPs": [{"ip": "127.0.0.2"}]}),
    )
    .await;
    // Not labelled: never watched.
    create_pod(&pods, "other", false).await;
    set_status(
        &pods,
        "other",
        json!({"podIP": "127.0.0.3", "podIPs": [{"ip": "127.0.0.3"}]}),
    )
    .await;

    let yaml = format!("identity:\n  namespaces: [{ns}]\n{}", policy(443));
    let proxy = proxy_with(&yaml, api.client()).await;
    eventually("ready after the first list", || async {
        admin_get(proxy.admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
    assert_eq!(gauge(&proxy, "identity_synced").await, 1.0);
    assert_eq!(gauge(&proxy, "identity_index_pods").await, 1.0);
    assert_eq!(gauge(&proxy, "identity_index_addresses").await, 1.0);
    gauge_is(&proxy, "identity_staleness_seconds", 0.0).await;

    // Added without an address, then given a dual-stack pair.
    create_pod(&pods, "b", true).await;
    gauge_is(&proxy, "identity_index_pods", 2.0).await;
    assert_eq!(gauge(&proxy, "identity_index_addresses").await, 1.0);
    set_status(
        &pods,
        "b",
        json!({"podIP": "127.0.0.4", "podIPs": [{"ip": "127.0.0.4"}, {"ip": "fd00::4"}]}),
    )
    .await;
    gauge_is(&proxy, "identity_index_addresses", 3.0).await;
    // Finished: the API still shows its addresses, the index drops them.
    set_status(&pods, "b", json!({"phase": "Succeeded"})).await;
    gauge_is(&proxy, "identity_index_addresses", 1.0).await;
    assert_eq!(gauge(&proxy, "identity_index_pods").await, 2.0);
    // Unlabelled: leaves the selection, so the watch reports it deleted.
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {CLIENT_LABEL: null}}})),
    )
    .await
    .unwrap();
    gauge_is(&proxy, "identity_index_pods", 1.0).await;
    assert_eq!(gauge(&proxy, "identity_index_addresses").await, 0.0);
    pods.delete("b", &DeleteParams::default()).await.unwrap();
    gauge_is(&proxy, "identity_index_pods", 0.0).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        admin_get(proxy.admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
}
