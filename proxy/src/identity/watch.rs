//! The pod watch: a kube-rs watcher per scope (the whole cluster, or each listed namespace)
//! on the pods the selector picks, with `spec.hostNetwork=false` (a host-network pod shares
//! its node's address and can never be told apart). Each API object is projected to a
//! [`SlimPod`] at once and fed to that scope's [`IndexFeeder`].
//!
//! Until every scope has listed once the proxy is not ready. After that, an API server
//! outage leaves the last complete index serving while the watcher retries with backoff;
//! `identity_staleness_seconds` says for how long.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::config::IdentityConfig;
use super::index::{Applied, IndexFeeder, Lookup, Phase, PodEvent, SlimPod};
use super::metrics::IdentityMetrics;

/// Pods per LIST page on a relist: client-go's and kube-rs's default, so a 50,000-pod relist
/// is a hundred requests of bounded size.
const PAGE_SIZE: u32 = 500;
/// How often the staleness gauge is brought up to date: it only matters at scrape time.
const STALENESS_TICK: Duration = Duration::from_secs(1);
/// The field selector every watch carries.
const NOT_HOST_NETWORK: &str = "spec.hostNetwork=false";

/// One watched scope and its index.
#[derive(Debug)]
struct Scope {
    /// The namespace, or `None` for the whole cluster; for logs.
    namespace: Option<String>,
    /// The index fed by this scope's watch. A std lock: held for one event or one lookup,
    /// never across an await.
    feeder: RwLock<IndexFeeder>,
    /// When the watch last failed with no success since; `None` while it streams.
    failing_since: Mutex<Option<Instant>>,
}

/// What the watch tasks and the lookups share.
#[derive(Debug)]
struct Inner {
    /// The scopes, one watch each.
    scopes: Vec<Scope>,
    /// Bumped on every change any lookup could see: connections waiting for an unknown
    /// address wake on it.
    generation: watch::Sender<u64>,
    /// Gauges.
    metrics: IdentityMetrics,
    /// When the watch started: before the first sync, staleness counts from here.
    started: Instant,
}

/// The running pod watch and its index. Dropping it stops the watch tasks.
#[derive(Debug)]
pub struct Identities {
    /// Shared with the watch tasks.
    inner: Arc<Inner>,
    /// The watch and staleness tasks, aborted on drop.
    tasks: Vec<AbortHandle>,
}

impl Drop for Identities {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Identities {
    /// Starts one watch per scope with `client`; must run inside a tokio runtime.
    pub fn start(config: &IdentityConfig, client: kube::Client, metrics: IdentityMetrics) -> Self {
        let selector = config
            .selector()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
            vec![None]
        } else {
            config.namespaces.iter().cloned().map(Some).collect()
        };
        let inner = Arc::new(Inner {
            scopes: namespaces
                .iter()
                .map(|namespace| Scope {
                    namespace: namespace.clone(),
                    feeder: RwLock::new(IndexFeeder::default()),
                    failing_since: Mutex::new(None),
                })
                .collect(),
            generation: watch::Sender::new(0),
            metrics,
            started: Instant::now(),
        });
        inner.metrics.synced.set(0);
        let mut tasks = Vec::new();
        for (i, namespace) in namespaces.into_iter().enumerate() {
            let api: Api<Pod> = match &namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let config = watcher::Config::default()
                .labels(&selector)
                .fields(NOT_HOST_NETWORK)
                .page_size(PAGE_SIZE);
            let stream = watcher::watcher(api, config).default_backoff();
            let inner = Arc::clone(&inner);
            tasks.push(tokio::spawn(run_scope(inner, i, stream)).abort_handle());
        }
        let ticker = Arc::clone(&inner);
        tasks.push(
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(STALENESS_TICK);
                loop {
                    tick.tick().await;
                    ticker
                        .metrics
                        .staleness_seconds
                        .set(ticker.staleness().as_secs_f64());
                }
            })
            .abort_handle(),
        );
        tracing::info!(
            selector,
            field_selector = NOT_HOST_NETWORK,
            "identity: watching pods"
        );
        Self { inner, tasks }
    }

    /// Whether every scope has listed completely at least once.
    pub fn synced(&self) -> bool {
        self.inner.synced()
    }

    /// Who owns `ip`, across every scope: one pod in one scope, or ambiguous.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let mut found = Lookup::Unknown;
        for scope in &self.inner.scopes {
            let here = read(&scope.feeder).index().lookup(ip);
            found = match (found, here) {
                (found, Lookup::Unknown) => found,
                (Lookup::Unknown, here) => here,
                (a, b) => Lookup::Ambiguous(claimants(&a) + claimants(&b)),
            };
        }
        found
    }

    /// How long the index has not been known current (zero while every watch streams).
    pub fn staleness(&self) -> Duration {
        self.inner.staleness()
    }

    /// A receiver that changes whenever the index does: wait on it for an unknown address.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }
}

fn claimants(l: &Lookup) -> usize {
    match l {
        Lookup::Unknown => 0,
        Lookup::Pod(_) => 1,
        Lookup::Ambiguous(n) => *n,
    }
}

impl Inner {
    fn synced(&self) -> bool {
        self.scopes.iter().all(|s| read(&s.feeder).synced())
    }

    fn staleness(&self) -> Duration {
        if !self.synced() {
            return self.started.elapsed();
        }
        self.scopes
            .iter()
            .filter_map(|s| lock(&s.failing_since).map(|t| t.elapsed()))
            .max()
            .unwrap_or_default()
    }

    /// Publishes sizes and wakes waiters after a change.
    fn changed(&self) {
        let (pods, addresses) = self.scopes.iter().fold((0, 0), |(p, a), s| {
            let f = read(&s.feeder);
            (p + f.index().len(), a + f.index().claimed_addresses())
        });
        self.metrics
            .index_pods
            .set(i64::try_from(pods).unwrap_or(i64::MAX));
        self.metrics
            .index_addresses
            .set(i64::try_from(addresses).unwrap_or(i64::MAX));
        self.metrics
            .staleness_seconds
            .set(self.staleness().as_secs_f64());
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// Feeds one scope's index from its watch stream until the task is aborted.
async fn run_scope<S>(inner: Arc<Inner>, i: usize, stream: S)
where
    S: futures_util::Stream<Item = watcher::Result<Event<Pod>>> + Send,
{
    let Some(scope) = inner.scopes.get(i) else {
        return;
    };
    let scope_name = scope.namespace.as_deref().unwrap_or("(all namespaces)");
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if let Some(since) = lock(&scope.failing_since).take() {
                    tracing::info!(scope = scope_name, down_for = ?since.elapsed(), "identity: pod watch recovered");
                }
                let Some(event) = project(event) else {
                    continue;
                };
                let applied = write(&scope.feeder).apply(event);
                match applied {
                    Applied::Buffered => {}
                    Applied::Changed => inner.changed(),
                    Applied::Swapped => {
                        inner.changed();
                        if inner.synced() {
                            inner.metrics.synced.set(1);
                        }
                        let pods = read(&scope.feeder).index().len();
                        tracing::info!(scope = scope_name, pods, "identity: pod list complete");
                    }
                }
            }
            Err(e) => {
                let mut failing = lock(&scope.failing_since);
                if failing.is_none() {
                    tracing::warn!(scope = scope_name, error = %e, "identity: pod watch failing; serving the last complete index, retrying");
                    *failing = Some(Instant::now());
                }
            }
        }
    }
}

/// A watch event in the index's terms; `None` for an object without the identity it needs
/// (no UID or namespace), which the API server never sends for a pod.
fn project(event: Event<Pod>) -> Option<PodEvent> {
    Some(match event {
        Event::Init => PodEvent::Init,
        Event::InitDone => PodEvent::InitDone,
        Event::InitApply(pod) => PodEvent::InitApply(slim(pod)?),
        Event::Apply(pod) => PodEvent::Apply(slim(pod)?),
        Event::Delete(pod) => PodEvent::Delete(slim(pod)?),
    })
}

/// Keeps the few fields the proxy needs; the rest of the object is dropped here.
pub fn slim(pod: Pod) -> Option<SlimPod> {
    let meta = pod.metadata;
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    // A host-network pod has its node's address; the field selector keeps them out, and
    // this keeps one from claiming an address should it get through anyway.
    let ips = if spec.host_network == Some(true) {
        Vec::new()
    } else {
        let listed: Vec<String> = match status.pod_ips {
            Some(ips) if !ips.is_empty() => ips.into_iter().map(|p| p.ip).collect(),
            _ => status.pod_ip.into_iter().collect(),
        };
        listed
            .iter()
            .filter_map(|ip| match ip.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    tracing::debug!(ip, "identity: ignoring an unparsable pod IP");
                    None
                }
            })
            .collect()
    };
    Some(SlimPod {
        uid: meta.uid?,
        namespace: meta.namespace?,
        name: meta.name.unwrap_or_default(),
        labels: meta.labels.unwrap_or_default(),
        service_account: spec
            .service_account_name
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        ips,
        phase: Phase::from_status(status.phase.as_deref()),
        terminating: meta.deletion_timestamp.is_some(),
    })
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn projection_keeps_identity_and_addresses() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"uid": "u1", "namespace": "db-a", "name": "pg-a-1",
                         "labels": {"cnpg.io/cluster": "pg-a"},
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"serviceAccountName": "pg-a", "containers": [{"name": "postgres"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap();
        let p = slim(pod).unwrap();
        assert_eq!(
            (p.uid.as_str(), p.namespace.as_str(), p.name.as_str()),
            ("u1", "db-a", "pg-a-1")
        );
        assert_eq!(p.service_account, "pg-a");
        assert_eq!(
            p.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(p.phase, Phase::Running);
        assert!(p.terminating);

        let host: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"uid": "u2", "namespace": "kube-system", "name": "node-agent"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.0.4"}
        }))
        .unwrap();
        let p = slim(host).unwrap();
        assert!(p.ips.is_empty());
        assert_eq!(p.service_account, "default");
        let no_uid: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(slim(no_uid).is_none());
    }
}
