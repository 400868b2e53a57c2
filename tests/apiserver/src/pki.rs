//! The API server's certificates and the ServiceAccount signing key, made fresh per start.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// PEM files for one API server.
pub(crate) struct Pki {
    /// The CA clients trust.
    pub(crate) ca_pem: String,
    /// The same CA in DER.
    pub(crate) ca_der: Vec<u8>,
    /// The serving certificate, for 127.0.0.1 and localhost.
    pub(crate) serving_cert_pem: String,
    /// Its key.
    pub(crate) serving_key_pem: String,
    /// The ServiceAccount token signing key (ECDSA P-256, PKCS#8).
    pub(crate) sa_key_pem: String,
    /// Its public half, which the API server verifies tokens with.
    pub(crate) sa_pub_pem: String,
}

impl Pki {
    /// A new CA, a serving certificate it signs, and a signing key pair.
    pub(crate) fn generate() -> Result<Self, rcgen::Error> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "egress-gate test kube-apiserver CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut serving =
            CertificateParams::new(vec!["localhost".to_string(), "kubernetes".to_string()])?;
        serving
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca)?;

        let sa = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            sa_key_pem: sa.serialize_pem(),
            sa_pub_pem: sa.public_key_pem(),
        })
    }
}
