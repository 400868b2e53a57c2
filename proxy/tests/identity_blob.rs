//! `from:` on blob gateway virtual accounts (issue 14): the calling pod is a second factor
//! beside the client key. Against a real kube-apiserver: pods are created through the API
//! with loopback addresses as their `status.podIPs`, and each client binds its source
//! address to its pod's. A refused request gets 403 `AuthorizationFailure` with the reason
//! and never reaches the upstream. Without the kube-apiserver binary the test prints one
//! skip line (see `egress-gate-apiserver`).
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use common::{admin_get, eventually};
use egress_gate_apiserver::ApiServer;
use egress_proxy::blob::shared_key::{AccountKey, sign};
use egress_proxy::{Config, Server};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::net::TcpListener;

/// The key both virtual accounts' clients sign with (the test is about identity, not keys).
const CLIENT_KEY: &str = "Y2xpZW50LWtleS1mb3ItcGctcHJvZC1vbmx5LWF0LXRoZS1nYXRld2F5IQ==";
/// The real account's key; this upstream does not check it.
const REAL_KEY: &str = "cmVhbC1hY2NvdW50LWtleS10aGF0LW5ldmVyLWxlYXZlcy10aGUtZ2F0ZXdheQ==";

/// A plain HTTP upstream that answers every request 200 and counts them.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let count = hits.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("blob"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// Creates pod `name` of CNPG cluster `cluster`, labelled as the webhook would, and gives
/// it `ip` through the status subresource (there is no kubelet).
async fn cnpg_pod(pods: &Api<Pod>, name: &str, cluster: &str, ip: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"egress-gate.io/client": "true", "cnpg.io/cluster": cluster}},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/c"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})),
    )
    .await
    .unwrap();
}

/// A signed GET of `/account/pgbackups/base.tar` from source address `src`: the status,
/// `x-ms-error-code` and body.
async fn get_from(gateway: SocketAddr, src: &str, account: &str) -> (u16, String, String) {
    let path = format!("/{account}/pgbackups/base.tar");
    let (mut parts, ()) = http::Request::builder()
        .method("GET")
        .uri(&path)
        .header("x-ms-date", httpdate::fmt_http_date(SystemTime::now()))
        .header("x-ms-version", "2021-08-06")
        .body(())
        .unwrap()
        .into_parts();
    sign(
        &mut parts,
        account,
        &AccountKey::from_base64(CLIENT_KEY).unwrap(),
    )
    .unwrap();
    let client = reqwest::Client::builder()
        .local_address(src.parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{gateway}{path}"))
        .headers(parts.headers)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let code = r
        .headers()
        .get("x-ms-error-code")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, code, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_account_with_from_serves_only_the_workloads_it_names() {
    let Some(api) = ApiServer::shared() else {
        return;
    };
    let ns = api.namespace("egb4-blob").await;
    let pods: Api<Pod> = Api::namespaced(api.client(), &ns);
    cnpg_pod(&pods, "pg-a-1", "pg-a", "127.0.0.2").await;
    cnpg_pod(&pods, "pg-b-1", "pg-b", "127.0.0.3").await;
    let (up, hits) = counting_upstream().await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client.key"), CLIENT_KEY).unwrap();
    std::fs::write(dir.path().join("real.key"), REAL_KEY).unwrap();
    let d = dir.path().display();
    let port = up.port();
    let account = |name: &str, from: &str| {
        format!(
            "    - name: {name}\n      clientKeyFile: {d}/client.key\n      containers: [pgbackups]\n      permissions: [read]\n      upstream: {{endpoint: 'http://127.0.0.1:{port}/realacct', account: realacct, sharedKeyFile: {d}/real.key}}\n{from}"
        )
    };
    let yaml = format!(
        "listen: 127.0.0.1:0\nadminListen: 127.0.0.1:0\nidentity:\n  namespaces: [{ns}]\n  unknownWait: 300ms\n  unidentified: global\nallow:\n  - cidrs: [127.0.0.1/32]\n    ports: [{port}]\nblob:\n  listen: 127.0.0.1:0\n  accounts:\n{}{}",
        account(
            "pg-a",
            &format!(
                "      from:\n        - namespaces: [{ns}]\n          podLabels: {{cnpg.io/cluster: pg-a}}\n"
            )
        ),
        account("shared", ""),
    );
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind_with_client(&config, Some(api.client()))
        .await
        .unwrap();
    let gateway = server.blob_addrs().0.unwrap();
    let admin = server.admin_addr().unwrap();
    let _task = tokio::spawn(server.run());
    eventually("ready after the first pod list", || async {
        admin_get(admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;

    // The pod the account's from: selects.
    let (status, code, body) = get_from(gateway, "127.0.0.2", "pg-a").await;
    assert_eq!((status, body.as_str()), (200, "blob"), "{code}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Same key, another pod: refused with the reason, nothing upstream.
    let (status, code, body) = get_from(gateway, "127.0.0.3", "pg-a").await;
    assert_eq!((status, code.as_str()), (403, "AuthorizationFailure"));
    assert!(body.contains("<Code>AuthorizationFailure</Code>"), "{body}");
    assert!(
        body.contains(&format!("pod {ns}/pg-b-1 (service account default) is not among the workloads account pg-a admits")),
        "{body}"
    );
    // An address no pod holds (after the wait): not one pod, so never admitted by from:.
    let (status, code, body) = get_from(gateway, "127.0.0.4", "pg-a").await;
    assert_eq!((status, code.as_str()), (403, "AuthorizationFailure"));
    assert!(
        body.contains("is not one pod (identity: unknown)"),
        "{body}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a refusal reached the upstream"
    );

    // An account without from: keeps serving every key holder (unidentified: global).
    for src in ["127.0.0.3", "127.0.0.4"] {
        let (status, code, _) = get_from(gateway, src, "shared").await;
        assert_eq!(status, 200, "{src}: {code}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    // The pod gains the label: admitted from its next connection on.
    pods.patch(
        "pg-b-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"cnpg.io/cluster": "pg-a"}}})),
    )
    .await
    .unwrap();
    eventually("pg-b-1 admitted once relabelled", || async {
        get_from(gateway, "127.0.0.3", "pg-a").await.0 == 200
    })
    .await;
}

#[test]
fn from_on_an_account_needs_the_identity_section_and_valid_entries() {
    let yaml = |extra: &str, from: &str| {
        format!(
            "{extra}blob:\n  listen: 127.0.0.1:0\n  accounts:\n    - name: pg-a\n      clientKeyFile: /k\n      containers: [pgbackups]\n      permissions: [read]\n      upstream: {{endpoint: 'https://a.blob.core.windows.net', account: a, sharedKeyFile: /r}}\n      from: {from}\n"
        )
    };
    let err = |y: String| Config::parse(&y, "t").unwrap_err().to_string();
    let e = err(yaml("", "[{namespaces: [db-a]}]"));
    assert!(
        e.contains("`blob.accounts[0].from`: needs the identity: section"),
        "{e}"
    );
    let e = err(yaml("identity: {}\n", "[{}]"));
    assert!(e.contains("`blob.accounts[0].from[0]`"), "{e}");
    let e = err(yaml("identity: {}\n", "[{serviceAccounts: [velero]}]"));
    assert!(
        e.contains("`blob.accounts[0].from[0].serviceAccounts[0]`"),
        "{e}"
    );
    let e = err(yaml(
        "identity: {namespaces: [db-a]}\n",
        "[{namespaces: [db-b]}]",
    ));
    assert!(e.contains("not in identity.namespaces"), "{e}");
    assert!(Config::parse(&yaml("identity: {}\n", "[{namespaces: [db-a]}]"), "t").is_ok());
}
