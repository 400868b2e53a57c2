//! The offline `inject` command's core: the engine applied to whole manifests.
//!
//! Reads a multi-document YAML stream, injects Pods and the pod templates of workload
//! controllers exactly as the admission webhook would, and passes other kinds through.

use std::collections::BTreeMap;

use json_patch::PatchOperation;
use jsonptr::Pointer;
use serde::Deserialize;
use serde_json::Value;

use crate::engine::pod::PodShapeError;
use crate::engine::{Injector, Mutation, Operation, PodContext};

/// Namespace assumed for objects that name none, as `kubectl apply` would.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a manifest could not be injected. `document` counts from 1, as editors show it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// A document is not valid YAML.
    #[error("document {document}: not valid YAML: {message}")]
    Yaml {
        /// Which document.
        document: usize,
        /// What the YAML parser said.
        message: String,
    },
    /// A pod or pod template has a field of the wrong shape.
    #[error("document {document}: {kind} {name}: {source}")]
    Shape {
        /// Which document.
        document: usize,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// The offending field (relative to the pod or template).
        source: PodShapeError,
    },
    /// The engine's patch did not apply (a bug: say so rather than print a wrong object).
    #[error("document {document}: {kind} {name}: patch did not apply: {message}")]
    Patch {
        /// Which document.
        document: usize,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// What json-patch said.
        message: String,
    },
}

/// One object of the stream after injection.
#[derive(Debug)]
pub struct InjectedObject {
    /// The document it came from, counting from 1.
    pub document: usize,
    /// Its kind (`Pod`, `Deployment`, ...), empty when it has none.
    pub kind: String,
    /// `namespace/name` (or `namespace/generateName*`) for messages.
    pub display_name: String,
    /// The engine's answer, with pointers relative to the pod or template; `None` for kinds
    /// without pods, which pass through unchanged.
    pub mutation: Option<Mutation>,
    /// The operations applied, with pointers relative to the object; empty when unchanged.
    pub patch: Vec<PatchOperation>,
    /// The object with the patch applied.
    pub object: Value,
}

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
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| ManifestError::Yaml {
            document: i + 1,
            message: e.to_string(),
        })?;
        if !value.is_null() {
            docs.push((i + 1, value));
        }
    }
    Ok(docs)
}

/// Injects every pod and pod template in `text`. Services found in the stream count as
/// peer services of pods in their namespace, as the webhook's discovery would see them.
pub fn inject_stream(
    injector: &Injector,
    text: &str,
    namespace: Option<&str>,
) -> Result<Vec<InjectedObject>, ManifestError> {
    let default_ns = namespace.unwrap_or(DEFAULT_NAMESPACE);
    let mut objects = Vec::new();
    for (document, value) in parse_documents(text)? {
        flatten(document, value, &mut objects);
    }
    let services = services_by_namespace(&objects, default_ns);
    objects
        .into_iter()
        .map(|(document, object)| inject_object(injector, document, object, default_ns, &services))
        .collect()
}

/// Unwraps `kind: List` (what `kubectl get -o yaml` prints) into its items.
fn flatten(document: usize, value: Value, out: &mut Vec<(usize, Value)>) {
    if str_at(&value, "/kind") == Some("List")
        && let Some(Value::Array(items)) = value.get("items")
    {
        for item in items {
            flatten(document, item.clone(), out);
        }
        return;
    }
    out.push((document, value));
}

fn services_by_namespace(
    objects: &[(usize, Value)],
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

fn inject_object(
    injector: &Injector,
    document: usize,
    mut object: Value,
    default_ns: &str,
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
    let Some(template_at) = pod_template_pointer(&kind) else {
        return Ok(InjectedObject {
            document,
            kind,
            display_name,
            mutation: None,
            patch: Vec::new(),
            object,
        });
    };
    let shape_error = |source: PodShapeError| ManifestError::Shape {
        document,
        kind: kind.clone(),
        name: display_name.clone(),
        source,
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
        document,
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
        mutation: Some(mutation),
        patch,
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
