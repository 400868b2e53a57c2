//! `write_bundle`: PEM files and the Secret manifest, as `egress-webhook certs` writes them.
// Helpers here are test code too: a panic in them is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine as _;
use egress_gate_certs::{BundleOutput, BundleRequest, write_bundle};

const NAME: &str = "egress-webhook.egress-gate.svc";

fn b64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .unwrap()
}

#[test]
fn secret_manifest_is_a_tls_secret_with_the_ca() {
    let request = BundleRequest::new("egress-webhook", "egress-gate");
    let mut out = Vec::new();
    let summary = write_bundle(&request, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(doc["apiVersion"], "v1");
    assert_eq!(doc["kind"], "Secret");
    assert_eq!(doc["type"], "kubernetes.io/tls");
    assert_eq!(doc["metadata"]["name"], "egress-webhook-tls");
    assert_eq!(doc["metadata"]["namespace"], "egress-gate");
    let data = doc["data"].as_mapping().unwrap();
    let keys: Vec<_> = data.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        keys,
        ["ca.crt", "tls.crt", "tls.key"],
        "no CA key unless asked"
    );
    let ca = String::from_utf8(b64(doc["data"]["ca.crt"].as_str().unwrap())).unwrap();
    let leaf = String::from_utf8(b64(doc["data"]["tls.crt"].as_str().unwrap())).unwrap();
    common::verify(&ca, &leaf, NAME, std::time::SystemTime::now()).unwrap();
    // caBundle is base64 of ca.crt, printed as the last comment line.
    assert_eq!(b64(&summary.ca_bundle_base64), ca.as_bytes());
    assert!(
        text.trim_end()
            .ends_with(&format!("# {}", summary.ca_bundle_base64))
    );
}

#[test]
fn out_dir_gets_pem_files_with_private_keys_unreadable_to_others() {
    let dir = std::env::temp_dir().join(format!("egress-gate-certs-{}", std::process::id()));
    let mut request = BundleRequest::new("egress-webhook", "egress-gate");
    request.output = BundleOutput::Dir(dir.clone());
    request.include_ca_key = true;
    let mut out = Vec::new();
    let summary = write_bundle(&request, &mut out).unwrap();
    let names: Vec<_> = summary
        .files
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["ca.crt", "tls.crt", "tls.key", "ca.key"]);
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    common::verify(
        &read("ca.crt"),
        &read("tls.crt"),
        NAME,
        std::time::SystemTime::now(),
    )
    .unwrap();
    egress_gate_certs::CertificateAuthority::from_pem(&read("ca.crt"), &read("ca.key")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for secret in ["tls.key", "ca.key"] {
            let mode = std::fs::metadata(dir.join(secret))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{secret} is readable by others: {mode:o}");
        }
    }
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(&format!("caBundle: {}", summary.ca_bundle_base64)));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn invalid_requests_are_refused_before_writing() {
    let mut request = BundleRequest::new("egress-webhook", "Egress_Gate");
    request.output = BundleOutput::Dir(std::env::temp_dir().join("egress-gate-certs-never"));
    let err = write_bundle(&request, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("namespace"), "{err}");
    assert!(
        !std::env::temp_dir()
            .join("egress-gate-certs-never")
            .exists()
    );
}
