//! Test harness: a test CA, the real `egress-webhook serve` binary on loopback, and clients
//! that speak to it as the API server does (TLS with SNI `<service>.<namespace>.svc`, ALPN
//! `h2, http/1.1`, `POST /mutate?timeout=5s`).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The name the API server uses to reach the webhook Service.
pub const SERVICE_NAME: &str = "egress-webhook.egress-gate.svc";

/// A CA that issues serving certificates for the webhook Service.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A serving certificate and key (PEM) for the webhook Service names.
    pub fn serving(&self) -> (String, String, CertificateDer<'static>) {
        // 127.0.0.1 too: a real API server calls a webhook registered by URL
        // (`https://127.0.0.1:PORT/mutate`) and checks the address against the certificate.
        let params = CertificateParams::new(vec![
            "egress-webhook".to_string(),
            "egress-webhook.egress-gate".to_string(),
            SERVICE_NAME.to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }
}

/// Writes a cert/key pair the way the kubelet lays out a Secret volume: files are symlinks
/// through `..data`, which is swapped atomically to publish a new version.
pub fn publish_pair(dir: &Path, version: u32, cert: &str, key: &str) {
    let versioned = dir.join(format!("..v{version}"));
    std::fs::create_dir_all(&versioned).unwrap();
    std::fs::write(versioned.join("tls.crt"), cert).unwrap();
    std::fs::write(versioned.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

/// The real binary, started on loopback with ephemeral ports.
pub struct Webhook {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub cert_der: CertificateDer<'static>,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Webhook {
    pub fn start(config: Option<&str>) -> Self {
        Self::start_with(config, &[])
    }

    /// Starts the binary outside any cluster, even when the tests run in a pod.
    pub fn start_with(config: Option<&str>, extra_args: &[&str]) -> Self {
        Self::start_env(config, extra_args, &[("KUBERNETES_SERVICE_HOST", "")])
    }

    /// Starts the binary with `env` added to (or, with an empty value, removed from) the
    /// test's environment.
    pub fn start_env(config: Option<&str>, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("egress-gate test CA");
        let (cert, key, cert_der) = ca.serving();
        let tls_dir = dir.path().join("tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        publish_pair(&tls_dir, 1, &cert, &key);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_egress-webhook"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--tls-cert")
        .arg(tls_dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(tls_dir.join("tls.key"))
        .args(extra_args);
        if let Some(config) = config {
            let path = dir.path().join("config").join("webhook.yaml");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, config).unwrap();
            cmd.arg("--config").arg(path);
        }
        for (name, value) in env {
            if value.is_empty() {
                cmd.env_remove(name);
            } else {
                cmd.env(name, value);
            }
        }
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "serving admission reviews"
                {
                    let _ = tx.send((
                        v["listen"].as_str().unwrap().parse().unwrap(),
                        v["admin"].as_str().unwrap().parse().unwrap(),
                    ));
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (addr, admin) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("webhook did not start");
        Self {
            child,
            addr,
            admin,
            dir,
            ca,
            cert_der,
            logs,
        }
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config").join("webhook.yaml")
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// GET on the admin port: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let tcp = TcpStream::connect(self.admin).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// The value of one metric sample line (`name{labels}`), if present.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines().find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS connection to the webhook as the API server opens it.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVICE_NAME).unwrap(), tcp)
        .await
        .unwrap()
}

/// The certificate the server presented on a connection.
pub fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// A response: status, content type, body.
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
}

fn request(body: Vec<u8>) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post("/mutate?timeout=5s")
        .header("host", SERVICE_NAME)
        .header("content-type", "application/json")
        .header("accept", "application/json, */*")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn answer(resp: hyper::Response<hyper::body::Incoming>) -> Answer {
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        content_type,
        body,
    }
}

/// An HTTP/1.1 keep-alive client on one TLS connection.
pub struct H1 {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    pub cert: CertificateDer<'static>,
    pub alpn: Option<Vec<u8>>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr, ca: &CertificateDer<'static>) -> Self {
        let tls = tls_connect(addr, ca, &[b"http/1.1"]).await;
        let cert = peer_cert(&tls);
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self { send, cert, alpn }
    }

    pub async fn post(&mut self, body: Vec<u8>) -> Answer {
        self.send.ready().await.unwrap();
        answer(self.send.send_request(request(body)).await.unwrap()).await
    }

    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }
}

/// An HTTP/2 client on one TLS connection, negotiated through ALPN as the API server does.
pub struct H2 {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    pub alpn: Option<Vec<u8>>,
}

impl H2 {
    pub async fn connect(addr: SocketAddr, ca: &CertificateDer<'static>) -> Self {
        let tls = tls_connect(addr, ca, &[b"h2", b"http/1.1"]).await;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        Self { send, alpn }
    }

    pub async fn post(&mut self, body: Vec<u8>) -> Answer {
        self.send.ready().await.unwrap();
        answer(self.send.send_request(request(body)).await.unwrap()).await
    }
}

/// An AdmissionReview for a pod CREATE, shaped like the API server's.
pub fn review_body(uid: &str, namespace: &str, pod: &Value, dry_run: bool) -> Vec<u8> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:cnpg-system:cnpg-manager", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
    .to_string()
    .into_bytes()
}

pub fn fixture(name: &str) -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/pods/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
