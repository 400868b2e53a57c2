//! Service SAS known answers. Each file under `fixtures/blob/sas/` is one SAS the Azure SDK
//! for Python signed (with the string-to-sign its `sts_hook` reported) and one request
//! carrying it to Azurite (with the string-to-sign and signature Azurite logged, and its
//! answer); `fixtures/blob/sas/README.md` says how they were made. The gateway must build the
//! same string byte for byte, compute the same signature, and accept or refuse the request as
//! the fixture records.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use egress_proxy::blob::operation::classify;
use egress_proxy::blob::sas::{self, Context, SasError, Transport, parse_time};
use egress_proxy::blob::shared_key::{AccountKey, signature};
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
