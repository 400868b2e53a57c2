//! The Blob Batch body path: every byte of a batch a client sends goes through the
//! multipart parser, then each part through Shared Key verification and classification.
//! None may panic; a parsed batch written back must parse to the same requests, and writing
//! is stable (written twice, the same bytes). The Content-Type parser sees the same bytes.
#![no_main]

use std::time::{Duration, SystemTime};

use egress_proxy::blob::batch::{Batch, boundary};
use egress_proxy::blob::operation::classify;
use egress_proxy::blob::shared_key::{AccountKey, HeaderOrder, string_to_sign, verify};
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
});
