//! The CA and the webhook's serving certificate: generation, PEM in and out, reading back.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::CertError;

/// Kubernetes' default cluster DNS domain; most clusters keep it.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// How far `notBefore` is set before "now": nodes' clocks drift, and an API server a minute
/// behind the webhook's node must not see a certificate that is not valid yet.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// The key type of generated certificates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256: small, fast, and accepted by every API server (Go's TLS
    /// stack and rustls alike). The default.
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384, for policies that ask for it.
    EcdsaP384,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }

    fn generate(self) -> Result<KeyPair, CertError> {
        Ok(KeyPair::generate_for(self.rcgen())?)
    }
}

/// The Service the webhook is reached through, and so the names its certificate must carry.
///
/// The API server dials `<service>.<namespace>.svc`; the other names cover clients inside
/// the cluster that use a shorter or the fully qualified form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIdentity {
    /// The Service's name, e.g. `egress-webhook`.
    pub service: String,
    /// The Service's namespace, e.g. `egress-gate`.
    pub namespace: String,
    /// The cluster DNS domain, `cluster.local` unless the cluster was set up otherwise.
    pub cluster_domain: String,
    /// More DNS names to put in the certificate (a name used from outside the cluster).
    pub extra_dns_names: Vec<String>,
    /// IP addresses to put in the certificate (a webhook reached by URL, say).
    pub extra_ips: Vec<IpAddr>,
}

impl ServiceIdentity {
    /// The identity of `service` in `namespace`, with the default cluster domain and no
    /// extra names.
    pub fn new(service: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            namespace: namespace.into(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
            extra_dns_names: Vec::new(),
            extra_ips: Vec::new(),
        }
    }

    /// The name the API server uses and the certificate's common name:
    /// `<service>.<namespace>.svc`.
    pub fn service_host(&self) -> String {
        format!("{}.{}.svc", self.service, self.namespace)
    }

    /// Every DNS name the certificate carries, in this order and without duplicates:
    /// `<svc>`, `<svc>.<ns>`, `<svc>.<ns>.svc`, `<svc>.<ns>.svc.<clusterDomain>`, then the
    /// extra names.
    pub fn dns_names(&self) -> Vec<String> {
        let host = self.service_host();
        let fqdn = format!("{host}.{}", normalise_dns(&self.cluster_domain));
        let mut names = vec![
            self.service.clone(),
            format!("{}.{}", self.service, self.namespace),
            host,
            fqdn,
        ];
        for extra in &self.extra_dns_names {
            let extra = normalise_dns(extra);
            if !names.contains(&extra) {
                names.push(extra);
            }
        }
        names
    }

    /// Checks that every name is a DNS name a certificate can carry (RFC 1123 labels, no
    /// wildcards), naming the offending setting.
    pub fn validate(&self) -> Result<(), CertError> {
        validate_label("service", &self.service)?;
        validate_label("namespace", &self.namespace)?;
        validate_dns_name("clusterDomain", &normalise_dns(&self.cluster_domain))?;
        for (i, name) in self.extra_dns_names.iter().enumerate() {
            validate_dns_name(&format!("dns[{i}]"), &normalise_dns(name))?;
        }
        Ok(())
    }
}

fn normalise_dns(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `label` is an RFC 1123 DNS label as Kubernetes names use them: 1 to 63
/// lower-case letters, digits or `-`, not starting or ending with `-`.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn validate_label(setting: &str, label: &str) -> Result<(), CertError> {
    if is_dns_label(label) {
        Ok(())
    } else {
        Err(CertError::Invalid(format!(
            "{setting} {label:?}: must be a DNS label (lower-case letters, digits and '-', at most 63)"
        )))
    }
}

fn validate_dns_name(setting: &str, name: &str) -> Result<(), CertError> {
    if name.is_empty() || name.len() > 253 {
        return Err(CertError::Invalid(format!(
            "{setting} {name:?}: must be a DNS name of 1 to 253 characters"
        )));
    }
    for label in name.split('.') {
        validate_label(setting, label).map_err(|_| {
            CertError::Invalid(format!(
                "{setting} {name:?}: every label must be lower-case letters, digits and '-' \
                 (no wildcards, no empty labels)"
            ))
        })?;
    }
    Ok(())
}

/// What this crate needs to know about a certificate, read back from its DER.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// DNS names in the subjectAltName extension, as written.
    pub dns_names: Vec<String>,
    /// IP addresses in the subjectAltName extension.
    pub ip_addresses: Vec<IpAddr>,
    /// `basicConstraints CA:true`.
    pub is_ca: bool,
    /// The subject, rendered as text (`CN=egress-gate-ca@1700000000`).
    pub subject: String,
    spki_der: Vec<u8>,
}

impl CertInfo {
    /// Reads a DER-encoded certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::parse("certificate", e))?;
        let validity = cert.validity();
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|e| CertError::parse("subjectAltName", e))?
        {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            ip_addresses.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(Self {
            not_before: from_unix(validity.not_before.timestamp()),
            not_after: from_unix(validity.not_after.timestamp()),
            dns_names,
            ip_addresses,
            is_ca: cert.is_ca(),
            subject: cert.subject().to_string(),
            spki_der: cert.public_key().raw.to_vec(),
        })
    }

    /// Whether `now` lies inside the validity period.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Whether the certificate carries every name and address `identity` asks for.
    pub fn covers(&self, identity: &ServiceIdentity) -> bool {
        identity.dns_names().iter().all(|name| {
            self.dns_names
                .iter()
                .any(|have| have.eq_ignore_ascii_case(name))
        }) && identity
            .extra_ips
            .iter()
            .all(|ip| self.ip_addresses.contains(ip))
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Whether `leaf_der` names `ca_der`'s subject as its issuer and carries a signature that
/// `ca_der`'s key made. False for anything that does not parse.
pub fn is_issued_by(leaf_der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok((_, leaf)), Ok((_, ca))) = (
        X509Certificate::from_der(leaf_der),
        X509Certificate::from_der(ca_der),
    ) else {
        return false;
    };
    leaf.issuer().as_raw() == ca.subject().as_raw()
        && leaf.verify_signature(Some(ca.public_key())).is_ok()
}

/// Splits PEM text into its `CERTIFICATE` blocks (other blocks are skipped). `what` names the
/// input in errors. Text without a single certificate is an error.
pub fn parse_certificates(
    pem: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::parse(what, e))?;
    if certs.is_empty() {
        return Err(CertError::parse(what, "no PEM CERTIFICATE block"));
    }
    Ok(certs)
}

/// Encodes one DER certificate as a PEM `CERTIFICATE` block (64-column lines, trailing
/// newline), the form `ca.crt`, `tls.crt` and `caBundle` use.
pub fn encode_certificate_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn parse_key(key_pem: &str, what: &str) -> Result<KeyPair, CertError> {
    KeyPair::from_pem(key_pem).map_err(|e| CertError::parse(what, e))
}

/// A certificate authority: its certificate and the key that signs serving certificates.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CertificateAuthority")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA named `common_name`, valid from `now` (less
    /// [`CLOCK_SKEW_ALLOWANCE`]) for `validity`. It may sign end-entity certificates only
    /// (path length 0).
    pub fn generate(
        common_name: &str,
        algorithm: KeyAlgorithm,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, CertError> {
        let key = algorithm.generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_offset(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = to_offset(now + validity);
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        let info = CertInfo::from_der(&cert_der)?;
        Ok(Self {
            cert_der,
            info,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA back from PEM, so a replica can issue under a CA another replica (or an
    /// admin) made. `cert_pem` may hold several certificates (a bundle); the one whose public
    /// key matches `key_pem` is taken. It must be a CA certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = parse_key(key_pem, "CA key")?;
        let spki = key.subject_public_key_info();
        for der in parse_certificates(cert_pem, "CA certificate")? {
            let info = CertInfo::from_der(&der)?;
            if info.spki_der != spki {
                continue;
            }
            if !info.is_ca {
                return Err(CertError::parse(
                    "CA certificate",
                    "the certificate matching the key is not a CA (basicConstraints CA:false)",
                ));
            }
            let issuer = Issuer::from_ca_cert_der(&der, key)?;
            return Ok(Self {
                cert_der: der,
                info,
                issuer,
            });
        }
        Err(CertError::parse(
            "CA certificate",
            "no certificate matches the CA key",
        ))
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        encode_certificate_pem(&self.cert_der)
    }

    /// The CA's private key, PKCS#8 PEM. Keep it secret: whoever has it can mint
    /// certificates the webhook configuration trusts.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Validity and names of the CA certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Whether this CA signed `cert_der`.
    pub fn issued(&self, cert_der: &[u8]) -> bool {
        is_issued_by(cert_der, &self.cert_der)
    }

    /// Issues a serving certificate for `identity` with a new key, valid from `now` (less
    /// [`CLOCK_SKEW_ALLOWANCE`]) for `validity`, cut short to the CA's own expiry: a
    /// certificate never outlives the CA that vouches for it.
    pub fn issue_serving(
        &self,
        identity: &ServiceIdentity,
        algorithm: KeyAlgorithm,
        now: SystemTime,
        validity: Duration,
    ) -> Result<ServingCert, CertError> {
        identity.validate()?;
        if now >= self.info.not_after {
            return Err(CertError::Invalid(format!(
                "the CA {} has expired; it cannot issue",
                self.info.subject
            )));
        }
        let key = algorithm.generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.service_host());
        params.distinguished_name = dn;
        params.subject_alt_names = identity
            .dns_names()
            .into_iter()
            .map(|name| {
                name.try_into()
                    .map(SanType::DnsName)
                    .map_err(CertError::Generate)
            })
            .collect::<Result<Vec<_>, _>>()?;
        params
            .subject_alt_names
            .extend(identity.extra_ips.iter().copied().map(SanType::IpAddress));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = to_offset((now + validity).min(self.info.not_after));
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_der = cert.der().clone();
        Ok(ServingCert {
            info: CertInfo::from_der(&cert_der)?,
            cert_pem: encode_certificate_pem(&cert_der),
            key_pem: key.serialize_pem(),
            cert_der,
        })
    }
}

/// A serving certificate and its key: what the webhook's TLS listener presents.
#[derive(Clone)]
pub struct ServingCert {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    info: CertInfo,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Loads a certificate and key from PEM (`tls.crt`, `tls.key`). The first certificate in
    /// `cert_pem` is the leaf; the key must be its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let cert_der = parse_certificates(cert_pem, "tls.crt")?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::parse("tls.crt", "no certificate"))?;
        let info = CertInfo::from_der(&cert_der)?;
        let key = parse_key(key_pem, "tls.key")?;
        if key.subject_public_key_info() != info.spki_der {
            return Err(CertError::parse(
                "tls.key",
                "the key does not belong to the certificate in tls.crt",
            ));
        }
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
            info,
        })
    }

    /// The certificate, PEM (`tls.crt`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, PKCS#8 PEM (`tls.key`).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Validity and names of the certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const DAY: Duration = Duration::from_secs(86_400);
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn names_in_order() {
        let mut id = ServiceIdentity::new("egress-webhook", "egress-gate");
        id.extra_dns_names = vec!["Webhook.Example.COM.".into(), "egress-webhook".into()];
        assert_eq!(
            id.dns_names(),
            [
                "egress-webhook",
                "egress-webhook.egress-gate",
                "egress-webhook.egress-gate.svc",
                "egress-webhook.egress-gate.svc.cluster.local",
                "webhook.example.com",
            ]
        );
    }

    #[test]
    fn bad_names_are_named() {
        let mut id = ServiceIdentity::new("Egress", "egress-gate");
        assert!(id.validate().unwrap_err().to_string().contains("service"));
        id.service = "ok".into();
        id.extra_dns_names = vec!["*.example.com".into()];
        assert!(id.validate().unwrap_err().to_string().contains("dns[0]"));
        id.extra_dns_names.clear();
        id.cluster_domain = "cluster..local".into();
        assert!(
            id.validate()
                .unwrap_err()
                .to_string()
                .contains("clusterDomain")
        );
    }

    #[test]
    fn issued_cert_carries_names_and_clipped_validity() {
        let now = at(NOW);
        let ca = CertificateAuthority::generate("test-ca", KeyAlgorithm::EcdsaP256, now, 100 * DAY)
            .unwrap();
        assert!(ca.info().is_ca);
        let mut id = ServiceIdentity::new("egress-webhook", "egress-gate");
        id.extra_ips = vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        let leaf = ca
            .issue_serving(&id, KeyAlgorithm::EcdsaP256, now, 365 * DAY)
            .unwrap();
        assert!(!leaf.info().is_ca);
        assert!(leaf.info().covers(&id));
        assert_eq!(leaf.info().ip_addresses, id.extra_ips);
        assert_eq!(
            leaf.info().not_after,
            ca.info().not_after,
            "clipped to the CA"
        );
        assert_eq!(leaf.info().not_before, now - CLOCK_SKEW_ALLOWANCE);
        assert!(ca.issued(leaf.cert_der()));
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_issuing() {
        let now = at(NOW);
        let ca =
            CertificateAuthority::generate("rt", KeyAlgorithm::EcdsaP384, now, 10 * DAY).unwrap();
        let other = CertificateAuthority::generate("other", KeyAlgorithm::EcdsaP256, now, 10 * DAY)
            .unwrap();
        // A bundle with another CA first: the key picks the right certificate.
        let bundle = format!("{}{}", other.cert_pem(), ca.cert_pem());
        let loaded = CertificateAuthority::from_pem(&bundle, &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        let id = ServiceIdentity::new("svc", "ns");
        let leaf = loaded
            .issue_serving(&id, KeyAlgorithm::EcdsaP256, now, DAY)
            .unwrap();
        assert!(ca.issued(leaf.cert_der()));
        assert!(!other.issued(leaf.cert_der()));
        let reread = ServingCert::from_pem(leaf.cert_pem(), leaf.key_pem()).unwrap();
        assert_eq!(reread.info(), leaf.info());
    }

    #[test]
    fn mismatched_keys_are_refused() {
        let now = at(NOW);
        let a = CertificateAuthority::generate("a", KeyAlgorithm::EcdsaP256, now, DAY).unwrap();
        let b = CertificateAuthority::generate("b", KeyAlgorithm::EcdsaP256, now, DAY).unwrap();
        assert!(CertificateAuthority::from_pem(&a.cert_pem(), &b.key_pem()).is_err());
        let id = ServiceIdentity::new("svc", "ns");
        let leaf = a
            .issue_serving(&id, KeyAlgorithm::EcdsaP256, now, DAY)
            .unwrap();
        let other = a
            .issue_serving(&id, KeyAlgorithm::EcdsaP256, now, DAY)
            .unwrap();
        assert!(ServingCert::from_pem(leaf.cert_pem(), other.key_pem()).is_err());
        // A leaf is not a CA, even with its own key.
        assert!(CertificateAuthority::from_pem(leaf.cert_pem(), leaf.key_pem()).is_err());
        assert!(parse_certificates("not pem", "x").is_err());
    }

    #[test]
    fn expired_ca_does_not_issue() {
        let ca =
            CertificateAuthority::generate("old", KeyAlgorithm::EcdsaP256, at(NOW), DAY).unwrap();
        let id = ServiceIdentity::new("svc", "ns");
        assert!(
            ca.issue_serving(&id, KeyAlgorithm::EcdsaP256, at(NOW) + 2 * DAY, DAY)
                .is_err()
        );
    }
}
