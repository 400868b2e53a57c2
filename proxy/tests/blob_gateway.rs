//! The blob gateway end to end in-process: a real gateway (both listeners, TLS to the
//! client and to the upstream) in front of a real HTTPS upstream that checks every request's
//! Shared Key signature with the REAL key, which the client never holds. Clients sign with
//! their gateway-only key; refusals must be 403 with `x-ms-error-code` and must never reach
//! the upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use common::{pki, server_tls};
use egress_proxy::blob::shared_key::{AccountKey, sign, verify};
use egress_proxy::{Config, Server};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The workload's gateway-only key.
const CLIENT_KEY: &str = "Y2xpZW50LWtleS1mb3ItcGctcHJvZC1vbmx5LWF0LXRoZS1nYXRld2F5IQ==";
/// The storage account's real key; only the gateway and the upstream know it.
const REAL_KEY: &str = "cmVhbC1hY2NvdW50LWtleS10aGF0LW5ldmVyLWxlYXZlcy10aGUtZ2F0ZXdheQ==";

/// What the upstream saw: method, path and query, whether the real key's signature held,
/// and the body length.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    signed_ok: bool,
    body_len: usize,
    /// Whether an `Expect` header arrived (the gateway must answer it itself).
    expect: bool,
}

/// An HTTPS upstream for path-style account `realacct`: verifies the signature with the
/// real key, answers GETs with a fixed body and everything else 201.
async fn upstream(tls: Arc<rustls::ServerConfig>) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let log = log.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(socket).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let key = AccountKey::from_base64(REAL_KEY).unwrap();
                        let signed_ok = verify(&parts, "realacct", &key, SystemTime::now()).is_ok();
                        let body = body.collect().await.unwrap().to_bytes();
                        log.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            path: parts.uri.to_string(),
                            signed_ok,
                            body_len: body.len(),
                            expect: parts.headers.contains_key("expect"),
                        });
                        let (status, text) = match (signed_ok, parts.method.as_str()) {
                            (false, _) => (403, "bad signature"),
                            (true, "GET") => (200, "blob content from upstream"),
                            (true, _) => (201, ""),
                        };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("x-ms-request-id", "upstream")
                                .body(Full::new(Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A gateway with a plain and a TLS listener; `pg-prod` may read, list and write
/// `pgbackups` (no delete) on `realacct` behind `upstream`.
struct Gateway {
    /// The config it runs, for reloads.
    config: Config,
    /// Where its key files are; removed when the test ends.
    dir: tempfile::TempDir,
    handle: egress_proxy::Handle,
    plain: SocketAddr,
    tls: SocketAddr,
    admin: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    ca_pem: String,
}

async fn gateway() -> Gateway {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let upstream_pki = pki(&["127.0.0.1"]);
    let (up, seen) = upstream(server_tls(&upstream_pki)).await;
    let gw_pki = pki(&["localhost"]);
    for (name, text) in [
        ("client.key", format!("{CLIENT_KEY}\n")),
        ("real.key", REAL_KEY.to_owned()),
        ("upstream-ca.pem", upstream_pki.ca_pem.clone()),
        ("gw.crt", gw_pki.cert_pem.clone()),
        ("gw.key", gw_pki.key_pem.clone()),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let d = dir.display();
    let yaml = format!(
        r#"
listen: 127.0.0.1:0
adminListen: 127.0.0.1:0
connectTimeout: 2s
allow:
  - cidrs: [127.0.0.1/32]
    ports: [{port}]
blob:
  listen: 127.0.0.1:0
  tls: {{listen: 127.0.0.1:0, certFile: {d}/gw.crt, keyFile: {d}/gw.key}}
  accounts:
    - name: pg-prod
      clientKeyFile: {d}/client.key
      containers: [pgbackups]
      permissions: [read, list, write]
      upstream:
        endpoint: https://127.0.0.1:{port}/realacct
        account: realacct
        sharedKeyFile: {d}/real.key
        caFile: {d}/upstream-ca.pem
"#,
        port = up.port()
    );
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind(&config).await.unwrap();
    let (plain, tls) = server.blob_addrs();
    let admin = server.admin_addr().unwrap();
    let handle = server.handle();
    tokio::spawn(server.run());
    Gateway {
        config,
        dir: tmp,
        handle,
        plain: plain.unwrap(),
        tls: tls.unwrap(),
        admin,
        seen,
        ca_pem: gw_pki.ca_pem,
    }
}

/// A request as a storage client builds it: `x-ms-date` and `x-ms-version`, `extra`
/// headers, signed as `account` with `key` (base64) unless `authorization` overrides it.
struct Req<'a> {
    method: &'a str,
    path: &'a str,
    body: Vec<u8>,
    account: &'a str,
    key: &'a str,
    date: SystemTime,
    extra: Vec<(&'a str, &'a str)>,
    authorization: Option<&'a str>,
}

impl<'a> Req<'a> {
    fn new(method: &'a str, path: &'a str) -> Self {
        Self {
            method,
            path,
            body: Vec::new(),
            account: "pg-prod",
            key: CLIENT_KEY,
            date: SystemTime::now(),
            extra: Vec::new(),
            authorization: None,
        }
    }

    /// The headers to send, the signature last.
    fn headers(&self) -> http::HeaderMap {
        let mut builder = http::Request::builder()
            .method(self.method)
            .uri(self.path)
            .header("x-ms-date", httpdate::fmt_http_date(self.date))
            .header("x-ms-version", "2021-08-06");
        if !self.body.is_empty() {
            builder = builder.header("content-length", self.body.len().to_string());
        }
        for (k, v) in &self.extra {
            builder = builder.header(*k, *v);
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        match self.authorization {
            Some(a) => {
                if !a.is_empty() {
                    parts.headers.insert("authorization", a.parse().unwrap());
                }
            }
            None => {
                let key = AccountKey::from_base64(self.key).unwrap();
                sign(&mut parts, self.account, &key).unwrap();
            }
        }
        parts.headers.remove("content-length");
        parts.headers
    }
}

/// Sends `req` to `base` (`http://...` or `https://localhost:...`).
async fn send(client: &reqwest::Client, base: &str, req: &Req<'_>) -> reqwest::Response {
    client
        .request(req.method.parse().unwrap(), format!("{base}{}", req.path))
        .headers(req.headers())
        .body(req.body.clone())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn signed_requests_are_re_signed_with_the_real_key_and_streamed_both_ways() {
    let gw = gateway().await;
    let plain = reqwest::Client::new();
    let base = format!("http://{}", gw.plain);
    let mut put = Req::new("PUT", "/pg-prod/pgbackups/wals/0001");
    put.body = vec![7u8; 3 * 1024 * 1024 + 17];
    put.extra = vec![("x-ms-blob-type", "BlockBlob"), ("expect", "100-continue")];
    let r = send(&plain, &base, &put).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let get = Req::new("GET", "/pg-prod/pgbackups/wals/0001");
    let r = send(&plain, &base, &get).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ms-request-id"], "upstream");
    assert_eq!(r.text().await.unwrap(), "blob content from upstream");

    // The same through the TLS listener, trusting the gateway's CA.
    let tls = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(gw.ca_pem.as_bytes()).unwrap())
        .resolve("localhost", gw.tls)
        .build()
        .unwrap();
    let base_tls = format!("https://localhost:{}", gw.tls.port());
    let list = Req::new(
        "GET",
        "/pg-prod/pgbackups?restype=container&comp=list&prefix=wals%2F",
    );
    let r = send(&tls, &base_tls, &list).await;
    assert_eq!(r.status(), 200);

    let seen = gw.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|s| s.signed_ok), "{seen:?}");
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].path, "/realacct/pgbackups/wals/0001");
    assert_eq!(seen[0].body_len, 3 * 1024 * 1024 + 17);
    assert!(
        !seen[0].expect,
        "Expect is answered by the gateway, not forwarded"
    );
    assert_eq!(
        seen[2].path,
        "/realacct/pgbackups?restype=container&comp=list&prefix=wals%2F"
    );
    common::eventually("the access log's metrics", || async {
        common::metric(
            gw.admin,
            "egress_proxy_blob_requests_total{account=\"pg-prod\",operation=\"put-blob\",result=\"forwarded\"}",
        )
        .await
            == 1.0
    })
    .await;
    let up = common::metric(gw.admin, "egress_proxy_blob_bytes_total{direction=\"up\"}").await;
    assert_eq!(up, (3 * 1024 * 1024 + 17) as f64);
}

#[tokio::test]
async fn refusals_are_azure_errors_and_never_reach_the_upstream() {
    let gw = gateway().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", gw.plain);
    let blob = "/pg-prod/pgbackups/base/data.tar";
    let stale = SystemTime::now() - Duration::from_secs(20 * 60);
    let wrong_key = BASE64.encode(b"some other key entirely");
    let cases: Vec<(&str, Req<'_>, &str)> = vec![
        (
            "wrong client key",
            Req {
                key: &wrong_key,
                ..Req::new("GET", blob)
            },
            "AuthenticationFailed",
        ),
        (
            "the real key",
            Req {
                key: REAL_KEY,
                ..Req::new("GET", blob)
            },
            "AuthenticationFailed",
        ),
        (
            "stale date",
            Req {
                date: stale,
                ..Req::new("GET", blob)
            },
            "AuthenticationFailed",
        ),
        (
            "bearer",
            Req {
                authorization: Some("Bearer eyJ0eXAi"),
                ..Req::new("GET", blob)
            },
            "AuthenticationFailed",
        ),
        (
            "anonymous",
            Req {
                authorization: Some(""),
                ..Req::new("GET", blob)
            },
            "AuthenticationFailed",
        ),
        (
            "unknown account",
            Req {
                account: "other",
                ..Req::new("GET", "/other/pgbackups/x")
            },
            "AuthenticationFailed",
        ),
        (
            "signed for another account",
            Req {
                account: "other",
                ..Req::new("GET", blob)
            },
            "AuthenticationFailed",
        ),
        (
            "unlisted container",
            Req::new("GET", "/pg-prod/secrets/x"),
            "AuthorizationPermissionMismatch",
        ),
        (
            "delete without permission",
            Req::new("DELETE", blob),
            "AuthorizationPermissionMismatch",
        ),
        (
            "container acl",
            Req::new("PUT", "/pg-prod/pgbackups?restype=container&comp=acl"),
            "AuthorizationPermissionMismatch",
        ),
        (
            "copy source",
            Req {
                extra: vec![("x-ms-copy-source", "https://evil.blob.core.windows.net/c/b")],
                ..Req::new("PUT", blob)
            },
            "AuthorizationPermissionMismatch",
        ),
        (
            "account level",
            Req::new("GET", "/pg-prod/?comp=list"),
            "AuthorizationPermissionMismatch",
        ),
    ];
    for (what, req, code) in &cases {
        let r = send(&client, &base, req).await;
        assert_eq!(r.status(), 403, "{what}");
        assert_eq!(r.headers()["x-ms-error-code"], *code, "{what}");
        let text = r.text().await.unwrap();
        assert!(
            text.starts_with("<?xml") && text.contains(&format!("<Code>{code}</Code>")),
            "{what}: {text}"
        );
        assert!(
            !text.contains(CLIENT_KEY) && !text.contains(REAL_KEY),
            "{what}"
        );
    }
    assert!(
        gw.seen.lock().unwrap().is_empty(),
        "{:?}",
        gw.seen.lock().unwrap()
    );
    common::eventually("refusals counted", || async {
        common::metric(
            gw.admin,
            "egress_proxy_blob_requests_total{account=\"pg-prod\",operation=\"-\",result=\"bad-signature\"}",
        )
        .await
            >= 2.0
    })
    .await;
}

#[tokio::test]
async fn a_rotated_client_key_takes_effect_on_reload() {
    let gw = gateway().await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", gw.plain);
    let new_key = BASE64.encode(b"the rotated gateway-only key of pg-prod");
    let get = |key| Req {
        key,
        ..Req::new("GET", "/pg-prod/pgbackups/x")
    };
    assert_eq!(send(&client, &base, &get(CLIENT_KEY)).await.status(), 200);
    std::fs::write(gw.dir.path().join("client.key"), &new_key).unwrap();
    // Not re-read until the reload: the running key still holds.
    assert_eq!(send(&client, &base, &get(CLIENT_KEY)).await.status(), 200);
    gw.handle.reload(&gw.config).unwrap();
    assert_eq!(send(&client, &base, &get(CLIENT_KEY)).await.status(), 403);
    assert_eq!(send(&client, &base, &get(&new_key)).await.status(), 200);
    // A reload that cannot read a key keeps the running settings.
    std::fs::write(gw.dir.path().join("client.key"), "").unwrap();
    assert!(gw.handle.reload(&gw.config).is_err());
    assert_eq!(send(&client, &base, &get(&new_key)).await.status(), 200);
}

#[test]
fn an_unreadable_key_file_stops_the_start_with_exit_64_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("real.key"), REAL_KEY).unwrap();
    std::fs::write(dir.join("client.key"), "not base64 !!\n").unwrap();
    let config = dir.join("proxy.yaml");
    let yaml = |client_key: &str| {
        format!(
            "listen: 127.0.0.1:0\nadminListen: 127.0.0.1:0\nblob:\n  listen: 127.0.0.1:0\n  accounts:\n    - name: pg-prod\n      clientKeyFile: {client_key}\n      containers: [pgbackups]\n      permissions: [read]\n      upstream:\n        endpoint: https://realacct.blob.core.windows.net\n        account: realacct\n        sharedKeyFile: {}/real.key\n",
            dir.display()
        )
    };
    for (client_key, expect) in [
        (format!("{}/missing.key", dir.display()), "cannot read"),
        (format!("{}/client.key", dir.display()), "not base64"),
    ] {
        std::fs::write(&config, yaml(&client_key)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
            .arg("--config")
            .arg(&config)
            .env_remove("EGRESS_PROXY_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("field `blob.accounts[0].clientKeyFile`") && stderr.contains(expect),
            "{stderr}"
        );
    }
}

/// Runs `egress-proxy blob client-config` with `extra` arguments against `yaml`.
fn client_config(yaml: &str, extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
        .args(["blob", "client-config", "--config"])
        .arg(&config)
        .args(extra)
        .env_remove("EGRESS_PROXY_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn client_config_prints_a_fresh_key_and_objects_ready_to_apply() {
    let yaml = "blob:\n  listen: 0.0.0.0:10000\n  tls: {listen: 0.0.0.0:10443, certFile: /c, keyFile: /k}\n  accounts:\n    - name: pg-prod\n      clientKeyFile: /secrets/pg-prod/key\n      containers: [pgbackups]\n      permissions: [read]\n      upstream: {endpoint: https://realacct.blob.core.windows.net, account: realacct, sharedKeyFile: /s}\n";
    let out = client_config(yaml, &["--account", "pg-prod", "--namespace", "infra"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("/secrets/pg-prod/key"), "{stderr}");
    let conn = stdout
        .lines()
        .find_map(|l| l.strip_prefix("  AZURE_STORAGE_CONNECTION_STRING: \""))
        .unwrap()
        .trim_end_matches('"');
    let fields: std::collections::HashMap<&str, &str> = conn
        .split(';')
        .filter(|f| !f.is_empty())
        .map(|f| f.split_once('=').unwrap())
        .collect();
    assert_eq!(fields["AccountName"], "pg-prod");
    assert_eq!(fields["DefaultEndpointsProtocol"], "https");
    assert_eq!(
        fields["BlobEndpoint"],
        "https://egress-gate-blob.infra.svc:10443/pg-prod"
    );
    let key = fields["AccountKey"];
    assert_eq!(BASE64.decode(key).unwrap().len(), 64);
    AccountKey::from_base64(key).unwrap();
    for expected in [
        "destinationPath: https://egress-gate-blob.infra.svc:10443/pg-prod/pgbackups/",
        "endpointCA: {name: egress-gate-blob-ca, key: ca.crt}",
        "storageAccount: pg-prod",
        "storageAccountURI: https://egress-gate-blob.infra.svc:10443/pg-prod",
        "storageAccountKeyEnvVar: AZURE_STORAGE_ACCOUNT_ACCESS_KEY",
        &format!("AZURE_STORAGE_ACCOUNT_ACCESS_KEY={key}"),
        "bucket: pgbackups",
    ] {
        assert!(stdout.contains(expected), "{expected}\n{stdout}");
    }
    // Every run makes a new key.
    let again = String::from_utf8(client_config(yaml, &["--account", "pg-prod"]).stdout).unwrap();
    assert!(!again.contains(key));
    // Plain HTTP without tls: no CA references.
    let plain = yaml.replace(
        "  tls: {listen: 0.0.0.0:10443, certFile: /c, keyFile: /k}\n",
        "",
    );
    let out = client_config(&plain, &["--account", "pg-prod"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("BlobEndpoint=http://egress-gate-blob.egress-gate.svc:10000/pg-prod;"));
    assert!(!stdout.contains("ca.crt"), "{stdout}");
    // An account that is not configured, or no blob section: exit 64 saying so.
    let out = client_config(yaml, &["--account", "nope"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no account \"nope\""));
    let out = client_config("", &["--account", "pg-prod"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no blob: section"));
}

#[tokio::test]
async fn an_upstream_the_policy_refuses_is_a_502_naming_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display();
    std::fs::write(tmp.path().join("client.key"), CLIENT_KEY).unwrap();
    std::fs::write(tmp.path().join("real.key"), REAL_KEY).unwrap();
    // The only rule opens another port than the upstream's.
    let yaml = format!(
        "listen: 127.0.0.1:0\nadminListen: 127.0.0.1:0\nconnectTimeout: 1s\nallow:\n  - cidrs: [127.0.0.1/32]\n    ports: [9]\nblob:\n  listen: 127.0.0.1:0\n  accounts:\n    - name: pg-prod\n      clientKeyFile: {d}/client.key\n      containers: [pgbackups]\n      permissions: [read]\n      upstream: {{endpoint: 'https://127.0.0.1:10/realacct', account: realacct, sharedKeyFile: {d}/real.key}}\n"
    );
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind(&config).await.unwrap();
    let plain = server.blob_addrs().0.unwrap();
    tokio::spawn(server.run());
    let r = send(
        &reqwest::Client::new(),
        &format!("http://{plain}"),
        &Req::new("GET", "/pg-prod/pgbackups/x"),
    )
    .await;
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-ms-error-code"], "UpstreamUnavailable");
    let text = r.text().await.unwrap();
    assert!(text.contains("policy refuses"), "{text}");
}
