//! The pod index: which pod owns a source address. Pure data, no I/O: the watcher feeds it
//! [`PodEvent`]s, the tunnel path asks it [`PodIndex::lookup`].
//!
//! Every entry is tied to the pod's UID, never to the address alone: CNIs hand a released
//! address to the next pod within seconds, and the delete of the old pod can arrive after
//! the new pod's add. The rules:
//! - a pod claims each address in its `status.podIPs` (both families on a dual-stack
//!   cluster) while it is live;
//! - a pod that finished (`Succeeded` or `Failed`) claims nothing, although the API still
//!   shows its address: the CNI has released it, and it may already be another pod's;
//! - a terminating pod (deletion requested) still claims its addresses: a CNPG primary
//!   archives its last WAL segment while it terminates;
//! - an address claimed by two live pods is ambiguous, and names neither.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

/// Distinct label keys shared between pods. Keys repeat across pods (`cnpg.io/cluster`,
/// `app.kubernetes.io/name`, ...), so each is kept once; past this many, further keys are
/// stored per pod, so pods with ever-new keys cannot grow the table without bound.
const MAX_SHARED_KEYS: usize = 1024;

/// A pod's labels, compact: the keys sorted, each shared with every other pod that has it,
/// and all values in one string. Measured with `tests/identity_memory.rs` at 50,000
/// CNPG-like pods (nine labels each): a `BTreeMap<String, String>` cost the index 1,842
/// bytes a pod, shared keys with a boxed value each 1,280, this layout (with the slim wire
/// type and inline claimants) 884.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodLabels {
    /// Each key and the end of its value in `values` (the value starts where the previous
    /// one ends), sorted by key.
    keys: Box<[(Arc<str>, usize)]>,
    /// The values, concatenated in key order.
    values: Box<str>,
}

impl PodLabels {
    /// The value of label `key`, if the pod has it.
    pub fn get(&self, key: &str) -> Option<&str> {
        let i = self
            .keys
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()?;
        let start = match i.checked_sub(1) {
            Some(prev) => self.keys.get(prev)?.1,
            None => 0,
        };
        let end = self.keys.get(i)?.1;
        self.values.get(start..end)
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the pod has no label.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The shared copy of a label key, namespace or service account name (bounded, see
/// [`MAX_SHARED_KEYS`]).
pub fn shared_key(key: String) -> Arc<str> {
    static KEYS: OnceLock<Mutex<HashSet<Arc<str>>>> = OnceLock::new();
    let mut keys = KEYS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(k) = keys.get(key.as_str()) {
        return Arc::clone(k);
    }
    let k: Arc<str> = Arc::from(key);
    if keys.len() < MAX_SHARED_KEYS {
        keys.insert(Arc::clone(&k));
    }
    k
}

impl FromIterator<(String, String)> for PodLabels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        // Through a BTreeMap: sorted, one value per key (the last), as the API has them.
        let sorted: BTreeMap<String, String> = iter.into_iter().collect();
        sorted.into()
    }
}

impl From<BTreeMap<String, String>> for PodLabels {
    fn from(map: BTreeMap<String, String>) -> Self {
        let mut values = String::with_capacity(map.values().map(String::len).sum());
        let keys = map
            .into_iter()
            .map(|(k, v)| {
                values.push_str(&v);
                (shared_key(k), values.len())
            })
            .collect();
        Self {
            keys,
            values: values.into_boxed_str(),
        }
    }
}

/// A pod's lifecycle phase, as `status.phase` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, containers not all started (its address may already be in use).
    Pending,
    /// Bound to a node, containers started.
    Running,
    /// Every container exited successfully and will not restart.
    Succeeded,
    /// Every container exited, at least one in failure, and none will restart.
    Failed,
    /// The node stopped reporting; the pod may well still be running.
    Unknown,
}

impl Phase {
    /// Reads `status.phase`; absent or unrecognised counts as `Pending` (live), since a
    /// phase the proxy does not know must not make a running pod's address unclaimed.
    pub fn from_status(phase: Option<&str>) -> Self {
        match phase {
            Some("Running") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            Some("Unknown") => Self::Unknown,
            _ => Self::Pending,
        }
    }

    /// Whether the pod finished for good (its containers will never run again).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// The few fields of a pod the proxy needs: who it is and which addresses it holds. The
/// watcher projects each API object to this at once, so container specs and managed
/// fields are never kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlimPod {
    /// `metadata.uid`: the key of every entry, unique across a pod's delete and re-create
    /// (the index keys its maps with this very allocation).
    pub uid: Arc<str>,
    /// `metadata.namespace`, matched by `from[].namespaces`; shared between pods.
    pub namespace: Arc<str>,
    /// `metadata.name`, for the access log only.
    pub name: Box<str>,
    /// `metadata.labels`, matched by `from[].podLabels`.
    pub labels: PodLabels,
    /// `spec.serviceAccountName` (`default` when unset), matched by `from[].serviceAccounts`;
    /// shared between pods.
    pub service_account: Arc<str>,
    /// `status.podIPs`, canonical (an IPv4-mapped IPv6 address is stored as IPv4).
    pub ips: Vec<IpAddr>,
    /// `status.hostIPs`: the node's addresses. A connection from one of them is a node's,
    /// which means something between the pod and the proxy rewrote the source (SNAT).
    pub host_ips: Vec<IpAddr>,
    /// `status.phase`: terminal pods claim no address.
    pub phase: Phase,
    /// `metadata.deletionTimestamp` is set: the pod is shutting down but still running.
    pub terminating: bool,
}

impl SlimPod {
    /// Whether the pod holds its addresses: not finished. Terminating pods still do.
    pub fn is_live(&self) -> bool {
        !self.phase.is_terminal()
    }
}

/// One change from the watch, in the order the watcher delivers them. A relist is `Init`,
/// any number of `InitApply`, then `InitDone`; only at `InitDone` does the relisted set
/// replace what the index held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// A relist begins.
    Init,
    /// A pod of the relist in progress.
    InitApply(SlimPod),
    /// The relist is complete: its pods become the index, at once.
    InitDone,
    /// A pod was added or changed.
    Apply(SlimPod),
    /// A pod is gone from the API.
    Delete(SlimPod),
}

/// What the index knows about a source address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Exactly one live pod claims the address.
    Pod(Arc<SlimPod>),
    /// No live pod claims it.
    Unknown,
    /// Several live pods claim it (a reuse race, or a broken CNI); the count, for the log.
    Ambiguous(usize),
}

/// The live pods claiming one address, by UID. Nearly every address has exactly one, held
/// inline: no list allocation per pod.
#[derive(Debug, Clone)]
enum Claimants {
    /// The usual case.
    One(Arc<str>),
    /// A reuse race or a broken CNI: two or more, never fewer.
    Many(Vec<Arc<str>>),
}

impl Claimants {
    /// Adds `uid` as a claimant.
    fn add(&mut self, uid: Arc<str>) {
        match self {
            Self::One(first) => *self = Self::Many(vec![Arc::clone(first), uid]),
            Self::Many(all) => all.push(uid),
        }
    }

    /// Removes `uid`; `true` when no claimant is left.
    fn remove(&mut self, uid: &Arc<str>) -> bool {
        match self {
            Self::One(only) => only == uid,
            Self::Many(all) => {
                all.retain(|c| c != uid);
                match all.as_slice() {
                    [] => true,
                    [one] => {
                        *self = Self::One(Arc::clone(one));
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Source address -> claimants, keyed by UID.
#[derive(Debug, Default, Clone)]
pub struct PodIndex {
    /// Every pod of the watch, live or not, by UID: a later event for the UID replaces it.
    pods: HashMap<Arc<str>, Arc<SlimPod>>,
    /// Each claimed address and the UIDs of the live pods claiming it.
    by_ip: HashMap<IpAddr, Claimants>,
    /// Node addresses (the `hostIPs` of live pods), with how many live pods report each.
    nodes: HashMap<IpAddr, usize>,
}

impl PodIndex {
    /// An index holding these pods (later duplicates of a UID win).
    pub fn from_pods(pods: impl IntoIterator<Item = SlimPod>) -> Self {
        let mut index = Self::default();
        for pod in pods {
            index.apply(pod);
        }
        index
    }

    /// Pods held, live or not.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether the index holds no pod.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Addresses claimed by at least one live pod.
    pub fn claimed_addresses(&self) -> usize {
        self.by_ip.len()
    }

    /// Whether `ip` is the address of a node running one of the indexed live pods.
    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        self.nodes.contains_key(&ip.to_canonical())
    }

    /// Node addresses known (from the live pods' `hostIPs`).
    pub fn node_addresses(&self) -> usize {
        self.nodes.len()
    }

    /// Who owns `ip`. An IPv4-mapped IPv6 source (a dual-stack listener) is looked up as
    /// the IPv4 address it is.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        let ip = ip.to_canonical();
        match self.by_ip.get(&ip) {
            None => Lookup::Unknown,
            Some(Claimants::One(uid)) => match self.pods.get(uid) {
                Some(pod) => Lookup::Pod(Arc::clone(pod)),
                None => Lookup::Unknown,
            },
            Some(Claimants::Many(uids)) => Lookup::Ambiguous(uids.len()),
        }
    }

    /// Adds or replaces the pod with this UID, and its claims.
    pub fn apply(&mut self, mut pod: SlimPod) {
        for ip in &mut pod.ips {
            *ip = ip.to_canonical();
        }
        pod.ips.sort_unstable();
        pod.ips.dedup();
        for ip in &mut pod.host_ips {
            *ip = ip.to_canonical();
        }
        pod.host_ips.sort_unstable();
        pod.host_ips.dedup();
        pod.ips.shrink_to_fit();
        pod.host_ips.shrink_to_fit();
        let uid: Arc<str> = match self.pods.get_key_value(&*pod.uid) {
            Some((uid, _)) => Arc::clone(uid),
            None => Arc::clone(&pod.uid),
        };
        self.unclaim(&uid);
        if pod.is_live() {
            for ip in &pod.ips {
                match self.by_ip.entry(*ip) {
                    Entry::Occupied(mut claims) => claims.get_mut().add(Arc::clone(&uid)),
                    Entry::Vacant(free) => {
                        free.insert(Claimants::One(Arc::clone(&uid)));
                    }
                }
            }
            for ip in &pod.host_ips {
                *self.nodes.entry(*ip).or_default() += 1;
            }
        }
        self.pods.insert(uid, Arc::new(pod));
    }

    /// Removes the pod with this UID and its claims; other pods' claims on the same
    /// addresses stay.
    pub fn delete(&mut self, uid: &str) {
        if let Some(uid) = self.pods.get_key_value(uid).map(|(k, _)| Arc::clone(k)) {
            self.unclaim(&uid);
            self.pods.remove(&uid);
        }
    }

    /// Drops every claim the current entry for `uid` holds.
    fn unclaim(&mut self, uid: &Arc<str>) {
        let Some(old) = self.pods.get(uid) else {
            return;
        };
        if !old.is_live() {
            return;
        }
        for ip in &old.host_ips {
            if let Some(n) = self.nodes.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    self.nodes.remove(ip);
                }
            }
        }
        for ip in &old.ips {
            if self.by_ip.get_mut(ip).is_some_and(|c| c.remove(uid)) {
                self.by_ip.remove(ip);
            }
        }
    }
}

/// The watch's view: the index in service and, during a relist, the one being rebuilt.
/// Lookups always see a complete index: the last relist, plus the events since.
#[derive(Debug, Default)]
pub struct IndexFeeder {
    /// The index lookups are answered from.
    live: PodIndex,
    /// The relist in progress, swapped in whole at `InitDone`.
    relist: Option<PodIndex>,
    /// Whether a relist has ever completed: before that the index is not the cluster's.
    synced: bool,
}

/// What an event did, so the caller knows when to publish, wake waiters or mark ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The index in service changed (an add, change or delete).
    Changed,
    /// A relist completed and replaced the index in service.
    Swapped,
    /// Only the relist in progress changed; lookups see nothing new.
    Buffered,
}

impl IndexFeeder {
    /// Applies one watch event.
    pub fn apply(&mut self, event: PodEvent) -> Applied {
        match event {
            PodEvent::Init => {
                self.relist = Some(PodIndex::default());
                Applied::Buffered
            }
            PodEvent::InitApply(pod) => {
                self.relist.get_or_insert_with(PodIndex::default).apply(pod);
                Applied::Buffered
            }
            PodEvent::InitDone => {
                self.live = self.relist.take().unwrap_or_default();
                self.synced = true;
                Applied::Swapped
            }
            PodEvent::Apply(pod) => {
                self.live.apply(pod);
                Applied::Changed
            }
            PodEvent::Delete(pod) => {
                self.live.delete(&pod.uid);
                Applied::Changed
            }
        }
    }

    /// The index lookups are answered from.
    pub fn index(&self) -> &PodIndex {
        &self.live
    }

    /// Whether a relist has completed at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(uid: &str, ips: &[&str], phase: Phase, terminating: bool) -> SlimPod {
        SlimPod {
            uid: uid.into(),
            namespace: "db-a".into(),
            name: format!("pod-{uid}").into(),
            labels: PodLabels::default(),
            service_account: "default".into(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            host_ips: vec!["192.168.0.1".parse().unwrap()],
            phase,
            terminating,
        }
    }

    fn owner(index: &PodIndex, ip: &str) -> Option<String> {
        match index.lookup(ip.parse().unwrap()) {
            Lookup::Pod(p) => Some(p.uid.to_string()),
            Lookup::Unknown => None,
            Lookup::Ambiguous(n) => Some(format!("ambiguous:{n}")),
        }
    }

    #[test]
    fn the_reuse_race_and_the_lifecycle() {
        let mut index = PodIndex::default();
        index.apply(pod("a", &[], Phase::Pending, false));
        assert_eq!(owner(&index, "10.0.0.1"), None);
        index.apply(pod("a", &["10.0.0.1", "fd00::1"], Phase::Running, false));
        assert_eq!(owner(&index, "10.0.0.1").as_deref(), Some("a"));
        assert_eq!(owner(&index, "fd00::1").as_deref(), Some("a"));
        assert_eq!(owner(&index, "::ffff:10.0.0.1").as_deref(), Some("a"));
        // Terminating pods keep their address; finished ones give it up.
        index.apply(pod("a", &["10.0.0.1"], Phase::Running, true));
        assert_eq!(owner(&index, "10.0.0.1").as_deref(), Some("a"));
        assert_eq!(owner(&index, "fd00::1"), None);
        index.apply(pod("a", &["10.0.0.1"], Phase::Succeeded, true));
        assert_eq!(owner(&index, "10.0.0.1"), None);
        // The address goes to b before a's delete arrives; the late delete leaves b alone.
        index.apply(pod("b", &["10.0.0.1"], Phase::Running, false));
        index.delete("a");
        assert_eq!(owner(&index, "10.0.0.1").as_deref(), Some("b"));
        // Two live claimants name neither.
        index.apply(pod("c", &["10.0.0.1"], Phase::Pending, false));
        assert_eq!(owner(&index, "10.0.0.1").as_deref(), Some("ambiguous:2"));
        index.delete("b");
        assert_eq!(owner(&index, "10.0.0.1").as_deref(), Some("c"));
        assert_eq!(index.len(), 1);
        assert_eq!(index.claimed_addresses(), 1);
    }

    #[test]
    fn a_relist_is_invisible_until_done() {
        let mut feeder = IndexFeeder::default();
        assert!(!feeder.synced());
        feeder.apply(PodEvent::Init);
        feeder.apply(PodEvent::InitApply(pod(
            "a",
            &["10.0.0.1"],
            Phase::Running,
            false,
        )));
        assert_eq!(owner(feeder.index(), "10.0.0.1"), None);
        assert_eq!(feeder.apply(PodEvent::InitDone), Applied::Swapped);
        assert!(feeder.synced());
        assert_eq!(owner(feeder.index(), "10.0.0.1").as_deref(), Some("a"));
        // A second relist that no longer has a keeps serving a until it completes.
        feeder.apply(PodEvent::Init);
        feeder.apply(PodEvent::InitApply(pod(
            "b",
            &["10.0.0.2"],
            Phase::Running,
            false,
        )));
        assert_eq!(owner(feeder.index(), "10.0.0.1").as_deref(), Some("a"));
        feeder.apply(PodEvent::InitDone);
        assert_eq!(owner(feeder.index(), "10.0.0.1"), None);
        assert_eq!(owner(feeder.index(), "10.0.0.2").as_deref(), Some("b"));
    }

    mod model {
        //! The index after any event sequence equals the one computed from the final pod
        //! set: for every address, the live pods claiming it.
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        /// A few UIDs and addresses, so that claims collide, IPs are reused and deletes
        /// hit pods that were re-added.
        const UIDS: &[&str] = &["u0", "u1", "u2", "u3", "u4"];
        /// Both families, and one IPv4-mapped spelling of an IPv4 address in the pool.
        const IPS: &[&str] = &[
            "127.0.0.2",
            "127.0.0.3",
            "127.0.0.4",
            "fd00::2",
            "fd00::3",
            "::ffff:127.0.0.3",
        ];

        fn phase() -> impl Strategy<Value = Phase> {
            prop_oneof![
                Just(Phase::Pending),
                Just(Phase::Running),
                Just(Phase::Succeeded),
                Just(Phase::Failed),
                Just(Phase::Unknown),
            ]
        }

        fn slim_pod() -> impl Strategy<Value = SlimPod> {
            (
                0..UIDS.len(),
                proptest::collection::vec(0..IPS.len(), 0..3),
                phase(),
                any::<bool>(),
            )
                .prop_map(|(u, ips, phase, terminating)| {
                    let ips: Vec<&str> = ips.into_iter().map(|i| IPS[i]).collect();
                    let mut p = pod(UIDS[u], &ips, phase, terminating);
                    // Nodes shared between some pods; one spelled IPv4-mapped.
                    p.host_ips = match u % 3 {
                        0 => vec!["10.9.0.1".parse().unwrap()],
                        1 => vec![
                            "::ffff:10.9.0.1".parse().unwrap(),
                            "fd09::1".parse().unwrap(),
                        ],
                        _ => vec!["10.9.0.2".parse().unwrap()],
                    };
                    p
                })
        }

        #[derive(Debug, Clone)]
        enum Op {
            Apply(SlimPod),
            Delete(usize),
            /// A relist, optionally after one that was cut off part-way.
            Relist(Vec<SlimPod>, Option<Vec<SlimPod>>),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => slim_pod().prop_map(Op::Apply),
                3 => (0..UIDS.len()).prop_map(Op::Delete),
                1 => (
                    proptest::collection::vec(slim_pod(), 0..6),
                    proptest::option::of(proptest::collection::vec(slim_pod(), 0..4)),
                )
                    .prop_map(|(pods, cut)| Op::Relist(pods, cut)),
            ]
        }

        /// Expected owner of each address of the pool, from the pod set alone.
        fn expected(pods: &BTreeMap<String, SlimPod>) -> Vec<Lookup> {
            IPS.iter()
                .map(|ip| {
                    let ip = ip.parse::<IpAddr>().unwrap().to_canonical();
                    let claimants: Vec<&SlimPod> = pods
                        .values()
                        .filter(|p| p.is_live() && p.ips.iter().any(|i| i.to_canonical() == ip))
                        .collect();
                    match claimants.as_slice() {
                        [] => Lookup::Unknown,
                        [one] => {
                            let mut canonical = (*one).clone();
                            canonical.ips = canonical
                                .ips
                                .iter()
                                .map(IpAddr::to_canonical)
                                .collect::<BTreeSet<_>>()
                                .into_iter()
                                .collect();
                            canonical.host_ips = canonical
                                .host_ips
                                .iter()
                                .map(IpAddr::to_canonical)
                                .collect::<BTreeSet<_>>()
                                .into_iter()
                                .collect();
                            Lookup::Pod(Arc::new(canonical))
                        }
                        many => Lookup::Ambiguous(many.len()),
                    }
                })
                .collect()
        }

        fn nodes(pods: &BTreeMap<String, SlimPod>) -> BTreeSet<IpAddr> {
            pods.values()
                .filter(|p| p.is_live())
                .flat_map(|p| p.host_ips.iter().map(IpAddr::to_canonical))
                .collect()
        }

        /// Node addresses the index reports, over the pool's nodes.
        fn observed_nodes(index: &PodIndex) -> BTreeSet<IpAddr> {
            ["10.9.0.1", "10.9.0.2", "fd09::1"]
                .iter()
                .map(|s| s.parse::<IpAddr>().unwrap())
                .filter(|ip| index.is_node_address(*ip))
                .collect()
        }

        fn observed(index: &PodIndex) -> Vec<Lookup> {
            IPS.iter()
                .map(|ip| index.lookup(ip.parse().unwrap()))
                .collect()
        }

        fn claimed(pods: &BTreeMap<String, SlimPod>) -> usize {
            pods.values()
                .filter(|p| p.is_live())
                .flat_map(|p| p.ips.iter().map(IpAddr::to_canonical))
                .collect::<BTreeSet<_>>()
                .len()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn index_equals_the_model_of_the_final_pod_set(ops in proptest::collection::vec(op(), 0..40)) {
                let mut feeder = IndexFeeder::default();
                // Before the first relist the feeder serves an empty index.
                let mut model: BTreeMap<String, SlimPod> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Apply(p) => {
                            model.insert(p.uid.to_string(), p.clone());
                            feeder.apply(PodEvent::Apply(p));
                        }
                        Op::Delete(u) => {
                            let gone = model.remove(UIDS[u]).unwrap_or_else(|| pod(UIDS[u], &[], Phase::Running, false));
                            feeder.apply(PodEvent::Delete(gone));
                        }
                        Op::Relist(pods, cut) => {
                            if let Some(cut) = cut {
                                feeder.apply(PodEvent::Init);
                                for p in cut {
                                    feeder.apply(PodEvent::InitApply(p));
                                }
                                // The cut-off relist is not visible.
                                prop_assert_eq!(observed(feeder.index()), expected(&model));
                            }
                            feeder.apply(PodEvent::Init);
                            for p in &pods {
                                feeder.apply(PodEvent::InitApply(p.clone()));
                                // Lookups keep seeing the last complete index mid-relist.
                                prop_assert_eq!(observed(feeder.index()), expected(&model));
                            }
                            prop_assert_eq!(feeder.apply(PodEvent::InitDone), Applied::Swapped);
                            model = pods.into_iter().map(|p| (p.uid.to_string(), p)).collect();
                        }
                    }
                    prop_assert_eq!(observed(feeder.index()), expected(&model));
                    prop_assert_eq!(feeder.index().len(), model.len());
                    prop_assert_eq!(feeder.index().claimed_addresses(), claimed(&model));
                    prop_assert_eq!(observed_nodes(feeder.index()), nodes(&model));
                    prop_assert_eq!(feeder.index().node_addresses(), nodes(&model).len());
                }
            }
        }
    }
}
