//! A read-only view of the parts of a raw pod the engine looks at.
//!
//! The engine never re-serializes a typed Pod: it reads the request's JSON where it is and
//! writes patch operations against it, so fields this code does not know survive untouched.
//!
//! Two ways in: [`PodView::parse`] reads an already parsed JSON value (manifests, tests), and
//! [`PodView::from_json`] reads the bytes of an admission request directly, deserializing only
//! the fields below and skipping the rest without allocating, which is most of the cost of a
//! review. Where the fast path rejects a pod, the value path decides, so both accept the
//! same pods and report the same field in errors.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvEntry<'a> {
    /// The variable's name.
    pub name: Cow<'a, str>,
    /// Its literal value; `None` when it has no string `value` (for example `valueFrom`).
    pub value: Option<Cow<'a, str>>,
}

/// One container of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView<'a> {
    /// Which list it is in.
    pub list: ContainerList,
    /// Its index in that list, for patch pointers.
    pub index: usize,
    /// Its name.
    pub name: Cow<'a, str>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView<'a> {
    /// `metadata.name`, empty names read as absent.
    pub name: Option<Cow<'a, str>>,
    /// `metadata.generateName`, for pods whose name the API server has yet to pick.
    pub generate_name: Option<Cow<'a, str>>,
    /// `metadata.namespace`.
    pub namespace: Option<Cow<'a, str>>,
    /// Whether `metadata` is present (an object).
    pub has_metadata: bool,
    /// Labels; `None` when the pod has no `labels` key.
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations; `None` when the pod has no `annotations` key.
    pub annotations: Option<Annotations<'a>>,
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
                string_map(m, "annotations", "/metadata/annotations")?.map(Annotations::from),
            ),
            None => (None, None),
        };
        let meta_str = |key: &str| {
            metadata
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(Cow::Borrowed)
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
            name: meta_str("name"),
            generate_name: meta_str("generateName"),
            namespace: meta_str("namespace"),
            has_metadata: metadata.is_some(),
            labels,
            annotations,
            containers,
        })
    }

    /// Reads a pod from JSON bytes (an admission request's `object`).
    pub fn from_json(json: &'a [u8]) -> Result<Self, PodShapeError> {
        match serde_json::from_slice::<PodFields<'a>>(json) {
            Ok(fields) => fields.into_view(),
            Err(fast_error) => {
                // Rare: a malformed pod, or JSON the fast path is stricter about (duplicate
                // keys). The value path gives the precise field, or reads the pod after all.
                let value: Value = serde_json::from_slice(json)
                    .map_err(|e| shape("/", format!("is not JSON: {e}")))?;
                match PodView::parse(&value) {
                    Ok(view) => Ok(view.into_owned()),
                    Err(e) => Err(e),
                }
                .map_err(|e| {
                    if e.path.is_empty() {
                        shape("/", fast_error.to_string())
                    } else {
                        e
                    }
                })
            }
        }
    }

    /// The same view, owning its strings.
    pub fn into_owned(self) -> PodView<'static> {
        let owned = |c: Option<Cow<'_, str>>| c.map(|c| Cow::Owned(c.into_owned()));
        PodView {
            name: owned(self.name),
            generate_name: owned(self.generate_name),
            namespace: owned(self.namespace),
            has_metadata: self.has_metadata,
            labels: self.labels,
            annotations: self.annotations.map(Annotations::into_owned),
            containers: self
                .containers
                .into_iter()
                .map(|c| ContainerView {
                    list: c.list,
                    index: c.index,
                    name: Cow::Owned(c.name.into_owned()),
                    env: c.env.map(|env| {
                        env.into_iter()
                            .map(|e| EnvEntry {
                                name: Cow::Owned(e.name.into_owned()),
                                value: owned(e.value),
                            })
                            .collect()
                    }),
                })
                .collect(),
        }
    }

    /// A label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// An annotation's value.
    pub fn annotation(&self, key: &str) -> Option<Cow<'_, str>> {
        self.annotations.as_ref()?.get(key)
    }
}

/// A pod's annotations. Values read from request bytes stay as the request's JSON string
/// literals and are decoded only when looked up: the engine reads two keys, and the others can
/// be most of the request (CNPG's `cnpg.io/podSpec` is a JSON document inside a string, with
/// an escape every few bytes).
#[derive(Debug, Clone, Default)]
pub struct Annotations<'a>(BTreeMap<Cow<'a, str>, AnnotationValue<'a>>);

/// One annotation value, decoded or still a JSON string literal.
#[derive(Debug, Clone)]
enum AnnotationValue<'a> {
    /// Already decoded (the value path).
    Text(Cow<'a, str>),
    /// A JSON string literal, quotes included, as it appears in the request.
    Json(Cow<'a, str>),
}

impl AnnotationValue<'_> {
    fn decode(&self) -> Cow<'_, str> {
        match self {
            AnnotationValue::Text(text) => Cow::Borrowed(text),
            // Borrowed when it has no escapes. A literal that fails to decode cannot occur:
            // the deserializer validated it; reading it as absent would be the safe answer.
            AnnotationValue::Json(literal) => match serde_json::from_str::<&str>(literal) {
                Ok(text) => Cow::Borrowed(text),
                Err(_) => Cow::Owned(serde_json::from_str(literal).unwrap_or_default()),
            },
        }
    }
}

impl<'a> Annotations<'a> {
    /// The value under `key`, decoded.
    pub fn get(&self, key: &str) -> Option<Cow<'_, str>> {
        self.0.get(key).map(AnnotationValue::decode)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The same annotations, owning their strings.
    pub fn into_owned(self) -> Annotations<'static> {
        let owned = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        Annotations(
            self.0
                .into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        AnnotationValue::Text(t) => AnnotationValue::Text(owned(t)),
                        AnnotationValue::Json(j) => AnnotationValue::Json(owned(j)),
                    };
                    (owned(k), v)
                })
                .collect(),
        )
    }
}

impl From<BTreeMap<String, String>> for Annotations<'_> {
    fn from(map: BTreeMap<String, String>) -> Self {
        Annotations(
            map.into_iter()
                .map(|(k, v)| (Cow::Owned(k), AnnotationValue::Text(Cow::Owned(v))))
                .collect(),
        )
    }
}

/// Equal when the same keys hold the same decoded values, however each side was read.
impl PartialEq for Annotations<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((ka, va), (kb, vb))| ka == kb && va.decode() == vb.decode())
    }
}

impl Eq for Annotations<'_> {}

impl<'de: 'a, 'a> Deserialize<'de> for Annotations<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Annotations<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut entries = BTreeMap::new();
                while let Some((key, Literal(value))) = map.next_entry::<BorrowedKey<'de>, _>()? {
                    // A later duplicate wins, as in the value path.
                    entries.insert(key.0, AnnotationValue::Json(value));
                }
                Ok(Annotations(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// A map key, borrowed from the input unless it has escapes.
#[derive(Deserialize)]
#[serde(transparent)]
struct BorrowedKey<'a>(#[serde(borrow)] Cow<'a, str>);

/// A JSON string literal kept undecoded; any other JSON value is refused (so the value path
/// can name the field).
struct Literal<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Literal<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <&'de serde_json::value::RawValue>::deserialize(deserializer)?;
        if raw.get().starts_with('"') {
            Ok(Literal(Cow::Borrowed(raw.get())))
        } else {
            Err(serde::de::Error::custom("annotation value is not a string"))
        }
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
                        name: Cow::Borrowed(name),
                        value: e.get("value").and_then(Value::as_str).map(Cow::Borrowed),
                    })
                })
                .collect::<Result<Vec<_>, PodShapeError>>()?,
        ),
        Some(_) => return Err(shape(format!("{path}/env"), "is not a list")),
    };
    Ok(ContainerView {
        list,
        index,
        name: Cow::Borrowed(name),
        env,
    })
}

/// The fields of a pod the engine reads, as a type to embed in a larger request: deserializing
/// it skips everything else in the pod. [`PodFields::into_view`] checks what is required.
#[derive(Deserialize)]
#[serde(transparent)]
pub struct PodFields<'a>(#[serde(borrow)] Obj<SlimPod<'a>>);

impl<'a> PodFields<'a> {
    /// The view of the pod, or which required field is missing.
    pub fn into_view(self) -> Result<PodView<'a>, PodShapeError> {
        self.0.0.into_view()
    }
}

/// A struct read only from a JSON object: serde's derive also accepts arrays (fields by
/// position), which a pod's parts never are.
struct Obj<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectOnly<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(ObjectOnly(std::marker::PhantomData))
            .map(Obj)
    }
}

/// The fields of a pod the engine reads, deserialized straight from bytes; everything else
/// is skipped. Strings borrow from the input unless they contain escapes.
#[derive(Deserialize)]
struct SlimPod<'a> {
    #[serde(borrow, default)]
    metadata: Option<Obj<SlimMeta<'a>>>,
    #[serde(borrow, default)]
    spec: Option<Obj<SlimSpec<'a>>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMeta<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    generate_name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    namespace: Option<Cow<'a, str>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(borrow, default)]
    annotations: Option<Annotations<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimSpec<'a> {
    #[serde(borrow, default)]
    init_containers: Option<Vec<Obj<SlimContainer<'a>>>>,
    #[serde(borrow, default)]
    containers: Option<Vec<Obj<SlimContainer<'a>>>>,
}

#[derive(Deserialize)]
struct SlimContainer<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    env: Option<Vec<Obj<SlimEnv<'a>>>>,
}

#[derive(Deserialize)]
struct SlimEnv<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    value: Option<Cow<'a, str>>,
}

impl<'a> SlimPod<'a> {
    fn into_view(self) -> Result<PodView<'a>, PodShapeError> {
        let Obj(spec) = self.spec.ok_or_else(|| shape("/spec", "is missing"))?;
        let main = spec
            .containers
            .ok_or_else(|| shape("/spec/containers", "is missing"))?;
        let lists = [
            (
                ContainerList::Init,
                spec.init_containers.unwrap_or_default(),
            ),
            (ContainerList::Main, main),
        ];
        let containers = lists
            .into_iter()
            .flat_map(|(list, items)| {
                items
                    .into_iter()
                    .enumerate()
                    .map(move |(index, Obj(c))| ContainerView {
                        list,
                        index,
                        name: c.name,
                        env: c.env.map(|env| {
                            env.into_iter()
                                .map(|Obj(e)| EnvEntry {
                                    name: e.name,
                                    value: e.value,
                                })
                                .collect()
                        }),
                    })
            })
            .collect();
        let non_empty = |c: Option<Cow<'a, str>>| c.filter(|s| !s.is_empty());
        let (has_metadata, name, generate_name, namespace, labels, annotations) =
            match self.metadata {
                Some(Obj(m)) => (
                    true,
                    non_empty(m.name),
                    non_empty(m.generate_name),
                    non_empty(m.namespace),
                    m.labels,
                    m.annotations,
                ),
                None => (false, None, None, None, None, None),
            };
        Ok(PodView {
            name,
            generate_name,
            namespace,
            has_metadata,
            labels,
            annotations,
            containers,
        })
    }
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
            .map(|c| (c.list, c.index, c.name.as_ref()))
            .collect();
        assert_eq!(
            names,
            [
                (ContainerList::Init, 0, "init"),
                (ContainerList::Main, 0, "app")
            ]
        );
        assert!(view.containers[0].env.is_none());
        assert_eq!(
            view.containers[1].env_var("A").unwrap().value.as_deref(),
            Some("1")
        );
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
            let bytes = pod.to_string().into_bytes();
            assert_eq!(
                PodView::from_json(&bytes).unwrap_err().path,
                path,
                "bytes: {pod}"
            );
        }
    }

    #[test]
    fn bytes_and_values_read_the_same_pod() {
        let pods = [
            json!({"metadata": {"name": "p", "namespace": "db", "labels": {"a": "b"}, "annotations": {"x": "y"}, "other": [1]},
                   "spec": {"initContainers": [{"name": "i", "env": [{"name": "E", "value": "v\\u00e9"}]}],
                            "containers": [{"name": "c", "env": [{"name": "N", "value": 5}, {"name": "F", "valueFrom": {}}], "image": "x"}]}}),
            json!({"metadata": {"generateName": "g-", "name": ""}, "spec": {"containers": [{"name": "c", "env": null}], "initContainers": null}}),
            json!({"spec": {"containers": []}}),
        ];
        for pod in pods {
            let bytes = pod.to_string().into_bytes();
            assert_eq!(
                PodView::from_json(&bytes).unwrap(),
                PodView::parse(&pod).unwrap(),
                "{pod}"
            );
        }
        // Duplicate keys: the fast path refuses them, the value path keeps the last one.
        let dup = br#"{"spec": {"containers": [{"name": "a", "name": "b"}]}}"#;
        assert_eq!(PodView::from_json(dup).unwrap().containers[0].name, "b");
    }
}
