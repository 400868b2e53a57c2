//! The drift detector: is every pod that should go through egress-gate going through it?
//!
//! The quiet failure of an admission webhook with `failurePolicy: Ignore` is a pod admitted
//! bare while the webhook was down or unregistered. This module watches pod *metadata* (labels
//! and annotations are all selection needs; specs would cost memory on big clusters) and the
//! namespaces opted in with [`OPT_IN_LABEL`], decides per pod with the engine's own rule
//! ([`Injector::select`]) whether it is selected, and reads egress-gate's status annotation to
//! tell whether the webhook mutated it, and whether with the values it would inject now.
//!
//! Only selected pods are kept, as a name, a profile and a state, so memory grows with the
//! pods egress-gate cares about. [`DriftTracker`] is pure and unit-tested; [`start`] feeds it
//! from kube-rs watchers and publishes the counts as gauges.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ResourceExt};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::admission::ServiceDirectory;
use crate::engine::{InjectionStatus, Injector, Operation, PodContext, Selection};
use crate::metrics::{Metrics, PodLabels};

/// The namespace label that opts a namespace in, as deploy/base's namespaceSelector reads it.
pub const OPT_IN_LABEL: &str = "egress-gate.io/injection";
/// The value of [`OPT_IN_LABEL`] that opts in.
pub const OPT_IN_VALUE: &str = "enabled";
/// Namespaces the shipped namespaceSelector always leaves out, besides the webhook's own.
pub const ALWAYS_EXCLUDED: [&str; 1] = ["kube-system"];
/// How often at most the gauges are recomputed: a burst of pod events (a relist of 50,000
/// pods) costs one pass, and a scrape every 15 s or more never sees a count older than this.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// What the status annotation says about a selected pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PodState {
    /// The status annotation is present and records the values egress-gate injects now.
    Injected,
    /// The status annotation is present but records other values (the configuration or the
    /// namespace's peer Services changed since the pod was created): the pod still goes
    /// through the proxy, with an older NO_PROXY.
    Stale,
    /// Selected, and no readable status annotation: the webhook never mutated the pod.
    Uninjected,
}

impl PodState {
    /// Whether the webhook mutated the pod at some point.
    pub fn injected(self) -> bool {
        self != PodState::Uninjected
    }
}

/// One selected pod, as kept in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Tracked {
    /// The selecting profile (shared text: there are few profiles).
    profile: Arc<str>,
    /// What its status annotation says.
    state: PodState,
}

/// Counts for one namespace and profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pods a profile or the opt-in annotation selects.
    pub selected: u64,
    /// Of those, pods the webhook mutated (current or stale).
    pub injected: u64,
    /// Of those, pods whose status records other values than egress-gate injects now.
    pub stale: u64,
    /// Selected pods the webhook never mutated.
    pub uninjected: u64,
}

/// A selected pod the webhook never mutated, for `status` and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The profile that selects it.
    pub profile: String,
}

/// A pod as a watch event carries it: (namespace, name) and, when selected, its profile
/// and state (see [`classify`]).
pub type PodSeen = ((String, String), Option<(String, PodState)>);

/// Pods and opted-in namespaces as the watches last showed them.
#[derive(Debug, Default)]
pub struct DriftTracker {
    /// Selected pods by (namespace, name), in every namespace: a namespace opted in later
    /// counts its pods at once.
    pods: HashMap<(String, String), Tracked>,
    /// Pods of a relist in progress, swapped in when it completes.
    pods_relist: Option<HashMap<(String, String), Tracked>>,
    /// Counts of `pods` by namespace (opted in or not) and profile, kept in step with every
    /// event, so publishing the gauges costs the namespaces and profiles rather than a pass
    /// over every pod each second (50,000 pods: a pass that stalled admission on the shared
    /// runtime thread; see docs/performance.md). Recomputed only when a relist completes.
    totals: HashMap<String, HashMap<Arc<str>, Counts>>,
    /// Namespaces carrying the opt-in label, less the excluded ones.
    namespaces: BTreeSet<String>,
    /// Namespaces of a relist in progress.
    namespaces_relist: Option<BTreeSet<String>>,
    /// Namespaces never counted: kube-system and the webhook's own.
    excluded: BTreeSet<String>,
    /// Interned profile names.
    profiles: Vec<Arc<str>>,
    /// Both watches have listed once.
    pods_listed: bool,
    /// See `pods_listed`.
    namespaces_listed: bool,
}

impl DriftTracker {
    /// A tracker for a webhook running in `own_namespace`.
    pub fn new(own_namespace: &str) -> Self {
        Self {
            excluded: ALWAYS_EXCLUDED
                .iter()
                .map(|s| s.to_string())
                .chain([own_namespace.to_string()])
                .collect(),
            ..Self::default()
        }
    }

    /// Whether both watches have completed a listing.
    pub fn synced(&self) -> bool {
        self.pods_listed && self.namespaces_listed
    }

    /// Whether pods in `namespace` are counted.
    pub fn opted_in(&self, namespace: &str) -> bool {
        self.namespaces.contains(namespace)
    }

    /// Applies one namespace watch event (the watch selects the opt-in label already).
    pub fn namespace_event(&mut self, event: Event<String>) {
        match event {
            Event::Apply(ns) => {
                if !self.excluded.contains(&ns) {
                    self.namespaces.insert(ns);
                }
            }
            Event::Delete(ns) => {
                self.namespaces.remove(&ns);
            }
            Event::Init => self.namespaces_relist = Some(BTreeSet::new()),
            Event::InitApply(ns) => {
                if !self.excluded.contains(&ns) {
                    self.namespaces_relist.get_or_insert_default().insert(ns);
                }
            }
            Event::InitDone => {
                if let Some(set) = self.namespaces_relist.take() {
                    self.namespaces = set;
                }
                self.namespaces_listed = true;
            }
        }
    }

    /// Applies one pod event, classified by [`classify`]: `Some` for a selected pod.
    /// Returns the pod when it has just become uninjected in an opted-in namespace (not
    /// seen so before), so the caller logs it once.
    pub fn pod_event(&mut self, event: Event<PodSeen>) -> Option<Missing> {
        match event {
            Event::Apply((key, found)) => self.upsert(key, found, false),
            Event::Delete((key, _)) => {
                self.remove(&key);
                None
            }
            Event::Init => {
                self.pods_relist = Some(HashMap::new());
                None
            }
            Event::InitApply((key, found)) => self.upsert(key, found, true),
            Event::InitDone => {
                if let Some(pods) = self.pods_relist.take() {
                    self.pods = pods;
                    self.totals.clear();
                    for ((ns, _), tracked) in &self.pods {
                        tally(&mut self.totals, ns, tracked, true);
                    }
                }
                self.pods_listed = true;
                None
            }
        }
    }

    fn upsert(
        &mut self,
        key: (String, String),
        found: Option<(String, PodState)>,
        relist: bool,
    ) -> Option<Missing> {
        let Some((profile, state)) = found else {
            self.remove(&key);
            if let Some(r) = self.pods_relist.as_mut().filter(|_| relist) {
                r.remove(&key);
            }
            return None;
        };
        let before = self.pods.get(&key).map(|t| t.state);
        let profile = self.intern(&profile);
        let newly_missing = state == PodState::Uninjected
            && before != Some(PodState::Uninjected)
            && self.opted_in(&key.0);
        let missing = newly_missing.then(|| Missing {
            namespace: key.0.clone(),
            name: key.1.clone(),
            profile: profile.to_string(),
        });
        let tracked = Tracked { profile, state };
        match self.pods_relist.as_mut().filter(|_| relist) {
            Some(r) => {
                r.insert(key, tracked);
            }
            None => {
                tally(&mut self.totals, &key.0, &tracked, true);
                if let Some(old) = self.pods.insert(key.clone(), tracked) {
                    tally(&mut self.totals, &key.0, &old, false);
                }
            }
        }
        missing
    }

    /// Forgets a pod, and uncounts it.
    fn remove(&mut self, key: &(String, String)) {
        if let Some(old) = self.pods.remove(key) {
            tally(&mut self.totals, &key.0, &old, false);
        }
    }

    fn intern(&mut self, profile: &str) -> Arc<str> {
        if let Some(p) = self.profiles.iter().find(|p| ***p == *profile) {
            return Arc::clone(p);
        }
        let p: Arc<str> = Arc::from(profile);
        self.profiles.push(Arc::clone(&p));
        p
    }

    /// Counts by (namespace, profile), over opted-in namespaces only, for the pairs with
    /// at least one selected pod. Costs the number of namespaces and profiles, not pods.
    pub fn counts(&self) -> BTreeMap<(String, String), Counts> {
        let mut out: BTreeMap<(String, String), Counts> = BTreeMap::new();
        for (ns, profiles) in &self.totals {
            if !self.opted_in(ns) {
                continue;
            }
            for (profile, c) in profiles {
                if c.selected > 0 {
                    out.insert((ns.clone(), profile.to_string()), *c);
                }
            }
        }
        out
    }

    /// Every selected pod in an opted-in namespace the webhook never mutated, sorted.
    pub fn missing(&self) -> Vec<Missing> {
        let mut out: Vec<Missing> = self
            .pods
            .iter()
            .filter(|((ns, _), t)| t.state == PodState::Uninjected && self.opted_in(ns))
            .map(|((ns, name), t)| Missing {
                namespace: ns.clone(),
                name: name.clone(),
                profile: t.profile.to_string(),
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// The opted-in namespaces, sorted.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().map(String::as_str)
    }
}

/// Adds one tracked pod of `namespace` to the totals (`add`), or takes it away.
fn tally(
    totals: &mut HashMap<String, HashMap<Arc<str>, Counts>>,
    namespace: &str,
    tracked: &Tracked,
    add: bool,
) {
    let profiles = match totals.get_mut(namespace) {
        Some(p) => p,
        None => totals.entry(namespace.to_string()).or_default(),
    };
    let c = profiles.entry(Arc::clone(&tracked.profile)).or_default();
    let step = |n: &mut u64| {
        *n = if add {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        }
    };
    step(&mut c.selected);
    match tracked.state {
        PodState::Injected => step(&mut c.injected),
        PodState::Stale => {
            step(&mut c.injected);
            step(&mut c.stale);
        }
        PodState::Uninjected => step(&mut c.uninjected),
    }
}

/// Decides about one pod from its metadata: `None` when no profile and no opt-in selects it
/// (or it opted out), else the selecting profile and what its status annotation says.
pub fn classify(
    injector: &Injector,
    services: &dyn ServiceDirectory,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Option<(String, PodState)> {
    let config = injector.config();
    let opt_in = annotations
        .get(&config.inject_annotation)
        .map(String::as_str);
    let Selection::Selected { profile, name } = injector.select(labels, opt_in) else {
        return None;
    };
    let status: Option<InjectionStatus> = annotations
        .get(&config.status_annotation)
        .and_then(|text| serde_json::from_str(text).ok());
    let state = match status {
        None => PodState::Uninjected,
        Some(status) => {
            let peers = services.services_in(namespace);
            let ctx = PodContext {
                namespace,
                operation: Operation::Create,
                services: &peers,
            };
            if status.values_hash == injector.current_values_hash(profile, labels, &ctx) {
                PodState::Injected
            } else {
                PodState::Stale
            }
        }
    };
    Some((name.to_string(), state))
}

/// The name of the detector's OS thread, as `top -H` and `perf` show it.
pub const THREAD_NAME: &str = "pod-drift";

/// Why the detector could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The OS refused a new thread.
    #[error("cannot start the pod drift thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A running detector: its tracker, and the thread it runs on. Dropping it stops the
/// detector without waiting; [`DriftHandle::stop`] stops it and waits for the thread.
pub struct DriftHandle {
    /// The shared tracker, for tests and the benchmark.
    pub tracker: Arc<Mutex<DriftTracker>>,
    /// Tells the detector's runtime to stop (set to `true`, or dropped).
    stop: watch::Sender<bool>,
    /// The detector's thread; `None` once joined.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DriftHandle {
    /// Stops the watches and the publisher and waits for the thread to end. Blocks for as
    /// long as the detector takes to drop its runtime (its tasks are cancelled at their next
    /// await point, so milliseconds); call it from a blocking context.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("pod drift thread panicked");
        }
    }
}

impl Drop for DriftHandle {
    /// Signals the thread without joining it: a handle dropped on an async runtime must not
    /// block it, and the thread ends on its own at its next await point.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Locks the tracker, recovering it after a panic elsewhere (its state stays consistent:
/// every update is a single insert or swap).
pub fn lock(tracker: &Mutex<DriftTracker>) -> std::sync::MutexGuard<'_, DriftTracker> {
    match tracker.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Starts the detector on an OS thread of its own ([`THREAD_NAME`]) with its own
/// single-threaded tokio runtime, where it builds its Kubernetes client from `client_config`,
/// runs the namespace and pod metadata watches and publishes the gauges.
///
/// Why a thread: with the detector on the admission runtime, a review waited behind every
/// watch event and listing page, and with 50,000 pods held the review path itself got slower
/// (docs/performance.md, "With the pod drift watch running"). On its own thread the
/// detector's work and its allocations stay off the threads that answer reviews.
///
/// `injector` follows configuration reloads; pods are classified under the configuration
/// in force when their event arrives. The detector runs until [`DriftHandle::stop`] or until
/// the handle is dropped.
pub fn start(
    client_config: kube::Config,
    own_namespace: &str,
    injector: watch::Receiver<Arc<Injector>>,
    services: Arc<dyn ServiceDirectory>,
    metrics: Arc<Metrics>,
) -> Result<DriftHandle, StartError> {
    let tracker = Arc::new(Mutex::new(DriftTracker::new(own_namespace)));
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let shared = Arc::clone(&tracker);
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.to_string())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "pod drift: cannot start its runtime; pod drift is not tracked");
                    return;
                }
            };
            runtime.block_on(async move {
                // A kube client spawns its request buffer on the runtime it is built in.
                let client = match kube::Client::try_from(client_config) {
                    Ok(c) => c,
                    Err(e) => {
                        error!(error = %e, "pod drift: no Kubernetes client; pod drift is not tracked");
                        return;
                    }
                };
                tokio::select! {
                    () = run(client, shared, injector, services, metrics) => {}
                    _ = stop_rx.wait_for(|stop| *stop) => {}
                }
            });
            // Dropping the runtime here cancels the watches and the publisher.
        })
        .map_err(StartError::Thread)?;
    info!("pod drift detector watching opted-in namespaces' pods (metadata only)");
    Ok(DriftHandle {
        tracker,
        stop: stop_tx,
        thread: Some(thread),
    })
}

/// The watches and the publisher, until the watches end (they retry, so never).
async fn run(
    client: kube::Client,
    tracker: Arc<Mutex<DriftTracker>>,
    injector: watch::Receiver<Arc<Injector>>,
    services: Arc<dyn ServiceDirectory>,
    metrics: Arc<Metrics>,
) {
    let dirty = Arc::new(Notify::new());

    let namespaces = watcher::watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default().labels(&format!("{OPT_IN_LABEL}={OPT_IN_VALUE}")),
    )
    .default_backoff();
    let namespaces = {
        let tracker = Arc::clone(&tracker);
        let dirty = Arc::clone(&dirty);
        async move {
            let mut namespaces = std::pin::pin!(namespaces);
            while let Some(event) = namespaces.next().await {
                match event {
                    Ok(event) => {
                        lock(&tracker).namespace_event(map_event(event, |ns| ns.name_any()));
                        dirty.notify_one();
                    }
                    Err(e) => warn!(error = %e, "pod drift: namespace watch failed; retrying"),
                }
            }
        }
    };

    let pods = watcher::watcher(
        Api::<PartialObjectMeta<Pod>>::all(client),
        watcher::Config::default(),
    )
    .default_backoff();
    let pods = {
        let tracker = Arc::clone(&tracker);
        let dirty = Arc::clone(&dirty);
        async move {
            let mut pods = std::pin::pin!(pods);
            while let Some(event) = pods.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(error = %e, "pod drift: pod watch failed; retrying");
                        continue;
                    }
                };
                let injector = Arc::clone(&injector.borrow());
                let event = map_event(event, |pod| {
                    let ns = pod.namespace().unwrap_or_default();
                    let found = classify(
                        &injector,
                        services.as_ref(),
                        &ns,
                        &pod.metadata.labels.unwrap_or_default(),
                        &pod.metadata.annotations.unwrap_or_default(),
                    );
                    ((ns, pod.metadata.name.unwrap_or_default()), found)
                });
                if let Some(missing) = lock(&tracker).pod_event(event) {
                    warn!(
                        namespace = %missing.namespace,
                        pod = %missing.name,
                        profile = %missing.profile,
                        "pod selected by egress-gate was admitted without injection: it has no egress-gate status annotation, so it reaches the internet without the proxy (was the webhook down or unregistered when it was created? recreate the pod)"
                    );
                }
                dirty.notify_one();
            }
        }
    };

    tokio::join!(namespaces, pods, publish(tracker, dirty, metrics));
}

/// Sets the gauges from the tracker after changes, at most once per [`PUBLISH_INTERVAL`].
async fn publish(tracker: Arc<Mutex<DriftTracker>>, dirty: Arc<Notify>, metrics: Arc<Metrics>) {
    let mut shown: BTreeSet<PodLabels> = BTreeSet::new();
    loop {
        dirty.notified().await;
        let (counts, synced) = {
            let t = lock(&tracker);
            (t.counts(), t.synced())
        };
        if !synced {
            continue;
        }
        metrics.pod_watch_synced.set(1);
        let mut now = BTreeSet::new();
        for ((namespace, profile), c) in counts {
            let labels = PodLabels { namespace, profile };
            metrics
                .pods_selected
                .get_or_create(&labels)
                .set(gauge(c.selected));
            metrics
                .pods_injected
                .get_or_create(&labels)
                .set(gauge(c.injected));
            metrics
                .pods_stale
                .get_or_create(&labels)
                .set(gauge(c.stale));
            metrics
                .pods_uninjected
                .get_or_create(&labels)
                .set(gauge(c.uninjected));
            now.insert(labels);
        }
        for gone in shown.difference(&now) {
            for family in [
                &metrics.pods_selected,
                &metrics.pods_injected,
                &metrics.pods_stale,
                &metrics.pods_uninjected,
            ] {
                family.remove(gone);
            }
        }
        shown = now;
        tokio::time::sleep(PUBLISH_INTERVAL).await;
    }
}

/// The same watcher event about what `f` makes of its object.
fn map_event<K, T>(event: Event<K>, f: impl FnOnce(K) -> T) -> Event<T> {
    match event {
        Event::Apply(k) => Event::Apply(f(k)),
        Event::Delete(k) => Event::Delete(f(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(f(k)),
        Event::InitDone => Event::InitDone,
    }
}

/// A count as a gauge value (counts of pods never come near `i64::MAX`).
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::NoServices;
    use crate::config::Config;
    use crate::engine::ClusterFacts;

    fn injector() -> Injector {
        let config = Config::default();
        Injector::new(&config, &ClusterFacts::from_config(&config))
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn key(ns: &str, name: &str) -> (String, String) {
        (ns.into(), name.into())
    }

    #[test]
    fn selection_and_status_decide_the_state() {
        let inj = injector();
        let instance = map(&[("cnpg.io/podRole", "instance")]);
        assert_eq!(
            classify(&inj, &NoServices, "db", &instance, &BTreeMap::new()),
            Some(("cnpg".into(), PodState::Uninjected))
        );
        let app = map(&[("app", "web")]);
        assert_eq!(
            classify(&inj, &NoServices, "db", &app, &BTreeMap::new()),
            None
        );
        let opted_out = map(&[("egress-gate.io/inject", "false")]);
        assert_eq!(
            classify(&inj, &NoServices, "db", &instance, &opted_out),
            None
        );
        let opted_in = map(&[("egress-gate.io/inject", "true")]);
        assert_eq!(
            classify(&inj, &NoServices, "db", &app, &opted_in),
            Some(("annotation".into(), PodState::Uninjected))
        );

        // The status the webhook itself writes is current; another hash is stale.
        let pod = serde_json::json!({
            "metadata": {"labels": instance},
            "spec": {"containers": [{"name": "postgres", "image": "pg"}]},
        });
        let ctx = PodContext {
            namespace: "db",
            operation: Operation::Create,
            services: &[],
        };
        let mutation = inj.review(&pod, &ctx).unwrap_or_else(|e| panic!("{e}"));
        let mut patched = pod.clone();
        let patch: json_patch::Patch =
            serde_json::from_slice(mutation.patch.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        json_patch::patch(&mut patched, &patch).unwrap_or_else(|e| panic!("{e}"));
        let annotations: BTreeMap<String, String> =
            serde_json::from_value(patched["metadata"]["annotations"].clone())
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            classify(&inj, &NoServices, "db", &instance, &annotations),
            Some(("cnpg".into(), PodState::Injected))
        );
        let mut status: InjectionStatus =
            serde_json::from_str(&annotations["egress-gate.io/status"])
                .unwrap_or_else(|e| panic!("{e}"));
        status.values_hash = "sha256:0000000000000000".into();
        let stale = map(&[(
            "egress-gate.io/status",
            &serde_json::to_string(&status).unwrap_or_else(|e| panic!("{e}")),
        )]);
        assert_eq!(
            classify(&inj, &NoServices, "db", &instance, &stale),
            Some(("cnpg".into(), PodState::Stale))
        );
    }

    #[test]
    fn counts_follow_updates_deletes_and_relists_without_a_pass_over_the_pods() {
        let mut t = DriftTracker::new("egress-gate");
        t.namespace_event(Event::Apply("db".into()));
        let state = |s| Some(("cnpg".to_string(), s));
        let db = ("db".to_string(), "cnpg".to_string());
        t.pod_event(Event::Apply((key("db", "a"), state(PodState::Uninjected))));
        t.pod_event(Event::Apply((key("db", "b"), state(PodState::Stale))));
        t.pod_event(Event::Apply((key("apps", "c"), state(PodState::Injected))));
        // An update moves a pod between states; a label change out of every profile, or a
        // delete, uncounts it.
        t.pod_event(Event::Apply((key("db", "a"), state(PodState::Injected))));
        assert_eq!(
            t.counts()[&db],
            Counts {
                selected: 2,
                injected: 2,
                stale: 1,
                uninjected: 0
            }
        );
        t.pod_event(Event::Apply((key("db", "b"), None)));
        assert_eq!(t.counts()[&db].selected, 1);
        t.pod_event(Event::Delete((key("db", "a"), None)));
        assert!(t.counts().is_empty(), "{:?}", t.counts());
        // Opting `apps` in shows the pod counted all along.
        t.namespace_event(Event::Apply("apps".into()));
        assert_eq!(t.counts().len(), 1);
        // A relist replaces everything, counts included, when it completes.
        t.pod_event(Event::Init);
        t.pod_event(Event::InitApply((
            key("db", "x"),
            state(PodState::Uninjected),
        )));
        assert_eq!(
            t.counts().len(),
            1,
            "the old pods count until the relist is done"
        );
        t.pod_event(Event::InitDone);
        let counts = t.counts();
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(counts[&db].uninjected, 1);
    }

    #[test]
    fn counts_cover_opted_in_namespaces_and_log_each_missing_pod_once() {
        let mut t = DriftTracker::new("egress-gate");
        t.namespace_event(Event::Init);
        for ns in ["db", "kube-system", "egress-gate"] {
            t.namespace_event(Event::InitApply(ns.to_string()));
        }
        t.namespace_event(Event::InitDone);
        assert_eq!(t.namespaces().collect::<Vec<_>>(), ["db"]);

        let bare = Some(("cnpg".to_string(), PodState::Uninjected));
        let done = Some(("cnpg".to_string(), PodState::Injected));
        t.pod_event(Event::Init);
        assert!(
            t.pod_event(Event::InitApply((key("db", "a"), bare.clone())))
                .is_some()
        );
        assert!(
            t.pod_event(Event::InitApply((key("db", "b"), done.clone())))
                .is_none()
        );
        assert!(
            t.pod_event(Event::InitApply((key("apps", "c"), bare.clone())))
                .is_none()
        );
        assert!(
            t.pod_event(Event::InitApply((key("db", "d"), None)))
                .is_none()
        );
        assert!(!t.synced());
        t.pod_event(Event::InitDone);
        assert!(t.synced());

        let counts = t.counts();
        assert_eq!(counts.len(), 1, "{counts:?}");
        assert_eq!(
            counts[&("db".to_string(), "cnpg".to_string())],
            Counts {
                selected: 2,
                injected: 1,
                stale: 0,
                uninjected: 1
            }
        );
        // An update of an already missing pod is not logged again.
        assert!(
            t.pod_event(Event::Apply((key("db", "a"), bare.clone())))
                .is_none()
        );
        assert_eq!(t.missing().len(), 1);
        assert_eq!(t.missing()[0].name, "a");

        // Opting `apps` in counts its pod at once; deleting pods uncounts them.
        t.namespace_event(Event::Apply("apps".into()));
        assert_eq!(t.missing().len(), 2);
        t.pod_event(Event::Delete((key("db", "a"), None)));
        t.pod_event(Event::Delete((key("apps", "c"), None)));
        assert!(t.missing().is_empty());
        assert_eq!(
            t.counts()[&("db".to_string(), "cnpg".to_string())].selected,
            1
        );
    }

    #[test]
    // A plain test thread, no runtime to block: it may sleep while it waits for the spawn.
    #[allow(clippy::disallowed_methods)]
    fn the_detector_runs_on_its_own_thread_and_stops_when_asked() {
        // A real client against a loopback port nothing listens on: the watches fail and
        // back off, which is exactly when a stop must still be prompt.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", closed.local_addr().unwrap());
        drop(closed);
        let config = kube::Config::new(url.parse().unwrap());
        let metrics = Arc::new(Metrics::default());
        let (_tx, injector_rx) = watch::channel(Arc::new(injector()));
        let handle = start(
            config,
            "egress-gate",
            injector_rx,
            Arc::new(NoServices),
            Arc::clone(&metrics),
        )
        .unwrap();
        let named = |name: &str| {
            std::fs::read_dir("/proc/self/task").unwrap().any(|task| {
                std::fs::read_to_string(task.unwrap().path().join("comm"))
                    .is_ok_and(|comm| comm.trim() == name)
            })
        };
        // The new thread names itself once it runs: wait for it rather than race it.
        let spawned = std::time::Instant::now();
        while !named(THREAD_NAME) && spawned.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(named(THREAD_NAME), "no {THREAD_NAME} thread");
        let asked = std::time::Instant::now();
        handle.stop();
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "stop took {:?}",
            asked.elapsed()
        );
        assert!(
            !named(THREAD_NAME),
            "{THREAD_NAME} still running after stop"
        );
        assert_eq!(
            metrics.pod_watch_synced.get(),
            0,
            "never listed, never synced"
        );
    }
}
