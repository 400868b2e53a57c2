//! Engine behaviour beyond the golden files: reinvocation, user-set variables, pointers.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

use egress_webhook::config::Config;
use egress_webhook::engine::{ClusterFacts, Decision, Injector, Mutation, Operation, PodContext};
use serde_json::{Value, json};

fn injector(yaml: &str) -> Injector {
    let config = Config::from_yaml(yaml).unwrap();
    Injector::new(&config, &ClusterFacts::from_config(&config))
}

fn review(injector: &Injector, pod: &Value) -> Mutation {
    let ctx = PodContext {
        namespace: "db",
        operation: Operation::Create,
        services: &[],
    };
    injector.review(pod, &ctx).unwrap()
}

fn apply(pod: &Value, m: &Mutation) -> Value {
    let mut out = pod.clone();
    json_patch::patch(&mut out, &m.patch.operations().unwrap()).unwrap();
    out
}

fn env_names(pod: &Value, list: &str, i: usize) -> Vec<String> {
    pod["spec"][list][i]["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn cnpg_pod() -> Value {
    json!({
        "metadata": {"name": "pg-1", "namespace": "db", "labels": {"cnpg.io/cluster": "pg", "cnpg.io/podRole": "instance"}},
        "spec": {"containers": [{"name": "postgres", "env": [{"name": "PGDATA", "value": "/d"}]}]}
    })
}

#[test]
fn a_container_added_by_a_later_webhook_is_injected_on_reinvocation() {
    let inj = injector("");
    let first = review(&inj, &cnpg_pod());
    let mut pod = apply(&cnpg_pod(), &first);
    // Another webhook appends a sidecar after ours ran; the API server calls us again.
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "late-sidecar"}));
    let second = review(&inj, &pod);
    let paths: Vec<String> = second
        .patch
        .operations()
        .unwrap()
        .iter()
        .map(op_path)
        .collect();
    assert_eq!(
        paths,
        [
            "/metadata/annotations/egress-gate.io~1status",
            "/spec/containers/1/env"
        ],
        "only the new container and the status change"
    );
    let pod = apply(&pod, &second);
    assert_eq!(
        env_names(&pod, "containers", 1),
        ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"]
    );
    let status = status_of(&pod);
    assert_eq!(status["containers"], json!(["postgres", "late-sidecar"]));
    assert!(review(&inj, &pod).patch.is_empty());
}

#[test]
fn values_an_earlier_call_set_are_updated_on_reinvocation_when_no_proxy_changed() {
    let first = injector("");
    let pod = apply(&cnpg_pod(), &review(&first, &cnpg_pod()));
    // Between the two calls NO_PROXY changed (a reloaded config here; a new Service in the
    // namespace with discovery), and a later webhook added a sidecar.
    let second = injector("noProxy: [.corp.example]\n");
    let mut pod2 = pod.clone();
    pod2["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "late-sidecar"}));
    let m = review(&second, &pod2);
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    let paths: Vec<String> = m.patch.operations().unwrap().iter().map(op_path).collect();
    assert_eq!(
        paths,
        [
            "/metadata/annotations/egress-gate.io~1status",
            "/spec/containers/0/env/3/value",
            "/spec/containers/0/env/4/value",
            "/spec/containers/1/env"
        ]
    );
    let out = apply(&pod2, &m);
    for i in [0, 1] {
        let env = out["spec"]["containers"][i]["env"].as_array().unwrap();
        let no_proxy: Vec<&str> = env
            .iter()
            .filter(|e| e["name"] == "NO_PROXY" || e["name"] == "no_proxy")
            .map(|e| e["value"].as_str().unwrap())
            .collect();
        assert_eq!(no_proxy.len(), 2, "container {i}");
        assert!(
            no_proxy.iter().all(|v| v.ends_with(",.corp.example")),
            "{no_proxy:?}"
        );
    }
    let status = status_of(&out);
    assert_eq!(status["containers"], json!(["postgres", "late-sidecar"]));
    assert_eq!(status.get("kept"), None);
    assert!(review(&second, &out).patch.is_empty());
}

#[test]
fn values_changed_by_someone_else_after_our_call_are_theirs_to_keep() {
    let inj = injector("");
    let mut pod = apply(&cnpg_pod(), &review(&inj, &cnpg_pod()));
    // Another webhook rewrote NO_PROXY in both cases after ours ran.
    for e in pod["spec"]["containers"][0]["env"].as_array_mut().unwrap() {
        if e["name"] == "NO_PROXY" || e["name"] == "no_proxy" {
            e["value"] = json!(".corp.example");
        }
    }
    let m = review(&inj, &pod);
    assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
    assert!(m.warnings[0].contains("keeps its own NO_PROXY and no_proxy"));
    let out = apply(&pod, &m);
    let status = status_of(&out);
    assert_eq!(
        status["kept"],
        json!({"postgres": ["NO_PROXY", "no_proxy"]})
    );
    let env = out["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        env.iter()
            .filter(|e| e["name"] == "NO_PROXY" || e["name"] == "no_proxy")
            .all(|e| e["value"] == ".corp.example")
    );
}

fn status_of(pod: &Value) -> Value {
    let text = pod["metadata"]["annotations"]["egress-gate.io/status"]
        .as_str()
        .unwrap();
    serde_json::from_str(text).unwrap()
}

fn op_path(op: &json_patch::PatchOperation) -> String {
    serde_json::to_value(op).unwrap()["path"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn either_case_set_by_the_user_keeps_the_whole_pair() {
    for user_var in ["HTTPS_PROXY", "https_proxy"] {
        let mut pod = cnpg_pod();
        pod["spec"]["containers"][0]["env"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": user_var, "value": "http://corp:8080"}));
        let m = review(&injector(""), &pod);
        let out = apply(&pod, &m);
        let names = env_names(&out, "containers", 0);
        assert_eq!(
            names,
            ["PGDATA", user_var, "NO_PROXY", "no_proxy"],
            "{user_var}"
        );
        assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
        assert!(
            m.warnings[0].contains(user_var) && m.warnings[0].contains("\"postgres\""),
            "{}",
            m.warnings[0]
        );
        // The user's value is never touched.
        assert!(out.to_string().contains("http://corp:8080"));
    }
}

#[test]
fn a_value_from_reference_counts_as_set_by_the_user() {
    let mut pod = cnpg_pod();
    pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "no_proxy", "valueFrom": {"configMapKeyRef": {"name": "proxy", "key": "no_proxy"}}}));
    let m = review(&injector(""), &pod);
    let out = apply(&pod, &m);
    assert_eq!(
        env_names(&out, "containers", 0),
        ["PGDATA", "no_proxy", "HTTPS_PROXY", "https_proxy"]
    );
}

#[test]
fn opt_out_wins_over_profiles_and_opt_in_selects_unlabelled_pods() {
    let mut pod = cnpg_pod();
    pod["metadata"]["annotations"] = json!({"egress-gate.io/inject": "false"});
    let m = review(&injector(""), &pod);
    assert_eq!(m.decision, Decision::OptedOut);
    assert!(m.patch.is_empty());

    let pod = json!({"metadata": {"annotations": {"egress-gate.io/inject": "true"}}, "spec": {"containers": [{"name": "app"}]}});
    let m = review(&injector(""), &pod);
    assert_eq!(
        m.decision,
        Decision::Injected {
            profile: "annotation".into()
        }
    );
}

#[test]
fn unknown_annotation_value_warns_and_falls_back_to_profiles() {
    let pod = json!({"metadata": {"annotations": {"egress-gate.io/inject": "yes"}}, "spec": {"containers": [{"name": "app"}]}});
    let m = review(&injector(""), &pod);
    assert_eq!(m.decision, Decision::NotSelected);
    assert!(m.warnings[0].contains("\"yes\""), "{:?}", m.warnings);
}

#[test]
fn a_client_label_set_to_something_else_is_replaced_with_a_warning() {
    let mut pod = cnpg_pod();
    pod["metadata"]["labels"]["egress-gate.io/client"] = json!("false");
    let m = review(&injector(""), &pod);
    let out = apply(&pod, &m);
    assert_eq!(out["metadata"]["labels"]["egress-gate.io/client"], "true");
    assert!(
        m.warnings.iter().any(|w| w.contains("replaced")),
        "{:?}",
        m.warnings
    );
}

#[test]
fn a_pod_without_metadata_gets_labels_and_annotations_in_one_add() {
    let pod = json!({"spec": {"containers": [{"name": "app"}]}});
    let m = review(&injector("profiles: [{name: all, selector: {}}]"), &pod);
    let ops = serde_json::to_value(&m.patch).unwrap();
    assert_eq!(ops[0]["op"], "add");
    assert_eq!(ops[0]["path"], "/metadata");
    let out = apply(&pod, &m);
    assert_eq!(out["metadata"]["labels"]["egress-gate.io/client"], "true");
    assert!(out["metadata"]["annotations"]["egress-gate.io/status"].is_string());
}

#[test]
fn pointers_escape_tilde_and_slash() {
    let inj = injector(
        "clientLabel: example.com/egress-client\nstatusAnnotation: audit.example.com/egress.status\n",
    );
    let m = review(&inj, &cnpg_pod());
    let ops = serde_json::to_value(&m.patch).unwrap();
    assert_eq!(
        ops[0]["path"], "/metadata/labels/example.com~1egress-client",
        "{ops}"
    );
    assert_eq!(ops[1]["path"], "/metadata/annotations", "{ops}");
    let out = apply(&cnpg_pod(), &m);
    assert_eq!(
        out["metadata"]["labels"]["example.com/egress-client"],
        "true"
    );
    // Label keys cannot hold `~`, but the pointer type the engine builds with must escape it
    // too (RFC 6901), so check the encoding the engine relies on.
    let p = jsonptr::PointerBuf::from_tokens(["metadata", "annotations", "a~b/c"]);
    assert_eq!(p.as_str(), "/metadata/annotations/a~0b~1c");
}

#[test]
fn only_create_is_mutated() {
    for op in [Operation::Update, Operation::Delete, Operation::Connect] {
        let ctx = PodContext {
            namespace: "db",
            operation: op,
            services: &[],
        };
        let m = injector("").review(&cnpg_pod(), &ctx).unwrap();
        assert_eq!(m.decision, Decision::NotCreate);
        assert!(m.patch.is_empty());
    }
}

#[test]
fn malformed_pods_are_reported_not_panicked_on() {
    let pod = json!({"metadata": {"labels": {"cnpg.io/podRole": "instance"}}, "spec": {"containers": [{"name": "a", "env": "oops"}]}});
    let ctx = PodContext {
        namespace: "db",
        operation: Operation::Create,
        services: &[],
    };
    let err = injector("").review(&pod, &ctx).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pod field /spec/containers/0/env is not a list"
    );
}

#[test]
fn peer_services_and_namespace_services_are_in_no_proxy_before_extras() {
    let inj = injector("noProxy: [.corp.example]\n");
    let services = vec!["pg-rw".to_string(), "reports".to_string()];
    let ctx = PodContext {
        namespace: "db",
        operation: Operation::Create,
        services: &services,
    };
    let m = inj.review(&cnpg_pod(), &ctx).unwrap();
    let out = apply(&cnpg_pod(), &m);
    let env = &out["spec"]["containers"][0]["env"];
    let no_proxy = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NO_PROXY")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    assert!(
        no_proxy.ends_with(",pg-rw.db,pg-rw,pg-ro.db,pg-ro,pg-r.db,pg-r,pg-any.db,pg-any,reports.db,reports,.corp.example"),
        "{no_proxy}"
    );
    assert!(no_proxy.starts_with("localhost,127.0.0.1,::1,10.96.0.1,kubernetes,kubernetes.default,.svc,.svc.cluster.local,.cluster.local,10.96.0.0/12,10.244.0.0/16,"));
}
