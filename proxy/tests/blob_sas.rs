//! Service SAS from clients. Known answers first: each file under `fixtures/blob/sas/` is
//! one SAS the Azure SDK for Python signed (with the string-to-sign its `sts_hook` reported)
//! and one request carrying it to Azurite (with the string-to-sign and signature Azurite
//! logged, and its answer); `fixtures/blob/sas/README.md` says how they were made. The
//! gateway must build the same string byte for byte, compute the same signature, and accept
//! or refuse the request as the fixture records. Then a real gateway (plain and TLS
//! listeners) in front of a real upstream that checks Shared Key with the real key: SAS URLs
//! signed with the client key download, refused ones never reach the upstream.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::pki;
use egress_proxy::{Config, Server};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use egress_proxy::blob::operation::classify;
use egress_proxy::blob::sas::{self, Context, SasError, Transport, parse_time};
use egress_proxy::blob::shared_key::{AccountKey, signature, verify};
use http::request::Parts;
use serde_json::Value;

fn fixtures() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blob/sas");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let json: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_stem().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 5, "SAS fixtures missing: {out:?}");
    out
}

fn field<'a>(json: &'a Value, name: &str) -> &'a str {
    json[name]
        .as_str()
        .unwrap_or_else(|| panic!("fixture field {name} missing"))
}

fn parts(json: &Value) -> Parts {
    http::Request::builder()
        .method(field(json, "method"))
        .uri(field(json, "target"))
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// The time the fixtures are checked at: inside every window they sign.
fn context() -> Context {
    let now = parse_time("2026-12-06T20:00:00Z").unwrap();
    Context {
        now: UNIX_EPOCH + Duration::from_secs(u64::try_from(now).unwrap()),
        transport: Transport::Tls,
        client: "127.0.0.1".parse().unwrap(),
    }
}

/// The SDK and Azurite agree with each other, and the gateway with both.
#[test]
fn string_to_sign_and_signature_match_the_sdk_and_azurite() {
    let mut service_sas = 0;
    for (name, json) in fixtures() {
        let sdk = field(&json, "sdk_string_to_sign");
        assert_eq!(sdk, field(&json, "azurite_string_to_sign"), "{name}");
        let key = AccountKey::from_base64(field(&json, "key")).unwrap();
        let ours_sig = signature(&key, sdk);
        assert_eq!(ours_sig, field(&json, "azurite_signature"), "{name}");
        let p = parts(&json);
        match sas::parse(p.uri.query().unwrap()) {
            Ok(parsed) => {
                let ours = parsed
                    .string_to_sign(field(&json, "account"), p.uri.path())
                    .unwrap();
                assert_eq!(ours, sdk, "{name}");
                service_sas += 1;
            }
            Err(e) => assert_eq!(e.reason(), field(&json, "gateway"), "{name}"),
        }
    }
    assert!(service_sas >= 4, "too few service SAS fixtures");
}

/// What the gateway decides for each captured request, at a time inside its window.
#[test]
fn the_gateway_decides_as_recorded() {
    for (name, json) in fixtures() {
        let p = parts(&json);
        let key = AccountKey::from_base64(field(&json, "key")).unwrap();
        let account = field(&json, "account");
        let expected = field(&json, "gateway");
        assert!(sas::carries_sas(&p), "{name}");
        match sas::verify(&p, account, &key, &context()) {
            Ok(grant) => {
                assert_eq!(expected, "accepted", "{name}");
                let request = classify(&p, account).unwrap();
                assert_eq!(grant.permits(&request), Ok(()), "{name}");
            }
            Err(e) => assert_eq!(e.reason(), expected, "{name}: {e}"),
        }
    }
}

/// Any change to a signed part of a captured request breaks its signature.
#[test]
fn tampering_with_a_captured_url_breaks_the_signature() {
    let json = fixtures()
        .into_iter()
        .find(|(n, _)| n == "velero_download_url")
        .unwrap()
        .1;
    let key = AccountKey::from_base64(field(&json, "key")).unwrap();
    let target = field(&json, "target");
    for (from, to) in [
        ("sp=r&", "sp=rwd&"),
        ("b1-logs.gz", "b1-results.gz"),
        ("se=2099", "se=2098"),
        ("spr=https", "spr=https%2Chttp"),
        ("sv=2020-12-06", "sv=2021-12-02"),
        ("sig=y", "sig=z"),
    ] {
        assert!(target.contains(from), "{from}");
        let mut tampered = json.clone();
        tampered["target"] = Value::from(target.replacen(from, to, 1));
        let p = parts(&tampered);
        let got = sas::verify(&p, field(&json, "account"), &key, &context());
        assert_eq!(got, Err(SasError::BadSignature), "{from} -> {to}");
    }
    // The same URL, untouched, expired: refused for its time, not its signature.
    let later = Context {
        now: SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parse_time("2099-01-01T00:16:00Z").unwrap()).unwrap(),
            ),
        ..context()
    };
    let e = sas::verify(&parts(&json), field(&json, "account"), &key, &later).unwrap_err();
    assert_eq!(e.reason(), "sas-expired");
}

/// The workload's gateway-only key, which signs its SAS.
const CLIENT_KEY: &str = "c2FzLWNsaWVudC1rZXktZm9yLXZlbGVyby1vbmx5LWF0LXRoZS1nYXRld2F5IQ==";
/// The storage account's real key; only the gateway and the upstream know it.
const REAL_KEY: &str = "cmVhbC1rZXktYmVoaW5kLXRoZS1nYXRld2F5LW5ldmVyLXNlZW4tYnktY2xpZW50cw==";
/// The body the upstream answers downloads with.
const CONTENT: &str = "velero backup log lines\n";

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    /// Whether its Shared Key signature held under the real key.
    signed_ok: bool,
    version: Option<String>,
}

/// A plain HTTP upstream for path-style account `realacct` that checks Shared Key with the
/// real key; downloads get [`CONTENT`], everything else 202.
async fn upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, _) = req.into_parts();
                        let key = AccountKey::from_base64(REAL_KEY).unwrap();
                        let signed_ok = verify(&parts, "realacct", &key, SystemTime::now()).is_ok();
                        log.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            target: parts.uri.to_string(),
                            signed_ok,
                            version: parts
                                .headers
                                .get("x-ms-version")
                                .map(|v| v.to_str().unwrap().to_owned()),
                        });
                        let (status, body) = match (signed_ok, parts.method.as_str()) {
                            (false, _) => (403, ""),
                            (true, "GET") => (200, CONTENT),
                            (true, _) => (202, ""),
                        };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// A gateway with both listeners; `velero-prod` may read, list, write and delete in
/// `velero` on `realacct` behind the upstream.
struct Gateway {
    _dir: tempfile::TempDir,
    plain: SocketAddr,
    tls: reqwest::Client,
    tls_base: String,
    admin: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn gateway() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let (up, seen) = upstream().await;
    let gw_pki = pki(&["localhost"]);
    for (name, text) in [
        ("client.key", CLIENT_KEY),
        ("real.key", REAL_KEY),
        ("gw.crt", gw_pki.cert_pem.as_str()),
        ("gw.key", gw_pki.key_pem.as_str()),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
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
    - name: velero-prod
      clientKeyFile: {d}/client.key
      containers: [velero]
      permissions: [read, list, write, delete]
      upstream:
        endpoint: http://127.0.0.1:{port}/realacct
        account: realacct
        sharedKeyFile: {d}/real.key
"#,
        port = up.port()
    );
    let server = Server::bind(&Config::parse(&yaml, "test").unwrap())
        .await
        .unwrap();
    let (plain, tls) = server.blob_addrs();
    let admin = server.admin_addr().unwrap();
    tokio::spawn(server.run());
    let tls = tls.unwrap();
    Gateway {
        _dir: dir,
        plain: plain.unwrap(),
        tls: reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(gw_pki.ca_pem.as_bytes()).unwrap())
            .resolve("localhost", tls)
            .build()
            .unwrap(),
        tls_base: format!("https://localhost:{}", tls.port()),
        admin,
        seen,
    }
}

/// An ISO 8601 UTC time `offset_secs` from now, as SAS fields carry it.
fn at(offset_secs: i64) -> String {
    let t = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(offset_secs))
        .unwrap();
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// `path?fields&sig=...`: `fields` signed with `key` for account `velero-prod`.
fn sas_target(path: &str, fields: &str, key: &str) -> String {
    let parsed = sas::parse(&format!("{fields}&sig=AAAA")).unwrap();
    let sts = parsed.string_to_sign("velero-prod", path).unwrap();
    let sig = signature(&AccountKey::from_base64(key).unwrap(), &sts);
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("sig", &sig)
        .finish();
    format!("{path}?{fields}&{query}")
}

/// The fields of Velero's download URL: read-only blob SAS, from ten minutes back, https only.
fn velero_fields() -> String {
    format!(
        "sv=2020-12-06&sr=b&sp=r&spr=https&st={}&se={}",
        at(-600),
        at(1800)
    )
}

#[tokio::test]
async fn a_velero_download_url_signed_with_the_client_key_downloads_the_blob() {
    let gw = gateway().await;
    let target = sas_target(
        "/velero-prod/velero/backups/b1/b1-logs.gz",
        &velero_fields(),
        CLIENT_KEY,
    );
    let r = gw
        .tls
        .get(format!("{}{target}", gw.tls_base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), CONTENT);
    let seen = gw.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert!(seen[0].signed_ok, "re-signed with the real key: {seen:?}");
    assert_eq!(seen[0].target, "/realacct/velero/backups/b1/b1-logs.gz");
    assert_eq!(seen[0].version.as_deref(), Some("2020-12-06"));
    common::eventually("the forwarded SAS download in the metrics", || async {
        common::metric(
            gw.admin,
            "egress_proxy_blob_requests_total{account=\"velero-prod\",operation=\"get-blob\",result=\"forwarded\"}",
        )
        .await
            == 1.0
    })
    .await;
}

#[tokio::test]
async fn refused_sas_requests_are_azure_errors_and_never_reach_the_upstream() {
    let gw = gateway().await;
    let blob = "/velero-prod/velero/backups/b1/b1-logs.gz";
    let plain_base = format!("http://{}", gw.plain);
    let velero = sas_target(blob, &velero_fields(), CLIENT_KEY);
    let expired = format!("sv=2020-12-06&sr=b&sp=r&st={}&se={}", at(-7200), at(-1200));
    let write_only = format!("sv=2020-12-06&sr=b&sp=w&se={}", at(1800));
    let container_rl = format!("sv=2022-11-02&sr=c&sp=rl&se={}", at(1800));
    let account_sas = format!("sv=2022-11-02&ss=b&srt=co&sp=rl&se={}&sig=AAAA", at(1800));
    let other_blob = sas_target("/velero-prod/velero/other", &velero_fields(), CLIENT_KEY);
    let cases: Vec<(&str, &str, String, &str, &str)> = vec![
        (
            "GET",
            "tls",
            sas_target(blob, &expired, CLIENT_KEY),
            "AuthenticationFailed",
            "sas-expired",
        ),
        (
            "GET",
            "tls",
            sas_target(blob, &write_only, CLIENT_KEY),
            "AuthorizationPermissionMismatch",
            "sas-permission",
        ),
        (
            "DELETE",
            "tls",
            velero.clone(),
            "AuthorizationPermissionMismatch",
            "sas-permission",
        ),
        (
            "GET",
            "tls",
            velero.replace("sp=r&", "sp=rwd&"),
            "AuthenticationFailed",
            "bad-signature",
        ),
        (
            "GET",
            "tls",
            other_blob.replace("/other?", "/backups/b1/b1-logs.gz?"),
            "AuthenticationFailed",
            "bad-signature",
        ),
        (
            "GET",
            "tls",
            sas_target(blob, &velero_fields(), REAL_KEY),
            "AuthenticationFailed",
            "bad-signature",
        ),
        (
            "GET",
            "tls",
            format!("{blob}?{account_sas}"),
            "AuthenticationFailed",
            "account-sas",
        ),
        (
            "GET",
            "plain",
            velero.clone(),
            "AuthorizationProtocolMismatch",
            "sas-protocol",
        ),
        (
            "PUT",
            "tls",
            sas_target(
                "/velero-prod/velero",
                &format!("restype=container&{container_rl}"),
                CLIENT_KEY,
            ),
            "AuthorizationPermissionMismatch",
            "not-with-sas",
        ),
    ];
    let plain = reqwest::Client::new();
    for (method, listener, target, code, reason) in &cases {
        let (client, base) = match *listener {
            "plain" => (&plain, &plain_base),
            _ => (&gw.tls, &gw.tls_base),
        };
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let r = client
            .request(method.clone(), format!("{base}{target}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{reason}: {method} {target}");
        assert_eq!(r.headers()["x-ms-error-code"], *code, "{reason}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains(&format!("<Code>{code}</Code>")),
            "{reason}: {body}"
        );
    }
    assert!(
        gw.seen.lock().unwrap().is_empty(),
        "a refused SAS request reached the upstream"
    );
    common::eventually("every refusal counted under its reason", || async {
        let mut total = 0.0;
        for reason in ["sas-expired", "bad-signature", "account-sas", "sas-protocol"] {
            total += common::metric(
                gw.admin,
                &format!("egress_proxy_blob_requests_total{{account=\"velero-prod\",operation=\"-\",result=\"{reason}\"}}"),
            )
            .await;
        }
        total == 6.0
    })
    .await;
}
