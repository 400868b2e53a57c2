//! Property tests over generated pods: the patch always applies, is idempotent, and touches
//! nothing but container env, labels and annotations.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

use egress_webhook::config::Config;
use egress_webhook::engine::pod::PodView;
use egress_webhook::engine::{ClusterFacts, Injector, Operation, PodContext};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Env names the generator draws from: ours in both cases, plus unrelated ones.
const ENV_NAMES: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "HTTP_PROXY",
    "PGDATA",
    "FOO",
];
/// Labels that select (or nearly select) the built-in profiles, plus our own label.
const LABELS: &[(&str, &str)] = &[
    ("cnpg.io/podRole", "instance"),
    ("cnpg.io/podRole", "pooler"),
    ("cnpg.io/cluster", "pg"),
    ("cnpg.io/jobRole", "full-recovery"),
    ("component", "velero"),
    ("app.kubernetes.io/name", "velero"),
    ("name", "node-agent"),
    ("egress-gate.io/client", "false"),
    ("egress-gate.io/client", "true"),
    ("app", "harbor"),
];
const INJECT_VALUES: &[&str] = &["true", "false", "maybe"];

fn env_entry() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(ENV_NAMES),
        prop_oneof!["[a-z:/.]{0,12}".prop_map(Some), Just(None)],
    )
        .prop_map(|(name, value)| match value {
            Some(v) => json!({"name": name, "value": v}),
            None => {
                json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
            }
        })
}

fn container(name: String) -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::collection::vec(env_entry(), 0..4)),
        any::<bool>(),
    )
        .prop_map(move |(env, extra)| {
            let mut c = Map::new();
            c.insert("name".into(), json!(name));
            c.insert("image".into(), json!("registry.example/app:1"));
            if let Some(env) = env {
                c.insert("env".into(), Value::Array(env));
            }
            if extra {
                c.insert("futureField".into(), json!({"kept": [1, 2, 3]}));
            }
            Value::Object(c)
        })
}

fn containers(prefix: &'static str, min: usize) -> impl Strategy<Value = Vec<Value>> {
    (min..4usize).prop_flat_map(move |n| {
        (0..n)
            .map(|i| container(format!("{prefix}{i}")))
            .collect::<Vec<_>>()
    })
}

fn pod() -> impl Strategy<Value = Value> {
    let labels = prop::option::of(prop::collection::vec(prop::sample::select(LABELS), 0..4));
    let annotations = prop::option::of((
        prop::option::of(prop::sample::select(INJECT_VALUES)),
        any::<bool>(),
    ));
    (
        any::<bool>(),
        labels,
        annotations,
        containers("c", 1),
        prop::option::of(containers("init", 0)),
    )
        .prop_map(|(has_metadata, labels, annotations, main, init)| {
            let mut pod = Map::new();
            if has_metadata || labels.is_some() || annotations.is_some() {
                let mut metadata = Map::new();
                metadata.insert("generateName".into(), json!("gen-"));
                if let Some(labels) = labels {
                    let map: Map<String, Value> = labels
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), json!(v)))
                        .collect();
                    metadata.insert("labels".into(), Value::Object(map));
                }
                if let Some((inject, stale_status)) = annotations {
                    let mut map = Map::new();
                    if let Some(v) = inject {
                        map.insert("egress-gate.io/inject".into(), json!(v));
                    }
                    if stale_status {
                        map.insert(
                            "egress-gate.io/status".into(),
                            json!("{\"profile\":\"old\"}"),
                        );
                    }
                    map.insert("cnpg.io/podSpec".into(), json!("{\"containers\":[]}"));
                    metadata.insert("annotations".into(), Value::Object(map));
                }
                pod.insert("metadata".into(), Value::Object(metadata));
            }
            let mut spec = Map::new();
            spec.insert("containers".into(), Value::Array(main));
            if let Some(init) = init {
                spec.insert("initContainers".into(), Value::Array(init));
            }
            spec.insert("volumes".into(), json!([{"name": "data", "emptyDir": {}}]));
            pod.insert("spec".into(), Value::Object(spec));
            Value::Object(pod)
        })
}

/// The pod without the fields the webhook may change.
fn outside_of_our_fields(pod: &Value) -> Value {
    let mut pod = pod.clone();
    if let Some(m) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("labels");
        m.remove("annotations");
        if m.is_empty() {
            pod.as_object_mut().unwrap().remove("metadata");
        }
    }
    for list in ["containers", "initContainers"] {
        if let Some(items) = pod["spec"].get_mut(list).and_then(Value::as_array_mut) {
            for c in items {
                c.as_object_mut().unwrap().remove("env");
            }
        }
    }
    pod
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn patch_applies_is_idempotent_and_stays_in_its_fields(pod in pod(), http_proxy in any::<bool>()) {
        let config = Config::from_yaml(&format!("injectHTTPProxy: {http_proxy}\n")).unwrap();
        let injector = Injector::new(&config, &ClusterFacts::from_config(&config));
        let ctx = PodContext { namespace: "db", operation: Operation::Create, services: &[] };

        let first = injector.review(&pod, &ctx).unwrap();
        // The admission path reads bytes; it must see the same pod as the value path.
        let bytes = pod.to_string().into_bytes();
        prop_assert_eq!(PodView::from_json(&bytes).unwrap(), PodView::parse(&pod).unwrap());
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &first.patch.operations().unwrap()).unwrap();

        let second = injector.review(&patched, &ctx).unwrap();
        prop_assert!(second.patch.is_empty(), "second review patched: {:?}", second.patch);
        prop_assert_eq!(outside_of_our_fields(&pod), outside_of_our_fields(&patched));

        // Env entries the pod had are all still there, unchanged and in order.
        for list in ["containers", "initContainers"] {
            for (before, after) in pod["spec"][list].as_array().into_iter().flatten().zip(patched["spec"][list].as_array().into_iter().flatten()) {
                let before = before["env"].as_array().cloned().unwrap_or_default();
                let after = after["env"].as_array().cloned().unwrap_or_default();
                prop_assert_eq!(&after[..before.len()], &before[..]);
            }
        }
        if first.decision.profile().is_some() {
            prop_assert_eq!(&patched["metadata"]["labels"]["egress-gate.io/client"], "true");
        } else {
            prop_assert!(first.patch.is_empty());
        }
    }
}
