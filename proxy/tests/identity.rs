//! Workload identity against a real kube-apiserver (issue 14): the pod watch feeds the
//! index, the proxy is not ready (and answers CONNECTs 503 with Retry-After) until the first
//! full list, and only labelled, addressed, unfinished pods claim addresses.
//!
//! Pods are created through the API and given loopback addresses through the status
//! subresource; there is no kubelet, so nothing else touches them. Needs the kube-apiserver
//! binary (see `egress-gate-apiserver`); without it these tests print one skip line.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

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
    create(pods, json!({"name": name, "labels": labels}), json!({})).await;
}

/// Creates a client pod of CNPG cluster `cluster` holding `ip` (through the status
/// subresource, as the kubelet would set it).
async fn cnpg_pod(pods: &Api<Pod>, name: &str, cluster: &str, ip: &str) {
    let labels = json!({ CLIENT_LABEL: "true", "cnpg.io/cluster": cluster });
    // Bound to a node, so that a delete is graceful (the pod terminates) as on a real one.
    create(
        pods,
        json!({"name": name, "labels": labels}),
        json!({"nodeName": "egh14-node"}),
    )
    .await;
    set_status(
        pods,
        name,
        json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}),
    )
    .await;
}

async fn create(pods: &Api<Pod>, metadata: serde_json::Value, spec: serde_json::Value) {
    let mut pod_spec = json!({"containers": [{"name": "c", "image": "registry.invalid/c"}]});
    if let (Some(to), Some(from)) = (pod_spec.as_object_mut(), spec.as_object()) {
        to.extend(from.clone());
    }
    let pod: Pod = serde_json::from_value(json!({"metadata": metadata, "spec": pod_spec})).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

/// CONNECTs to `host:port` from source address `src` and returns the status line and the
/// reason header ("200" alone for a tunnel).
async fn connect_from(proxy: std::net::SocketAddr, src: &str, host: &str, port: u16) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(proxy).await.unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(
        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    if head == ESTABLISHED {
        return "200".into();
    }
    let status = head.lines().next().unwrap_or_default().to_owned();
    let reason = head
        .lines()
        .find_map(|l| l.strip_prefix("X-Egress-Gate-Reason: "))
        .unwrap_or_default();
    format!("{status} {reason}")
}

/// The test policy: `ACCT` only for CNPG cluster pg-a in `ns`, `shared.` for everyone.
fn identity_policy(ns: &str, port: u16, unknown_wait: &str) -> String {
    format!(
        "headTimeout: 2s\nconnectTimeout: 1s\nidentity:\n  namespaces: [{ns}]\n  unknownWait: {unknown_wait}\nallow:\n  - host: {ACCT}\n    ports: [{port}]\n    cidrs: [127.0.0.0/8]\n    from:\n      - namespaces: [{ns}]\n        podLabels: {{cnpg.io/cluster: pg-a}}\n  - host: shared.blob.core.windows.net\n    ports: [{port}]\n    cidrs: [127.0.0.0/8]\nhosts:\n  {ACCT}: [127.0.0.1]\n  shared.blob.core.windows.net: [127.0.0.1]\n"
    )
}

async fn ready(proxy: &Proxy) {
    eventually("ready after the first list", || async {
        admin_get(proxy.admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
}

const SHARED: &str = "shared.blob.core.windows.net";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_is_judged_as_the_pod_it_comes_from() {
    let Some(api) = ApiServer::shared() else {
        return;
    };
    let ns = api.namespace("egh14-decide").await;
    let pods: Api<Pod> = Api::namespaced(api.client(), &ns);
    cnpg_pod(&pods, "pg-a-1", "pg-a", "127.0.0.2").await;
    cnpg_pod(&pods, "pg-b-1", "pg-b", "127.0.0.3").await;
    let up = echo_upstream().await;
    let port = up.addr.port();
    let proxy = proxy_with(&identity_policy(&ns, port, "1s"), api.client()).await;
    ready(&proxy).await;

    // The pod the rule's from: selects, and one it does not.
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.2", ACCT, port).await,
        "200"
    );
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.3", ACCT, port).await,
        "HTTP/1.1 403 Forbidden workload-not-allowed"
    );
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.3", SHARED, port).await,
        "200"
    );

    // An address no pod holds: refused once the wait is over, even for a rule without from:.
    let t0 = Instant::now();
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.9", SHARED, port).await,
        "HTTP/1.1 403 Forbidden unidentified-client"
    );
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());

    // A pod that gets its address while its first connection waits is let through.
    let addr = proxy.addr;
    let waiting = tokio::spawn(async move { connect_from(addr, "127.0.0.5", ACCT, port).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    cnpg_pod(&pods, "pg-a-2", "pg-a", "127.0.0.5").await;
    assert_eq!(waiting.await.unwrap(), "200");

    // The address reuse race: a new pod claims 127.0.0.2 while the old one still holds it.
    // Neither is named until the old one is gone, then the new one is judged as itself.
    cnpg_pod(&pods, "pg-b-2", "pg-b", "127.0.0.2").await;
    eventually("127.0.0.2 ambiguous", || async {
        connect_from(proxy.addr, "127.0.0.2", ACCT, port).await
            == "HTTP/1.1 403 Forbidden unidentified-client"
    })
    .await;
    pods.delete(
        "pg-a-1",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually("127.0.0.2 is pg-b-2", || async {
        connect_from(proxy.addr, "127.0.0.2", ACCT, port).await
            == "HTTP/1.1 403 Forbidden workload-not-allowed"
    })
    .await;

    // A terminating pod keeps its identity (a primary archiving its last WAL segment).
    pods.delete("pg-a-2", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = pods.get("pg-a-2").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    // Watch events arrive in order: once a pod created after the delete is indexed, the
    // proxy has seen the pod terminating.
    let before = gauge(&proxy, "identity_index_pods").await;
    create_pod(&pods, "sentinel", true).await;
    gauge_is(&proxy, "identity_index_pods", before + 1.0).await;
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.5", ACCT, port).await,
        "200"
    );
    // Once the pod finishes, its address is no longer its identity.
    set_status(&pods, "pg-a-2", json!({"phase": "Succeeded"})).await;
    eventually("a finished pod gives up its address", || async {
        connect_from(proxy.addr, "127.0.0.5", ACCT, port).await
            == "HTTP/1.1 403 Forbidden unidentified-client"
    })
    .await;
    assert!(up.accepted() >= 4);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_keeps_the_last_index_serving() {
    // A pair of its own: this test stops it.
    let Some(api) = ApiServer::start().unwrap() else {
        return;
    };
    let ns = api.namespace("egh14-outage").await;
    let pods: Api<Pod> = Api::namespaced(api.client(), &ns);
    cnpg_pod(&pods, "pg-a-1", "pg-a", "127.0.0.2").await;
    let up = echo_upstream().await;
    let port = up.addr.port();
    let proxy = proxy_with(&identity_policy(&ns, port, "200ms"), api.client()).await;
    ready(&proxy).await;
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.2", ACCT, port).await,
        "200"
    );

    drop(api);
    eventually("the outage shows as staleness", || async {
        gauge(&proxy, "identity_staleness_seconds").await >= 1.0
    })
    .await;
    // Still ready, still judging by the last complete index.
    assert!(
        admin_get(proxy.admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.2", ACCT, port).await,
        "200"
    );
    assert_eq!(
        connect_from(proxy.addr, "127.0.0.3", ACCT, port).await,
        "HTTP/1.1 403 Forbidden unidentified-client"
    );
    assert_eq!(gauge(&proxy, "identity_synced").await, 1.0);
}

/// The binary as deployed: it finds the API server through `KUBECONFIG` (in a pod, through
/// its service account), and its access log names the calling pod and the deciding rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_uses_kubeconfig_and_logs_who_called() {
    use tokio::io::AsyncBufReadExt;
    let Some(api) = ApiServer::shared() else {
        return;
    };
    let ns = api.namespace("egh14-binary").await;
    let pods: Api<Pod> = Api::namespaced(api.client(), &ns);
    cnpg_pod(&pods, "pg-a-1", "pg-a", "127.0.0.6").await;
    let up = echo_upstream().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, identity_policy(&ns, port, "200ms")).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", api.kubeconfig())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_line = async |message: &str| loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no log line {message:?}"))
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"].as_str().is_some_and(|m| m.contains(message)) {
            return v;
        }
    };
    let started = next_line("egress-proxy listening").await;
    let addr: std::net::SocketAddr = started["listen"].as_str().unwrap().parse().unwrap();
    next_line("identity: pod list complete").await;

    assert_eq!(connect_from(addr, "127.0.0.6", ACCT, port).await, "200");
    let allowed = next_line("tunnel").await;
    assert_eq!(allowed["identity"], "pod");
    assert_eq!(allowed["src_namespace"], ns.as_str());
    assert_eq!(allowed["src_pod"], "pg-a-1");
    assert_eq!(allowed["src_sa"], format!("{ns}/default").as_str());
    assert_eq!(allowed["rule"], "allow[0]");

    assert_eq!(
        connect_from(addr, "127.0.0.7", SHARED, port).await,
        "HTTP/1.1 403 Forbidden unidentified-client"
    );
    let refused = next_line("tunnel").await;
    assert_eq!(refused["identity"], "unknown");
    assert_eq!(refused["src_pod"], "-");
    assert_eq!(refused["reason"], "unidentified-client");
}

/// With identity on, a pod's open connections are counted together, whichever of its
/// addresses (IPv4 or IPv6) they come from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_connections_are_limited_across_its_addresses() {
    let Some(api) = ApiServer::shared() else {
        return;
    };
    let ns = api.namespace("egh14-limit").await;
    let pods: Api<Pod> = Api::namespaced(api.client(), &ns);
    cnpg_pod(&pods, "pg-a-1", "pg-a", "127.0.0.8").await;
    set_status(
        &pods,
        "pg-a-1",
        json!({"podIPs": [{"ip": "127.0.0.8"}, {"ip": "::1"}]}),
    )
    .await;
    let up = echo_upstream().await;
    let port = up.addr.port();
    // Dual-stack listener, so the pod's IPv6 address can reach it too.
    let yaml = format!(
        "listen: '[::]:0'\nadminListen: 127.0.0.1:0\nperSource: {{maxConnections: 2}}\n{}",
        identity_policy(&ns, port, "200ms")
    );
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind_with_client(&config, Some(api.client()))
        .await
        .unwrap();
    let port_proxy = server.proxy_addr().unwrap().port();
    let admin = server.admin_addr().unwrap();
    tokio::spawn(server.run());
    eventually("ready", || async {
        admin_get(admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
    let open = |src: &'static str| async move {
        let (socket, proxy) = if src.contains(':') {
            (
                tokio::net::TcpSocket::new_v6().unwrap(),
                format!("[::1]:{port_proxy}"),
            )
        } else {
            (
                tokio::net::TcpSocket::new_v4().unwrap(),
                format!("127.0.0.1:{port_proxy}"),
            )
        };
        let src: std::net::IpAddr = src.parse().unwrap();
        socket.bind(std::net::SocketAddr::new(src, 0)).unwrap();
        let mut s = socket.connect(proxy.parse().unwrap()).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        (head, s)
    };
    let (a, _held_a) = open("127.0.0.8").await;
    assert_eq!(a, ESTABLISHED);
    let (b, _held_b) = open("::1").await;
    assert_eq!(b, ESTABLISHED);
    // Each address has one connection open, under its own limit of two; the pod has two.
    let (c, _) = open("127.0.0.8").await;
    assert!(
        c.starts_with("HTTP/1.1 429 Too Many Requests\r\nX-Egress-Gate-Reason: workload-connection-limit\r\nRetry-After: 5\r\n"),
        "{c}"
    );
    drop(_held_b);
    eventually("a slot freed by the pod's IPv6 connection", || async {
        open("127.0.0.8").await.0 == ESTABLISHED
    })
    .await;
}
