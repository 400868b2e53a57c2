//! The blob gateway's request handling against known answers and properties. The fixtures
//! under `fixtures/blob/` are requests as Azurite received them, with the string-to-sign and
//! signature Azurite computed for them (see `fixtures/blob/README.md`). Shared Key is checked
//! against them byte for byte; so is the whole gateway step (verify the client, classify,
//! authorize, rewrite and re-sign), which must reproduce requests Azurite accepted. The
//! properties check that a signature covers every part of a request it must cover.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use egress_proxy::blob::batch::{Batch, BatchError, PartCheck, boundary, rewrite_body};
use egress_proxy::blob::collation::service_order;
use egress_proxy::blob::operation::{Operation, Permission, Scope, classify};
use egress_proxy::blob::rewrite::Upstream;
use egress_proxy::blob::shared_key::{
    AccountKey, AuthError, HeaderOrder, credential, sign, signature, string_to_sign, verify,
};
use egress_proxy::blob::upstream_auth::Credential;
use http::request::Parts;
use proptest::prelude::*;
use serde_json::Value;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blob")
}

/// One captured request.
struct Fixture {
    name: String,
    account: String,
    key: AccountKey,
    parts: Parts,
    json: Value,
}

impl Fixture {
    fn str(&self, field: &str) -> &str {
        self.json[field].as_str().unwrap()
    }
    /// What the service computes: Azurite's string, unless the fixture documents where
    /// Azurite departs from the service.
    fn expected(&self) -> &str {
        self.json["documented_string_to_sign"]
            .as_str()
            .unwrap_or_else(|| self.str("azurite_string_to_sign"))
    }
    /// The request's own date, so the clock check passes as it did when captured.
    fn sent_at(&self) -> SystemTime {
        let date = self.parts.headers["x-ms-date"].to_str().unwrap();
        httpdate::parse_http_date(date).unwrap()
    }
}

fn request(method: &str, target: &str, headers: &[(String, String)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(target);
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(()).unwrap().into_parts().0
}

fn load(name: &str) -> Fixture {
    let text = std::fs::read_to_string(fixtures_dir().join(format!("{name}.json"))).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let headers: Vec<(String, String)> = json["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    Fixture {
        name: name.to_owned(),
        account: json["account"].as_str().unwrap().to_owned(),
        key: AccountKey::from_base64(json["key"].as_str().unwrap()).unwrap(),
        parts: request(
            json["method"].as_str().unwrap(),
            json["target"].as_str().unwrap(),
            &headers,
        ),
        json,
    }
}

fn all_request_fixtures() -> Vec<Fixture> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "collation" && n != "batch_delete_body")
        .collect();
    names.sort();
    assert!(names.len() >= 12, "fixtures missing: {names:?}");
    names.iter().map(|n| load(n)).collect()
}

fn sig_of(authorization: &str) -> &str {
    authorization.split_once(':').unwrap().1
}

/// Our string-to-sign equals Azurite's byte for byte (or the documented service form where
/// the fixture records that Azurite departs from it), in both header orders, and our
/// signature of it equals the one Azurite computed.
#[test]
fn string_to_sign_and_signature_match_azurite() {
    for f in all_request_fixtures() {
        if f.name == "put_blob_metadata_collation" {
            continue; // Azurite's own header order; checked in the test below.
        }
        for order in [HeaderOrder::Service, HeaderOrder::Bytes] {
            let ours = string_to_sign(&f.parts, &f.account, order).unwrap();
            assert_eq!(ours, f.expected(), "{} ({order:?})", f.name);
        }
        if f.json.get("documented_string_to_sign").is_none() {
            let ours = signature(&f.key, f.expected());
            assert_eq!(ours, sig_of(f.str("azurite_authorization")), "{}", f.name);
        }
    }
}

/// Requests the SDK signed and Azurite accepted verify, and re-signing them (as the
/// gateway does towards Azure) reproduces the header Azurite accepted.
#[test]
fn sdk_requests_verify_and_resign_identically() {
    let mut accepted = 0;
    for f in all_request_fixtures() {
        if !f.json["azurite_accepted"].as_bool().unwrap() {
            continue;
        }
        accepted += 1;
        assert_eq!(
            f.str("client_authorization"),
            f.str("azurite_authorization")
        );
        verify(&f.parts, &f.account, &f.key, f.sent_at())
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let mut resigned = f.parts.clone();
        resigned.headers.remove(http::header::AUTHORIZATION);
        sign(&mut resigned, &f.account, &f.key).unwrap();
        assert_eq!(
            resigned.headers[http::header::AUTHORIZATION],
            f.str("azurite_authorization"),
            "{}",
            f.name
        );
    }
    assert!(accepted >= 10, "only {accepted} accepted fixtures");
}

/// Requests sent by curl with a placeholder signature are refused as a bad signature, not
/// for any other reason (their dates and shape are fine).
#[test]
fn placeholder_signatures_are_bad_signatures() {
    let curl: Vec<Fixture> = all_request_fixtures()
        .into_iter()
        .filter(|f| f.str("client").starts_with("curl"))
        .collect();
    assert_eq!(curl.len(), 3);
    for f in curl {
        assert_eq!(
            verify(&f.parts, &f.account, &f.key, f.sent_at()),
            Err(AuthError::BadSignature),
            "{}",
            f.name
        );
    }
}

/// The SDK signs metadata headers in the service's collation, which is not byte order and
/// not Azurite's order either; verification accepts it through the service order.
#[test]
fn metadata_names_in_service_collation() {
    let f = load("put_blob_metadata_collation");
    let service = string_to_sign(&f.parts, &f.account, HeaderOrder::Service).unwrap();
    let bytes = string_to_sign(&f.parts, &f.account, HeaderOrder::Bytes).unwrap();
    assert_ne!(service, bytes);
    assert_ne!(service, f.str("azurite_string_to_sign"));
    assert!(
        service.contains("x-ms-meta-test:3\nx-ms-meta-test_a-:4\nx-ms-meta-test-_a:5\nx-ms-meta-test_z:2\nx-ms-meta-test-a:1\n"),
        "{service}"
    );
    assert_eq!(
        signature(&f.key, &service),
        sig_of(f.str("client_authorization"))
    );
    verify(&f.parts, &f.account, &f.key, f.sent_at()).unwrap();
}

/// Header names sorted by the SDK's emulation of the service, PR #33951's list among them.
#[test]
fn collation_matches_the_sdk() {
    let text = std::fs::read_to_string(fixtures_dir().join("collation.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let strings = |k: &str| -> Vec<String> {
        json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let mut ours = strings("input");
    ours.sort_by(|a, b| service_order(a, b));
    assert_eq!(ours, strings("sorted"));
}

/// A client key that is not the account's, and the date window.
#[test]
fn wrong_key_and_dates() {
    let f = load("put_blob_with_body");
    let other = AccountKey::from_base64("c3RvcmFnZWFjY291bnRrZXk=").unwrap();
    assert_eq!(
        verify(&f.parts, &f.account, &other, f.sent_at()),
        Err(AuthError::BadSignature)
    );
    for (offset, ok) in [(14 * 60, true), (16 * 60, false), (20 * 60, false)] {
        let later = f.sent_at() + Duration::from_secs(offset);
        let earlier = f.sent_at() - Duration::from_secs(offset);
        for now in [later, earlier] {
            let r = verify(&f.parts, &f.account, &f.key, now);
            assert_eq!(r.is_ok(), ok, "{offset} s: {r:?}");
            if !ok {
                assert_eq!(r.unwrap_err().reason(), "stale-date");
            }
        }
    }
    assert!(matches!(
        verify(&f.parts, "otheraccount", &f.key, f.sent_at()),
        Err(AuthError::WrongAccount { .. })
    ));
}

/// Every captured request classifies as the operation the SDK (or curl) performed.
#[test]
fn captured_requests_classify() {
    use Operation::*;
    for f in all_request_fixtures() {
        let expected = match f.name.as_str() {
            "create_container_content_length_0" => Ok(CreateContainer),
            "get_blob_with_range" => Ok(GetBlob),
            "list_blobs_prefix_include"
            | "curl_query_decoding"
            | "curl_repeated_query_parameter" => Ok(ListBlobs),
            "blob_batch_delete" => Ok(BlobBatch),
            "batch_part_delete_wal" | "batch_part_delete_percent_encoded" => Ok(DeleteBlob),
            "put_block_query_encoded_blockid" => Ok(PutBlock),
            "put_blob_with_body"
            | "put_blob_small"
            | "put_blob_metadata_collation"
            | "put_blob_percent_encoded_name" => Ok(PutBlob),
            // Set Blob Metadata (comp=metadata) is not an operation the gateway forwards.
            "curl_every_standard_header" => Err("operation-not-allowed"),
            other => panic!("no expectation for fixture {other}"),
        };
        let got = classify(&f.parts, &f.account)
            .map(|r| r.operation)
            .map_err(|e| e.reason());
        assert_eq!(got, expected, "{}", f.name);
    }
}

/// The gateway step on every request the SDK made and Azurite accepted: the same request
/// sent to the gateway (virtual account `pg-prod`, signed with its client key, a SAS
/// parameter added for good measure) verifies, classifies, is within scope, and rewritten
/// for `devstoreaccount1` carries exactly the Authorization header Azurite accepted.
#[test]
fn gateway_step_reproduces_accepted_requests() {
    let client_key = AccountKey::from_base64("Z2F0ZXdheS1vbmx5IGNsaWVudCBrZXk=").unwrap();
    let scope = Scope {
        containers: vec!["pgbackups".into()],
        permissions: vec![
            Permission::Read,
            Permission::List,
            Permission::Write,
            Permission::Delete,
        ],
    };
    let mut checked = 0;
    for f in all_request_fixtures() {
        if !f.json["azurite_accepted"].as_bool().unwrap()
            || f.str("target").contains("?restype=container&comp=batch")
        {
            continue;
        }
        let upstream =
            Upstream::new("http://127.0.0.1:47613/devstoreaccount1", &f.account).unwrap();
        let target = f
            .str("target")
            .replacen("/devstoreaccount1/", "/pg-prod/", 1);
        let target = if target.contains('?') {
            format!("{target}&sig=client%3D")
        } else {
            format!("{target}?sig=client%3D")
        };
        let mut headers: Vec<(String, String)> = f.json["headers"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "authorization")
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        headers.retain(|(k, _)| k != "host");
        headers.push((
            "host".into(),
            "egress-gate-blob.egress-gate.svc:10000".into(),
        ));
        let mut parts = request(f.str("method"), &target, &headers);
        sign(&mut parts, "pg-prod", &client_key).unwrap();

        verify(&parts, "pg-prod", &client_key, f.sent_at())
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let request = classify(&parts, "pg-prod").unwrap();
        scope.authorize(&request).unwrap();
        let mut upstream_parts = parts.clone();
        upstream
            .rewrite(
                &mut upstream_parts,
                "pg-prod",
                &Credential::SharedKey(f.key.clone()),
            )
            .unwrap();

        assert_eq!(
            upstream_parts.headers[http::header::AUTHORIZATION],
            f.str("azurite_authorization"),
            "{}",
            f.name
        );
        assert_eq!(
            upstream_parts.uri.path_and_query().unwrap().as_str(),
            f.str("target").trim_end_matches('?'),
            "{}",
            f.name
        );
        assert_eq!(upstream_parts.headers["host"], "127.0.0.1:47613");
        checked += 1;
    }
    assert!(
        checked >= 9,
        "only {checked} requests went through the gateway step"
    );
}

/// The Blob Batch barman-cloud's deletes produce, as the SDK sent it (see
/// `fixtures/blob/batch_delete_body.json`).
struct BatchFixture {
    json: Value,
    key: AccountKey,
    content_type: http::HeaderValue,
    now: SystemTime,
}

fn batch_fixture() -> BatchFixture {
    let text = std::fs::read_to_string(fixtures_dir().join("batch_delete_body.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    BatchFixture {
        key: AccountKey::from_base64(json["key"].as_str().unwrap()).unwrap(),
        content_type: http::HeaderValue::from_str(json["content_type"].as_str().unwrap()).unwrap(),
        now: httpdate::parse_http_date(json["x_ms_date"].as_str().unwrap()).unwrap(),
        json,
    }
}

impl BatchFixture {
    fn body(&self) -> &[u8] {
        self.json["body"].as_str().unwrap().as_bytes()
    }
    fn accepted(&self) -> Vec<String> {
        let parts = self.json["parts"].as_array().unwrap();
        assert_eq!(parts.len(), 3);
        parts
            .iter()
            .map(|p| {
                assert!(p["azurite_accepted"].as_bool().unwrap());
                p["azurite_authorization"].as_str().unwrap().to_owned()
            })
            .collect()
    }
}

fn delete_scope(permissions: Vec<Permission>) -> Scope {
    Scope {
        containers: vec!["batchcap".into()],
        permissions,
    }
}

fn authorizations(body: &[u8], content_type: &http::HeaderValue) -> Vec<String> {
    let batch = Batch::parse(body, &boundary(content_type).unwrap()).unwrap();
    batch
        .parts
        .iter()
        .map(|p| {
            p.request.headers["authorization"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// The batch exactly as the SDK signed it verifies part by part (with the account's key
/// standing in as the client key), and re-signing reproduces every part's header.
#[test]
fn batch_parts_as_the_sdk_signed_them() {
    let f = batch_fixture();
    let upstream = Upstream::new(
        "http://127.0.0.1:47613/devstoreaccount1",
        "devstoreaccount1",
    )
    .unwrap();
    let scope = delete_scope(vec![Permission::Delete]);
    let check = PartCheck {
        virtual_account: "devstoreaccount1",
        container: "batchcap",
        client_key: &f.key,
        scope: &scope,
        upstream: &upstream,
        credential: &Credential::SharedKey(f.key.clone()),
        now: f.now,
    };
    let out = rewrite_body(f.body(), &f.content_type, &check).unwrap();
    assert_eq!(authorizations(&out, &f.content_type), f.accepted());
}

/// A batch sent to the gateway as virtual account `pg-prod` comes out for
/// `devstoreaccount1` with every part carrying the header Azurite accepted, its path
/// rewritten, and a body length that differs from the client's.
#[test]
fn batch_through_the_gateway() {
    let f = batch_fixture();
    let client_key = AccountKey::from_base64("Z2F0ZXdheS1vbmx5IGNsaWVudCBrZXk=").unwrap();
    let boundary_text = boundary(&f.content_type).unwrap();
    // The client's batch: the same parts, addressed to and signed for pg-prod.
    let client_body = f.json["body"]
        .as_str()
        .unwrap()
        .replace(" /devstoreaccount1/", " /pg-prod/");
    let mut batch = Batch::parse(client_body.as_bytes(), &boundary_text).unwrap();
    for part in &mut batch.parts {
        sign(&mut part.request, "pg-prod", &client_key).unwrap();
    }
    let client_body = batch.to_bytes();
    let upstream = Upstream::new(
        "http://127.0.0.1:47613/devstoreaccount1",
        "devstoreaccount1",
    )
    .unwrap();
    let scope = delete_scope(vec![Permission::Read, Permission::List, Permission::Delete]);
    let check = PartCheck {
        virtual_account: "pg-prod",
        container: "batchcap",
        client_key: &client_key,
        scope: &scope,
        upstream: &upstream,
        credential: &Credential::SharedKey(f.key.clone()),
        now: f.now,
    };
    let out = rewrite_body(&client_body, &f.content_type, &check).unwrap();
    assert_eq!(authorizations(&out, &f.content_type), f.accepted());
    let rewritten = Batch::parse(&out, &boundary_text).unwrap();
    assert_eq!(
        rewritten.parts[2].request.uri.to_string(),
        "/devstoreaccount1/batchcap/dir%20with%20space/%C3%BC%2Bx.txt"
    );
    assert_ne!(out.len(), client_body.len());

    // Without the delete permission, or with a part signed by another key, nothing passes.
    let no_delete = delete_scope(vec![Permission::Read, Permission::List, Permission::Write]);
    let e = rewrite_body(
        &client_body,
        &f.content_type,
        &PartCheck {
            scope: &no_delete,
            ..check
        },
    )
    .unwrap_err();
    assert_eq!(e.reason(), "permission-denied");
    assert!(matches!(e, BatchError::Refused { index: 0, .. }), "{e}");
    let other = delete_scope(vec![Permission::Delete]);
    let other = Scope {
        containers: vec!["velero".into()],
        ..other
    };
    let e = rewrite_body(
        &client_body,
        &f.content_type,
        &PartCheck {
            scope: &other,
            ..check
        },
    )
    .unwrap_err();
    assert_eq!(e.reason(), "container-not-allowed");
    let mut tampered = Batch::parse(&client_body, &boundary_text).unwrap();
    tampered.parts[1].request.uri = "/pg-prod/batchcap/base/20261206T1800/other.tar"
        .parse()
        .unwrap();
    let e = rewrite_body(&tampered.to_bytes(), &f.content_type, &check).unwrap_err();
    assert!(
        matches!(
            e,
            BatchError::Auth {
                index: 1,
                source: AuthError::BadSignature
            }
        ),
        "{e}"
    );
    // The SDK's own signatures are for devstoreaccount1's key, not pg-prod's client key.
    let e = rewrite_body(f.body(), &f.content_type, &check).unwrap_err();
    assert_eq!(e.reason(), "wrong-account");
}

/// The same batch as azure-storage-blob sends it to a host other than `localhost` or
/// `127.0.0.1` (a Service name): each part's path relative to the account
/// (`/batchcap/...`), signed over `/pg-prod/batchcap/...`. It comes out exactly like the
/// path-style batch: for the path-style upstream with the headers Azurite accepted, for a
/// host-style account as `/batchcap/...` signed for the real account. A part for another
/// container, in either form, stops the batch.
#[test]
fn batch_with_account_relative_part_paths() {
    let f = batch_fixture();
    let client_key = AccountKey::from_base64("Z2F0ZXdheS1vbmx5IGNsaWVudCBrZXk=").unwrap();
    let boundary_text = boundary(&f.content_type).unwrap();
    let signed = |body: String| {
        let mut batch = Batch::parse(body.as_bytes(), &boundary_text).unwrap();
        for part in &mut batch.parts {
            sign(&mut part.request, "pg-prod", &client_key).unwrap();
        }
        batch.to_bytes()
    };
    let sdk_body = f.json["body"].as_str().unwrap();
    let relative = signed(sdk_body.replace(" /devstoreaccount1/", " /"));
    let parsed = Batch::parse(&relative, &boundary_text).unwrap();
    assert!(parsed.parts[0].request.uri.path().starts_with("/batchcap/"));
    let azurite = Upstream::new(
        "http://127.0.0.1:47613/devstoreaccount1",
        "devstoreaccount1",
    )
    .unwrap();
    let scope = delete_scope(vec![Permission::Delete]);
    let credential = Credential::SharedKey(f.key.clone());
    let check = PartCheck {
        virtual_account: "pg-prod",
        container: "batchcap",
        client_key: &client_key,
        scope: &scope,
        upstream: &azurite,
        credential: &credential,
        now: f.now,
    };
    let out = rewrite_body(&relative, &f.content_type, &check).unwrap();
    assert_eq!(authorizations(&out, &f.content_type), f.accepted());
    let path_style = signed(sdk_body.replace(" /devstoreaccount1/", " /pg-prod/"));
    assert_eq!(
        out,
        rewrite_body(&path_style, &f.content_type, &check).unwrap()
    );

    // A host-style real account: the part keeps its account-relative path and is signed
    // over /<real account>/<container>/<blob>.
    let azure = Upstream::new(
        "https://devstoreaccount1.blob.core.windows.net",
        "devstoreaccount1",
    )
    .unwrap();
    let out = rewrite_body(
        &relative,
        &f.content_type,
        &PartCheck {
            upstream: &azure,
            ..check
        },
    )
    .unwrap();
    let rewritten = Batch::parse(&out, &boundary_text).unwrap();
    for part in &rewritten.parts {
        let r = &part.request;
        assert!(r.uri.path().starts_with("/batchcap/"), "{}", r.uri);
        let sts = string_to_sign(r, "devstoreaccount1", HeaderOrder::Service).unwrap();
        assert!(sts.contains("\n/devstoreaccount1/batchcap/"), "{sts}");
        let expected = format!("SharedKey devstoreaccount1:{}", signature(&f.key, &sts));
        assert_eq!(r.headers["authorization"], expected.as_str());
    }
    assert_eq!(
        rewritten.parts[2].request.uri.to_string(),
        "/batchcap/dir%20with%20space/%C3%BC%2Bx.txt"
    );

    // A part for another container, relative or with the account, even one the account
    // may use: the batch was authorized for batchcap only.
    let wide = Scope {
        containers: vec!["batchcap".into(), "velero".into()],
        permissions: vec![Permission::Delete],
    };
    for other in [
        " /velero/",
        " /pg-prod/velero/",
        " /devstoreaccount1/batchcap/",
    ] {
        let body = signed(sdk_body.replace(" /devstoreaccount1/batchcap/", other));
        let e = rewrite_body(
            &body,
            &f.content_type,
            &PartCheck {
                scope: &wide,
                ..check
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, BatchError::OtherContainer { index: 0, .. }),
            "{other}: {e}"
        );
        assert_eq!(e.reason(), "container-not-allowed");
    }
    // A container named like the account: `/pg-prod/pg-prod/...` reads two ways.
    let same_name = Scope {
        containers: vec!["pg-prod".into()],
        permissions: vec![Permission::Delete],
    };
    let body = signed(sdk_body.replace(" /devstoreaccount1/batchcap/", " /pg-prod/pg-prod/"));
    let e = rewrite_body(
        &body,
        &f.content_type,
        &PartCheck {
            scope: &same_name,
            container: "pg-prod",
            ..check
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, BatchError::AmbiguousPath { index: 0, .. }),
        "{e}"
    );
    // Relative to the account in that container is still one reading.
    let body = signed(sdk_body.replace(" /devstoreaccount1/batchcap/", " /pg-prod/"));
    let out = rewrite_body(
        &body,
        &f.content_type,
        &PartCheck {
            scope: &same_name,
            container: "pg-prod",
            ..check
        },
    )
    .unwrap();
    let rewritten = Batch::parse(&out, &boundary_text).unwrap();
    assert!(
        rewritten.parts[0]
            .request
            .uri
            .path()
            .starts_with("/devstoreaccount1/pg-prod/"),
        "{}",
        rewritten.parts[0].request.uri
    );
}

/// The parts of a generated request, kept apart so one of them can be changed.
#[derive(Debug, Clone)]
struct Spec {
    method: &'static str,
    path: Vec<String>,
    query: Vec<(String, String)>,
    ms_headers: Vec<(String, String)>,
    content_length: u64,
}

const DATE: &str = "Sun, 06 Dec 2026 17:19:43 GMT";
const ACCOUNT: &str = "pgprod";

/// Percent-encodes everything but unreserved characters (so `+`, `%`, `/` and spaces in
/// generated names and values survive the trip).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Spec {
    fn parts(&self) -> Parts {
        let mut target = format!("/{ACCOUNT}");
        for seg in &self.path {
            target.push('/');
            target.push_str(&encode(seg));
        }
        if !self.query.is_empty() {
            let q: Vec<String> = self
                .query
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            target.push('?');
            target.push_str(&q.join("&"));
        }
        let mut headers = vec![
            ("x-ms-date".to_owned(), DATE.to_owned()),
            ("x-ms-version".to_owned(), "2026-10-06".to_owned()),
            ("content-length".to_owned(), self.content_length.to_string()),
        ];
        headers.extend(self.ms_headers.iter().cloned());
        request(self.method, &target, &headers)
    }
}

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "HEAD"];

fn spec() -> impl Strategy<Value = Spec> {
    let segment = "[a-zA-Z0-9 %+/_.~-]{1,12}";
    // Parameter names are distinct and lowercase, so a changed value or an added name is a
    // changed request; values are any printable text.
    let query = proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,12}", 0..5)
        .prop_map(|m| m.into_iter().collect::<Vec<_>>());
    let ms = proptest::collection::btree_map(
        "x-ms-[a-z][a-z_-]{0,10}[a-z]",
        "[!-~]([ -~]{0,10}[!-~])?",
        0..4,
    )
    .prop_map(|m| {
        m.into_iter()
            .filter(|(k, _)| k != "x-ms-date" && k != "x-ms-version")
            .collect::<Vec<_>>()
    });
    (
        0..METHODS.len(),
        proptest::collection::vec(segment, 1..4),
        query,
        ms,
        0u64..1 << 40,
    )
        .prop_map(|(m, path, query, ms_headers, content_length)| Spec {
            method: METHODS[m],
            path,
            query,
            ms_headers,
            content_length,
        })
}

fn key() -> AccountKey {
    AccountKey::from_base64("Z2F0ZXdheS1vbmx5IGNsaWVudCBrZXkgZm9yIHByb3BlcnR5IHRlc3Rz").unwrap()
}

fn now() -> SystemTime {
    httpdate::parse_http_date(DATE).unwrap()
}

/// Signs `spec`, then rebuilds the request from `changed` and carries the signature over.
fn sign_then_change(spec: &Spec, changed: &Spec) -> Result<(), AuthError> {
    let mut signed = spec.parts();
    sign(&mut signed, ACCOUNT, &key()).unwrap();
    let mut replay = changed.parts();
    replay.headers.insert(
        http::header::AUTHORIZATION,
        signed.headers[http::header::AUTHORIZATION].clone(),
    );
    verify(&replay, ACCOUNT, &key(), now())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sign_then_verify(spec in spec()) {
        prop_assert_eq!(sign_then_change(&spec, &spec), Ok(()));
        let parts = spec.parts();
        let mut signed = parts.clone();
        sign(&mut signed, ACCOUNT, &key()).unwrap();
        prop_assert_eq!(credential(&signed.headers).unwrap().account, ACCOUNT);
    }

    #[test]
    fn any_single_change_fails(spec in spec(), which in 0..6usize, pick in any::<prop::sample::Index>()) {
        let mut changed = spec.clone();
        match which {
            0 => {
                let i = METHODS.iter().position(|m| *m == spec.method).unwrap();
                changed.method = METHODS[(i + 1 + pick.index(METHODS.len() - 1)) % METHODS.len()];
            }
            1 => {
                let i = pick.index(changed.path.len());
                changed.path[i].push('x');
            }
            2 => changed.query.push(("zzadded".to_owned(), String::new())),
            3 => match changed.query.len() {
                0 => changed.query.push(("comp".to_owned(), "list".to_owned())),
                n => changed.query[pick.index(n)].1.push('x'),
            },
            4 => match changed.ms_headers.len() {
                0 => changed.ms_headers.push(("x-ms-copy-source".to_owned(), "https://a/b".to_owned())),
                n => changed.ms_headers[pick.index(n)].1.push('x'),
            },
            _ => changed.content_length += 1,
        }
        prop_assert_eq!(sign_then_change(&spec, &changed), Err(AuthError::BadSignature));
    }
}
