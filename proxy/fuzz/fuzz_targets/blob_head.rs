//! The gateway's serving head path on arbitrary bytes: a request head parsed as hyper's
//! server parses it (httparse, then `http` types), then the steps `blob::serve` runs in the
//! same order: Shared Key verification, operation classification, authorization, and the
//! rewrite and re-signing for the real account. Nothing may panic, and three properties
//! must hold for every head the parser accepts:
//! - a head signed with the client key verifies with it (the verifier and the signer agree
//!   on every header and query the parser lets through);
//! - a rewritten request verifies with the REAL key for the real account (the upstream
//!   accepts what the gateway signs);
//! - the rewritten request classifies as the same operation on the same container and blob
//!   as the one authorized (the rewrite cannot turn an allowed call into another).
#![no_main]

use std::time::{Duration, SystemTime};

use egress_proxy::blob::operation::{Permission, Scope, classify};
use egress_proxy::blob::rewrite::Upstream;
use egress_proxy::blob::shared_key::{AccountKey, sign, verify};
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;

/// The virtual account: the fixtures' (Azurite's development account), so the seeds taken
/// from them classify.
const VIRTUAL: &str = "devstoreaccount1";
/// The real account behind it, path style, as the gateway serves Azurite.
const REAL: &str = "realacct";
/// The workload's key.
const CLIENT_KEY: &str = "Z2F0ZXdheS1vbmx5IGNsaWVudCBrZXk=";
/// The real account's key.
const REAL_KEY: &str = "cmVhbC1hY2NvdW50LWtleQ==";
/// Headers hyper's server parses at most by default (`h1_max_headers`).
const MAX_HEADERS: usize = 100;
/// Headers the gateway strips before rewriting (`serve::HOP_BY_HOP`).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// Parses a request head the way hyper 1's HTTP/1 server does; `None` where it would
/// answer 400 or 431 itself.
fn parse(data: &[u8]) -> Option<Parts> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(data).ok()? else {
        return None;
    };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri = Uri::try_from(req.path?).ok()?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        builder = builder.header(name, value);
    }
    Some(builder.body(()).ok()?.into_parts().0)
}

fuzz_target!(|data: &[u8]| {
    let Some(mut parts) = parse(data) else {
        return;
    };
    let (Ok(client_key), Ok(real_key)) = (
        AccountKey::from_base64(CLIENT_KEY),
        AccountKey::from_base64(REAL_KEY),
    ) else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_578_167);
    let Ok(upstream) = Upstream::new("http://127.0.0.1:10000/realacct", REAL, real_key.clone())
    else {
        return;
    };
    let scope = Scope {
        containers: vec!["pgbackups".into()],
        permissions: vec![
            Permission::Read,
            Permission::List,
            Permission::Write,
            Permission::Delete,
        ],
    };
    // The head as sent: whatever its own signature and date say.
    let _ = verify(&parts, VIRTUAL, &client_key, now);
    let _ = classify(&parts, VIRTUAL);

    // The same head, signed now with the client key: the verifier must accept it.
    parts
        .headers
        .insert("x-ms-date", HeaderValue::from_static("Sun, 06 Dec 2026 17:29:27 GMT"));
    if sign(&mut parts, VIRTUAL, &client_key).is_err() {
        return;
    }
    if let Err(e) = verify(&parts, VIRTUAL, &client_key, now) {
        panic!("a request signed with the client key does not verify: {e}");
    }
    let Ok(classified) = classify(&parts, VIRTUAL) else {
        return;
    };
    if scope.authorize(&classified).is_err() {
        return;
    }
    let operation = classified.operation;
    let container = classified.resource.container.to_owned();
    let blob = classified.resource.blob.map(str::to_owned);
    for header in HOP_BY_HOP {
        parts.headers.remove(header);
    }
    let mut upstream_parts = parts.clone();
    if upstream.rewrite(&mut upstream_parts, VIRTUAL).is_err() {
        return;
    }
    // What the upstream receives: origin-form, as hyper's client writes it.
    let origin = upstream_parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Ok(uri) = Uri::try_from(origin.as_str()) else {
        panic!("the rewritten target {origin:?} does not parse back");
    };
    upstream_parts.uri = uri;
    if let Err(e) = verify(&upstream_parts, REAL, &real_key, now) {
        panic!("the upstream request does not verify with the real key: {e}");
    }
    match classify(&upstream_parts, REAL) {
        Ok(seen) => {
            assert_eq!(seen.operation, operation, "{origin}");
            assert_eq!(seen.resource.container, container, "{origin}");
            assert_eq!(seen.resource.blob.map(str::to_owned), blob, "{origin}");
        }
        Err(e) => panic!("the upstream request {origin:?} classifies differently: {e}"),
    }
});
