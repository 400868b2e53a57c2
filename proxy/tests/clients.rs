//! Real clients through the proxy to a real rustls HTTPS server: curl (HTTP/1.1 and
//! HTTP/1.0 CONNECT, and through the proxy's own TLS listener), Python's http.client (what
//! barman-cloud on Python 3.11 uses) and reqwest. Each completes an HTTPS request and checks
//! the server certificate against a test CA, so the bytes went through the tunnel untouched.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tokio::process::Command;

/// An HTTPS upstream for `ACCT`, a proxy allowing it, and the CA file on disk.
async fn setup_https(extra: &str) -> (Upstream, Proxy, TestPki, std::path::PathBuf) {
    let pki = pki(&[ACCT, "127.0.0.1"]);
    let up = https_upstream(&pki).await;
    let dir = temp_dir("clients");
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), &pki.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &pki.key_pem).unwrap();
    let p = proxy(&format!("{extra}{}", policy(up.addr.port()))).await;
    (up, p, pki, dir)
}

async fn curl(args: &[&str], env: &[(&str, String)]) -> String {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10"]).args(args);
    for var in [
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .await
        .expect("curl is installed (scripts/test-deps.sh)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn curl_with_https_proxy_env_completes_an_https_request() {
    let (up, p, _pki, dir) = setup_https("").await;
    let url = format!(
        "https://{ACCT}:{}/container?restype=container",
        up.addr.port()
    );
    let ca = dir.join("ca.pem");
    let body = curl(
        &["--cacert", ca.to_str().unwrap(), &url],
        &[("https_proxy", format!("http://{}", p.addr))],
    )
    .await;
    assert_eq!(body, HELLO);
    // The HTTP/1.0 CONNECT form, as Python 3.11 sends it.
    let body = curl(
        &[
            "--cacert",
            ca.to_str().unwrap(),
            "--proxy1.0",
            &p.addr.to_string(),
            &url,
        ],
        &[],
    )
    .await;
    assert_eq!(body, HELLO);
    assert_eq!(up.accepted(), 2);
}

#[tokio::test]
async fn curl_through_the_tls_listener() {
    let dir = temp_dir("tls-listener");
    let (up, p, _pki, dir2) = {
        // The proxy's own certificate is issued by the same test CA, for 127.0.0.1.
        let pki = pki(&[ACCT, "127.0.0.1"]);
        let up = https_upstream(&pki).await;
        for (name, pem) in [
            ("ca.pem", &pki.ca_pem),
            ("cert.pem", &pki.cert_pem),
            ("key.pem", &pki.key_pem),
        ] {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        let tls = format!(
            "tls:\n  listen: 127.0.0.1:0\n  certFile: {}\n  keyFile: {}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        );
        let p = proxy(&format!("{tls}{}", policy(up.addr.port()))).await;
        (up, p, pki, dir.clone())
    };
    let ca = dir2.join("ca.pem");
    let tls_addr = p.tls.unwrap();
    let body = curl(
        &[
            "--proxy",
            &format!("https://{tls_addr}"),
            "--proxy-cacert",
            ca.to_str().unwrap(),
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://{ACCT}:{}/", up.addr.port()),
        ],
        &[],
    )
    .await;
    assert_eq!(body, HELLO);
    // The plain listener keeps working beside it.
    drop(open_tunnel(p.addr, up.addr.port()).await);
}

#[tokio::test]
async fn python_http_client_http10_connect() {
    let (up, p, _pki, dir) = setup_https("").await;
    // Python 3.11's http.client sends `CONNECT host:port HTTP/1.0` and no Host header.
    let script = format!(
        r#"
import http.client, ssl
ctx = ssl.create_default_context(cafile={ca:?})
c = http.client.HTTPSConnection("127.0.0.1", {pport}, context=ctx, timeout=10)
c.set_tunnel("{ACCT}", {uport})
c.request("GET", "/")
print(c.getresponse().read().decode(), end="")
"#,
        ca = dir.join("ca.pem").display().to_string(),
        pport = p.addr.port(),
        uport = up.addr.port(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .await
        .expect("python3 is installed (scripts/test-deps.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), HELLO);
}

#[tokio::test]
async fn reqwest_with_proxy_completes_an_https_request() {
    let (up, p, pki, _dir) = setup_https("").await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .proxy(reqwest::Proxy::https(format!("http://{}", p.addr)).unwrap())
        .build()
        .unwrap();
    let url = format!("https://{ACCT}:{}/", up.addr.port());
    for _ in 0..3 {
        let resp = client.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), HELLO);
    }
    assert!(up.accepted() >= 1);
    // A name the policy does not allow fails in the client (hyper reports a non-200 CONNECT
    // answer as TunnelUnsuccessful without the status) and nothing is dialled.
    let before = up.accepted();
    let err = client
        .get(format!("https://example.com:{}/", up.addr.port()))
        .send()
        .await
        .unwrap_err();
    assert!(format!("{err:?}").contains("TunnelUnsuccessful"), "{err:?}");
    assert_eq!(up.accepted(), before);
}
