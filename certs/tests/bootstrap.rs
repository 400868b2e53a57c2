//! `ensure_certificates` against an in-memory cluster, including two replicas racing.
//!
//! Why in memory and not the real kube-apiserver (`egress_gate_apiserver`): these tests
//! force interleavings a real server cannot be made to produce on demand (every replica
//! reading the same stale Secret before any writes, a read failing mid-flow) and count
//! writes exactly. The same flows against the real API server, through `KubeStore` with
//! deploy/base's RBAC, are in `webhook/tests/apiserver_bootstrap.rs`.
// Helpers here are test code too: a panic in them is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{DAY, t0, verify};
use egress_gate_certs::renewal::{CA_CERT_KEY, CA_KEY_KEY, TLS_CERT_KEY};
use egress_gate_certs::{
    BootstrapError, BootstrapParams, BundleOutcome, BundleRequest, CertPolicy, ClusterStore,
    Decision, Reason, SecretOutcome, ServiceIdentity, StoreError, StoredSecret,
    ensure_certificates, generate_bundle,
};
use tokio::sync::Barrier;

const SECRET: &str = "egress-webhook-tls";
const CONFIG: &str = "egress-gate";
const NAME: &str = "egress-webhook.egress-gate.svc";

/// The API server, as far as the bootstrap sees it.
#[derive(Default)]
struct Cluster {
    secret: Option<(BTreeMap<String, Vec<u8>>, u64)>,
    /// `None`: no MutatingWebhookConfiguration; `Some(None)`: one without a caBundle.
    config: Option<Option<Vec<u8>>>,
    next_version: u64,
    writes: usize,
    patches: usize,
}

/// One replica's client. `barrier`, when set, holds the first secret read until every
/// replica has read, so all of them act on the same stale view.
#[derive(Clone)]
struct Replica {
    cluster: Arc<Mutex<Cluster>>,
    barrier: Option<Arc<Barrier>>,
    waited: Arc<AtomicBool>,
    fail_reads: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

impl Replica {
    fn new(cluster: &Arc<Mutex<Cluster>>) -> Self {
        Self {
            cluster: cluster.clone(),
            barrier: None,
            waited: Arc::default(),
            fail_reads: Arc::default(),
            calls: Arc::default(),
        }
    }

    fn racing(cluster: &Arc<Mutex<Cluster>>, barrier: &Arc<Barrier>) -> Self {
        Self {
            barrier: Some(barrier.clone()),
            ..Self::new(cluster)
        }
    }
}

fn with_config() -> Arc<Mutex<Cluster>> {
    Arc::new(Mutex::new(Cluster {
        config: Some(None),
        ..Cluster::default()
    }))
}

impl ClusterStore for Replica {
    async fn get_secret(&self, name: &str) -> Result<Option<StoredSecret>, StoreError> {
        assert_eq!(name, SECRET);
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Other("secrets is forbidden".into()));
        }
        let seen = self
            .cluster
            .lock()
            .unwrap()
            .secret
            .clone()
            .map(|(data, v)| StoredSecret {
                data,
                resource_version: Some(v.to_string()),
            });
        if let Some(barrier) = &self.barrier
            && !self.waited.swap(true, Ordering::SeqCst)
        {
            barrier.wait().await;
        }
        Ok(seen)
    }

    async fn create_secret(
        &self,
        name: &str,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<(), StoreError> {
        assert_eq!(name, SECRET);
        let mut c = self.cluster.lock().unwrap();
        if c.secret.is_some() {
            return Err(StoreError::AlreadyExists);
        }
        c.next_version += 1;
        c.secret = Some((data.clone(), c.next_version));
        c.writes += 1;
        Ok(())
    }

    async fn replace_secret(&self, name: &str, secret: &StoredSecret) -> Result<(), StoreError> {
        assert_eq!(name, SECRET);
        let mut c = self.cluster.lock().unwrap();
        let current = c.secret.as_ref().map(|(_, v)| v.to_string());
        match current {
            None => Err(StoreError::NotFound),
            Some(v) if Some(&v) != secret.resource_version.as_ref() => Err(StoreError::Conflict),
            Some(_) => {
                c.next_version += 1;
                c.secret = Some((secret.data.clone(), c.next_version));
                c.writes += 1;
                Ok(())
            }
        }
    }

    async fn get_ca_bundle(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        assert_eq!(name, CONFIG);
        self.cluster
            .lock()
            .unwrap()
            .config
            .clone()
            .ok_or(StoreError::NotFound)
    }

    async fn patch_ca_bundle(&self, name: &str, bundle: &[u8]) -> Result<(), StoreError> {
        assert_eq!(name, CONFIG);
        let mut c = self.cluster.lock().unwrap();
        let config = c.config.as_mut().ok_or(StoreError::NotFound)?;
        *config = Some(bundle.to_vec());
        c.patches += 1;
        Ok(())
    }
}

fn params() -> BootstrapParams {
    BootstrapParams {
        secret_name: SECRET.into(),
        webhook_config_name: CONFIG.into(),
        identity: ServiceIdentity::new("egress-webhook", "egress-gate"),
        policy: CertPolicy::default(),
    }
}

fn secret_of(cluster: &Arc<Mutex<Cluster>>) -> BTreeMap<String, Vec<u8>> {
    cluster.lock().unwrap().secret.clone().unwrap().0
}

fn bundle_of(cluster: &Arc<Mutex<Cluster>>) -> String {
    String::from_utf8(cluster.lock().unwrap().config.clone().unwrap().unwrap()).unwrap()
}

#[tokio::test]
async fn first_start_creates_the_secret_and_patches_the_bundle() {
    let cluster = with_config();
    let replica = Replica::new(&cluster);
    let m = ensure_certificates(&replica, &params(), t0())
        .await
        .unwrap();
    assert_eq!(m.secret, SecretOutcome::Created);
    assert_eq!(m.bundle, BundleOutcome::Patched);
    let secret = secret_of(&cluster);
    assert_eq!(
        secret.keys().collect::<Vec<_>>(),
        ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    );
    assert_eq!(secret[TLS_CERT_KEY], m.cert_pem.as_bytes());
    assert_eq!(secret[CA_CERT_KEY], m.ca_bundle_pem.as_bytes());
    assert_eq!(bundle_of(&cluster), m.ca_bundle_pem);
    verify(&bundle_of(&cluster), &m.cert_pem, NAME, t0()).unwrap();
    assert_eq!(m.next_check, t0() + 335 * DAY);

    // A restart at the same time changes nothing.
    let again = ensure_certificates(&replica, &params(), t0() + DAY)
        .await
        .unwrap();
    assert_eq!(
        (again.secret, again.bundle),
        (SecretOutcome::Unchanged, BundleOutcome::Unchanged)
    );
    assert_eq!(again.cert_pem, m.cert_pem);
    let c = cluster.lock().unwrap();
    assert_eq!((c.writes, c.patches), (1, 1));
}

#[tokio::test]
async fn two_replicas_racing_to_create_serve_the_same_certificate() {
    let cluster = with_config();
    let barrier = Arc::new(Barrier::new(2));
    let a = Replica::racing(&cluster, &barrier);
    let b = Replica::racing(&cluster, &barrier);
    let p = params();
    let (ma, mb) = tokio::join!(
        ensure_certificates(&a, &p, t0()),
        ensure_certificates(&b, &p, t0())
    );
    let (ma, mb) = (ma.unwrap(), mb.unwrap());
    let mut outcomes = [ma.secret, mb.secret];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        [SecretOutcome::Created, SecretOutcome::TakenFromPeer]
    );
    assert_eq!(
        ma.cert_pem, mb.cert_pem,
        "the loser serves the winner's certificate"
    );
    assert_eq!(ma.key_pem, mb.key_pem);
    assert_eq!(ma.ca_bundle_pem, mb.ca_bundle_pem);
    assert_eq!(bundle_of(&cluster), ma.ca_bundle_pem);
    verify(&bundle_of(&cluster), &mb.cert_pem, NAME, t0()).unwrap();
    assert_eq!(cluster.lock().unwrap().writes, 1, "one create won");
    // The loser read twice: once before the race, once after losing it.
    assert_eq!(
        a.calls.load(Ordering::SeqCst) + b.calls.load(Ordering::SeqCst),
        3
    );
}

#[tokio::test]
async fn two_replicas_racing_to_renew_settle_on_one_certificate() {
    let cluster = with_config();
    ensure_certificates(&Replica::new(&cluster), &params(), t0())
        .await
        .unwrap();
    let ca_key = secret_of(&cluster)[CA_KEY_KEY].clone();
    let barrier = Arc::new(Barrier::new(2));
    let a = Replica::racing(&cluster, &barrier);
    let b = Replica::racing(&cluster, &barrier);
    let p = params();
    let later = t0() + 340 * DAY;
    let (ma, mb) = tokio::join!(
        ensure_certificates(&a, &p, later),
        ensure_certificates(&b, &p, later)
    );
    let (ma, mb) = (ma.unwrap(), mb.unwrap());
    let mut outcomes = [ma.secret, mb.secret];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        [
            SecretOutcome::TakenFromPeer,
            SecretOutcome::Updated(Decision::RenewServing(Reason::ServingDue))
        ]
    );
    assert_eq!(ma.cert_pem, mb.cert_pem);
    assert_eq!(
        secret_of(&cluster)[CA_KEY_KEY],
        ca_key,
        "renewal keeps the CA"
    );
    assert_eq!(ma.bundle, BundleOutcome::Unchanged, "same CA, same bundle");
    verify(&bundle_of(&cluster), &ma.cert_pem, NAME, later).unwrap();
    assert_eq!(cluster.lock().unwrap().writes, 2, "create + one replace");
}

#[tokio::test]
async fn ca_rollover_patches_a_bundle_with_both_cas_then_drops_the_old() {
    let cluster = with_config();
    let replica = Replica::new(&cluster);
    let p = params();
    let first = ensure_certificates(&replica, &p, t0()).await.unwrap();
    let ca_end = t0() + 5 * 365 * DAY;
    let rollover = ca_end - 90 * DAY;
    let m = ensure_certificates(&replica, &p, rollover).await.unwrap();
    assert_eq!(
        m.secret,
        SecretOutcome::Updated(Decision::RolloverCa(Reason::CaDue))
    );
    assert_eq!(m.bundle, BundleOutcome::Patched);
    let bundle = bundle_of(&cluster);
    assert_eq!(common::certs_from_pem(&bundle).len(), 2);
    assert!(bundle.ends_with(&first.ca_bundle_pem));
    verify(&bundle, &m.cert_pem, NAME, rollover).unwrap();
    // The other replica, not yet restarted, still serves a certificate under the old CA: trusted.
    let old_ca_leaf = generate_bundle(&BundleRequest::new("x", "y"), t0()).unwrap();
    assert!(
        verify(&bundle, &old_ca_leaf.cert_pem, NAME, rollover).is_err(),
        "sanity: strangers fail"
    );
    verify(&bundle, &first.cert_pem, NAME, first.not_after - DAY).unwrap();
    assert_eq!(m.next_check, ca_end);

    let m = ensure_certificates(&replica, &p, ca_end).await.unwrap();
    assert_eq!(m.secret, SecretOutcome::Updated(Decision::RewriteBundle));
    assert_eq!(m.bundle, BundleOutcome::Patched);
    assert_eq!(common::certs_from_pem(&bundle_of(&cluster)).len(), 1);
    verify(&bundle_of(&cluster), &m.cert_pem, NAME, ca_end).unwrap();
}

#[tokio::test]
async fn drifted_bundle_is_patched_back() {
    let cluster = with_config();
    let replica = Replica::new(&cluster);
    let m = ensure_certificates(&replica, &params(), t0())
        .await
        .unwrap();
    // Someone re-applied the manifests, which carry no caBundle.
    cluster.lock().unwrap().config = Some(None);
    let again = ensure_certificates(&replica, &params(), t0())
        .await
        .unwrap();
    assert_eq!(
        (again.secret, again.bundle),
        (SecretOutcome::Unchanged, BundleOutcome::Patched)
    );
    assert_eq!(bundle_of(&cluster), m.ca_bundle_pem);
}

#[tokio::test]
async fn missing_webhook_configuration_still_serves() {
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    let m = ensure_certificates(&Replica::new(&cluster), &params(), t0())
        .await
        .unwrap();
    assert_eq!(m.bundle, BundleOutcome::ConfigMissing);
    assert_eq!(m.secret, SecretOutcome::Created);
}

#[tokio::test]
async fn admin_made_secret_without_ca_key_is_adopted_by_rollover() {
    let cluster = with_config();
    let made = generate_bundle(&BundleRequest::new("egress-webhook", "egress-gate"), t0()).unwrap();
    cluster.lock().unwrap().secret = Some((
        BTreeMap::from([
            ("tls.crt".to_owned(), made.cert_pem.clone().into_bytes()),
            ("tls.key".to_owned(), made.key_pem.clone().into_bytes()),
            ("ca.crt".to_owned(), made.ca_cert_pem.clone().into_bytes()),
        ]),
        7,
    ));
    let m = ensure_certificates(&Replica::new(&cluster), &params(), t0())
        .await
        .unwrap();
    assert_eq!(
        m.secret,
        SecretOutcome::Updated(Decision::RolloverCa(Reason::CaMissing))
    );
    assert!(
        m.ca_bundle_pem.ends_with(&made.ca_cert_pem),
        "the admin's CA stays until it expires"
    );
    verify(&m.ca_bundle_pem, &made.cert_pem, NAME, t0()).unwrap();
    verify(&m.ca_bundle_pem, &m.cert_pem, NAME, t0()).unwrap();
}

#[tokio::test]
async fn store_errors_say_what_was_being_done() {
    let cluster = with_config();
    let replica = Replica::new(&cluster);
    replica.fail_reads.store(true, Ordering::SeqCst);
    let err = ensure_certificates(&replica, &params(), t0())
        .await
        .unwrap_err();
    assert!(matches!(err, BootstrapError::Store { .. }));
    assert_eq!(
        err.to_string(),
        "reading Secret egress-gate/egress-webhook-tls: secrets is forbidden"
    );
}

#[tokio::test]
async fn invalid_parameters_fail_before_any_call() {
    let cluster = with_config();
    let replica = Replica::new(&cluster);
    let mut p = params();
    p.identity.service = "Not A Label".into();
    assert!(matches!(
        ensure_certificates(&replica, &p, t0()).await,
        Err(BootstrapError::Cert(_))
    ));
    assert_eq!(replica.calls.load(Ordering::SeqCst), 0);
}

/// The trait's futures are `Send`, so the webhook can run the bootstrap on a spawned task.
#[tokio::test]
async fn ensure_runs_on_a_spawned_task() {
    let cluster = with_config();
    let replica = Replica::new(&cluster);
    let handle = tokio::spawn(async move { ensure_certificates(&replica, &params(), t0()).await });
    assert!(handle.await.unwrap().is_ok());
}
