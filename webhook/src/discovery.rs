//! Cluster discovery (`discovery: true`): watch caches of what shapes NO_PROXY.
//!
//! Four kube-rs watchers keep local caches: Services (metadata only; peer services per
//! namespace), the `default/kubernetes` Service (the API server's ClusterIPs),
//! `networking.k8s.io/v1` ServiceCIDRs and Nodes' `podCIDRs`. Reviews read the caches and
//! never call the API. A source that fails (missing RBAC, an API server without
//! ServiceCIDR) is logged once and counts as empty, so the configured values still apply.
//!
//! The kube client sits behind [`start`]; everything that turns cached objects into facts is
//! in [`ClusterCache`], which is pure and unit-tested.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use futures_util::{Stream, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, ResourceExt};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admission::ServiceDirectory;
use crate::config::Config;
use crate::engine::ClusterFacts;
use crate::metrics::{CacheLabel, Metrics};

/// What discovery adds to the configured cluster facts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovered {
    /// Service CIDRs from ServiceCIDR objects.
    pub service_cidrs: Vec<IpNet>,
    /// Pod CIDRs from Nodes, aggregated.
    pub pod_cidrs: Vec<IpNet>,
    /// API server addresses: `KUBERNETES_SERVICE_HOST` and the `kubernetes` Service's IPs.
    pub api_server: Vec<String>,
}

impl Discovered {
    /// What the webhook's own environment says without any API access: the API server
    /// address the kubelet gives every pod in `KUBERNETES_SERVICE_HOST` (empty outside a
    /// cluster). Used when discovery is off.
    pub fn from_environment() -> Self {
        Self {
            api_server: own_service_host().into_iter().collect(),
            ..Self::default()
        }
    }

    /// The union of `config`'s facts and discovered ones: configured entries first and in
    /// their order, then discovered ones not already covered. A CIDR list the config left at
    /// its built-in default is replaced by the discovered one when discovery found any: the
    /// default is a guess (kubeadm's ranges), the discovered ranges are the cluster's.
    pub fn facts_for(&self, config: &Config) -> ClusterFacts {
        let mut facts = ClusterFacts::from_config(config);
        replace_or_union(
            &mut facts.service_cidrs,
            config.service_cidrs_defaulted,
            &self.service_cidrs,
        );
        replace_or_union(
            &mut facts.pod_cidrs,
            config.pod_cidrs_defaulted,
            &self.pod_cidrs,
        );
        for host in &self.api_server {
            if !facts.api_server.contains(host) {
                facts.api_server.push(host.clone());
            }
        }
        facts
    }
}

/// `KUBERNETES_SERVICE_HOST` of this process, when set.
fn own_service_host() -> Option<String> {
    std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .filter(|h| !h.is_empty())
}

fn replace_or_union(into: &mut Vec<IpNet>, defaulted: bool, found: &[IpNet]) {
    if defaulted && !found.is_empty() {
        into.clear();
    }
    union_into(into, found);
}

fn union_into(into: &mut Vec<IpNet>, extra: &[IpNet]) {
    for net in extra {
        if !into.iter().any(|have| have.contains(net)) {
            into.push(*net);
        }
    }
}

/// One cache fed by a watcher: objects by key, with a relist buffered until complete so a
/// restart never shows a half-empty cache.
#[derive(Debug)]
pub struct Index<V> {
    /// Current contents.
    items: BTreeMap<(String, String), V>,
    /// Contents of a relist in progress.
    relist: Option<BTreeMap<(String, String), V>>,
    /// Whether a full list has completed (or the source failed and counts as empty).
    settled: bool,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
            settled: false,
        }
    }
}

impl<V> Index<V> {
    /// Applies one watcher event; `key` gives (namespace, name), `value` what to keep.
    pub fn apply<K>(
        &mut self,
        event: Event<K>,
        key: impl Fn(&K) -> (String, String),
        value: impl Fn(&K) -> V,
    ) {
        match event {
            Event::Apply(obj) => {
                self.items.insert(key(&obj), value(&obj));
            }
            Event::Delete(obj) => {
                self.items.remove(&key(&obj));
            }
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(obj) => {
                self.relist
                    .get_or_insert_default()
                    .insert(key(&obj), value(&obj));
            }
            Event::InitDone => {
                if let Some(items) = self.relist.take() {
                    self.items = items;
                }
                self.settled = true;
            }
        }
    }

    /// Marks the source as failed: it counts as settled so readiness does not wait on it.
    pub fn fail(&mut self) {
        self.settled = true;
    }

    /// Objects held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.items.values()
    }
}

/// All discovery caches.
#[derive(Debug, Default)]
pub struct ClusterCache {
    /// Service names by namespace (the value is unused; the key holds both).
    pub services: Index<()>,
    /// ClusterIPs of `default/kubernetes`.
    pub kubernetes: Index<Vec<String>>,
    /// CIDRs of each ServiceCIDR object.
    pub service_cidrs: Index<Vec<IpNet>>,
    /// Pod CIDRs of each Node.
    pub node_pod_cidrs: Index<Vec<IpNet>>,
    /// `KUBERNETES_SERVICE_HOST` of the webhook's own environment, an IP or a hostname
    /// (AKS uses an `*.azmk8s.io` name).
    pub service_host: Option<String>,
}

impl ClusterCache {
    /// Whether every source has listed once (or failed).
    pub fn synced(&self) -> bool {
        self.services.settled
            && self.kubernetes.settled
            && self.service_cidrs.settled
            && self.node_pod_cidrs.settled
    }

    /// The facts the caches hold.
    pub fn discovered(&self) -> Discovered {
        let mut api_server = Vec::new();
        if let Some(host) = &self.service_host {
            api_server.push(host.clone());
        }
        for ip in self.kubernetes.values().flatten() {
            if !api_server.contains(ip) {
                api_server.push(ip.clone());
            }
        }
        Discovered {
            service_cidrs: IpNet::aggregate(
                &self.service_cidrs.values().flatten().copied().collect(),
            ),
            pod_cidrs: IpNet::aggregate(&self.node_pod_cidrs.values().flatten().copied().collect()),
            api_server,
        }
    }

    /// Service names in `namespace`, sorted.
    pub fn services_in(&self, namespace: &str) -> Vec<String> {
        let start = (namespace.to_string(), String::new());
        self.services
            .items
            .range(start..)
            .take_while(|((ns, _), _)| ns == namespace)
            .map(|((_, name), _)| name.clone())
            .collect()
    }
}

/// Parses CIDR strings from the API, skipping (and logging) any it cannot read.
fn cidrs<'a>(texts: impl IntoIterator<Item = &'a String>, from: &str) -> Vec<IpNet> {
    texts
        .into_iter()
        .filter_map(|t| match t.parse::<IpNet>() {
            Ok(net) => Some(net.trunc()),
            Err(_) => {
                warn!(cidr = %t, from, "ignoring unparseable CIDR");
                None
            }
        })
        .collect()
}

fn key<K: ResourceExt>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Extracts the ClusterIPs of a Service (`clusterIPs`, else `clusterIP`), skipping `None`.
pub fn service_ips(svc: &Service) -> Vec<String> {
    let spec = svc.spec.as_ref();
    let ips = spec
        .and_then(|s| s.cluster_ips.clone())
        .or_else(|| spec.and_then(|s| s.cluster_ip.clone()).map(|ip| vec![ip]))
        .unwrap_or_default();
    ips.into_iter()
        .filter(|ip| ip.parse::<IpAddr>().is_ok())
        .collect()
}

/// The pod CIDRs a Node was assigned (`podCIDRs`, else `podCIDR`).
pub fn node_pod_cidrs(node: &Node) -> Vec<IpNet> {
    let spec = node.spec.as_ref();
    let texts = spec
        .and_then(|s| s.pod_cidrs.clone())
        .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
        .unwrap_or_default();
    cidrs(&texts, "node")
}

/// The CIDRs of a ServiceCIDR object.
pub fn service_cidr_ranges(obj: &ServiceCIDR) -> Vec<IpNet> {
    let texts = obj
        .spec
        .as_ref()
        .and_then(|s| s.cidrs.clone())
        .unwrap_or_default();
    cidrs(&texts, "servicecidr")
}

/// The shared cache, as the review path sees it.
struct SharedCache(Arc<RwLock<ClusterCache>>);

impl ServiceDirectory for SharedCache {
    fn services_in(&self, namespace: &str) -> Vec<String> {
        match self.0.read() {
            Ok(cache) => cache.services_in(namespace),
            Err(poisoned) => poisoned.into_inner().services_in(namespace),
        }
    }
}

/// What a running discovery offers the server.
pub struct DiscoveryHandle {
    /// Peer service lookup for reviews.
    pub services: Arc<dyn ServiceDirectory>,
    /// The discovered facts, updated as the caches change.
    pub facts: watch::Receiver<Discovered>,
    /// True once every cache has listed once (or failed).
    pub synced: watch::Receiver<bool>,
}

/// Starts the watchers with the in-cluster (or kubeconfig) client. Without a usable client
/// discovery is off: logged, configured facts only, ready at once.
pub async fn start(metrics: Arc<Metrics>) -> DiscoveryHandle {
    match kube::Client::try_default().await {
        Ok(client) => start_with(client, metrics),
        Err(e) => {
            warn!(error = %e, "discovery is on but no Kubernetes client could be built; using configured cluster facts only");
            let cache = Arc::new(RwLock::new(ClusterCache {
                service_host: own_service_host(),
                ..Default::default()
            }));
            let (_, facts) = watch::channel(read(&cache).discovered());
            let (_, synced) = watch::channel(true);
            DiscoveryHandle {
                services: Arc::new(SharedCache(cache)),
                facts,
                synced,
            }
        }
    }
}

/// Runs discovery once, as the serving webhook's first sync does, for the cluster-aware
/// preview: starts the same watchers with `client`, waits until every source has listed
/// (or failed, which counts as empty, as in the webhook), and returns what they found.
/// `None` when that takes longer than `within`. The watchers stop with the runtime.
pub async fn discover_once(
    client: kube::Client,
    within: std::time::Duration,
) -> Option<(Discovered, Arc<dyn ServiceDirectory>)> {
    let mut handle = start_with(client, Arc::new(Metrics::default()));
    tokio::time::timeout(within, handle.synced.wait_for(|synced| *synced))
        .await
        .ok()?
        .ok()?;
    let facts = handle.facts.borrow().clone();
    Some((facts, handle.services))
}

/// Starts the watchers with `client`.
pub fn start_with(client: kube::Client, metrics: Arc<Metrics>) -> DiscoveryHandle {
    let cache = Arc::new(RwLock::new(ClusterCache {
        service_host: own_service_host(),
        ..Default::default()
    }));
    let initial = read(&cache).discovered();
    let (facts_tx, facts) = watch::channel(initial);
    let (synced_tx, synced) = watch::channel(false);
    let services: Arc<dyn ServiceDirectory> = Arc::new(SharedCache(Arc::clone(&cache)));

    let publish = Arc::new(Publisher {
        cache,
        facts: facts_tx,
        synced: synced_tx,
        metrics,
    });

    // Metadata only: names are all the review path needs, and specs would cost memory.
    let svc_stream = watcher(
        Api::<PartialObjectMeta<Service>>::all(client.clone()),
        watcher::Config::default(),
    );
    spawn_source(
        Arc::clone(&publish),
        "services",
        svc_stream,
        |c, e| c.services.apply(e, key, |_| ()),
        |c| &mut c.services,
    );

    let kubernetes = watcher(
        Api::<Service>::namespaced(client.clone(), "default"),
        watcher::Config::default().fields("metadata.name=kubernetes"),
    );
    spawn_source(
        Arc::clone(&publish),
        "kubernetes-service",
        kubernetes,
        |c, e| c.kubernetes.apply(e, key, service_ips),
        |c| &mut c.kubernetes,
    );

    let service_cidrs = watcher(
        Api::<ServiceCIDR>::all(client.clone()),
        watcher::Config::default(),
    );
    spawn_source(
        Arc::clone(&publish),
        "servicecidrs",
        service_cidrs,
        |c, e| c.service_cidrs.apply(e, key, service_cidr_ranges),
        |c| &mut c.service_cidrs,
    );

    let nodes = watcher(Api::<Node>::all(client), watcher::Config::default());
    spawn_source(
        publish,
        "nodes",
        nodes,
        |c, e| c.node_pod_cidrs.apply(e, key, node_pod_cidrs),
        |c| &mut c.node_pod_cidrs,
    );

    DiscoveryHandle {
        services,
        facts,
        synced,
    }
}

fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(api, config).default_backoff()
}

fn read(cache: &RwLock<ClusterCache>) -> std::sync::RwLockReadGuard<'_, ClusterCache> {
    match cache.read() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Applies events to the shared cache and publishes what changed.
struct Publisher {
    cache: Arc<RwLock<ClusterCache>>,
    facts: watch::Sender<Discovered>,
    synced: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Publisher {
    fn update(&self, name: &str, change: impl FnOnce(&mut ClusterCache) -> usize) {
        let (discovered, synced, len) = {
            let mut cache = match self.cache.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let len = change(&mut cache);
            (cache.discovered(), cache.synced(), len)
        };
        self.metrics
            .cache_objects
            .get_or_create(&CacheLabel {
                cache: name.to_string(),
            })
            .set(len as i64);
        self.facts.send_if_modified(|current| {
            let changed = *current != discovered;
            *current = discovered;
            changed
        });
        self.synced.send_if_modified(|current| {
            let changed = *current != synced;
            *current = synced;
            changed
        });
    }
}

fn spawn_source<K, S, A, I, V>(
    publish: Arc<Publisher>,
    name: &'static str,
    stream: S,
    apply: A,
    index: I,
) where
    K: Send + 'static,
    S: Stream<Item = watcher::Result<Event<K>>> + Send + 'static,
    A: Fn(&mut ClusterCache, Event<K>) + Send + 'static,
    I: Fn(&mut ClusterCache) -> &mut Index<V> + Send + 'static,
    V: Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut logged_error = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    let done = matches!(event, Event::InitDone);
                    publish.update(name, |c| {
                        apply(c, event);
                        index(c).len()
                    });
                    if done && logged_error {
                        info!(source = name, "discovery source recovered");
                        logged_error = false;
                    }
                }
                Err(e) => {
                    if !logged_error {
                        warn!(source = name, error = %e, "discovery source failing; using configured values for it (retrying in the background)");
                        logged_error = true;
                    }
                    publish.update(name, |c| {
                        let idx = index(c);
                        idx.fail();
                        idx.len()
                    });
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, ServiceSpec};
    use k8s_openapi::api::networking::v1::ServiceCIDRSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::config::Config;
    use crate::engine::{Injector, Operation, PodContext};

    fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: ns.map(str::to_string),
            ..Default::default()
        }
    }

    fn svc(ns: &str, name: &str, ips: &[&str]) -> Service {
        Service {
            metadata: meta(Some(ns), name),
            spec: Some(ServiceSpec {
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(name: &str, cidrs: &[&str]) -> Node {
        Node {
            metadata: meta(None, name),
            spec: Some(NodeSpec {
                pod_cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn service_cidr(name: &str, cidrs: &[&str]) -> ServiceCIDR {
        ServiceCIDR {
            metadata: meta(None, name),
            spec: Some(ServiceCIDRSpec {
                cidrs: Some(cidrs.iter().map(|s| s.to_string()).collect()),
            }),
            ..Default::default()
        }
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse::<IpNet>().unwrap()).collect()
    }

    fn populated() -> ClusterCache {
        let mut c = ClusterCache {
            service_host: Some("aks-abc.hcp.westeurope.azmk8s.io".into()),
            ..Default::default()
        };
        for e in [
            Event::Init,
            Event::InitApply(svc("db", "pg-rw", &["10.0.0.10"])),
            Event::InitApply(svc("db", "harbor-core", &["10.0.0.11"])),
            Event::InitApply(svc("dbx", "other", &["10.0.0.12"])),
            Event::InitDone,
        ] {
            c.services.apply(e, key, |_| ());
        }
        for e in [
            Event::Init,
            Event::InitApply(svc("default", "kubernetes", &["10.0.0.1", "None"])),
            Event::InitDone,
        ] {
            c.kubernetes.apply(e, key, service_ips);
        }
        for e in [
            Event::Init,
            Event::InitApply(service_cidr(
                "kubernetes",
                &["10.0.0.0/16", "fd00:10::/108"],
            )),
            Event::InitDone,
        ] {
            c.service_cidrs.apply(e, key, service_cidr_ranges);
        }
        for e in [
            Event::Init,
            Event::InitApply(node("n1", &["10.244.0.0/24"])),
            Event::InitApply(node("n2", &["10.244.1.0/24"])),
            Event::InitApply(node("n3", &["10.250.7.0/24", "bogus"])),
            Event::InitDone,
        ] {
            c.node_pod_cidrs.apply(e, key, node_pod_cidrs);
        }
        c
    }

    #[test]
    fn caches_turn_into_facts() {
        let c = populated();
        assert!(c.synced());
        assert_eq!(c.services_in("db"), ["harbor-core", "pg-rw"]);
        assert_eq!(c.services_in("d"), Vec::<String>::new());
        let d = c.discovered();
        assert_eq!(
            d.api_server,
            ["aks-abc.hcp.westeurope.azmk8s.io", "10.0.0.1"]
        );
        assert_eq!(d.service_cidrs, nets(&["10.0.0.0/16", "fd00:10::/108"]));
        // Adjacent node ranges merge; nothing is lost.
        assert_eq!(d.pod_cidrs, nets(&["10.244.0.0/23", "10.250.7.0/24"]));
    }

    #[test]
    fn discovered_facts_reach_no_proxy_after_configured_ones() {
        let config =
            Config::from_yaml("serviceCIDRs: [10.0.0.0/16]\npodCIDRs: [10.244.0.0/16]\n").unwrap();
        let c = populated();
        let facts = c.discovered().facts_for(&config);
        let injector = Injector::new(&config, &facts);
        let services = c.services_in("db");
        let ctx = PodContext {
            namespace: "db",
            operation: Operation::Create,
            services: &services,
        };
        let list = injector.no_proxy_for(None, &Default::default(), &ctx);
        assert_eq!(
            list,
            "localhost,127.0.0.1,::1,aks-abc.hcp.westeurope.azmk8s.io,10.0.0.1,kubernetes,kubernetes.default,\
             .svc,.svc.cluster.local,.cluster.local,10.0.0.0/16,fd00:10::/108,10.244.0.0/16,10.250.7.0/24,\
             harbor-core.db,harbor-core,pg-rw.db,pg-rw"
        );
    }

    #[test]
    fn discovered_ranges_replace_the_built_in_defaults_but_join_configured_ones() {
        let c = populated();
        let found = c.discovered();
        // No CIDRs in the file: kubeadm's guesses give way to the cluster's ranges, and the
        // kubernetes Service IP comes from the first discovered Service range.
        let config = Config::from_yaml("discovery: true\n").unwrap();
        let facts = found.facts_for(&config);
        assert_eq!(facts.service_cidrs, nets(&["10.0.0.0/16", "fd00:10::/108"]));
        assert_eq!(facts.pod_cidrs, nets(&["10.244.0.0/23", "10.250.7.0/24"]));
        let list = Injector::new(&config, &facts).no_proxy_for(
            None,
            &Default::default(),
            &PodContext {
                namespace: "none",
                operation: Operation::Create,
                services: &[],
            },
        );
        assert!(!list.contains("10.96."), "{list}");
        assert!(list.contains(",10.0.0.1,"), "{list}");
        // Ranges the admin wrote stay, first, and discovered ones join them.
        let config = Config::from_yaml("serviceCIDRs: [10.96.0.0/12]\n").unwrap();
        let facts = found.facts_for(&config);
        assert_eq!(
            facts.service_cidrs,
            nets(&["10.96.0.0/12", "10.0.0.0/16", "fd00:10::/108"])
        );
        assert_eq!(facts.pod_cidrs, nets(&["10.244.0.0/23", "10.250.7.0/24"]));
        // Discovery that found nothing (no RBAC, no ServiceCIDR API) keeps the defaults.
        let facts = Discovered::default().facts_for(&config);
        assert_eq!(facts.service_cidrs, nets(&["10.96.0.0/12"]));
        assert_eq!(facts.pod_cidrs, nets(&["10.244.0.0/16"]));
    }

    #[test]
    fn relists_replace_atomically_and_deletes_apply() {
        let mut idx: Index<()> = Index::default();
        idx.apply(Event::Apply(svc("a", "x", &[])), key, |_| ());
        idx.apply(Event::Apply(svc("a", "y", &[])), key, |_| ());
        idx.apply(Event::Delete(svc("a", "x", &[])), key, |_| ());
        assert_eq!(idx.len(), 1);
        assert!(!idx.settled);
        idx.apply(Event::<Service>::Init, key, |_| ());
        idx.apply(Event::InitApply(svc("a", "z", &[])), key, |_| ());
        assert_eq!(
            idx.len(),
            1,
            "old contents stay until the relist is complete"
        );
        idx.apply(Event::<Service>::InitDone, key, |_| ());
        assert_eq!(
            idx.items.keys().cloned().collect::<Vec<_>>(),
            [("a".to_string(), "z".to_string())]
        );
        assert!(idx.settled);
    }

    #[test]
    fn a_failed_source_counts_as_settled_and_empty() {
        let mut c = populated();
        c.service_cidrs = Index::default();
        assert!(!c.synced());
        c.service_cidrs.fail();
        assert!(c.synced());
        assert!(c.discovered().service_cidrs.is_empty());
    }
}
