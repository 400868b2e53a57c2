//! Renewal and rollover decisions at given clock times.
// Helpers here are test code too: a panic in them is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use common::{DAY, t0, verify};
use egress_gate_certs::pki::{CertificateAuthority, KeyAlgorithm};
use egress_gate_certs::renewal::{CA_KEY_KEY, StoredCerts, ca_due, serving_due};
use egress_gate_certs::{CertPolicy, Decision, Reason, ServiceIdentity, plan};

const NAME: &str = "egress-webhook.egress-gate.svc";

fn id() -> ServiceIdentity {
    ServiceIdentity::new("egress-webhook", "egress-gate")
}

fn policy() -> CertPolicy {
    CertPolicy::default()
}

fn fresh() -> StoredCerts {
    StoredCerts::generate(&id(), &policy(), t0()).unwrap()
}

#[test]
fn fresh_certificates_are_kept() {
    let certs = fresh();
    assert_eq!(plan(&certs, &id(), &policy(), t0()), Decision::Keep);
    assert_eq!(
        plan(&certs, &id(), &policy(), t0() + 300 * DAY),
        Decision::Keep
    );
}

#[test]
fn serving_certificate_renews_inside_its_window() {
    let p = policy();
    let certs = fresh();
    let serving = certs.serving.as_ref().unwrap().info().clone();
    // Default: valid 365 days, renewed in the last 30.
    let window_opens = t0() + 335 * DAY;
    assert!(!serving_due(
        &serving,
        &p,
        window_opens - std::time::Duration::from_secs(1)
    ));
    assert!(serving_due(&serving, &p, window_opens));
    assert!(
        serving_due(&serving, &p, t0() + 400 * DAY),
        "expired counts as due"
    );
    assert_eq!(
        plan(
            &certs,
            &id(),
            &p,
            window_opens - std::time::Duration::from_secs(1)
        ),
        Decision::Keep
    );
    assert_eq!(
        plan(&certs, &id(), &p, window_opens),
        Decision::RenewServing(Reason::ServingDue)
    );
    assert_eq!(certs.next_check(&p), Some(window_opens));
}

#[test]
fn renewal_keeps_the_ca_and_the_bundle() {
    let p = policy();
    let certs = fresh();
    let before = certs.to_secret_data();
    let old_leaf = certs.serving.as_ref().unwrap().cert_pem().to_owned();
    let now = t0() + 340 * DAY;
    let renewed = certs
        .apply(Decision::RenewServing(Reason::ServingDue), &id(), &p, now)
        .unwrap();
    let after = renewed.to_secret_data();
    assert_eq!(before[CA_KEY_KEY], after[CA_KEY_KEY], "same CA key");
    assert_eq!(before["ca.crt"], after["ca.crt"], "same bundle");
    assert_ne!(before["tls.crt"], after["tls.crt"]);
    let bundle = renewed.bundle_pem();
    let leaf = renewed.serving.as_ref().unwrap();
    verify(&bundle, leaf.cert_pem(), NAME, now).unwrap();
    verify(&bundle, &old_leaf, NAME, now).unwrap();
    assert_eq!(plan(&renewed, &id(), &p, now), Decision::Keep);
}

#[test]
fn ca_rolls_over_keeping_both_cas_then_drops_the_old_one() {
    let p = policy();
    let certs = fresh();
    let old_ca = certs.ca.as_ref().unwrap().info().clone();
    let old_ca_pem = certs.ca.as_ref().unwrap().cert_pem();
    // The CA (5 years) rolls over 90 days before it expires.
    let rollover = old_ca.not_after - 90 * DAY;
    assert!(!ca_due(
        &old_ca,
        &p,
        rollover - std::time::Duration::from_secs(1)
    ));
    assert!(ca_due(&old_ca, &p, rollover));

    // Keep the serving certificate fresh up to the rollover, as the webhook would.
    let mut now = t0();
    let mut certs = certs;
    while now < rollover - DAY {
        now = certs.next_check(&p).unwrap().min(rollover - DAY);
        let decision = plan(&certs, &id(), &p, now);
        certs = certs.apply(decision, &id(), &p, now).unwrap();
    }
    let leaf_under_old = certs.serving.as_ref().unwrap().cert_pem().to_owned();
    assert_eq!(
        plan(&certs, &id(), &p, rollover),
        Decision::RolloverCa(Reason::CaDue)
    );

    let rolled = certs
        .apply(Decision::RolloverCa(Reason::CaDue), &id(), &p, rollover)
        .unwrap();
    let bundle = rolled.bundle_pem();
    assert_eq!(
        common::certs_from_pem(&bundle).len(),
        2,
        "both CAs during the overlap"
    );
    assert!(bundle.ends_with(&old_ca_pem), "new CA first, old CA after");
    // Both the new certificate and a peer's old one verify during the overlap.
    verify(
        &bundle,
        rolled.serving.as_ref().unwrap().cert_pem(),
        NAME,
        rollover,
    )
    .unwrap();
    verify(&bundle, &leaf_under_old, NAME, rollover).unwrap();
    assert_eq!(plan(&rolled, &id(), &p, rollover + DAY), Decision::Keep);
    assert_eq!(
        rolled.next_check(&p),
        Some(old_ca.not_after),
        "next: the old CA leaves"
    );

    // Once the old CA expires it leaves the bundle.
    assert_eq!(
        plan(&rolled, &id(), &p, old_ca.not_after),
        Decision::RewriteBundle
    );
    let pruned = rolled
        .apply(Decision::RewriteBundle, &id(), &p, old_ca.not_after)
        .unwrap();
    assert_eq!(common::certs_from_pem(&pruned.bundle_pem()).len(), 1);
    assert_eq!(pruned.bundle_pem(), pruned.ca.as_ref().unwrap().cert_pem());
    assert_eq!(plan(&pruned, &id(), &p, old_ca.not_after), Decision::Keep);
}

#[test]
fn serving_certificate_never_outlives_its_ca() {
    let p = CertPolicy {
        ca_validity: 100 * DAY,
        ca_rollover_before: 40 * DAY,
        ..policy()
    };
    let certs = StoredCerts::generate(&id(), &p, t0()).unwrap();
    let ca_end = certs.ca.as_ref().unwrap().info().not_after;
    assert_eq!(certs.serving.as_ref().unwrap().info().not_after, ca_end);
    // The rollover window opens before the clipped certificate's renewal window.
    assert_eq!(
        plan(&certs, &id(), &p, ca_end - 40 * DAY),
        Decision::RolloverCa(Reason::CaDue)
    );
}

#[test]
fn missing_or_foreign_parts_are_replaced() {
    let p = policy();
    // A Secret made by `egress-webhook certs` without the CA key: roll over to a CA we own.
    let mut data = fresh().to_secret_data();
    data.remove(CA_KEY_KEY);
    let certs = StoredCerts::from_secret_data(&data);
    assert_eq!(
        plan(&certs, &id(), &p, t0()),
        Decision::RolloverCa(Reason::CaMissing)
    );
    let old_bundle = certs.bundle_pem();
    let rolled = certs
        .apply(Decision::RolloverCa(Reason::CaMissing), &id(), &p, t0())
        .unwrap();
    assert!(
        rolled.bundle_pem().ends_with(&old_bundle),
        "the admin's CA stays trusted"
    );

    // Serving certificate from another CA.
    let mut data = fresh().to_secret_data();
    let other = fresh().to_secret_data();
    data.insert("tls.crt".into(), other["tls.crt"].clone());
    data.insert("tls.key".into(), other["tls.key"].clone());
    let certs = StoredCerts::from_secret_data(&data);
    assert_eq!(
        plan(&certs, &id(), &p, t0()),
        Decision::RenewServing(Reason::IssuerChanged)
    );

    // Key and certificate that do not belong together, or garbage.
    let mut data = fresh().to_secret_data();
    data.insert("tls.key".into(), other["tls.key"].clone());
    let certs = StoredCerts::from_secret_data(&data);
    assert!(!certs.problems.is_empty());
    assert_eq!(
        plan(&certs, &id(), &p, t0()),
        Decision::RenewServing(Reason::ServingMissing)
    );
    let mut data = fresh().to_secret_data();
    data.insert("ca.crt".into(), b"garbage".to_vec());
    let certs = StoredCerts::from_secret_data(&data);
    assert_eq!(
        plan(&certs, &id(), &p, t0()),
        Decision::RolloverCa(Reason::CaMissing)
    );

    // The Service gained a name.
    let certs = fresh();
    let mut wider = id();
    wider.extra_dns_names.push("webhook.example.com".into());
    assert_eq!(
        plan(&certs, &wider, &p, t0()),
        Decision::RenewServing(Reason::NamesChanged)
    );
    let renewed = certs
        .apply(
            Decision::RenewServing(Reason::NamesChanged),
            &wider,
            &p,
            t0(),
        )
        .unwrap();
    verify(
        &renewed.bundle_pem(),
        renewed.serving.as_ref().unwrap().cert_pem(),
        "webhook.example.com",
        t0(),
    )
    .unwrap();
}

#[test]
fn bundle_missing_the_signing_ca_is_rewritten() {
    let certs = fresh();
    let mut data = certs.to_secret_data();
    let stranger =
        CertificateAuthority::generate("stranger", KeyAlgorithm::EcdsaP256, t0(), 10 * DAY)
            .unwrap();
    // ca.crt holds the signing CA (needed to load the key) plus an unrelated, still valid CA
    // and an expired one; the expired one must go, the order must be signing CA first.
    let expired =
        CertificateAuthority::generate("expired", KeyAlgorithm::EcdsaP256, t0() - 10 * DAY, DAY)
            .unwrap();
    let ca_pem = String::from_utf8(data["ca.crt"].clone()).unwrap();
    data.insert(
        "ca.crt".into(),
        format!("{}{}{}", stranger.cert_pem(), expired.cert_pem(), ca_pem).into_bytes(),
    );
    let certs = StoredCerts::from_secret_data(&data);
    assert_eq!(
        plan(&certs, &id(), &policy(), t0()),
        Decision::RewriteBundle
    );
    let fixed = certs
        .apply(Decision::RewriteBundle, &id(), &policy(), t0())
        .unwrap();
    assert_eq!(
        fixed.bundle_pem(),
        format!("{ca_pem}{}", stranger.cert_pem())
    );
}

#[test]
fn secret_data_round_trips() {
    let certs = fresh();
    let data = certs.to_secret_data();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    );
    let again = StoredCerts::from_secret_data(&data);
    assert!(again.problems.is_empty(), "{:?}", again.problems);
    assert_eq!(again.to_secret_data(), data);
    assert_eq!(plan(&again, &id(), &policy(), t0()), Decision::Keep);
}

#[test]
fn inconsistent_policies_are_refused() {
    let bad = [
        CertPolicy {
            renew_before: 400 * DAY,
            ..policy()
        },
        CertPolicy {
            ca_rollover_before: 6 * 365 * DAY,
            ..policy()
        },
        CertPolicy {
            ca_rollover_before: 10 * DAY,
            ..policy()
        },
    ];
    for p in bad {
        assert!(p.validate().is_err(), "{p:?}");
        assert!(StoredCerts::generate(&id(), &p, t0()).is_err());
    }
    policy().validate().unwrap();
}
