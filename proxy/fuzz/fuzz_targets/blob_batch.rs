//! The Blob Batch body path: every byte of a batch a client sends goes through the
//! multipart parser, then each part through Shared Key verification and classification.
//! None may panic; a parsed batch written back must parse to the same requests, and writing
//! is stable (written twice, the same bytes). The Content-Type parser sees the same bytes.
//! The batch is then signed part by part with the client key and rewritten for a path-style
//! upstream as the gateway does (paths with the account segment or relative to it): a batch
//! that passes has every part in the batch's container of the real account, signed there.
#![no_main]

use std::time::{Duration, SystemTime};

use egress_proxy::blob::batch::{Batch, PartCheck, boundary, rewrite_body};
use egress_proxy::blob::operation::{Permission, Scope, classify};
use egress_proxy::blob::rewrite::Upstream;
use egress_proxy::blob::shared_key::{AccountKey, HeaderOrder, sign, string_to_sign, verify};
use egress_proxy::blob::upstream_auth::Credential;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

/// The boundary the seeds use.
const BOUNDARY: &str = "batch_fuzz";

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let _ = boundary(&v);
    }
    let Ok(batch) = Batch::parse(data, BOUNDARY) else {
        return;
    };
    let written = batch.to_bytes();
    let again = match Batch::parse(&written, BOUNDARY) {
        Ok(b) => b,
        Err(e) => panic!("a written batch does not parse: {e}"),
    };
    assert_eq!(batch.parts.len(), again.parts.len());
    for (a, b) in batch.parts.iter().zip(&again.parts) {
        assert_eq!(a.request.method, b.request.method);
        assert_eq!(a.request.uri, b.request.uri);
        assert_eq!(a.request.headers, b.request.headers);
    }
    assert_eq!(again.to_bytes(), written);
    let Ok(key) = AccountKey::from_base64("Z2F0ZXdheS1vbmx5IGNsaWVudCBrZXk=") else {
        return;
    };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_578_167);
    for part in &batch.parts {
        let _ = classify(&part.request, "pg-prod");
        let _ = string_to_sign(&part.request, "pg-prod", HeaderOrder::Bytes);
        let _ = verify(&part.request, "pg-prod", &key, now);
    }
    let mut signed = batch;
    for part in &mut signed.parts {
        if sign(&mut part.request, "pg-prod", &key).is_err() {
            return;
        }
    }
    let (Ok(upstream), Ok(content_type)) = (
        Upstream::new("http://127.0.0.1:10000/realacct", "realacct"),
        HeaderValue::from_str(&format!("multipart/mixed; boundary={BOUNDARY}")),
    ) else {
        return;
    };
    let scope = Scope {
        containers: vec!["pgbackups".into(), "pg-prod".into()],
        permissions: vec![Permission::Delete],
    };
    let credential = Credential::SharedKey(key.clone());
    let check = PartCheck {
        virtual_account: "pg-prod",
        container: "pgbackups",
        client_key: &key,
        scope: &scope,
        upstream: &upstream,
        credential: &credential,
        now,
    };
    let Ok(out) = rewrite_body(&signed.to_bytes(), &content_type, &check) else {
        return;
    };
    let out = match Batch::parse(&out, BOUNDARY) {
        Ok(b) => b,
        Err(e) => panic!("a rewritten batch does not parse: {e}"),
    };
    for part in &out.parts {
        let path = part.request.uri.path();
        assert!(
            path.starts_with("/realacct/pgbackups/"),
            "a part left the batch's container: {path}"
        );
        assert!(verify(&part.request, "realacct", &key, now).is_ok());
    }
});
