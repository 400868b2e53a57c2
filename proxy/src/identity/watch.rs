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
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::config::{IdentityConfig, Unidentified};
use super::index::{Applied, IndexFeeder, Lookup, Phase, PodEvent, SlimPod, shared_key};
use super::metrics::{IdentityMetrics, LookupLabel};
use super::wire::WatchedPod;

/// Pods per LIST page on a relist: client-go's and kube-rs's default, so a 50,000-pod relist
/// is a hundred requests of bounded size.
const PAGE_SIZE: u32 = 500;
/// How often the staleness gauge is brought up to date: it only matters at scrape time.
const STALENESS_TICK: Duration = Duration::from_secs(1);
/// The field selector every watch carries.
const NOT_HOST_NETWORK: &str = "spec.hostNetwork=false";
/// At most one direct `status.podIP` lookup per this interval, process-wide: the lookup is
/// a LIST the API server answers from etcd (the field is not indexed in its watch cache), so
/// a flood of connections from unknown addresses must not become a flood of LISTs.
const DIRECT_LOOKUP_INTERVAL: Duration = Duration::from_millis(200);
/// The node-address warning is repeated at most this often: under SNAT every connection
/// comes from a node, and one line a minute says so as well as thousands would.
const NODE_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// A direct lookup slower than this is abandoned; the connection is then unidentified.
const DIRECT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

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
struct Inner {
    /// The scopes, one watch each.
    scopes: Vec<Scope>,
    /// Bumped on every change any lookup could see: connections waiting for an unknown
    /// address wake on it.
    generation: watch::Sender<u64>,
    /// Gauges.
    metrics: IdentityMetrics,
    /// For the direct lookup on a miss.
    client: kube::Client,
    /// The label selector, in the API's syntax.
    selector: String,
    /// `identity.unknownWait`.
    unknown_wait: Duration,
    /// `identity.unidentified`.
    unidentified: Unidentified,
    /// When the last direct lookup started (the rate limit).
    last_direct: Mutex<Option<Instant>>,
    /// When the node-address warning was last logged.
    last_node_warning: Mutex<Option<Instant>>,
    /// When the watch started: before the first sync, staleness counts from here.
    started: Instant,
}

impl std::fmt::Debug for Inner {
    // kube::Client is not Debug; the rest says what is watched.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("scopes", &self.scopes)
            .field("selector", &self.selector)
            .field("unknown_wait", &self.unknown_wait)
            .field("unidentified", &self.unidentified)
            .finish_non_exhaustive()
    }
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
            client: client.clone(),
            selector: selector.clone(),
            unknown_wait: config.unknown_wait.0,
            unidentified: config.unidentified,
            last_direct: Mutex::new(None),
            last_node_warning: Mutex::new(None),
            started: Instant::now(),
        });
        inner.metrics.synced.set(0);
        let mut tasks = Vec::new();
        for (i, namespace) in namespaces.into_iter().enumerate() {
            let api: Api<WatchedPod> = match &namespace {
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

    /// What a connection from an address no single pod owns may do (`identity.unidentified`).
    pub fn unidentified(&self) -> Unidentified {
        self.inner.unidentified
    }

    /// Who is calling from `ip`. An address the index does not know is waited for (up to
    /// `unknownWait`, waking on every index change), then looked up once directly in the API
    /// (rate-limited), then checked against the node addresses.
    pub async fn identify(&self, ip: IpAddr) -> Caller {
        let ip = ip.to_canonical();
        // Subscribed before the first lookup, so a change in between is not missed.
        let mut changes = self.subscribe();
        let caller = match self.lookup(ip) {
            Lookup::Pod(pod) => (Caller::Pod(pod), "pod"),
            Lookup::Ambiguous(n) => (Caller::Ambiguous(n), "ambiguous"),
            Lookup::Unknown => self.identify_unknown(ip, &mut changes).await,
        };
        self.inner
            .metrics
            .lookups
            .get_or_create(&LookupLabel { result: caller.1 })
            .inc();
        caller.0
    }

    async fn identify_unknown(
        &self,
        ip: IpAddr,
        changes: &mut watch::Receiver<u64>,
    ) -> (Caller, &'static str) {
        let deadline = tokio::time::Instant::now() + self.inner.unknown_wait;
        while let Ok(Ok(())) = tokio::time::timeout_at(deadline, changes.changed()).await {
            match self.lookup(ip) {
                Lookup::Unknown => {}
                Lookup::Pod(pod) => return (Caller::Pod(pod), "pod_after_wait"),
                Lookup::Ambiguous(n) => return (Caller::Ambiguous(n), "ambiguous"),
            }
        }
        match self.direct_lookup(ip).await {
            Some(Lookup::Pod(pod)) => return (Caller::Pod(pod), "pod_direct"),
            Some(Lookup::Ambiguous(n)) => return (Caller::Ambiguous(n), "ambiguous"),
            Some(Lookup::Unknown) | None => {}
        }
        if self.is_node_address(ip) {
            let mut last = lock(&self.inner.last_node_warning);
            if last.is_none_or(|t| t.elapsed() >= NODE_WARNING_INTERVAL) {
                *last = Some(Instant::now());
                tracing::warn!(source = %ip, "identity: a connection comes from a node address: pod addresses are rewritten (SNAT) on the way to the proxy, so pods cannot be identified (repeated at most once a minute; the access log marks each: identity=node)");
            }
            (Caller::Node, "node")
        } else {
            (Caller::Unknown, "unknown")
        }
    }

    /// One LIST by `status.podIP` per scope, at most once per [`DIRECT_LOOKUP_INTERVAL`];
    /// `None` when rate-limited or failed. The field holds a pod's first address only.
    async fn direct_lookup(&self, ip: IpAddr) -> Option<Lookup> {
        {
            let mut last = lock(&self.inner.last_direct);
            if last.is_some_and(|t| t.elapsed() < DIRECT_LOOKUP_INTERVAL) {
                return None;
            }
            *last = Some(Instant::now());
        }
        let params = ListParams::default()
            .labels(&self.inner.selector)
            .fields(&format!("status.podIP={ip},{NOT_HOST_NETWORK}"));
        let mut found: Vec<SlimPod> = Vec::new();
        for scope in &self.inner.scopes {
            let api: Api<WatchedPod> = match &scope.namespace {
                Some(ns) => Api::namespaced(self.inner.client.clone(), ns),
                None => Api::all(self.inner.client.clone()),
            };
            match tokio::time::timeout(DIRECT_LOOKUP_TIMEOUT, api.list(&params)).await {
                Ok(Ok(list)) => found.extend(
                    list.items
                        .into_iter()
                        .filter_map(slim)
                        .filter(|p| p.is_live() && p.ips.contains(&ip)),
                ),
                Ok(Err(e)) => {
                    tracing::debug!(source = %ip, error = %e, "identity: direct pod lookup failed");
                    return None;
                }
                Err(_) => return None,
            }
        }
        Some(match found.len() {
            0 => Lookup::Unknown,
            1 => Lookup::Pod(Arc::new(found.remove(0))),
            n => Lookup::Ambiguous(n),
        })
    }

    /// Whether `ip` is the address of a node that runs a watched pod.
    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        self.inner
            .scopes
            .iter()
            .any(|s| read(&s.feeder).index().is_node_address(ip))
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

/// Who a connection comes from, as far as the proxy can tell.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Exactly one live pod owns the source address.
    Pod(Arc<SlimPod>),
    /// No pod owns it, even after the wait and the direct lookup.
    Unknown,
    /// Several live pods claim it; the count.
    Ambiguous(usize),
    /// It is a node's address: something rewrote the pod's source address.
    Node,
}

impl Caller {
    /// The `identity` field of the access log: `pod`, `unknown`, `ambiguous` or `node`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pod(_) => "pod",
            Self::Unknown => "unknown",
            Self::Ambiguous(_) => "ambiguous",
            Self::Node => "node",
        }
    }

    /// The pod, when identified.
    pub fn pod(&self) -> Option<&SlimPod> {
        match self {
            Self::Pod(p) => Some(p),
            _ => None,
        }
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
    S: futures_util::Stream<Item = watcher::Result<Event<WatchedPod>>> + Send,
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
fn project(event: Event<WatchedPod>) -> Option<PodEvent> {
    Some(match event {
        Event::Init => PodEvent::Init,
        Event::InitDone => PodEvent::InitDone,
        Event::InitApply(pod) => PodEvent::InitApply(slim(pod)?),
        Event::Apply(pod) => PodEvent::Apply(slim(pod)?),
        Event::Delete(pod) => PodEvent::Delete(slim(pod)?),
    })
}

/// The index's view of a pod read off the wire.
pub fn slim(pod: WatchedPod) -> Option<SlimPod> {
    let meta = pod.metadata;
    let (spec, status) = (pod.spec, pod.status);
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
    let host_ips: Vec<IpAddr> = match status.host_ips {
        Some(ips) if !ips.is_empty() => ips.into_iter().map(|h| h.ip).collect(),
        _ => status.host_ip.into_iter().collect::<Vec<_>>(),
    }
    .iter()
    .filter_map(|ip| ip.parse().ok())
    .collect();
    Some(SlimPod {
        uid: meta.uid?.into(),
        host_ips,
        namespace: shared_key(meta.namespace?),
        name: meta.name.unwrap_or_default().into(),
        labels: meta.labels.unwrap_or_default().into(),
        service_account: shared_key(
            spec.service_account_name
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
        ),
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
        let pod: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"uid": "u1", "namespace": "db-a", "name": "pg-a-1",
                         "labels": {"cnpg.io/cluster": "pg-a"},
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"serviceAccountName": "pg-a", "containers": [{"name": "postgres"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap();
        let p = slim(pod).unwrap();
        assert_eq!((&*p.uid, &*p.namespace, &*p.name), ("u1", "db-a", "pg-a-1"));
        assert_eq!(&*p.service_account, "pg-a");
        assert_eq!(
            p.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(p.phase, Phase::Running);
        assert!(p.terminating);

        let host: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"uid": "u2", "namespace": "kube-system", "name": "node-agent"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.0.4"}
        }))
        .unwrap();
        let p = slim(host).unwrap();
        assert!(p.ips.is_empty());
        assert_eq!(&*p.service_account, "default");
        let no_uid: WatchedPod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(slim(no_uid).is_none());
    }
}
