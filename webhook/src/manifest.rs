//! The offline `inject` command's core: the engine applied to whole manifests.
//!
//! Reads a multi-document YAML stream, injects Pods and the pod templates of workload
//! controllers exactly as the admission webhook would, and passes other kinds through.

use std::collections::BTreeMap;

use json_patch::PatchOperation;
use jsonptr::Pointer;
use serde::Deserialize;
use serde_json::Value;

use crate::admission::{NoServices, ServiceDirectory};
use crate::engine::pod::PodShapeError;
use crate::engine::{Injector, Mutation, Operation, PodContext};

/// Namespace assumed for objects that name none, as `kubectl apply` would.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Where a document came from: the file (or `-`) and its number in it, counting from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocRef {
    /// The file as the user named it; empty for text that came from no file.
    pub source: String,
    /// The document's number in that file, counting from 1 as editors show it.
    pub number: usize,
    /// Where in the document's `items` the object is, counting from 1, when the document
    /// is a list (nested lists: the innermost position).
    pub item: Option<usize>,
}

impl std::fmt::Display for DocRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.source.is_empty() {
            write!(f, "{}: ", self.source)?;
        }
        write!(f, "document {}", self.number)?;
        match self.item {
            Some(item) => write!(f, " item {item}"),
            None => Ok(()),
        }
    }
}

/// Why a manifest could not be injected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// A document is not valid YAML.
    #[error("{document}: not valid YAML: {message}")]
    Yaml {
        /// Which document.
        document: DocRef,
        /// What the YAML parser said.
        message: String,
    },
    /// A pod or pod template has a field of the wrong shape.
    #[error("{document}: {kind} {name}: {source}")]
    Shape {
        /// Which document.
        document: DocRef,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// The offending field (relative to the pod or template), boxed to keep the error
        /// small on the happy path's `Result`.
        source: Box<PodShapeError>,
    },
    /// A kind that differs from a workload kind only in case: the API server would reject
    /// it, and passing it through would hide a pod from the preview.
    #[error(
        "{document}: kind {kind:?} does not exist (kinds are case-sensitive): did you mean {meant}?"
    )]
    KindCase {
        /// Which document.
        document: DocRef,
        /// The kind as written.
        kind: String,
        /// The kind it resembles.
        meant: &'static str,
    },
    /// The engine's patch did not apply (a bug: say so rather than print a wrong object).
    #[error("{document}: {kind} {name}: patch did not apply: {message}")]
    Patch {
        /// Which document.
        document: DocRef,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// What json-patch said.
        message: String,
    },
}

/// What the preview did with one object, and why.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// A pod or pod template the engine reviewed: injected, or not and why.
    Reviewed(Mutation),
    /// A pod in a namespace the webhook configuration leaves out (`kube-system`, the
    /// webhook's own, or with a cluster one not opted in): the API server never calls the
    /// webhook for it.
    NamespaceExcluded {
        /// Why, naming the namespace.
        reason: String,
    },
    /// A Kubernetes object without pods, passed through unchanged.
    PassedThrough {
        /// Why it needs nothing, in the user's terms.
        reason: String,
    },
}

/// Settings of one preview run.
pub struct PreviewOptions<'a> {
    /// Namespace for objects that name none; [`DEFAULT_NAMESPACE`] when `None`.
    pub namespace: Option<String>,
    /// Why the webhook is not called for pods in a namespace (`None`: it is), from the
    /// webhook configuration's `namespaceSelector`.
    pub excluded: &'a dyn Fn(&str) -> Option<String>,
    /// The Services the cluster has, as the serving webhook's discovery sees them; the
    /// Services in the input join them.
    pub services: &'a dyn ServiceDirectory,
}

/// The exclusions of `deploy/base`'s webhook configuration without a cluster to read it
/// from: `kube-system` and the webhook's own namespace.
pub fn shipped_exclusion(namespace: &str, webhook_namespace: &str) -> Option<String> {
    (namespace == "kube-system" || namespace == webhook_namespace).then(|| {
        format!(
            "the webhook configuration leaves out namespace {namespace}, so the API server does not call the webhook for it"
        )
    })
}

/// One object of the stream after injection.
#[derive(Debug)]
pub struct InjectedObject {
    /// The document it came from.
    pub document: DocRef,
    /// Its kind (`Pod`, `Deployment`, ...).
    pub kind: String,
    /// `namespace/name` (or `namespace/generateName*`) for messages.
    pub display_name: String,
    /// What happened to it.
    pub outcome: Outcome,
    /// The operations applied, with pointers relative to the object; empty when unchanged.
    pub patch: Vec<PatchOperation>,
    /// The object as given (after `*List` unwrapping).
    pub original: Value,
    /// The object with the patch applied.
    pub object: Value,
}

impl InjectedObject {
    /// The engine's answer when the object is a reviewed pod or template.
    pub fn mutation(&self) -> Option<&Mutation> {
        match &self.outcome {
            Outcome::Reviewed(m) => Some(m),
            _ => None,
        }
    }
}

/// A document that is not a Kubernetes object (a Helm values file, a scalar), left out.
#[derive(Debug)]
pub struct Skipped {
    /// The document.
    pub document: DocRef,
    /// What it is instead.
    pub reason: String,
}

/// The result of a preview: the objects in input order and the documents left out.
#[derive(Debug, Default)]
pub struct Preview {
    /// Every Kubernetes object, `*List`s unwrapped.
    pub objects: Vec<InjectedObject>,
    /// Documents that are not Kubernetes objects.
    pub skipped: Vec<Skipped>,
}

/// The kinds with pods, as the API server spells them.
const WORKLOAD_KINDS: [&str; 8] = [
    "Pod",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "Job",
    "CronJob",
];

/// Where a kind keeps its pod template; `Some("")` for a Pod itself.
pub fn pod_template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Parses a YAML stream into JSON values, skipping empty documents.
pub fn parse_documents(text: &str) -> Result<Vec<(usize, Value)>, ManifestError> {
    parse_source("", text).map(|docs| docs.into_iter().map(|(d, v)| (d.number, v)).collect())
}

/// Parses one file's YAML stream; `source` names the file in errors.
pub fn parse_source(source: &str, text: &str) -> Result<Vec<(DocRef, Value)>, ManifestError> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = DocRef {
            source: source.to_string(),
            number: i + 1,
            item: None,
        };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                return Err(ManifestError::Yaml {
                    document,
                    message: e.to_string(),
                });
            }
        };
        if !value.is_null() {
            docs.push((document, value));
        }
    }
    Ok(docs)
}

/// Injects every pod and pod template in `text`. Services found in the stream count as
/// peer services of pods in their namespace, as the webhook's discovery would see them.
/// Documents that are not Kubernetes objects are left out.
pub fn inject_stream(
    injector: &Injector,
    text: &str,
    namespace: Option<&str>,
) -> Result<Vec<InjectedObject>, ManifestError> {
    let options = PreviewOptions {
        namespace: namespace.map(str::to_string),
        excluded: &|_| None,
        services: &NoServices,
    };
    Ok(preview(injector, parse_source("", text)?, &options)?.objects)
}

/// Previews what the webhook does to every object of `documents`.
pub fn preview(
    injector: &Injector,
    documents: Vec<(DocRef, Value)>,
    options: &PreviewOptions<'_>,
) -> Result<Preview, ManifestError> {
    let default_ns = options.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let mut objects = Vec::new();
    let mut skipped = Vec::new();
    for (document, value) in documents {
        flatten(document, value, &mut objects, &mut skipped);
    }
    let mut services = services_by_namespace(&objects, default_ns);
    let namespaces: Vec<String> = objects
        .iter()
        .map(|(_, o)| {
            str_at(o, "/metadata/namespace")
                .unwrap_or(default_ns)
                .to_string()
        })
        .collect();
    for ns in namespaces {
        let known = options.services.services_in(&ns);
        if known.is_empty() {
            continue;
        }
        let entry = services.entry(ns).or_default();
        entry.extend(known);
        entry.sort();
        entry.dedup();
    }
    let objects = objects
        .into_iter()
        .map(|(document, object)| {
            inject_object(injector, document, object, default_ns, options, &services)
        })
        .collect::<Result<_, _>>()?;
    Ok(Preview { objects, skipped })
}

/// Unwraps `kind: List` and typed lists (`PodList`, `DeploymentList`: what
/// `kubectl get -o yaml` and the API print) into their items, and sets documents that are
/// not Kubernetes objects aside.
fn flatten(
    document: DocRef,
    value: Value,
    out: &mut Vec<(DocRef, Value)>,
    skipped: &mut Vec<Skipped>,
) {
    let kind = str_at(&value, "/kind").unwrap_or_default();
    if let Some(item_kind) = kind.strip_suffix("List")
        && let Some(Value::Array(items)) = value.get("items")
    {
        let api_version = str_at(&value, "/apiVersion").map(str::to_string);
        for (position, item) in items.iter().enumerate() {
            let mut item = item.clone();
            // Items of a typed list (PodList) may carry no kind or apiVersion of their own.
            if let Value::Object(fields) = &mut item
                && !item_kind.is_empty()
            {
                if !fields.contains_key("kind") {
                    fields.insert("kind".into(), Value::String(item_kind.to_string()));
                }
                if let Some(v) = &api_version
                    && !fields.contains_key("apiVersion")
                {
                    fields.insert("apiVersion".into(), Value::String(v.clone()));
                }
            }
            let at = DocRef {
                item: Some(position + 1),
                ..document.clone()
            };
            flatten(at, item, out, skipped);
        }
        return;
    }
    let why = match &value {
        Value::Object(fields) => match (fields.get("apiVersion"), fields.get("kind")) {
            (Some(Value::String(_)), Some(Value::String(k))) if !k.is_empty() => None,
            _ if fields.contains_key("kind") => {
                Some("a mapping without a string apiVersion and kind".to_string())
            }
            _ => Some("a mapping without apiVersion and kind (a Helm values file?)".to_string()),
        },
        Value::Array(_) => Some("a sequence".to_string()),
        other => Some(format!("a scalar ({other})")),
    };
    match why {
        Some(reason) => skipped.push(Skipped { document, reason }),
        None => out.push((document, value)),
    }
}

fn services_by_namespace(
    objects: &[(DocRef, Value)],
    default_ns: &str,
) -> BTreeMap<String, Vec<String>> {
    let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, object) in objects {
        if str_at(object, "/kind") == Some("Service")
            && let Some(name) = str_at(object, "/metadata/name")
        {
            let ns = str_at(object, "/metadata/namespace").unwrap_or(default_ns);
            services
                .entry(ns.to_string())
                .or_default()
                .push(name.to_string());
        }
    }
    for names in services.values_mut() {
        names.sort();
        names.dedup();
    }
    services
}

/// Labels the pods an operator creates from its resources carry, to ask the configured
/// profiles whether they would select those pods.
fn pods_made_by(
    api_group: &str,
    kind: &str,
    name: &str,
) -> Option<(&'static str, BTreeMap<String, String>)> {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    match (api_group, kind) {
        ("postgresql.cnpg.io", "Cluster") => Some((
            "the pods CNPG creates from it",
            labels(&[("cnpg.io/podRole", "instance"), ("cnpg.io/cluster", name)]),
        )),
        ("postgresql.cnpg.io", "Backup" | "ScheduledBackup") => Some((
            "the Cluster's instance pods, which take the backup,",
            labels(&[("cnpg.io/podRole", "instance")]),
        )),
        ("barmancloud.cnpg.io", "ObjectStore") => Some((
            "the instance pods of the CNPG Clusters that use it (the Barman Cloud plugin's sidecar runs in them)",
            labels(&[("cnpg.io/podRole", "instance")]),
        )),
        ("velero.io", _) => Some((
            "the Velero pods that act on it",
            labels(&[
                ("component", "velero"),
                ("app.kubernetes.io/name", "velero"),
            ]),
        )),
        _ => None,
    }
}

/// Why an object without pods needs nothing, in the user's terms.
fn pass_reason(injector: &Injector, object: &Value, kind: &str, namespace: &str) -> String {
    let api_version = str_at(object, "/apiVersion").unwrap_or_default();
    let api_group = api_version
        .split_once('/')
        .map(|(g, _)| g)
        .unwrap_or_default();
    let name = str_at(object, "/metadata/name").unwrap_or_default();
    if kind == "Service" && api_group.is_empty() {
        return format!(
            "not a pod; a peer service of the pods in namespace {namespace} (in their NO_PROXY)"
        );
    }
    if let Some((who, labels)) = pods_made_by(api_group, kind, name) {
        let profile = injector
            .config()
            .profiles
            .iter()
            .find(|p| p.matches(&labels));
        return match profile {
            Some(p) => format!("not a pod; {who} match profile {}", p.name),
            None => format!("not a pod; no profile of this configuration selects {who}"),
        };
    }
    if api_group == "postgresql.cnpg.io" && kind == "Pooler" {
        return "not a pod; CNPG's pooler pods do not reach object storage and are not selected"
            .into();
    }
    "not a pod and holds no pod template".into()
}

fn inject_object(
    injector: &Injector,
    document: DocRef,
    mut object: Value,
    default_ns: &str,
    options: &PreviewOptions<'_>,
    services: &BTreeMap<String, Vec<String>>,
) -> Result<InjectedObject, ManifestError> {
    let kind = str_at(&object, "/kind").unwrap_or_default().to_string();
    let namespace = str_at(&object, "/metadata/namespace")
        .unwrap_or(default_ns)
        .to_string();
    let display_name = match (
        str_at(&object, "/metadata/name"),
        str_at(&object, "/metadata/generateName"),
    ) {
        (Some(name), _) => format!("{namespace}/{name}"),
        (None, Some(prefix)) => format!("{namespace}/{prefix}*"),
        (None, None) => format!("{namespace}/(unnamed)"),
    };
    let original = object.clone();
    let unchanged = |outcome: Outcome, object: Value| InjectedObject {
        document: document.clone(),
        kind: kind.clone(),
        display_name: display_name.clone(),
        outcome,
        patch: Vec::new(),
        original: original.clone(),
        object,
    };
    let Some(template_at) = pod_template_pointer(&kind) else {
        if let Some(meant) = WORKLOAD_KINDS
            .iter()
            .find(|k| k.eq_ignore_ascii_case(&kind))
        {
            return Err(ManifestError::KindCase {
                document,
                kind,
                meant,
            });
        }
        let reason = pass_reason(injector, &object, &kind, &namespace);
        return Ok(unchanged(Outcome::PassedThrough { reason }, object));
    };
    if let Some(reason) = (options.excluded)(&namespace) {
        return Ok(unchanged(Outcome::NamespaceExcluded { reason }, object));
    }
    let shape_error = |source: PodShapeError| ManifestError::Shape {
        document: document.clone(),
        kind: kind.clone(),
        name: display_name.clone(),
        source: Box::new(source),
    };
    let template = object.pointer(template_at).ok_or_else(|| {
        shape_error(PodShapeError {
            path: template_at.to_string(),
            problem: "is missing".into(),
        })
    })?;
    let ctx = PodContext {
        namespace: &namespace,
        operation: Operation::Create,
        services: services
            .get(&namespace)
            .map(Vec::as_slice)
            .unwrap_or_default(),
    };
    let mutation = injector.review(template, &ctx).map_err(|mut e| {
        e.path = format!("{template_at}{}", e.path);
        shape_error(e)
    })?;
    let patch_error = |message: String| ManifestError::Patch {
        document: document.clone(),
        kind: kind.clone(),
        name: display_name.clone(),
        message,
    };
    let prefix = Pointer::parse(template_at).map_err(|e| patch_error(e.to_string()))?;
    let mut patch = mutation
        .patch
        .operations()
        .map_err(|e| patch_error(e.to_string()))?;
    for op in &mut patch {
        prefix_path(op, prefix);
    }
    json_patch::patch(&mut object, &patch).map_err(|e| patch_error(e.to_string()))?;
    Ok(InjectedObject {
        document,
        kind,
        display_name,
        outcome: Outcome::Reviewed(mutation),
        patch,
        original,
        object,
    })
}

fn prefix_path(op: &mut PatchOperation, prefix: &Pointer) {
    let path = match op {
        PatchOperation::Add(o) => &mut o.path,
        PatchOperation::Replace(o) => &mut o.path,
        PatchOperation::Remove(o) => &mut o.path,
        PatchOperation::Test(o) => &mut o.path,
        PatchOperation::Move(o) => &mut o.path,
        PatchOperation::Copy(o) => &mut o.path,
    };
    let mut full = prefix.to_buf();
    full.append(&*path);
    *path = full;
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}
