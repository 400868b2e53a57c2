//! Shared fixtures for the proxy's integration tests: the real server in-process on
//! 127.0.0.1:0, upstreams that count their accepts, a test CA, raw-socket helpers.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use egress_proxy::{Config, Handle, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The name every test tunnels to; a `hosts` override points it at loopback.
pub const ACCT: &str = "acct.blob.core.windows.net";

/// Upper bound on any single wait in these tests, so a bug fails a test instead of hanging.
pub const WAIT: Duration = Duration::from_secs(10);

/// A proxy running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub handle: Handle,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the real server with `yaml` (listeners forced to 127.0.0.1:0).
pub async fn proxy(yaml: &str) -> Proxy {
    let yaml = format!("listen: 127.0.0.1:0\nadminListen: 127.0.0.1:0\n{yaml}");
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind(&config).await.unwrap();
    Proxy {
        addr: server.proxy_addr().unwrap(),
        admin: server.admin_addr().unwrap(),
        tls: server.tls_addr().map(|a| a.unwrap()),
        handle: server.handle(),
        task: tokio::spawn(server.run()),
    }
}

/// The usual test policy: `*.blob.core.windows.net` on `port`, allowed into 127.0.0.0/8,
/// with `acct.` overridden to 127.0.0.1 and a few names overridden into denied ranges.
pub fn policy(port: u16) -> String {
    format!(
        "headTimeout: 500ms\nconnectTimeout: 1s\nallow:\n  - host: '*.blob.core.windows.net'\n    ports: [{port}]\n    cidrs: [127.0.0.0/8]\nhosts:\n  {ACCT}: [127.0.0.1]\n  metadata.blob.core.windows.net: [169.254.169.254]\n  private.blob.core.windows.net: [10.1.2.3]\n  mapped.blob.core.windows.net: ['::ffff:169.254.169.254']\n"
    )
}

/// A TCP server that counts accepted connections and runs `serve` on each.
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
}

impl Upstream {
    pub fn accepted(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

pub async fn upstream<F, Fut>(serve: F) -> Upstream
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    Upstream { addr, accepts }
}

/// Echoes everything back; passes the client's FIN on after the last byte.
pub async fn echo_upstream() -> Upstream {
    upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// An echo upstream and a proxy with the usual [`policy`] for it.
pub async fn setup() -> (Upstream, Proxy) {
    let up = echo_upstream().await;
    let p = proxy(&policy(up.addr.port())).await;
    (up, p)
}

/// The success answer, exactly.
pub const ESTABLISHED: &str = "HTTP/1.1 200 Connection established\r\n\r\n";

/// Opens a tunnel to [`ACCT`]:`port` and checks the exact 200 answer.
pub async fn open_tunnel(proxy: SocketAddr, port: u16) -> TcpStream {
    let mut s = send(
        proxy,
        format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(read_head(&mut s).await, ESTABLISHED);
    s
}

/// Opens a connection to the proxy and writes `head`.
pub async fn send(proxy: SocketAddr, head: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(head).await.unwrap();
    s
}

/// Reads until the end of a response head (`\r\n\r\n`), byte by byte so that nothing after
/// it is consumed.
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n == 1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&out)
        );
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Sends `head` and returns everything the proxy answers up to its close.
pub async fn refusal(proxy: SocketAddr, head: &str) -> String {
    let mut s = send(proxy, head.as_bytes()).await;
    read_all(&mut s).await
}

/// Reads until EOF.
pub async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The exact error answer the proxy gives for `status`, `reason` and `body`.
pub fn answer(status: &str, reason: &str, body: &str, allow: bool) -> String {
    let allow = if allow { "Allow: CONNECT\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status}\r\nX-Egress-Gate-Reason: {reason}\r\n{allow}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Fetches a path from the admin port.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_all(&mut s).await
}

/// The value of a metric sample line starting with `prefix` (e.g. `egress_proxy_tunnels_active`).
pub async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let text = admin_get(admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Polls until `f` is true or fails the test.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A test CA and a server certificate for `names` (DNS names or IP addresses).
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn pki(names: &[&str]) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "egress-gate test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName((*n).try_into().unwrap()),
        })
        .collect();
    let cert = params.signed_by(&key, &ca).unwrap();
    TestPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A fresh directory for files a test hands to other programs.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "egress-proxy-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A rustls server config from PEM strings.
pub fn server_tls(pki: &TestPki) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    )
}

/// The body every HTTPS upstream answers with.
pub const HELLO: &str = "hello through the tunnel\n";

/// An HTTPS server (rustls) answering every request with [`HELLO`].
pub async fn https_upstream(pki: &TestPki) -> Upstream {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(pki));
    upstream(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match tls.read(&mut b).await {
                    Ok(1) => head.push(b[0]),
                    _ => return,
                }
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HELLO}",
                HELLO.len()
            );
            let _ = tls.write_all(resp.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    })
    .await
}
