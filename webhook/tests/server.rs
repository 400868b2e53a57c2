//! The real `egress-webhook serve` binary, spoken to as the API server speaks to it.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

mod support;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use egress_webhook::config::Config;
use egress_webhook::engine::{ClusterFacts, Injector, Operation, PodContext};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn engine_patch_bytes(pod: &Value, namespace: &str) -> Vec<u8> {
    let config = Config::default();
    let injector = Injector::new(&config, &ClusterFacts::from_config(&config));
    let ctx = PodContext {
        namespace,
        operation: Operation::Create,
        services: &[],
    };
    injector
        .review(pod, &ctx)
        .unwrap()
        .patch
        .as_bytes()
        .to_vec()
}

fn response(answer: &Answer) -> Value {
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.content_type, "application/json");
    let v: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    v["response"].clone()
}

fn decoded_patch(response: &Value) -> Vec<u8> {
    assert_eq!(response["patchType"], "JSONPatch");
    BASE64.decode(response["patch"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn h2_review_of_a_cnpg_instance_patches_exactly_what_the_engine_says() {
    let webhook = Webhook::start(None);
    let mut h2 = H2::connect(webhook.addr, &webhook.ca.der()).await;
    assert_eq!(
        h2.alpn.as_deref(),
        Some(&b"h2"[..]),
        "h2 is taken when offered"
    );

    let pod = fixture("cnpg-instance");
    let answer = h2
        .post(review_body(
            "c0ffee00-0000-4000-8000-000000000001",
            "db",
            &pod,
            false,
        ))
        .await;
    let resp = response(&answer);
    assert_eq!(resp["uid"], "c0ffee00-0000-4000-8000-000000000001");
    assert_eq!(resp["allowed"], true);
    let patch_bytes = decoded_patch(&resp);
    assert_eq!(
        patch_bytes,
        engine_patch_bytes(&pod, "db"),
        "patch bytes on the wire"
    );

    // Apply as the API server would, parse as a Pod, and review again: nothing more to do.
    let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    let typed: Pod = serde_json::from_value(patched.clone()).unwrap();
    let postgres = typed
        .spec
        .unwrap()
        .containers
        .into_iter()
        .find(|c| c.name == "postgres")
        .unwrap();
    let env = postgres.env.unwrap();
    let get = |n: &str| {
        env.iter()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        get("HTTPS_PROXY").as_deref(),
        Some("http://egress-proxy.egress-gate.svc.cluster.local:3128")
    );
    assert_eq!(get("NO_PROXY"), get("no_proxy"));

    let again = h2
        .post(review_body(
            "c0ffee00-0000-4000-8000-000000000002",
            "db",
            &patched,
            false,
        ))
        .await;
    assert_eq!(
        std::str::from_utf8(&again.body).unwrap(),
        r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"c0ffee00-0000-4000-8000-000000000002","allowed":true}}"#,
        "reinvocation answers with no patch"
    );
}

#[tokio::test]
async fn http1_keep_alive_serves_many_reviews_on_one_connection() {
    let webhook = Webhook::start(None);
    let mut h1 = H1::connect(webhook.addr, &webhook.ca.der()).await;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    for (i, name) in [
        "velero-install-server",
        "plain-app",
        "generate-name-pod",
        "velero-node-agent",
    ]
    .iter()
    .enumerate()
    {
        let pod = fixture(name);
        let ns = pod["metadata"]["namespace"].as_str().unwrap().to_string();
        let answer = h1
            .post(review_body(&format!("uid-{i}"), &ns, &pod, false))
            .await;
        let resp = response(&answer);
        assert_eq!(resp["uid"], format!("uid-{i}"));
        if *name == "plain-app" {
            assert!(resp.get("patch").is_none());
        } else {
            assert_eq!(
                decoded_patch(&resp),
                engine_patch_bytes(&pod, &ns),
                "{name}"
            );
        }
    }
    assert!(!h1.is_closed());
}

#[tokio::test]
async fn dry_run_generate_name_and_namespace_from_the_request() {
    let webhook = Webhook::start(None);
    let mut h2 = H2::connect(webhook.addr, &webhook.ca.der()).await;
    // A controller's pod: no name, no namespace in the object; the request carries it.
    let mut pod = fixture("cnpg-full-recovery-job");
    pod["metadata"].as_object_mut().unwrap().remove("namespace");
    assert!(pod["metadata"].get("name").is_none());
    let dry = response(&h2.post(review_body("dry", "db", &pod, true)).await);
    let wet = response(&h2.post(review_body("wet", "db", &pod, false)).await);
    assert_eq!(dry["patch"], wet["patch"], "dry run gets the same patch");
    let patch = String::from_utf8(decoded_patch(&dry)).unwrap();
    assert!(
        patch.contains("pg-rw.db"),
        "namespace taken from the request: {patch}"
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = webhook.logs().join("\n");
    let line = logs
        .lines()
        .find(|l| l.contains("\"uid\":\"dry\""))
        .expect("one log line per review");
    let v: Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["pod"], "pg-1-full-recovery-*");
    assert_eq!(v["namespace"], "db");
    assert_eq!(v["profile"], "cnpg");
    assert_eq!(v["decision"], "injected");
    assert_eq!(v["dry_run"], true);
    assert!(v["duration_us"].is_u64());
}

#[tokio::test]
async fn bad_input_gets_clear_http_errors_and_allowed_unchanged_reviews() {
    let webhook = Webhook::start(None);
    let mut h1 = H1::connect(webhook.addr, &webhook.ca.der()).await;

    let answer = h1.post(b"{not json".to_vec()).await;
    assert_eq!(answer.status, 400);
    assert!(answer.content_type.starts_with("text/plain"));
    assert!(String::from_utf8_lossy(&answer.body).starts_with("body is not an AdmissionReview: "));

    let answer = h1
        .post(br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec())
        .await;
    assert_eq!(answer.status, 400);

    // An unparseable pod is admitted as it is, with a warning naming the field.
    let pod = json!({"metadata": {"name": "x", "labels": {"cnpg.io/podRole": "instance"}}, "spec": {"containers": [{"name": "c", "env": {"bad": 1}}]}});
    let resp = response(&h1.post(review_body("bad-pod", "db", &pod, false)).await);
    assert_eq!(resp["allowed"], true);
    assert!(resp.get("patch").is_none());
    assert_eq!(
        resp["warnings"][0],
        "egress-gate: pod not injected: pod field /spec/containers/0/env is not a list"
    );

    // Over 3 MiB: 413, and the same connection serves the next review.
    let mut big = fixture("plain-app");
    big["metadata"]["annotations"] = json!({"blob": "x".repeat(3 * 1024 * 1024)});
    let answer = h1.post(review_body("big", "db", &big, false)).await;
    assert_eq!(answer.status, 413);
    assert!(!h1.is_closed());
    let resp = response(
        &h1.post(review_body("after", "db", &fixture("plain-app"), false))
            .await,
    );
    assert_eq!(resp["uid"], "after");

    assert_eq!(
        webhook
            .metric("egress_webhook_reviews_total{result=\"bad-request\",profile=\"\"}")
            .await,
        Some(2.0)
    );
    assert_eq!(
        webhook
            .metric("egress_webhook_reviews_total{result=\"unparseable\",profile=\"\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn admin_port_reports_health_readiness_and_metrics() {
    let webhook = Webhook::start(None);
    assert_eq!(
        webhook.admin_get("/healthz").await,
        (200, "ok\n".to_string())
    );
    assert_eq!(
        webhook.admin_get("/readyz").await,
        (200, "ready\n".to_string())
    );
    let mut h2 = H2::connect(webhook.addr, &webhook.ca.der()).await;
    response(
        &h2.post(review_body("m1", "db", &fixture("cnpg-instance"), false))
            .await,
    );
    assert_eq!(
        webhook
            .metric("egress_webhook_reviews_total{result=\"patched\",profile=\"cnpg\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        webhook
            .metric("egress_webhook_patch_operations_total")
            .await,
        Some(11.0)
    );
    assert_eq!(
        webhook
            .metric("egress_webhook_review_duration_seconds_count")
            .await,
        Some(1.0)
    );
    assert_eq!(
        webhook.metric("egress_webhook_config_valid").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn rotated_certificate_is_served_to_new_connections_while_old_ones_keep_working() {
    let webhook = Webhook::start(None);
    let mut old = H1::connect(webhook.addr, &webhook.ca.der()).await;
    assert_eq!(old.cert, webhook.cert_der);

    // A broken pair is rejected; the old certificate keeps serving.
    support::publish_pair(&webhook.tls_dir(), 2, "not a certificate", "not a key");
    wait_for_metric(
        &webhook,
        "egress_webhook_tls_reloads_total{result=\"error\"}",
    )
    .await;
    assert_eq!(
        H1::connect(webhook.addr, &webhook.ca.der()).await.cert,
        webhook.cert_der
    );

    // cert-manager style rotation: a new pair under the same CA, swapped in through ..data.
    let (cert, key, new_der) = webhook.ca.serving();
    support::publish_pair(&webhook.tls_dir(), 3, &cert, &key);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = H1::connect(webhook.addr, &webhook.ca.der()).await;
        if fresh.cert == new_der {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resp = response(
        &old.post(review_body(
            "still-here",
            "db",
            &fixture("plain-app"),
            false,
        ))
        .await,
    );
    assert_eq!(
        resp["uid"], "still-here",
        "the connection opened before the rotation still works"
    );
}

async fn wait_for_metric(webhook: &Webhook, sample: &str) {
    for _ in 0..100 {
        if webhook.metric(sample).await.unwrap_or(0.0) >= 1.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("metric {sample} never appeared");
}

#[tokio::test]
async fn config_reload_applies_valid_files_and_keeps_the_old_one_on_errors() {
    let webhook = Webhook::start(Some("proxyURL: http://old-proxy.egress-gate.svc:3128\n"));
    let mut h2 = H2::connect(webhook.addr, &webhook.ca.der()).await;
    let pod = fixture("cnpg-instance");
    let patch = |resp: Value| String::from_utf8(decoded_patch(&resp)).unwrap();
    assert!(
        patch(response(
            &h2.post(review_body("a", "db", &pod, false)).await
        ))
        .contains("old-proxy")
    );

    std::fs::write(webhook.config_path(), "proxyURL: ftp://nope\n").unwrap();
    wait_for_metric(
        &webhook,
        "egress_webhook_config_reloads_total{result=\"error\"}",
    )
    .await;
    assert_eq!(
        webhook.metric("egress_webhook_config_valid").await,
        Some(0.0)
    );
    assert!(
        patch(response(
            &h2.post(review_body("b", "db", &pod, false)).await
        ))
        .contains("old-proxy")
    );
    assert!(
        webhook
            .logs()
            .iter()
            .any(|l| l.contains("proxyURL") && l.contains("rejected")),
        "the log names the key"
    );

    // `discovery` cannot be switched on by a reload: the rest applies, and the log says so.
    std::fs::write(
        webhook.config_path(),
        "proxyURL: http://new-proxy.egress-gate.svc:3128\ndiscovery: true\n",
    )
    .unwrap();
    wait_for_metric(
        &webhook,
        "egress_webhook_config_reloads_total{result=\"ok\"}",
    )
    .await;
    assert_eq!(
        webhook.metric("egress_webhook_config_valid").await,
        Some(1.0)
    );
    assert!(
        patch(response(
            &h2.post(review_body("c", "db", &pod, false)).await
        ))
        .contains("new-proxy")
    );
    let logs = webhook.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("takes effect when the webhook restarts")),
        "{logs:?}"
    );
    assert!(!logs.iter().any(|l| l.contains("no Kubernetes client")));
}

#[tokio::test]
async fn sigterm_fails_readiness_finishes_the_review_in_flight_and_exits() {
    let mut webhook = Webhook::start_with(None, &["--grace-period", "10s"]);
    let body = review_body("in-flight", "db", &fixture("cnpg-instance"), false);
    let mut tls = tls_connect(webhook.addr, &webhook.ca.der(), &[b"http/1.1"]).await;
    let head = format!(
        "POST /mutate?timeout=5s HTTP/1.1\r\nHost: {SERVICE_NAME}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    tls.write_all(&body[..half]).await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    webhook.sigterm();
    let mut not_ready = false;
    for _ in 0..50 {
        if webhook.admin_get("/readyz").await.0 == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(not_ready, "readiness fails on SIGTERM");
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(webhook.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener stops accepting on SIGTERM");

    tls.write_all(&body[half..]).await.unwrap();
    tls.flush().await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw))
        .await
        .expect("connection closed after the response")
        .ok();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\"uid\":\"in-flight\""), "{text}");

    let status = webhook
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after draining");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn discovery_without_a_reachable_cluster_falls_back_to_config_and_serves() {
    let webhook = Webhook::start(Some("discovery: true\nserviceCIDRs: [10.0.0.0/16]\n"));
    let mut ready = false;
    for _ in 0..100 {
        if webhook.admin_get("/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "ready with configured facts only");
    let patch = cnpg_patch(&webhook, "d").await;
    assert!(
        patch.contains("10.0.0.1,kubernetes,kubernetes.default,.svc"),
        "{patch}"
    );
    assert!(
        webhook
            .logs()
            .iter()
            .any(|l| l.contains("no Kubernetes client")),
        "the fallback is logged"
    );
}

#[tokio::test]
async fn without_discovery_no_proxy_still_has_the_api_server_from_the_environment() {
    // What the kubelet sets in an AKS pod: the API server's public name, not an IP.
    let aks = "egress-dns-1a2b3c4d.hcp.westeurope.azmk8s.io";
    let webhook = Webhook::start_env(None, &[], &[("KUBERNETES_SERVICE_HOST", aks)]);
    let patch = cnpg_patch(&webhook, "k").await;
    assert!(
        patch.contains(&format!(
            "localhost,127.0.0.1,::1,{aks},10.96.0.1,kubernetes,"
        )),
        "{patch}"
    );
}

#[tokio::test]
async fn the_default_proxy_url_names_the_webhooks_own_namespace() {
    // What the Deployment passes through POD_NAMESPACE when installed elsewhere.
    let webhook = Webhook::start_env(
        None,
        &[],
        &[
            ("POD_NAMESPACE", "platform-egress"),
            ("KUBERNETES_SERVICE_HOST", ""),
        ],
    );
    let patch = cnpg_patch(&webhook, "n").await;
    assert!(
        patch.contains(r#""value":"http://egress-proxy.platform-egress.svc.cluster.local:3128""#),
        "{patch}"
    );
    assert!(!patch.contains("egress-proxy.egress-gate.svc"), "{patch}");
}

/// The patch the webhook answers for the CNPG instance fixture in namespace `db`, over h2.
async fn cnpg_patch(webhook: &Webhook, uid: &str) -> String {
    let mut h2 = H2::connect(webhook.addr, &webhook.ca.der()).await;
    let resp = response(
        &h2.post(review_body(uid, "db", &fixture("cnpg-instance"), false))
            .await,
    );
    String::from_utf8(decoded_patch(&resp)).unwrap()
}

#[test]
fn self_signed_without_a_cluster_stops_with_a_clear_message() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_egress-webhook"))
        .args([
            "serve",
            "--self-signed",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("self-signed certificates: no Kubernetes client"),
        "{stderr}"
    );
}

#[test]
fn invalid_config_stops_serve_with_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("webhook.yaml");
    std::fs::write(&config, "podCIDRs: [10.244.0.0/33]\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_egress-webhook"))
        .args([
            "serve",
            "--tls-cert",
            "/nonexistent",
            "--tls-key",
            "/nonexistent",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("podCIDRs[0]"));
}

/// A body over the limit on each protocol, as the API server (HTTP/2) and older clients
/// (HTTP/1.1) send it, with hyper's client: 413 with the webhook's message, and the same
/// connection carries the next review. (curl, which used to see no status over HTTP/2, is
/// the next test.)
#[tokio::test]
async fn an_oversized_review_gets_413_and_the_connection_goes_on_over_both_protocols() {
    let webhook = Webhook::start(None);
    let mut big = fixture("plain-app");
    big["metadata"]["annotations"] = json!({"blob": "x".repeat(4 * 1024 * 1024)});
    let big = review_body("big", "db", &big, false);
    let next = || review_body("next", "db", &fixture("plain-app"), false);

    let mut h2 = H2::connect(webhook.addr, &webhook.ca.der()).await;
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    for _ in 0..2 {
        let answer = h2.post(big.clone()).await;
        assert_eq!(answer.status, 413);
        assert!(String::from_utf8_lossy(&answer.body).contains("over 3145728 bytes"));
        assert_eq!(response(&h2.post(next()).await)["uid"], "next");
    }

    let mut h1 = H1::connect(webhook.addr, &webhook.ca.der()).await;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    for _ in 0..2 {
        let answer = h1.post(big.clone()).await;
        assert_eq!(answer.status, 413);
        assert!(!h1.is_closed(), "HTTP/1.1 connection closed after the 413");
        assert_eq!(response(&h1.post(next()).await)["uid"], "next");
    }
    assert_eq!(
        webhook
            .metric("egress_webhook_requests_total{protocol=\"HTTP/2.0\"}")
            .await,
        Some(4.0)
    );
    assert_eq!(
        webhook
            .metric("egress_webhook_requests_total{protocol=\"HTTP/1.1\"}")
            .await,
        Some(4.0)
    );
}

/// Past the drain bound the webhook does not read on: a client that declares such a body
/// gets 413 before sending it, and the HTTP/1.1 connection is closed (it would carry the
/// rest of the body).
#[tokio::test]
async fn a_body_declared_past_the_drain_bound_gets_413_at_once_and_a_closed_connection() {
    let webhook = Webhook::start(None);
    let mut tls = tls_connect(webhook.addr, &webhook.ca.der(), &[b"http/1.1"]).await;
    let head = format!(
        "POST /mutate?timeout=5s HTTP/1.1\r\nhost: {SERVICE_NAME}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        egress_webhook::server::MAX_DRAIN_BYTES + 1
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The server answers and closes without waiting for the body: read to EOF.
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("the server kept the connection open")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 413 "), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
}

/// The report this came from: `curl --http2` with a 4 MiB body saw "Stream error in the
/// HTTP/2 framing layer" and no status (hyper's client copes with a response sent before
/// the upload ends; curl does not). Over both protocols curl must read the 413 and send
/// the next review on the same connection (`num_connects` 0).
#[tokio::test]
async fn curl_reads_the_413_and_reuses_the_connection_over_both_protocols() {
    let webhook = Webhook::start(None);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, webhook.ca.pem()).unwrap();
    let mut big = fixture("plain-app");
    big["metadata"]["annotations"] = json!({"blob": "x".repeat(4 * 1024 * 1024)});
    let big_file = dir.path().join("big.json");
    std::fs::write(&big_file, review_body("big", "db", &big, false)).unwrap();
    let small_file = dir.path().join("small.json");
    std::fs::write(
        &small_file,
        review_body("next", "db", &fixture("plain-app"), false),
    )
    .unwrap();

    let port = webhook.addr.port();
    let url = format!("https://{SERVICE_NAME}:{port}/mutate?timeout=5s");
    let resolve = format!("{SERVICE_NAME}:{port}:127.0.0.1");
    for (protocol, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let request = |file: &std::path::Path| {
            vec![
                protocol.to_string(),
                "-sS".into(),
                "--cacert".into(),
                ca.display().to_string(),
                "--resolve".into(),
                resolve.clone(),
                "-H".into(),
                "content-type: application/json".into(),
                "--data-binary".into(),
                format!("@{}", file.display()),
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{http_code} %{num_connects} %{http_version}\\n".into(),
                url.clone(),
            ]
        };
        let mut args = request(&big_file);
        args.push("--next".into());
        args.extend(request(&small_file));
        let out = std::process::Command::new("curl")
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {protocol}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout,
            format!("413 1 {version}\n200 0 {version}\n"),
            "curl {protocol}: status, new connections, HTTP version per request"
        );
    }
}

#[tokio::test]
async fn certificate_expiry_build_info_and_last_good_reload_are_exported() {
    let webhook = Webhook::start(Some("discovery: false\n"));
    let info = egress_gate_certs::CertInfo::from_der(&webhook.cert_der).unwrap();
    let not_after = info
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert_eq!(
        webhook
            .metric("egress_webhook_certificate_expiry_timestamp_seconds")
            .await,
        Some(not_after)
    );
    let build = format!(
        "egress_webhook_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(webhook.metric(&build).await, Some(1.0));
    assert_eq!(webhook.metric("egress_webhook_ready").await, Some(1.0));
    // Buckets reach the API server's 5 s timeout.
    let (_, text) = webhook.admin_get("/metrics").await;
    assert!(
        text.contains("egress_webhook_review_duration_seconds_bucket{le=\"5.0\"}"),
        "{text}"
    );

    let last = "egress_webhook_config_last_reload_success_timestamp_seconds";
    let started = webhook.metric(last).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!((now - started).abs() < 60.0, "{started} vs {now}");
    // A rejected reload leaves it; a good one moves it (whole seconds: wait past one).
    std::fs::write(webhook.config_path(), "proxyURL: ftp://nope\n").unwrap();
    wait_for_metric(
        &webhook,
        "egress_webhook_config_reloads_total{result=\"error\"}",
    )
    .await;
    assert_eq!(webhook.metric(last).await, Some(started));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(
        webhook.config_path(),
        "discovery: false\nnoProxy: [a.example]\n",
    )
    .unwrap();
    wait_for_metric(
        &webhook,
        "egress_webhook_config_reloads_total{result=\"ok\"}",
    )
    .await;
    assert!(webhook.metric(last).await.unwrap() > started);
}
