//! The support crate against itself: the shared server answers, kubectl can use its
//! kubeconfig, ServiceAccount tokens are bound by RBAC, and a dedicated server leaves
//! nothing behind when dropped.
#![allow(clippy::unwrap_used)]

use egress_gate_apiserver::ApiServer;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, ListParams, PostParams};

#[tokio::test]
async fn shared_server_serves_a_namespace_per_test() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let a = server.namespace("lifecycle").await;
    let b = server.namespace("lifecycle").await;
    assert_ne!(a, b);
    let maps: Api<ConfigMap> = Api::namespaced(server.client(), &a);
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("probe".into());
    maps.create(&PostParams::default(), &cm).await.unwrap();
    assert!(maps.get_opt("probe").await.unwrap().is_some());
    let other: Api<ConfigMap> = Api::namespaced(server.client(), &b);
    assert!(other.get_opt("probe").await.unwrap().is_none());
}

#[tokio::test]
async fn kubectl_reads_the_admin_kubeconfig() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let ns = server.namespace("kubectl").await;
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .args(["get", "namespace", &ns, "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("namespace/{ns}")
    );
}

#[tokio::test]
async fn service_account_tokens_carry_only_their_rbac() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let ns = server.namespace("rbac").await;
    let token = server.service_account_token(&ns, "nobody").await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(server.client_with_token(&token), &ns);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("a ServiceAccount with no Role listed Secrets: {other:?}"),
    }
    // The same token through a kubeconfig file, as a spawned binary would read it.
    let path = server.kubeconfig_with_token(&token).unwrap();
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&path)
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("system:serviceaccount:{ns}:nobody")
    );
}

#[tokio::test]
async fn metrics_are_readable() {
    let Some(server) = ApiServer::shared() else {
        return;
    };
    let text = server.metrics().await.unwrap();
    assert!(
        text.contains("apiserver_request_total"),
        "{}",
        &text[..text.len().min(500)]
    );
}

#[tokio::test]
async fn a_dedicated_server_takes_extra_flags_and_cleans_up_on_drop() {
    // A later flag overrides the default range: the `kubernetes` Service shows it.
    let builder = ApiServer::builder().arg("--service-cluster-ip-range=10.100.0.0/16");
    let Some(server) = builder.start().unwrap() else {
        return;
    };
    let services: Api<Service> = Api::namespaced(server.client(), "default");
    let deadline = Instant::now() + Duration::from_secs(30);
    let cluster_ip = loop {
        if let Some(svc) = services.get_opt("kubernetes").await.unwrap() {
            break svc.spec.unwrap().cluster_ip.unwrap();
        }
        assert!(Instant::now() < deadline, "no kubernetes Service");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cluster_ip, "10.100.0.1");

    let dir = server.kubeconfig().parent().unwrap().to_path_buf();
    let url = server.url().to_string();
    drop(server);
    assert!(!dir.exists(), "{} left behind", dir.display());
    let port = url.rsplit(':').next().unwrap();
    assert!(
        std::net::TcpListener::bind(format!("127.0.0.1:{port}")).is_ok(),
        "port {port} still bound"
    );
}

#[tokio::test]
async fn a_restart_keeps_the_objects_and_watches_resume() {
    use futures_util::StreamExt as _;
    use kube::runtime::watcher;

    let Some(mut server) = ApiServer::builder().start().unwrap() else {
        return;
    };
    let maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("kept".into());
    maps.create(&PostParams::default(), &cm).await.unwrap();
    let mut events = Box::pin(watcher::watcher(maps.clone(), watcher::Config::default()));
    // The initial list, through to its end.
    while !matches!(events.next().await, Some(Ok(watcher::Event::InitDone))) {}

    // Restart from a blocking thread: the runtime must keep polling the watch meanwhile.
    let server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    assert!(maps.get_opt("kept").await.unwrap().is_some());
    // The watch was cut with the old process; the watcher resumes and sees what follows.
    cm.metadata.name = Some("after".into());
    maps.create(&PostParams::default(), &cm).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.next().await {
                // Resumed where it was cut (Apply), or, when the watcher had to list again
                // (its resource version was refused after the restart), in the new list.
                Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)))
                    if cm.metadata.name.as_deref() == Some("after") =>
                {
                    return;
                }
                // Connection refused while the server restarts: retry as a backoff would,
                // without spinning the test's one thread.
                Some(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => {}
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "the watcher did not resume after the restart");
}
