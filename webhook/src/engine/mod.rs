//! The injection engine: a pod's JSON in, RFC 6902 operations and warnings out.
//!
//! Pure and synchronous: no I/O, no clock, no HTTP. The admission server and the offline
//! `inject` command both call [`Injector::review`], so what admins preview is what runs.

pub mod no_proxy;
pub mod patch;
pub mod pod;
pub mod profile;
pub mod selector;

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::Config;
use no_proxy::{LOOPBACK, NoProxyList, kubernetes_service_ip};
pub use patch::Patch;
use patch::{Op, PatchWriter, json_object, push_json};
use pod::{ContainerList, ContainerView, PodShapeError, PodView};

/// Facts about the cluster that shape NO_PROXY. From the config, or discovered from the API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterFacts {
    /// Service CIDRs; the first one's first address is the `kubernetes` Service.
    pub service_cidrs: Vec<IpNet>,
    /// Pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// API server hostnames and IPs.
    pub api_server: Vec<String>,
}

impl ClusterFacts {
    /// The facts the configuration states.
    pub fn from_config(config: &Config) -> Self {
        Self {
            service_cidrs: config.service_cidrs.clone(),
            pod_cidrs: config.pod_cidrs.clone(),
            api_server: config.api_server.clone(),
        }
    }
}

/// The admission operation on the pod; only `Create` is ever mutated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    /// A new pod: env can still be set.
    Create,
    /// An update: a running pod's env cannot change, so it is left alone.
    Update,
    /// A deletion.
    Delete,
    /// A connect (exec, attach, port-forward).
    Connect,
}

/// What the engine knows about a pod besides its JSON.
#[derive(Clone, Copy, Debug)]
pub struct PodContext<'a> {
    /// The namespace the pod is created in (the request's, as the pod may not say).
    pub namespace: &'a str,
    /// The admission operation.
    pub operation: Operation,
    /// Names of the Services in that namespace, sorted, when the caller knows them.
    pub services: &'a [String],
}

/// What the engine decided about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Selected and injected; the patch may be empty when the pod already is.
    Injected {
        /// The profile that selected it, or `annotation` for a per-pod opt-in.
        profile: String,
    },
    /// No profile selects the pod and it did not opt in.
    NotSelected,
    /// The pod opted out with the inject annotation set to `"false"`.
    OptedOut,
    /// The operation is not a CREATE; nothing to do.
    NotCreate,
}

impl Decision {
    /// A short word for logs and metrics.
    pub fn as_str(&self) -> &str {
        match self {
            Decision::Injected { .. } => "injected",
            Decision::NotSelected => "not-selected",
            Decision::OptedOut => "opted-out",
            Decision::NotCreate => "not-create",
        }
    }

    /// The selecting profile, if any.
    pub fn profile(&self) -> Option<&str> {
        match self {
            Decision::Injected { profile } => Some(profile),
            _ => None,
        }
    }
}

/// The engine's answer for one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Mutation {
    /// Why the pod was or was not changed.
    pub decision: Decision,
    /// RFC 6902 operations against the pod as given; empty when nothing changes.
    pub patch: Patch,
    /// Human-readable warnings for the API server to show the user.
    pub warnings: Vec<String>,
}

impl Mutation {
    fn not_create() -> Self {
        Self {
            decision: Decision::NotCreate,
            patch: Patch::default(),
            warnings: Vec::new(),
        }
    }
}

/// What the status annotation records, as compact JSON.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InjectionStatus {
    /// The profile that selected the pod.
    pub profile: String,
    /// Containers and init containers carrying egress-gate's variables, in pod order.
    pub containers: Vec<String>,
    /// `sha256:` and the first 16 hex digits of the hash of the injected names and values.
    pub values_hash: String,
    /// Per container, the variables the user had set and egress-gate therefore left alone
    /// (with their other-case twin); absent when nothing was kept. What the warning said at
    /// admission, kept on the pod for the admins who audit it later.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kept: BTreeMap<String, Vec<String>>,
}

/// Whether a pod is selected, decided from its labels and opt-in annotation alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection<'a> {
    /// Selected: the profile (none for a per-pod opt-in) and the name the status
    /// annotation and metrics record.
    Selected {
        /// The matching profile; `None` when only the opt-in annotation selects the pod.
        profile: Option<&'a profile::Profile>,
        /// The profile's name, or [`ANNOTATION_PROFILE`].
        name: &'a str,
    },
    /// No profile selects the pod and it did not opt in.
    NotSelected,
    /// The pod opted out with the inject annotation set to `"false"`.
    OptedOut,
}

/// Profile name recorded for pods selected only by the opt-in annotation.
pub const ANNOTATION_PROFILE: &str = "annotation";

/// The injection engine, built once per configuration and shared by all reviews.
#[derive(Clone, Debug)]
pub struct Injector {
    /// The configuration it was built from.
    config: Config,
    /// NO_PROXY entries that do not depend on the pod: loopback, API server, cluster domain,
    /// CIDRs. Computed once; peer services and the admin's extras follow per pod.
    cluster_no_proxy: NoProxyList,
}

/// One pair of variables: the upper-case name Go reads first, the lower-case one Python and
/// curl read first. Both always carry the same value.
struct EnvPair {
    upper: &'static str,
    lower: &'static str,
    value: String,
}

impl EnvPair {
    /// The two env entries `{"name":NAME,"value":VALUE}` as JSON, upper-case name first.
    /// The value (NO_PROXY runs to hundreds of bytes) is escaped once for both.
    fn entries_json(&self) -> [Vec<u8>; 2] {
        let mut value = Vec::with_capacity(self.value.len() + 2);
        push_json(&mut value, &self.value);
        [self.upper, self.lower].map(|name| {
            let mut entry = Vec::with_capacity(name.len() + value.len() + 22);
            entry.extend_from_slice(br#"{"name":"#);
            push_json(&mut entry, name);
            entry.extend_from_slice(br#","value":"#);
            entry.extend_from_slice(&value);
            entry.push(b'}');
            entry
        })
    }
}

impl Injector {
    /// Builds the engine for `config` and the given cluster facts.
    pub fn new(config: &Config, facts: &ClusterFacts) -> Self {
        let mut list = NoProxyList::new();
        list.extend(LOOPBACK);
        list.extend(facts.api_server.iter().cloned());
        if let Some(ip) = facts.service_cidrs.first().and_then(kubernetes_service_ip) {
            list.push(ip.to_string());
        }
        // The in-cluster API server names that the `.svc` suffixes do not cover.
        list.extend(["kubernetes", "kubernetes.default"]);
        list.push_cluster_domain(&config.cluster_domain);
        for net in facts.service_cidrs.iter().chain(&facts.pod_cidrs) {
            list.push_cidr(net);
        }
        Self {
            config: config.clone(),
            cluster_no_proxy: list,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decides about one pod and returns the patch that injects it.
    pub fn review(&self, pod: &Value, ctx: &PodContext<'_>) -> Result<Mutation, PodShapeError> {
        if ctx.operation != Operation::Create {
            return Ok(Mutation::not_create());
        }
        Ok(self.review_view(&PodView::parse(pod)?, ctx))
    }

    /// Decides about a pod already read into a [`PodView`] (see [`PodView::from_json`]).
    pub fn review_view(&self, view: &PodView<'_>, ctx: &PodContext<'_>) -> Mutation {
        if ctx.operation != Operation::Create {
            return Mutation::not_create();
        }
        let mut warnings = Vec::new();
        let no_labels = BTreeMap::new();
        let labels = view.labels.as_ref().unwrap_or(&no_labels);

        let opt_in = view.annotation(&self.config.inject_annotation);
        if let Some(other) = opt_in
            .as_deref()
            .filter(|v| !matches!(*v, "true" | "false"))
        {
            warnings.push(format!(
                "egress-gate: annotation {}={other:?} ignored; use \"true\" or \"false\"",
                self.config.inject_annotation
            ));
        }
        let (profile, profile_name) = match self.select(labels, opt_in.as_deref()) {
            Selection::Selected { profile, name } => (profile, name.to_string()),
            Selection::OptedOut => {
                return Mutation {
                    decision: Decision::OptedOut,
                    patch: Patch::default(),
                    warnings,
                };
            }
            Selection::NotSelected => {
                return Mutation {
                    decision: Decision::NotSelected,
                    patch: Patch::default(),
                    warnings,
                };
            }
        };

        let no_proxy = self.no_proxy_for(profile, labels, ctx);
        let pairs = self.env_pairs(no_proxy);
        let values_hash = values_hash(&pairs);
        // Each variable's env entry, rendered once: [upper, lower] per pair.
        let entries: Vec<Vec<u8>> = pairs.iter().flat_map(EnvPair::entries_json).collect();

        // What an earlier call of this webhook recorded (reinvocation): variables it set then
        // are its own to update, not the user's to keep.
        let earlier: Option<InjectionStatus> = view
            .annotation(&self.config.status_annotation)
            .and_then(|text| serde_json::from_str(&text).ok());

        let mut additions = Vec::new();
        let mut updates = Vec::new();
        let mut carrying = Vec::new();
        let mut kept = BTreeMap::new();
        for container in &view.containers {
            let ours = earlier
                .as_ref()
                .is_some_and(|status| set_by(status, container, &pairs));
            let mut user_set = Vec::new();
            let (to_add, to_update, carries) =
                self.container_additions(container, &pairs, ours, &mut user_set, &mut warnings);
            if carries {
                carrying.push(container.name.to_string());
            }
            if !user_set.is_empty() {
                kept.insert(container.name.to_string(), user_set);
            }
            if !to_add.is_empty() {
                additions.push((container, to_add));
            }
            if !to_update.is_empty() {
                updates.push((container, to_update));
            }
        }

        let status = InjectionStatus {
            profile: profile_name.clone(),
            containers: carrying,
            values_hash,
            kept,
        };
        let mut metadata = MetadataEdits::default();
        self.label_edit(view, &mut metadata, &mut warnings);
        self.status_edit(view, &status, &mut metadata);
        // Room for every entry in every container that gets some, plus the operations' own
        // text (pointers, metadata): one allocation for the whole patch.
        let entry_bytes: usize = entries.iter().map(|e| e.len() + 64).sum();
        let mut patch = PatchWriter::with_capacity(512 + additions.len() * entry_bytes);
        metadata.write(view, &mut patch);
        for (container, to_update) in updates {
            write_env_updates(container, &to_update, &pairs, &mut patch);
        }
        for (container, to_add) in additions {
            write_env_additions(container, &to_add, &entries, &mut patch);
        }

        Mutation {
            decision: Decision::Injected {
                profile: profile_name,
            },
            patch: patch.finish(),
            warnings,
        }
    }

    /// Whether a pod with `labels` and the inject annotation's value `opt_in` is selected,
    /// and by which profile: the rule admission applies, for callers that have only a pod's
    /// metadata (the drift detector). An opt-out wins; then the first matching profile; then
    /// the opt-in annotation.
    pub fn select<'s>(
        &'s self,
        labels: &BTreeMap<String, String>,
        opt_in: Option<&str>,
    ) -> Selection<'s> {
        if opt_in == Some("false") {
            return Selection::OptedOut;
        }
        match self.config.profiles.iter().find(|p| p.matches(labels)) {
            Some(p) => Selection::Selected {
                profile: Some(p),
                name: &p.name,
            },
            None if opt_in == Some("true") => Selection::Selected {
                profile: None,
                name: ANNOTATION_PROFILE,
            },
            None => Selection::NotSelected,
        }
    }

    /// The `valuesHash` the status annotation of a pod injected now would record: a pod
    /// whose recorded hash differs was injected under another configuration or other peer
    /// Services than the current ones.
    pub fn current_values_hash(
        &self,
        profile: Option<&profile::Profile>,
        labels: &BTreeMap<String, String>,
        ctx: &PodContext<'_>,
    ) -> String {
        values_hash(&self.env_pairs(self.no_proxy_for(profile, labels, ctx)))
    }

    /// The NO_PROXY value for one pod: the cluster's entries, then the pod's peer services,
    /// then the admin's extras, each once.
    pub fn no_proxy_for(
        &self,
        profile: Option<&profile::Profile>,
        labels: &BTreeMap<String, String>,
        ctx: &PodContext<'_>,
    ) -> String {
        let mut pod = NoProxyList::new();
        let peers = profile
            .into_iter()
            .flat_map(|p| &p.peer_services)
            .filter_map(|t| t.render(labels))
            .chain(ctx.services.iter().cloned());
        for service in peers {
            // `svc` resolves through the pod's search path; `svc.ns` is the other short form.
            pod.push(format!("{service}.{}", ctx.namespace));
            pod.push(service);
        }
        pod.extend(self.config.no_proxy.iter().cloned());
        self.cluster_no_proxy.to_env_value_with(&pod)
    }

    fn env_pairs(&self, no_proxy: String) -> Vec<EnvPair> {
        let mut pairs = vec![
            EnvPair {
                upper: "HTTPS_PROXY",
                lower: "https_proxy",
                value: self.config.proxy_url.clone(),
            },
            EnvPair {
                upper: "NO_PROXY",
                lower: "no_proxy",
                value: no_proxy,
            },
        ];
        if self.config.inject_http_proxy {
            pairs.push(EnvPair {
                upper: "HTTP_PROXY",
                lower: "http_proxy",
                value: self.config.proxy_url.clone(),
            });
        }
        pairs
    }

    /// Which variables one container needs, as indexes into the rendered entries (`2 * pair`
    /// for the upper-case name, `2 * pair + 1` for the lower-case one), and whether the
    /// container carries egress-gate's values afterwards (injected now or on an earlier call).
    /// `ours`: the container's proxy variables are exactly what an earlier call set, so
    /// values that changed since (a new peer Service, a reloaded config) are updated: the
    /// second list holds the pairs to update, by index into `pairs`. The names of pairs left
    /// to the user's values go to `kept`.
    fn container_additions(
        &self,
        container: &ContainerView<'_>,
        pairs: &[EnvPair],
        ours: bool,
        kept: &mut Vec<String>,
        warnings: &mut Vec<String>,
    ) -> (Vec<usize>, Vec<usize>, bool) {
        let mut to_add = Vec::new();
        let mut to_update = Vec::new();
        let mut carries = false;
        for (i, pair) in pairs.iter().enumerate() {
            let upper = container.env_var(pair.upper);
            let lower = container.env_var(pair.lower);
            match (upper, lower) {
                (None, None) => {
                    to_add.extend([2 * i, 2 * i + 1]);
                    carries = true;
                }
                (Some(u), Some(l))
                    if u.value.as_deref() == Some(pair.value.as_str())
                        && l.value.as_deref() == Some(pair.value.as_str()) =>
                {
                    carries = true;
                }
                (Some(_), Some(_)) if ours => {
                    to_update.push(i);
                    carries = true;
                }
                _ => {
                    kept.extend([pair.upper, pair.lower].map(str::to_owned));
                    let user_names: Vec<&str> = [upper, lower]
                        .into_iter()
                        .flatten()
                        .map(|e| e.name.as_ref())
                        .collect();
                    warnings.push(format!(
                        "egress-gate: {} container {:?} keeps its own {}; {}/{} not injected there",
                        match container.list {
                            ContainerList::Init => "init",
                            ContainerList::Main => "app",
                        },
                        container.name,
                        user_names.join(" and "),
                        pair.upper,
                        pair.lower
                    ));
                }
            }
        }
        (to_add, to_update, carries)
    }

    fn label_edit(
        &self,
        view: &PodView<'_>,
        edits: &mut MetadataEdits,
        warnings: &mut Vec<String>,
    ) {
        let key = &self.config.client_label;
        match view.label(key) {
            Some("true") => {}
            Some(other) => {
                warnings.push(format!(
                    "egress-gate: label {key}={other:?} replaced by \"true\" so the pod may reach the proxy"
                ));
                edits.labels.push((key.clone(), "true".into()));
            }
            None => edits.labels.push((key.clone(), "true".into())),
        }
    }

    fn status_edit(&self, view: &PodView<'_>, status: &InjectionStatus, edits: &mut MetadataEdits) {
        let key = &self.config.status_annotation;
        let value = match serde_json::to_string(status) {
            Ok(v) => v,
            Err(e) => unreachable!("status always serializes: {e}"),
        };
        if view.annotation(key).as_deref() != Some(value.as_str()) {
            edits.annotations.push((key.clone(), value));
        }
    }
}

/// Labels and annotations to set, turned into operations in one place so that missing
/// parents (`metadata`, `labels`, `annotations`) are created exactly once.
#[derive(Default)]
struct MetadataEdits {
    /// Label keys and values to set.
    labels: Vec<(String, String)>,
    /// Annotation keys and values to set.
    annotations: Vec<(String, String)>,
}

impl MetadataEdits {
    /// Writes the operations: one `add` of `metadata` when the pod has none, one `add` per
    /// missing map, else one `add` or `replace` per key.
    fn write(self, view: &PodView<'_>, patch: &mut PatchWriter) {
        if !view.has_metadata {
            let mut metadata = Vec::new();
            for (name, entries) in [("labels", &self.labels), ("annotations", &self.annotations)] {
                if entries.is_empty() {
                    continue;
                }
                metadata.push(if metadata.is_empty() { b'{' } else { b',' });
                push_json(&mut metadata, name);
                metadata.push(b':');
                metadata.extend(string_object(entries));
            }
            if !metadata.is_empty() {
                metadata.push(b'}');
                patch.op(Op::Add, &["metadata"], &metadata);
            }
            return;
        }
        let labels = view.labels.as_ref();
        write_map(
            patch,
            "labels",
            self.labels,
            labels.map(|m| |k: &str| m.contains_key(k)),
        );
        let annotations = view.annotations.as_ref();
        let has_annotation = annotations.map(|m| |k: &str| m.contains_key(k));
        write_map(patch, "annotations", self.annotations, has_annotation);
    }
}

/// A JSON object of string members, in order.
fn string_object(entries: &[(String, String)]) -> Vec<u8> {
    json_object(entries.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// Writes the entries of one metadata map: one `add` of the whole map when the pod has none
/// (`has_key` is `None`), else per key a `replace` when present and an `add` when not.
fn write_map(
    patch: &mut PatchWriter,
    name: &str,
    entries: Vec<(String, String)>,
    has_key: Option<impl Fn(&str) -> bool>,
) {
    if entries.is_empty() {
        return;
    }
    let Some(has_key) = has_key else {
        patch.op(Op::Add, &["metadata", name], &string_object(&entries));
        return;
    };
    for (key, value) in entries {
        let mut literal = Vec::with_capacity(value.len() + 2);
        push_json(&mut literal, &value);
        let op = if has_key(&key) { Op::Replace } else { Op::Add };
        patch.op(op, &["metadata", name, &key], &literal);
    }
}

/// Writes one container's env additions: one `add` of the whole `env` list when the
/// container has none, else one `add` per variable at the end of its list.
fn write_env_additions(
    container: &ContainerView<'_>,
    to_add: &[usize],
    entries: &[Vec<u8>],
    patch: &mut PatchWriter,
) {
    let index = container.index.to_string();
    let env = ["spec", container.list.field(), &index, "env"];
    let chosen = to_add.iter().filter_map(|&i| entries.get(i));
    if container.env.is_none() {
        let mut list = vec![b'['];
        for (n, entry) in chosen.enumerate() {
            if n > 0 {
                list.push(b',');
            }
            list.extend_from_slice(entry);
        }
        list.push(b']');
        patch.op(Op::Add, &env, &list);
    } else {
        let append = ["spec", container.list.field(), &index, "env", "-"];
        for entry in chosen {
            patch.op(Op::Add, &append, entry);
        }
    }
}

/// Whether `container`'s proxy variables are the ones an earlier call recorded in `status`:
/// it is listed there, sets both cases of every pair to one value each, and those values
/// hash to the recorded hash. Anything else (a user's value, a pair missing) is not ours.
fn set_by(status: &InjectionStatus, container: &ContainerView<'_>, pairs: &[EnvPair]) -> bool {
    if !status.containers.iter().any(|c| *c == container.name) {
        return false;
    }
    let mut current = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let value = |name| container.env_var(name).and_then(|e| e.value.as_deref());
        match (value(pair.upper), value(pair.lower)) {
            (Some(u), Some(l)) if u == l => current.push(EnvPair {
                upper: pair.upper,
                lower: pair.lower,
                value: u.to_owned(),
            }),
            _ => return false,
        }
    }
    values_hash(&current) == status.values_hash
}

/// `replace` operations setting both cases of each updated pair to the new value.
fn write_env_updates(
    container: &ContainerView<'_>,
    to_update: &[usize],
    pairs: &[EnvPair],
    patch: &mut PatchWriter,
) {
    let index = container.index.to_string();
    let env = container.env.as_deref().unwrap_or_default();
    for pair in to_update.iter().filter_map(|&i| pairs.get(i)) {
        let mut value = Vec::with_capacity(pair.value.len() + 2);
        push_json(&mut value, &pair.value);
        for name in [pair.upper, pair.lower] {
            if let Some(at) = env.iter().position(|e| e.name == name) {
                let at = at.to_string();
                let path = ["spec", container.list.field(), &index, "env", &at, "value"];
                patch.op(Op::Replace, &path, &value);
            }
        }
    }
}

/// Length of the hex prefix of the SHA-256 kept in the status annotation: enough to tell
/// configurations apart, short enough to read.
const HASH_HEX_LEN: usize = 16;

fn values_hash(pairs: &[EnvPair]) -> String {
    let mut hasher = Sha256::new();
    for pair in pairs {
        for name in [pair.upper, pair.lower] {
            hasher.update(name.as_bytes());
            hasher.update(b"=");
            hasher.update(pair.value.as_bytes());
            hasher.update(b"\n");
        }
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity("sha256:".len() + HASH_HEX_LEN);
    out.push_str("sha256:");
    for b in hasher.finalize().iter().take(HASH_HEX_LEN / 2) {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}
