//! The blob gateway's keyless upstream modes end to end, with no Azure:
//! - workload identity against a real Azurite in OAuth mode (`--oauth basic`, HTTPS), which
//!   checks every bearer token's issuer, audience and lifetime; the tokens come from a
//!   token endpoint written here that checks the client assertion is the token file's
//!   current content and issues short-lived unsigned JWTs;
//! - a 401 bearer challenge (from a stand-in upstream: Azurite answers 403 instead) leading
//!   to exactly one new token;
//! - managed identity from a stand-in IMDS on loopback: only a stand-in can play IMDS here,
//!   and no test ever connects to the real 169.254.169.254;
//! - the upstream SAS mode against Azurite, which validates the SAS, including a rotation.
//!
//! Azurite is the one the e2e installs (tests/e2e/install.sh). Without it the Azurite tests
//! say so and pass, unless `REQUIRE_AZURITE=1` (set by `make test`, whose test-deps step
//! installs it) or `CI=true`, where they fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as B64URL};
use bytes::Bytes;
use common::{TestPki, pki, server_tls};
use egress_proxy::blob::shared_key::{AccountKey, sign};
use egress_proxy::{Config, Server};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The workload's gateway-only key.
const CLIENT_KEY: &str = "Y2xpZW50LWtleS1mb3ItcGctcHJvZC1vbmx5LWF0LXRoZS1nYXRld2F5IQ==";
/// The real account's key: only Azurite (and, in SAS mode, the test that signs the SAS)
/// knows it; the gateway in bearer mode never does.
const REAL_KEY: &str = "cmVhbC1hY2NvdW50LWtleS10aGF0LW5ldmVyLWxlYXZlcy10aGUtZ2F0ZXdheQ==";
const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "0e8a1ef2-b6a4-4c5e-9b5f-4a4f0b0e0c11";

type Handler = Arc<
    dyn Fn(http::request::Parts, Bytes) -> hyper::Response<Full<Bytes>> + Send + Sync + 'static,
>;

/// An HTTP server on 127.0.0.1:0, TLS when `tls` is given, answering with `handler`.
async fn serve(tls: Option<Arc<rustls::ServerConfig>>, handler: Handler) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let handler = handler.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        Ok::<_, Infallible>(handler(parts, body))
                    }
                });
                let builder = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(socket).await {
                            let _ = builder.serve_connection(TokioIo::new(s), service).await;
                        }
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(socket), service)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An unsigned JWT with the claims Azurite checks (`--oauth basic` does not check the
/// signature); `n` makes every token distinct.
fn jwt(audience: &str, lifetime: u64, n: u64) -> String {
    let now = now_secs();
    let header = B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "aud": audience,
        "iss": format!("https://sts.windows.net/{TENANT}/"),
        "iat": now - 1,
        "nbf": now - 1,
        "exp": now + lifetime,
        "tid": TENANT,
        "appid": CLIENT_ID,
        "n": n,
    });
    let payload = B64URL.encode(claims.to_string());
    format!("{header}.{payload}.{}", B64URL.encode(b"unsigned"))
}

/// One token the endpoint issued.
#[derive(Debug, Clone)]
struct Issued {
    token: String,
    /// The client assertion it was issued for.
    assertion: String,
    /// When, and until when, in Unix seconds.
    at: f64,
    exp: f64,
}

/// The test's Entra token endpoint: `POST /{tenant}/oauth2/v2.0/token` with a
/// client-credentials form whose assertion must equal `token_file`'s current content.
struct TokenEndpoint {
    addr: SocketAddr,
    issued: Arc<Mutex<Vec<Issued>>>,
    /// Requests refused (wrong form or stale assertion), with why.
    refused: Arc<Mutex<Vec<String>>>,
    /// Lifetime of the tokens it issues, seconds.
    lifetime: Arc<AtomicU64>,
}

async fn token_endpoint(tls: Arc<rustls::ServerConfig>, token_file: PathBuf) -> TokenEndpoint {
    let issued = Arc::new(Mutex::new(Vec::<Issued>::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let lifetime = Arc::new(AtomicU64::new(3600));
    let (i, r, l) = (issued.clone(), refused.clone(), lifetime.clone());
    let handler: Handler = Arc::new(move |parts, body| {
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&body).into_owned().collect();
        let current = std::fs::read_to_string(&token_file).unwrap();
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let problems: Vec<String> = [
            (parts.method == "POST", "method"),
            (
                parts.uri.path() == format!("/{TENANT}/oauth2/v2.0/token"),
                "path",
            ),
            (field("grant_type") == "client_credentials", "grant_type"),
            (field("client_id") == CLIENT_ID, "client_id"),
            (
                field("scope") == "https://storage.azure.com/.default",
                "scope",
            ),
            (
                field("client_assertion_type")
                    == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion_type",
            ),
            (
                !field("client_assertion").is_empty(),
                "client_assertion is empty",
            ),
            (
                field("client_assertion") == current.trim(),
                "client_assertion is not the token file's current content",
            ),
        ]
        .into_iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| what.to_owned())
        .collect();
        if !problems.is_empty() {
            r.lock().unwrap().push(problems.join(", "));
            return hyper::Response::builder()
                .status(400)
                .body(Full::new(Bytes::from(
                    r#"{"error":"invalid_client","error_description":"AADSTS700024: test endpoint refused"}"#,
                )))
                .unwrap();
        }
        let ttl = l.load(Ordering::SeqCst);
        let mut issued = i.lock().unwrap();
        let token = jwt("https://storage.azure.com", ttl, issued.len() as u64);
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        issued.push(Issued {
            token: token.clone(),
            assertion: field("client_assertion").to_owned(),
            at,
            exp: at + ttl as f64,
        });
        let answer = serde_json::json!({
            "token_type": "Bearer", "expires_in": ttl, "ext_expires_in": ttl, "access_token": token,
        });
        hyper::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(answer.to_string())))
            .unwrap()
    });
    let addr = serve(Some(tls), handler).await;
    TokenEndpoint {
        addr,
        issued,
        refused,
        lifetime,
    }
}

/// A running Azurite (killed when dropped) holding `realacct` with [`REAL_KEY`].
struct Azurite {
    port: u16,
    _child: tokio::process::Child,
}

/// Where the e2e installed Azurite, if it did.
fn azurite_bin() -> Option<PathBuf> {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("here=$1; source \"$1/cache.sh\"; printf %s \"$azurite_dir\"")
        .arg("cache")
        .arg(&e2e)
        .output()
        .ok()?;
    let bin =
        PathBuf::from(String::from_utf8(out.stdout).ok()?).join("node_modules/.bin/azurite-blob");
    bin.exists().then_some(bin)
}

/// Azurite over HTTPS with OAuth on, or `None` (test skipped) when it is not installed and
/// not required.
async fn azurite(dir: &Path, pki: &TestPki) -> Option<Azurite> {
    let Some(bin) = azurite_bin() else {
        let required = std::env::var("REQUIRE_AZURITE").as_deref() == Ok("1")
            || std::env::var("CI").as_deref() == Ok("true");
        assert!(
            !required,
            "REQUIRE_AZURITE=1 or CI=true, but Azurite is not installed (tests/e2e/install.sh)"
        );
        eprintln!("SKIPPED: Azurite is not installed (run tests/e2e/install.sh)");
        return None;
    };
    std::fs::write(dir.join("az.crt"), &pki.cert_pem).unwrap();
    std::fs::write(dir.join("az.key"), &pki.key_pem).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new(bin)
        .env("AZURITE_ACCOUNTS", format!("realacct:{REAL_KEY}"))
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .args(["--oauth", "basic", "--cert"])
        .arg(dir.join("az.crt"))
        .arg("--key")
        .arg(dir.join("az.key"))
        .args([
            "--inMemoryPersistence",
            "--disableProductStyleUrl",
            "--loose",
            "--skipApiVersionCheck",
            "--disableTelemetry",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Azurite did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some(Azurite {
        port,
        _child: child,
    })
}

/// A gateway with the blob listener on 127.0.0.1:0 and one account `pg-prod` (container
/// `pgbackups`, every permission) whose `upstream:` block is `upstream`; `allow_port` is
/// the one upstream port the policy allows.
struct Gateway {
    base: String,
    admin: SocketAddr,
    _handle: egress_proxy::Handle,
}

async fn gateway(dir: &Path, allow_port: u16, upstream: &str) -> Gateway {
    std::fs::write(dir.join("client.key"), CLIENT_KEY).unwrap();
    let yaml = format!(
        r#"
listen: 127.0.0.1:0
adminListen: 127.0.0.1:0
connectTimeout: 2s
allow:
  - cidrs: [127.0.0.1/32]
    ports: [{allow_port}]
blob:
  listen: 127.0.0.1:0
  accounts:
    - name: pg-prod
      clientKeyFile: {d}/client.key
      containers: [pgbackups]
      permissions: [read, list, write, delete]
      upstream:
{upstream}
"#,
        d = dir.display()
    );
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind(&config).await.unwrap();
    let (plain, _) = server.blob_addrs();
    let admin = server.admin_addr().unwrap();
    let handle = server.handle();
    tokio::spawn(server.run());
    Gateway {
        base: format!("http://{}", plain.unwrap()),
        admin,
        _handle: handle,
    }
}

/// Sends a request signed with the client key, as a storage SDK would.
async fn call(
    gw: &Gateway,
    method: &str,
    path: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) -> (u16, String) {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("x-ms-date", httpdate::fmt_http_date(SystemTime::now()));
    if !extra.iter().any(|(k, _)| *k == "x-ms-version") {
        b = b.header("x-ms-version", "2021-08-06");
    }
    if !body.is_empty() {
        b = b.header("content-length", body.len().to_string());
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let (mut parts, ()) = b.body(()).unwrap().into_parts();
    sign(
        &mut parts,
        "pg-prod",
        &AccountKey::from_base64(CLIENT_KEY).unwrap(),
    )
    .unwrap();
    parts.headers.remove("content-length");
    let r = reqwest::Client::new()
        .request(method.parse().unwrap(), format!("{}{path}", gw.base))
        .headers(parts.headers)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// A Blob Batch sent to `pgbackups` deleting the part paths `paths` (`/pg-prod/pgbackups/x`
/// path style, or `/pgbackups/x` relative to the account, as azure-storage-blob sends them
/// to a host other than localhost), every part signed with the client key as the SDK signs
/// them.
async fn batch_delete(gw: &Gateway, paths: &[&str]) -> (u16, String) {
    use egress_proxy::blob::batch::Batch;
    let boundary = "batch_6f1c2d4e";
    let date = httpdate::fmt_http_date(SystemTime::now());
    let mut body = String::new();
    for (i, path) in paths.iter().enumerate() {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Type: application/http\r\nContent-ID: {i}\r\nContent-Transfer-Encoding: binary\r\n\r\nDELETE {path} HTTP/1.1\r\nx-ms-date: {date}\r\nContent-Length: 0\r\n\r\n\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    let mut batch = Batch::parse(body.as_bytes(), boundary).unwrap();
    let key = AccountKey::from_base64(CLIENT_KEY).unwrap();
    for part in &mut batch.parts {
        sign(&mut part.request, "pg-prod", &key).unwrap();
    }
    let body = batch.to_bytes();
    let content_type = format!("multipart/mixed; boundary={boundary}");
    call(
        gw,
        "POST",
        "/pg-prod/pgbackups?restype=container&comp=batch",
        &body,
        &[("content-type", content_type.as_str())],
    )
    .await
}

/// Everything this test binary logs (INFO and up), from the first call on.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buffer
    })
    .clone()
}

/// A writer into the captured log.
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn workload_identity_against_oauth_azurite_refreshes_and_follows_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls_pki = pki(&["127.0.0.1"]);
    let Some(az) = azurite(d, &tls_pki).await else {
        return;
    };
    std::fs::write(d.join("ca.pem"), &tls_pki.ca_pem).unwrap();
    let token_file = d.join("azure-identity-token");
    std::fs::write(&token_file, "federated-token-1\n").unwrap();
    let entra = token_endpoint(server_tls(&tls_pki), token_file.clone()).await;
    entra.lifetime.store(4, Ordering::SeqCst);
    // The token endpoint's port is not in `allow`: the gateway reaches it as its own call.
    let gw = gateway(
        d,
        az.port,
        &format!(
            "        endpoint: https://127.0.0.1:{az}/realacct\n        account: realacct\n        caFile: {d}/ca.pem\n        workloadIdentity: {{clientId: {CLIENT_ID}, tenantId: {TENANT}, tokenFile: {tf}, authorityHost: 'https://127.0.0.1:{ep}/'}}",
            az = az.port,
            d = d.display(),
            tf = token_file.display(),
            ep = entra.addr.port(),
        ),
    )
    .await;

    let (s, t) = call(&gw, "PUT", "/pg-prod/pgbackups?restype=container", b"", &[]).await;
    assert_eq!(s, 201, "{t}");
    let (s, t) = call(
        &gw,
        "PUT",
        "/pg-prod/pgbackups/wal/0001",
        b"sixteen megabytes, in spirit",
        &[("x-ms-blob-type", "BlockBlob")],
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let (s, t) = call(&gw, "GET", "/pg-prod/pgbackups/wal/0001", b"", &[]).await;
    assert_eq!((s, t.as_str()), (200, "sixteen megabytes, in spirit"));
    assert_eq!(entra.issued.lock().unwrap().len(), 1, "one token so far");

    // Requests for ~9 s, more than two lifetimes: every one passes Azurite's lifetime
    // check, and the rotated token file is what the next exchange sends.
    let start = unix_now();
    let mut rotated = false;
    while unix_now() - start < 9.0 {
        let (s, t) = call(
            &gw,
            "GET",
            "/pg-prod/pgbackups?restype=container&comp=list",
            b"",
            &[],
        )
        .await;
        assert_eq!(s, 200, "{t}");
        if !rotated && unix_now() - start > 3.0 {
            std::fs::write(&token_file, "federated-token-2-after-kubelet-rotation\n").unwrap();
            rotated = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let issued = entra.issued.lock().unwrap().clone();
    assert!(
        entra.refused.lock().unwrap().is_empty(),
        "{:?}",
        entra.refused.lock().unwrap()
    );
    assert!(issued.len() >= 4, "a 4 s token refreshed: {issued:?}");
    for pair in issued.windows(2) {
        assert!(
            pair[1].at < pair[0].exp,
            "refreshed before the previous token expired: {pair:?}"
        );
        // In the background, at half of a 4 s lifetime; fetching only once a token is
        // no longer handed out (3.6 s) would space them further apart.
        assert!(
            pair[1].at - pair[0].at < 3.0,
            "refreshed ahead of time: {pair:?}"
        );
    }
    assert!(
        issued
            .iter()
            .any(|i| i.assertion == "federated-token-2-after-kubelet-rotation"),
        "the rotated token file was sent: {issued:?}"
    );
    assert_eq!(issued[0].assertion, "federated-token-1");
    // Every token is distinct: each exchange is a real one.
    let distinct: HashSet<_> = issued.iter().map(|i| i.token.clone()).collect();
    assert_eq!(distinct.len(), issued.len());

    let ok = common::metric(gw.admin, "egress_proxy_token_refresh_total{result=\"ok\"}").await;
    assert!(ok >= issued.len() as f64 - 1.0, "{ok}");
    let left = common::metric(
        gw.admin,
        &format!(
            "egress_proxy_token_expiry_seconds{{identity=\"workload-identity/{TENANT}/{CLIENT_ID}\"}}"
        ),
    )
    .await;
    assert!(left > 0.0 && left <= 4.0, "seconds to expiry {left}");

    // barman's retention deletes through a Blob Batch: every part carries the bearer token.
    let (s, t) = batch_delete(&gw, &["/pg-prod/pgbackups/wal/0001"]).await;
    assert_eq!(s, 202, "{t}");
    assert!(t.contains("HTTP/1.1 202"), "the part was accepted: {t}");
    let (s, _) = call(&gw, "GET", "/pg-prod/pgbackups/wal/0001", b"", &[]).await;
    assert_eq!(s, 404, "the batch deleted the blob");

    // A token endpoint that refuses: the token in hand keeps serving until it lapses (no
    // outage before then); after that the gateway answers 502 and counts the errors.
    std::fs::write(&token_file, "").unwrap();
    let (s, t) = call(
        &gw,
        "GET",
        "/pg-prod/pgbackups?restype=container&comp=list",
        b"",
        &[],
    )
    .await;
    assert_eq!(s, 200, "the current token still serves: {t}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (s, t) = call(
        &gw,
        "GET",
        "/pg-prod/pgbackups?restype=container&comp=list",
        b"",
        &[],
    )
    .await;
    assert_eq!(s, 502, "{t}");
    assert!(t.contains("AADSTS700024"), "{t}");
    let errors = common::metric(
        gw.admin,
        "egress_proxy_token_refresh_total{result=\"error\"}",
    )
    .await;
    assert!(errors >= 1.0, "{errors}");
}

/// What the bearer stand-in saw: method, path, token, `x-ms-version`.
type SeenBearer = (String, String, String, String);

/// The stand-in upstream for bearer modes: accepts `Bearer <t>` for any token not revoked
/// and answers 401 with Azure's bearer challenge for a revoked one; records what it saw.
struct BearerUpstream {
    addr: SocketAddr,
    revoked: Arc<Mutex<HashSet<String>>>,
    /// Refuse every token.
    reject_all: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<Vec<SeenBearer>>>,
}

async fn bearer_upstream(tls: Arc<rustls::ServerConfig>) -> BearerUpstream {
    let revoked = Arc::new(Mutex::new(HashSet::<String>::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reject_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (r, s, all) = (revoked.clone(), seen.clone(), reject_all.clone());
    let handler: Handler = Arc::new(move |parts, _body| {
        let h = |k: &str| {
            parts
                .headers
                .get(k)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let token = h("authorization")
            .strip_prefix("Bearer ")
            .unwrap_or("")
            .to_owned();
        s.lock().unwrap().push((
            parts.method.to_string(),
            parts.uri.to_string(),
            token.clone(),
            h("x-ms-version"),
        ));
        if token.is_empty() || all.load(Ordering::SeqCst) || r.lock().unwrap().contains(&token) {
            return hyper::Response::builder()
                .status(401)
                .header("www-authenticate", format!("Bearer authorization_uri=https://login.microsoftonline.com/{TENANT}/oauth2/authorize resource_id=https://storage.azure.com"))
                .header("x-ms-error-code", "InvalidAuthenticationInfo")
                .body(Full::new(Bytes::from("expired")))
                .unwrap();
        }
        hyper::Response::builder()
            .status(if parts.method == "PUT" { 201 } else { 200 })
            .body(Full::new(Bytes::from("blob content")))
            .unwrap()
    });
    let addr = serve(Some(tls), handler).await;
    BearerUpstream {
        addr,
        revoked,
        reject_all,
        seen,
    }
}

#[tokio::test]
async fn a_401_bearer_challenge_gets_exactly_one_new_token() {
    let log = captured_log();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls_pki = pki(&["127.0.0.1"]);
    std::fs::write(d.join("ca.pem"), &tls_pki.ca_pem).unwrap();
    let token_file = d.join("token");
    std::fs::write(&token_file, "federated-assertion-7f3a9c").unwrap();
    let entra = token_endpoint(server_tls(&tls_pki), token_file.clone()).await;
    let up = bearer_upstream(server_tls(&tls_pki)).await;
    let gw = gateway(
        d,
        up.addr.port(),
        &format!(
            "        endpoint: https://127.0.0.1:{}/realacct\n        account: realacct\n        caFile: {}/ca.pem\n        workloadIdentity: {{clientId: {CLIENT_ID}, tenantId: {TENANT}, tokenFile: {}, authorityHost: 'https://127.0.0.1:{}'}}",
            up.addr.port(),
            d.display(),
            token_file.display(),
            entra.addr.port()
        ),
    )
    .await;
    let issued = || entra.issued.lock().unwrap().len();
    let last_token = || entra.issued.lock().unwrap().last().unwrap().token.clone();

    // An old client version is raised to the first that takes bearer tokens.
    let (s, _) = call(
        &gw,
        "GET",
        "/pg-prod/pgbackups/a",
        b"",
        &[("x-ms-version", "2015-02-21")],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(issued(), 1);
    assert_eq!(up.seen.lock().unwrap()[0].3, "2017-11-09");
    assert_eq!(up.seen.lock().unwrap()[0].2, last_token());

    // The account revokes the token: one 401, one new token, the retry succeeds.
    up.revoked.lock().unwrap().insert(last_token());
    let (s, t) = call(&gw, "GET", "/pg-prod/pgbackups/a", b"", &[]).await;
    assert_eq!((s, t.as_str()), (200, "blob content"));
    assert_eq!(issued(), 2, "exactly one refresh");
    {
        let seen = up.seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert_ne!(seen[1].2, seen[2].2, "the retry carries the new token");
        assert_eq!(seen[2].2, last_token());
        assert_eq!(seen[2].3, "2021-08-06", "a newer client version is kept");
    }

    // A body that streams cannot be sent twice: the client gets the 401, the token is
    // dropped, and the next request fetches a new one.
    up.revoked.lock().unwrap().insert(last_token());
    let (s, _) = call(
        &gw,
        "PUT",
        "/pg-prod/pgbackups/b",
        b"streamed once",
        &[("x-ms-blob-type", "BlockBlob")],
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(issued(), 2);
    let (s, _) = call(&gw, "GET", "/pg-prod/pgbackups/a", b"", &[]).await;
    assert_eq!(s, 200);
    assert_eq!(issued(), 3);

    // An upstream that refuses every token: one refresh, one retry, then the 401 passes
    // through (no loop).
    let before = up.seen.lock().unwrap().len();
    up.reject_all.store(true, Ordering::SeqCst);
    let (s, _) = call(&gw, "GET", "/pg-prod/pgbackups/a", b"", &[]).await;
    assert_eq!(s, 401);
    assert_eq!(issued(), 4, "one refresh, not a loop");
    assert_eq!(up.seen.lock().unwrap().len(), before + 2);

    // The log tells what happened, and never holds a token or the assertion.
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert!(log.contains("upstream token fetched"), "{log}");
    assert!(log.contains("401 bearer challenge"), "{log}");
    assert!(!log.contains("federated-assertion-7f3a9c"), "{log}");
    for i in entra.issued.lock().unwrap().iter() {
        assert!(!log.contains(&i.token), "a token in the log: {log}");
        let payload = i.token.split('.').nth(1).unwrap();
        assert!(!log.contains(payload), "a token's claims in the log: {log}");
    }
}

#[tokio::test]
async fn managed_identity_from_an_imds_stand_in() {
    // Only a stand-in on loopback can play IMDS in a test; the real 169.254.169.254 is
    // never contacted (the endpoint is always set here).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls_pki = pki(&["127.0.0.1"]);
    std::fs::write(d.join("ca.pem"), &tls_pki.ca_pem).unwrap();
    let asked = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let a = asked.clone();
    let imds = serve(
        None,
        Arc::new(move |parts, _| {
            let metadata = parts
                .headers
                .get("metadata")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            a.lock()
                .unwrap()
                .push((parts.uri.to_string(), metadata.clone()));
            if metadata != "true" {
                return hyper::Response::builder()
                    .status(400)
                    .body(Full::new(Bytes::from(r#"{"error":"invalid_request"}"#)))
                    .unwrap();
            }
            // IMDS sends the numbers as strings.
            let token = jwt("https://storage.azure.com/", 3600, 0);
            let answer = serde_json::json!({"access_token": token, "expires_in": "3599", "expires_on": "1796580000", "resource": "https://storage.azure.com/", "token_type": "Bearer"});
            hyper::Response::builder()
                .body(Full::new(Bytes::from(answer.to_string())))
                .unwrap()
        }),
    )
    .await;
    let up = bearer_upstream(server_tls(&tls_pki)).await;
    let gw = gateway(
        d,
        up.addr.port(),
        &format!(
            "        endpoint: https://127.0.0.1:{}/realacct\n        account: realacct\n        caFile: {}/ca.pem\n        managedIdentity: {{clientId: {CLIENT_ID}, endpoint: 'http://{imds}'}}",
            up.addr.port(),
            d.display(),
        ),
    )
    .await;
    // Eight requests at once before any token exists: one fetch in flight, all served.
    let first = futures_util::future::join_all(
        (0..8).map(|_| call(&gw, "GET", "/pg-prod/pgbackups/a", b"", &[])),
    )
    .await;
    assert!(first.iter().all(|(s, _)| *s == 200), "{first:?}");
    let (s, t) = call(&gw, "GET", "/pg-prod/pgbackups/a", b"", &[]).await;
    assert_eq!(s, 200, "{t}");
    let asked = asked.lock().unwrap().clone();
    assert_eq!(
        asked.len(),
        1,
        "one token, fetched once, then cached: {asked:?}"
    );
    assert_eq!(asked[0].1, "true");
    assert_eq!(
        asked[0].0,
        format!(
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F&client_id={CLIENT_ID}"
        )
    );
    let seen = up.seen.lock().unwrap();
    assert!(seen.iter().all(|s| !s.2.is_empty() && s.0 == "GET"));
}

/// A container SAS for `realacct/pgbackups` signed with the real key (sv 2022-11-02, the
/// string-to-sign Azurite's `generateBlobSASSignature20201206` builds).
fn container_sas(permissions: &str) -> String {
    let expiry = "2099-01-01T00:00:00Z";
    let version = "2022-11-02";
    let string_to_sign = [
        permissions,
        "",
        expiry,
        "/blob/realacct/pgbackups",
        "",
        "",
        "https",
        version,
        "c",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
    ]
    .join("\n");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&BASE64.decode(REAL_KEY).unwrap()).unwrap();
    mac.update(string_to_sign.as_bytes());
    let sig = BASE64.encode(mac.finalize().into_bytes());
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("sv", version)
        .append_pair("spr", "https")
        .append_pair("se", expiry)
        .append_pair("sr", "c")
        .append_pair("sp", permissions)
        .append_pair("sig", &sig);
    q.finish()
}

#[tokio::test]
async fn sas_file_against_azurite_is_re_read_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls_pki = pki(&["127.0.0.1"]);
    let Some(az) = azurite(d, &tls_pki).await else {
        return;
    };
    std::fs::write(d.join("ca.pem"), &tls_pki.ca_pem).unwrap();
    // Azurite needs the container first: made with the real key, outside the gateway.
    let sas_path = d.join("sas");
    std::fs::write(&sas_path, format!("?{}\n", container_sas("racwdl"))).unwrap();
    let gw = gateway(
        d,
        az.port,
        &format!(
            "        endpoint: https://127.0.0.1:{}/realacct\n        account: realacct\n        caFile: {}/ca.pem\n        sasFile: {}",
            az.port,
            d.display(),
            sas_path.display()
        ),
    )
    .await;
    // A container SAS cannot create its container; make it with the real key directly.
    let mut create = http::Request::builder()
        .method("PUT")
        .uri("/realacct/pgbackups?restype=container")
        .header("x-ms-date", httpdate::fmt_http_date(SystemTime::now()))
        .header("x-ms-version", "2021-08-06")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    sign(
        &mut create,
        "realacct",
        &AccountKey::from_base64(REAL_KEY).unwrap(),
    )
    .unwrap();
    let direct = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(tls_pki.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = direct
        .put(format!(
            "https://127.0.0.1:{}/realacct/pgbackups?restype=container",
            az.port
        ))
        .headers(create.headers)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);

    // The client's own SAS parameters (here junk) are dropped; the file's SAS is used.
    let (s, t) = call(
        &gw,
        "PUT",
        "/pg-prod/pgbackups/base/data.tar?sp=r&sig=junk",
        b"base backup bytes",
        &[("x-ms-blob-type", "BlockBlob")],
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let (s, t) = call(&gw, "GET", "/pg-prod/pgbackups/base/data.tar", b"", &[]).await;
    assert_eq!((s, t.as_str()), (200, "base backup bytes"));

    // A Blob Batch delete: the SAS goes on the batch and on each part.
    let (s, t) = call(
        &gw,
        "PUT",
        "/pg-prod/pgbackups/base/old",
        b"expired backup",
        &[("x-ms-blob-type", "BlockBlob")],
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let (s, t) = batch_delete(&gw, &["/pg-prod/pgbackups/base/old"]).await;
    assert_eq!(s, 202, "{t}");
    assert!(t.contains("HTTP/1.1 202"), "the part was accepted: {t}");
    let (s, _) = call(&gw, "GET", "/pg-prod/pgbackups/base/old", b"", &[]).await;
    assert_eq!(s, 404, "the batch deleted the blob");

    // A read-only SAS replaces it: Azurite refuses the write, the listing still works.
    std::fs::write(&sas_path, container_sas("rl")).unwrap();
    let (s, t) = call(
        &gw,
        "PUT",
        "/pg-prod/pgbackups/base/other",
        b"x",
        &[("x-ms-blob-type", "BlockBlob")],
    )
    .await;
    assert_eq!(s, 403, "{t}");
    assert!(t.contains("AuthorizationPermissionMismatch"), "{t}");
    let (s, t) = call(
        &gw,
        "GET",
        "/pg-prod/pgbackups?restype=container&comp=list",
        b"",
        &[],
    )
    .await;
    assert_eq!(s, 200, "{t}");
    assert!(t.contains("base/data.tar"), "{t}");

    // A SAS signed with another key: Azurite refuses it, proving it checks the signature.
    let forged = container_sas("racwdl").replace("sig=", "sig=AA");
    std::fs::write(&sas_path, forged).unwrap();
    let (s, t) = call(&gw, "GET", "/pg-prod/pgbackups/base/data.tar", b"", &[]).await;
    assert_eq!(s, 403, "{t}");
}

#[test]
fn a_bearer_mode_without_settings_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client.key"), CLIENT_KEY).unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "blob:\n  listen: 127.0.0.1:0\n  accounts:\n    - name: pg-prod\n      clientKeyFile: {}/client.key\n      containers: [pgbackups]\n      permissions: [read]\n      upstream:\n        endpoint: https://realacct.blob.core.windows.net\n        account: realacct\n        workloadIdentity: {{}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
        .arg("--config")
        .arg(&config)
        .env_remove("AZURE_CLIENT_ID")
        .env_remove("AZURE_TENANT_ID")
        .env_remove("AZURE_FEDERATED_TOKEN_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("blob.accounts[0].upstream.workloadIdentity.clientId")
            && stderr.contains("AZURE_CLIENT_ID"),
        "{stderr}"
    );
}

/// Blob Batch parts relative to the account (`/pgbackups/<blob>`, what azure-storage-blob
/// sends through a Service name) through the gateway to a real Azurite that holds a key the
/// client never sees: deleted like path-style parts, mixed in one batch too; a part for
/// another container stops the whole batch before anything reaches Azurite.
#[tokio::test]
async fn shared_key_batch_with_account_relative_parts_against_azurite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls_pki = pki(&["127.0.0.1"]);
    let Some(az) = azurite(d, &tls_pki).await else {
        return;
    };
    std::fs::write(d.join("ca.pem"), &tls_pki.ca_pem).unwrap();
    std::fs::write(d.join("real.key"), REAL_KEY).unwrap();
    let gw = gateway(
        d,
        az.port,
        &format!(
            "        endpoint: https://127.0.0.1:{}/realacct\n        account: realacct\n        caFile: {}/ca.pem\n        sharedKeyFile: {}/real.key",
            az.port,
            d.display(),
            d.display()
        ),
    )
    .await;
    let (s, t) = call(&gw, "PUT", "/pg-prod/pgbackups?restype=container", b"", &[]).await;
    assert_eq!(s, 201, "{t}");
    let blobs = [
        "base/1/data.tar",
        "base/1/backup.info",
        "wal/0001",
        "wal/0002",
    ];
    for blob in blobs {
        let (s, t) = call(
            &gw,
            "PUT",
            &format!("/pg-prod/pgbackups/{blob}"),
            b"bytes",
            &[("x-ms-blob-type", "BlockBlob")],
        )
        .await;
        assert_eq!(s, 201, "{blob}: {t}");
    }

    // A part for another container, relative or path style: 403, nothing deleted.
    for other in ["/velero/base/1/data.tar", "/pg-prod/velero/base/1/data.tar"] {
        let (s, t) = batch_delete(&gw, &["/pgbackups/base/1/data.tar", other]).await;
        assert_eq!(s, 403, "{other}: {t}");
        assert!(t.contains("batch part 1"), "{t}");
        let (s, _) = call(&gw, "GET", "/pg-prod/pgbackups/base/1/data.tar", b"", &[]).await;
        assert_eq!(s, 200, "a refused batch deleted nothing");
    }

    // Relative parts, as the SDK sends them through a Service name.
    let (s, t) = batch_delete(
        &gw,
        &[
            "/pgbackups/base/1/data.tar",
            "/pgbackups/base/1/backup.info",
        ],
    )
    .await;
    assert_eq!(s, 202, "{t}");
    assert_eq!(
        t.matches("HTTP/1.1 202").count(),
        2,
        "both parts accepted: {t}"
    );
    // One of each form in one batch.
    let (s, t) = batch_delete(&gw, &["/pgbackups/wal/0001", "/pg-prod/pgbackups/wal/0002"]).await;
    assert_eq!(s, 202, "{t}");
    assert_eq!(
        t.matches("HTTP/1.1 202").count(),
        2,
        "both parts accepted: {t}"
    );
    for blob in blobs {
        let (s, _) = call(&gw, "GET", &format!("/pg-prod/pgbackups/{blob}"), b"", &[]).await;
        assert_eq!(s, 404, "{blob} was deleted");
    }
}
