//! A read-only view of the parts of a raw pod the engine looks at.
//!
//! The engine never re-serializes a typed Pod: it reads the request's JSON where it is and
//! writes patch operations against it, so fields this code does not know survive untouched.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Why a pod could not be read. The webhook allows such a pod unchanged and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod field {path} {problem}")]
pub struct PodShapeError {
    /// The JSON pointer of the offending field.
    pub path: String,
    /// What is wrong with it.
    pub problem: String,
}

fn shape(path: impl Into<String>, problem: impl Into<String>) -> PodShapeError {
    PodShapeError {
        path: path.into(),
        problem: problem.into(),
    }
}

/// The two container lists of a pod spec, in the order the engine visits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerList {
    /// `spec.initContainers`, including native sidecars (`restartPolicy: Always`).
    Init,
    /// `spec.containers`.
    Main,
}

impl ContainerList {
    /// The field name in the pod spec.
    pub fn field(self) -> &'static str {
        match self {
            ContainerList::Init => "initContainers",
            ContainerList::Main => "containers",
        }
    }
}

/// One environment entry as the pod declares it.
#[derive(Debug)]
pub struct EnvEntry<'a> {
    /// The variable's name.
    pub name: &'a str,
    /// Its literal value; `None` when it has no `value` (for example `valueFrom`).
    pub value: Option<&'a str>,
}

/// One container of the pod.
#[derive(Debug)]
pub struct ContainerView<'a> {
    /// Which list it is in.
    pub list: ContainerList,
    /// Its index in that list, for patch pointers.
    pub index: usize,
    /// Its name.
    pub name: &'a str,
    /// Its `env` entries; `None` when the container has no `env` key (or it is null).
    pub env: Option<Vec<EnvEntry<'a>>>,
}

impl ContainerView<'_> {
    /// The entry named `name`, if the container declares it.
    pub fn env_var(&self, name: &str) -> Option<&EnvEntry<'_>> {
        self.env.as_ref()?.iter().find(|e| e.name == name)
    }
}

/// What the engine reads of a pod.
#[derive(Debug)]
pub struct PodView<'a> {
    /// Whether `metadata` is present (an object).
    pub has_metadata: bool,
    /// Labels; `None` when the pod has no `labels` key.
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations; `None` when the pod has no `annotations` key.
    pub annotations: Option<BTreeMap<String, String>>,
    /// Init containers, then containers.
    pub containers: Vec<ContainerView<'a>>,
}

impl<'a> PodView<'a> {
    /// Reads `pod`, or says which field has the wrong shape.
    pub fn parse(pod: &'a Value) -> Result<Self, PodShapeError> {
        let pod = pod
            .as_object()
            .ok_or_else(|| shape("/", "is not an object"))?;
        let metadata = optional_object(pod, "metadata", "/metadata")?;
        let (labels, annotations) = match metadata {
            Some(m) => (
                string_map(m, "labels", "/metadata/labels")?,
                string_map(m, "annotations", "/metadata/annotations")?,
            ),
            None => (None, None),
        };
        let spec =
            optional_object(pod, "spec", "/spec")?.ok_or_else(|| shape("/spec", "is missing"))?;
        let mut containers = Vec::new();
        for list in [ContainerList::Init, ContainerList::Main] {
            let path = format!("/spec/{}", list.field());
            let items = match spec.get(list.field()) {
                None | Some(Value::Null) if list == ContainerList::Init => continue,
                None | Some(Value::Null) => return Err(shape(path, "is missing")),
                Some(Value::Array(items)) => items,
                Some(_) => return Err(shape(path, "is not a list")),
            };
            for (index, item) in items.iter().enumerate() {
                containers.push(container(list, index, item, &format!("{path}/{index}"))?);
            }
        }
        Ok(Self {
            has_metadata: metadata.is_some(),
            labels,
            annotations,
            containers,
        })
    }

    /// A label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// An annotation's value.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

fn optional_object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, PodShapeError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(shape(path, "is not an object")),
    }
}

fn string_map(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<BTreeMap<String, String>>, PodShapeError> {
    let Some(map) = optional_object(obj, key, path)? else {
        return Ok(None);
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(shape(format!("{path}/{}", escape(k)), "is not a string")),
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

fn container<'a>(
    list: ContainerList,
    index: usize,
    item: &'a Value,
    path: &str,
) -> Result<ContainerView<'a>, PodShapeError> {
    let obj = item
        .as_object()
        .ok_or_else(|| shape(path, "is not an object"))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| shape(format!("{path}/name"), "is missing or not a string"))?;
    let env = match obj.get("env") {
        None | Some(Value::Null) => None,
        Some(Value::Array(entries)) => Some(
            entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let name = e.get("name").and_then(Value::as_str).ok_or_else(|| {
                        shape(format!("{path}/env/{i}/name"), "is missing or not a string")
                    })?;
                    Ok(EnvEntry {
                        name,
                        value: e.get("value").and_then(Value::as_str),
                    })
                })
                .collect::<Result<Vec<_>, PodShapeError>>()?,
        ),
        Some(_) => return Err(shape(format!("{path}/env"), "is not a list")),
    };
    Ok(ContainerView {
        list,
        index,
        name,
        env,
    })
}

/// Escapes one JSON pointer token (RFC 6901: `~` -> `~0`, `/` -> `~1`), for messages.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_containers_in_order_and_tolerates_missing_parts() {
        let pod = json!({
            "spec": {
                "initContainers": [{"name": "init"}],
                "containers": [{"name": "app", "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {}}]}]
            }
        });
        let view = PodView::parse(&pod).unwrap();
        assert!(!view.has_metadata);
        assert!(view.labels.is_none());
        let names: Vec<_> = view
            .containers
            .iter()
            .map(|c| (c.list, c.index, c.name))
            .collect();
        assert_eq!(
            names,
            [
                (ContainerList::Init, 0, "init"),
                (ContainerList::Main, 0, "app")
            ]
        );
        assert!(view.containers[0].env.is_none());
        assert_eq!(view.containers[1].env_var("A").unwrap().value, Some("1"));
        assert_eq!(view.containers[1].env_var("B").unwrap().value, None);
    }

    #[test]
    fn wrong_shapes_name_the_field() {
        let cases = [
            (json!([]), "/"),
            (json!({"metadata": []}), "/metadata"),
            (
                json!({"metadata": {"labels": {"a/b": 1}}, "spec": {"containers": []}}),
                "/metadata/labels/a~1b",
            ),
            (json!({"metadata": {}}), "/spec"),
            (json!({"spec": {}}), "/spec/containers"),
            (json!({"spec": {"containers": {}}}), "/spec/containers"),
            (
                json!({"spec": {"containers": [{"env": []}]}}),
                "/spec/containers/0/name",
            ),
            (
                json!({"spec": {"containers": [{"name": "a", "env": {}}]}}),
                "/spec/containers/0/env",
            ),
            (
                json!({"spec": {"containers": [{"name": "a", "env": [{"value": "x"}]}]}}),
                "/spec/containers/0/env/0/name",
            ),
            (
                json!({"spec": {"containers": [], "initContainers": 3}}),
                "/spec/initContainers",
            ),
        ];
        for (pod, path) in cases {
            assert_eq!(PodView::parse(&pod).unwrap_err().path, path, "{pod}");
        }
    }
}
