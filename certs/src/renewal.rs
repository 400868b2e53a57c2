//! When to renew: pure decisions at a given clock time, and the change each decision makes.
//!
//! The stored state is the webhook's Secret: `tls.crt`/`tls.key` (the serving certificate),
//! `ca.key` (the CA that signs it) and `ca.crt` (the bundle the webhook configuration trusts:
//! the signing CA first, then older CAs that are still valid). [`plan`] looks at that state
//! and the clock and says what to do; [`StoredCerts::apply`] does it.
//!
//! CA rollover keeps the API server's trust unbroken: the new CA joins the bundle beside the
//! old one, a serving certificate from the new CA replaces the old one, and the old CA stays
//! in the bundle until it expires (at most [`CertPolicy::ca_rollover_before`] later), so a
//! replica still serving the old certificate is trusted until it picks up the new one.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;

use crate::CertError;
use crate::pki::{
    CertInfo, CertificateAuthority, KeyAlgorithm, ServiceIdentity, ServingCert,
    encode_certificate_pem, parse_certificates,
};

/// Secret key of the serving certificate (the `kubernetes.io/tls` convention).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Secret key of the serving certificate's private key.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Secret key of the CA bundle (the same PEM as the webhook configuration's `caBundle`).
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret key of the signing CA's private key, present only in self-signed mode.
pub const CA_KEY_KEY: &str = "ca.key";

/// Common-name prefix of generated CAs; the creation time is appended
/// (`egress-gate-webhook-ca@1700000000`, the form kube components use) so that an old and a
/// new CA in one bundle never share a subject.
pub const CA_NAME_PREFIX: &str = "egress-gate-webhook-ca";

const DAY: Duration = Duration::from_secs(86_400);

/// Validity periods and renewal windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertPolicy {
    /// Key type of new keys.
    pub algorithm: KeyAlgorithm,
    /// Lifetime of a new CA. Default 5 years: the CA rolls over rarely, and each rollover is
    /// a moment when two CAs are in play.
    pub ca_validity: Duration,
    /// Lifetime of a new serving certificate. Default 1 year, cut short to the CA's expiry.
    pub serving_validity: Duration,
    /// A serving certificate is renewed once it has less than this left. Default 30 days,
    /// time enough for a replica that was down to come back and renew before expiry.
    pub renew_before: Duration,
    /// The CA rolls over once it has less than this left; the old CA then stays in the
    /// bundle until it expires, so this is also the overlap window. Default 90 days. It must
    /// be at least `renew_before`, so a serving certificate cut short by its CA's expiry is
    /// renewed under the new CA, never re-issued under the old one.
    pub ca_rollover_before: Duration,
}

impl Default for CertPolicy {
    fn default() -> Self {
        Self {
            algorithm: KeyAlgorithm::default(),
            ca_validity: 5 * 365 * DAY,
            serving_validity: 365 * DAY,
            renew_before: 30 * DAY,
            ca_rollover_before: 90 * DAY,
        }
    }
}

impl CertPolicy {
    /// Checks that the windows fit inside the validities, naming the setting at fault.
    pub fn validate(&self) -> Result<(), CertError> {
        let days = |d: Duration| d.as_secs() / 86_400;
        if self.renew_before >= self.serving_validity {
            return Err(CertError::Invalid(format!(
                "renewBefore ({}d) must be shorter than the serving validity ({}d)",
                days(self.renew_before),
                days(self.serving_validity)
            )));
        }
        if self.ca_rollover_before >= self.ca_validity {
            return Err(CertError::Invalid(format!(
                "caRolloverBefore ({}d) must be shorter than the CA validity ({}d)",
                days(self.ca_rollover_before),
                days(self.ca_validity)
            )));
        }
        if self.ca_rollover_before < self.renew_before {
            return Err(CertError::Invalid(format!(
                "caRolloverBefore ({}d) must be at least renewBefore ({}d)",
                days(self.ca_rollover_before),
                days(self.renew_before)
            )));
        }
        Ok(())
    }
}

/// When a certificate with `info` becomes due, `before` ahead of its expiry.
pub fn due_at(info: &CertInfo, before: Duration) -> SystemTime {
    info.not_after.checked_sub(before).unwrap_or(UNIX_EPOCH)
}

/// Whether a serving certificate is due for renewal at `now`: inside the renewal window or
/// already expired.
pub fn serving_due(info: &CertInfo, policy: &CertPolicy, now: SystemTime) -> bool {
    now >= due_at(info, policy.renew_before)
}

/// Whether a CA is due for rollover at `now`: inside the rollover window or expired.
pub fn ca_due(info: &CertInfo, policy: &CertPolicy, now: SystemTime) -> bool {
    now >= due_at(info, policy.ca_rollover_before)
}

/// What to do with the stored certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Everything is fresh: serve what is stored.
    Keep,
    /// Only the bundle changes: an old CA expired and leaves, or the signing CA was missing
    /// from it.
    RewriteBundle,
    /// A new serving certificate under the same CA.
    RenewServing(Reason),
    /// A new CA, a new serving certificate under it, both CAs in the bundle.
    RolloverCa(Reason),
}

/// Why a certificate is replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// There is no usable signing CA (no `ca.key`, or it matches no certificate in `ca.crt`).
    CaMissing,
    /// The CA is inside its rollover window or expired.
    CaDue,
    /// There is no usable serving certificate.
    ServingMissing,
    /// The serving certificate is inside its renewal window or expired.
    ServingDue,
    /// The serving certificate lacks a name or address the identity asks for (the service,
    /// namespace, cluster domain or extra names changed).
    NamesChanged,
    /// The serving certificate was not issued by the signing CA.
    IssuerChanged,
}

/// The certificates as stored in the Secret, read leniently: a part that cannot be used is
/// `None` (and noted in `problems`), and [`plan`] replaces it.
#[derive(Debug, Default)]
pub struct StoredCerts {
    /// The signing CA: `ca.key` and the certificate in `ca.crt` that matches it.
    pub ca: Option<CertificateAuthority>,
    /// The CA bundle, `ca.crt`, in order.
    pub trusted: Vec<CertificateDer<'static>>,
    /// The serving certificate and key, `tls.crt` and `tls.key`.
    pub serving: Option<ServingCert>,
    /// What could not be read, for the log.
    pub problems: Vec<String>,
}

impl StoredCerts {
    /// A fresh CA and serving certificate for `identity`, as on first start.
    pub fn generate(
        identity: &ServiceIdentity,
        policy: &CertPolicy,
        now: SystemTime,
    ) -> Result<Self, CertError> {
        Self::default().apply(
            Decision::RolloverCa(Reason::CaMissing),
            identity,
            policy,
            now,
        )
    }

    /// Reads a Secret's `data`. Never fails: missing or broken parts are left out.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Self {
        let mut problems = Vec::new();
        let text = |key: &str, problems: &mut Vec<String>| -> Option<String> {
            let bytes = data.get(key)?;
            match String::from_utf8(bytes.clone()) {
                Ok(s) => Some(s),
                Err(_) => {
                    problems.push(format!("{key}: not UTF-8 PEM"));
                    None
                }
            }
        };
        let ca_crt = text(CA_CERT_KEY, &mut problems);
        let ca_key = text(CA_KEY_KEY, &mut problems);
        let tls_crt = text(TLS_CERT_KEY, &mut problems);
        let tls_key = text(TLS_KEY_KEY, &mut problems);

        let trusted = match &ca_crt {
            Some(pem) => parse_certificates(pem, CA_CERT_KEY).unwrap_or_else(|e| {
                problems.push(e.to_string());
                Vec::new()
            }),
            None => Vec::new(),
        };
        let ca = match (&ca_crt, &ca_key) {
            (Some(crt), Some(key)) => CertificateAuthority::from_pem(crt, key)
                .map_err(|e| problems.push(e.to_string()))
                .ok(),
            _ => None,
        };
        let serving = match (&tls_crt, &tls_key) {
            (Some(crt), Some(key)) => ServingCert::from_pem(crt, key)
                .map_err(|e| problems.push(e.to_string()))
                .ok(),
            _ => None,
        };
        Self {
            ca,
            trusted,
            serving,
            problems,
        }
    }

    /// The Secret's `data`: `tls.crt`, `tls.key`, `ca.crt` and, with a signing CA, `ca.key`.
    pub fn to_secret_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut data = BTreeMap::new();
        if let Some(serving) = &self.serving {
            data.insert(
                TLS_CERT_KEY.to_owned(),
                serving.cert_pem().as_bytes().to_vec(),
            );
            data.insert(
                TLS_KEY_KEY.to_owned(),
                serving.key_pem().as_bytes().to_vec(),
            );
        }
        data.insert(CA_CERT_KEY.to_owned(), self.bundle_pem().into_bytes());
        if let Some(ca) = &self.ca {
            data.insert(CA_KEY_KEY.to_owned(), ca.key_pem().into_bytes());
        }
        data
    }

    /// The CA bundle as PEM: what `caBundle` must hold (before base64).
    pub fn bundle_pem(&self) -> String {
        self.trusted
            .iter()
            .map(|der| encode_certificate_pem(der))
            .collect()
    }

    /// The bundle the state should have at `now`: the signing CA first, then the other CAs
    /// of the current bundle that have not expired, without duplicates.
    pub fn desired_bundle(&self, now: SystemTime) -> Vec<CertificateDer<'static>> {
        let mut bundle: Vec<CertificateDer<'static>> = Vec::new();
        if let Some(ca) = &self.ca {
            bundle.push(ca.cert_der().clone());
        }
        for der in &self.trusted {
            let keep = CertInfo::from_der(der)
                .map(|info| info.is_ca && now < info.not_after)
                .unwrap_or(false);
            if keep && !bundle.contains(der) {
                bundle.push(der.clone());
            }
        }
        bundle
    }

    /// Carries out `decision` at `now`, returning the new state to store.
    pub fn apply(
        self,
        decision: Decision,
        identity: &ServiceIdentity,
        policy: &CertPolicy,
        now: SystemTime,
    ) -> Result<Self, CertError> {
        policy.validate()?;
        identity.validate()?;
        let mut next = self;
        match decision {
            Decision::Keep => return Ok(next),
            Decision::RewriteBundle => {}
            Decision::RenewServing(_) => {
                let ca = next.ca.as_ref().ok_or_else(|| {
                    CertError::Invalid("cannot renew the serving certificate: no CA key".into())
                })?;
                next.serving = Some(issue(ca, identity, policy, now)?);
            }
            Decision::RolloverCa(_) => {
                let unix = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let ca = CertificateAuthority::generate(
                    &format!("{CA_NAME_PREFIX}@{unix}"),
                    policy.algorithm,
                    now,
                    policy.ca_validity,
                )?;
                next.serving = Some(issue(&ca, identity, policy, now)?);
                next.ca = Some(ca);
            }
        }
        next.trusted = next.desired_bundle(now);
        next.problems.clear();
        Ok(next)
    }

    /// The earliest time at which [`plan`] can decide something other than `Keep` without the
    /// state changing: a renewal or rollover window opening, or an old CA expiring out of the
    /// bundle. `None` when a change is due already (no CA or no serving certificate).
    pub fn next_check(&self, policy: &CertPolicy) -> Option<SystemTime> {
        let ca = self.ca.as_ref()?;
        let serving = self.serving.as_ref()?;
        let mut next = due_at(serving.info(), policy.renew_before)
            .min(due_at(ca.info(), policy.ca_rollover_before));
        for der in &self.trusted {
            if der == ca.cert_der() {
                continue;
            }
            if let Ok(info) = CertInfo::from_der(der) {
                next = next.min(info.not_after);
            }
        }
        Some(next)
    }
}

fn issue(
    ca: &CertificateAuthority,
    identity: &ServiceIdentity,
    policy: &CertPolicy,
    now: SystemTime,
) -> Result<ServingCert, CertError> {
    ca.issue_serving(identity, policy.algorithm, now, policy.serving_validity)
}

/// Decides what to do with `stored` at `now` for `identity` under `policy`.
///
/// In order: no signing CA or a CA in its rollover window -> [`Decision::RolloverCa`]; no
/// serving certificate, one from another CA, one lacking a name, or one in its renewal
/// window -> [`Decision::RenewServing`]; a bundle that differs from
/// [`StoredCerts::desired_bundle`] -> [`Decision::RewriteBundle`]; else [`Decision::Keep`].
pub fn plan(
    stored: &StoredCerts,
    identity: &ServiceIdentity,
    policy: &CertPolicy,
    now: SystemTime,
) -> Decision {
    let Some(ca) = &stored.ca else {
        return Decision::RolloverCa(Reason::CaMissing);
    };
    if ca_due(ca.info(), policy, now) {
        return Decision::RolloverCa(Reason::CaDue);
    }
    let Some(serving) = &stored.serving else {
        return Decision::RenewServing(Reason::ServingMissing);
    };
    if !ca.issued(serving.cert_der()) {
        return Decision::RenewServing(Reason::IssuerChanged);
    }
    if !serving.info().covers(identity) {
        return Decision::RenewServing(Reason::NamesChanged);
    }
    if serving_due(serving.info(), policy, now) {
        return Decision::RenewServing(Reason::ServingDue);
    }
    if stored.desired_bundle(now) != stored.trusted {
        return Decision::RewriteBundle;
    }
    Decision::Keep
}
