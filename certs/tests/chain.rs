//! Generated chains verify with rustls/webpki for the Service's names only, inside their
//! validity only, and carry a real TLS handshake.
// Helpers here are test code too: a panic in them is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{DAY, certs_from_pem, provider, t0, verify};
use egress_gate_certs::pki::{CLOCK_SKEW_ALLOWANCE, CertificateAuthority, KeyAlgorithm};
use egress_gate_certs::{BundleRequest, ServiceIdentity, generate_bundle};
use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn request() -> BundleRequest {
    let mut req = BundleRequest::new("egress-webhook", "egress-gate");
    req.identity.extra_dns_names = vec!["webhook.example.com".into()];
    req.identity.extra_ips = vec!["10.96.0.42".parse().unwrap()];
    req
}

#[test]
fn verifies_for_every_service_name_and_extra() {
    let bundle = generate_bundle(&request(), t0()).unwrap();
    for name in [
        "egress-webhook",
        "egress-webhook.egress-gate",
        "egress-webhook.egress-gate.svc",
        "egress-webhook.egress-gate.svc.cluster.local",
        "webhook.example.com",
        "10.96.0.42",
    ] {
        verify(&bundle.ca_cert_pem, &bundle.cert_pem, name, t0())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn fails_for_other_names() {
    let bundle = generate_bundle(&request(), t0()).unwrap();
    for name in [
        "egress-proxy.egress-gate.svc",
        "egress-webhook.default.svc",
        "egress-webhook.egress-gate.svc.cluster.example",
        "evil.egress-webhook.egress-gate.svc",
        "example.com",
        "10.96.0.43",
    ] {
        let err = verify(&bundle.ca_cert_pem, &bundle.cert_pem, name, t0());
        assert!(err.is_err(), "{name} verified but must not");
    }
}

#[test]
fn custom_cluster_domain_replaces_the_default() {
    let mut req = request();
    req.identity.cluster_domain = "corp.internal".into();
    let bundle = generate_bundle(&req, t0()).unwrap();
    let ca = &bundle.ca_cert_pem;
    verify(
        ca,
        &bundle.cert_pem,
        "egress-webhook.egress-gate.svc.corp.internal",
        t0(),
    )
    .unwrap();
    assert!(
        verify(
            ca,
            &bundle.cert_pem,
            "egress-webhook.egress-gate.svc.cluster.local",
            t0()
        )
        .is_err()
    );
}

#[test]
fn fails_outside_validity_and_under_another_ca() {
    let mut req = request();
    req.validity = 30 * DAY;
    let bundle = generate_bundle(&req, t0()).unwrap();
    let name = "egress-webhook.egress-gate.svc";
    verify(
        &bundle.ca_cert_pem,
        &bundle.cert_pem,
        name,
        t0() - CLOCK_SKEW_ALLOWANCE,
    )
    .unwrap();
    verify(
        &bundle.ca_cert_pem,
        &bundle.cert_pem,
        name,
        t0() + 30 * DAY - common::DAY / 24,
    )
    .unwrap();
    assert!(verify(&bundle.ca_cert_pem, &bundle.cert_pem, name, t0() + 31 * DAY).is_err());
    assert!(
        verify(
            &bundle.ca_cert_pem,
            &bundle.cert_pem,
            name,
            t0() - 2 * CLOCK_SKEW_ALLOWANCE
        )
        .is_err()
    );

    let other = generate_bundle(&req, t0()).unwrap();
    assert!(verify(&other.ca_cert_pem, &bundle.cert_pem, name, t0()).is_err());
}

#[test]
fn p384_chain_verifies() {
    let ca =
        CertificateAuthority::generate("p384", KeyAlgorithm::EcdsaP384, t0(), 10 * DAY).unwrap();
    let id = ServiceIdentity::new("egress-webhook", "egress-gate");
    let leaf = ca
        .issue_serving(&id, KeyAlgorithm::EcdsaP384, t0(), DAY)
        .unwrap();
    verify(
        &ca.cert_pem(),
        leaf.cert_pem(),
        "egress-webhook.egress-gate.svc",
        t0(),
    )
    .unwrap();
}

#[test]
fn ca_loaded_from_pem_issues_trusted_certificates() {
    let bundle = generate_bundle(&request(), t0()).unwrap();
    let ca = CertificateAuthority::from_pem(&bundle.ca_cert_pem, &bundle.ca_key_pem).unwrap();
    let id = ServiceIdentity::new("egress-webhook", "egress-gate");
    let leaf = ca
        .issue_serving(&id, KeyAlgorithm::EcdsaP256, t0() + DAY, DAY)
        .unwrap();
    verify(
        &bundle.ca_cert_pem,
        leaf.cert_pem(),
        "egress-webhook.egress-gate.svc",
        t0() + DAY,
    )
    .unwrap();
}

async fn handshake(server_name: &str) -> Result<Vec<u8>, std::io::Error> {
    // Issued now: the handshake checks validity against the real clock.
    let now = std::time::SystemTime::now();
    let bundle = generate_bundle(&request(), now).unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            certs_from_pem(&bundle.cert_pem),
            rustls::pki_types::PrivateKeyDer::from_pem_slice(bundle.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await
    });

    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_from_pem(&bundle.ca_cert_pem) {
        roots.add(ca).unwrap();
    }
    let client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let result = async {
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"ping").await?;
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await?;
        Ok(reply)
    }
    .await;
    let _ = server.await;
    result
}

#[tokio::test]
async fn tls_handshake_with_the_issued_certificate() {
    assert_eq!(
        handshake("egress-webhook.egress-gate.svc").await.unwrap(),
        b"pong"
    );
}

#[tokio::test]
async fn tls_handshake_fails_for_another_name() {
    let err = handshake("egress-proxy.egress-gate.svc").await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}
