//! Golden files: for every fixture pod, the exact patch and warnings the engine produces.
//!
//! Inputs are in `fixtures/pods/` (shaped like the API server's `request.object`), expected
//! answers in `fixtures/expected/`. After an intended change run `make golden` and review
//! the diff of `fixtures/expected/`.
//!
//! Beyond the exact bytes, every case checks what must hold for any pod: the patch applies
//! with `json-patch`, the result is a valid `k8s_openapi` Pod, both cases of each variable
//! carry the same value, and the engine on its own output returns no operations.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns; a panic is a failed test

use std::path::{Path, PathBuf};

use egress_webhook::config::Config;
use egress_webhook::engine::{ClusterFacts, Injector, Mutation, Operation, PodContext};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// One golden case: which pod, under which configuration, with which Services known.
struct Case {
    name: &'static str,
    pod: &'static str,
    config: Option<&'static str>,
    services: &'static [&'static str],
    decision: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "cnpg-instance",
        pod: "cnpg-instance",
        config: None,
        services: &["harbor-core", "pg-rw"],
        decision: "injected",
    },
    Case {
        name: "cnpg-instance-http-proxy",
        pod: "cnpg-instance",
        config: Some("http-proxy-and-extras"),
        services: &[],
        decision: "injected",
    },
    Case {
        name: "cnpg-full-recovery-job",
        pod: "cnpg-full-recovery-job",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "cnpg-pooler",
        pod: "cnpg-pooler",
        config: None,
        services: &[],
        decision: "not-selected",
    },
    Case {
        name: "cnpg-opt-out",
        pod: "cnpg-opt-out",
        config: None,
        services: &[],
        decision: "opted-out",
    },
    Case {
        name: "velero-install-server",
        pod: "velero-install-server",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "velero-helm-server",
        pod: "velero-helm-server",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "velero-node-agent",
        pod: "velero-node-agent",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "velero-helm-node-agent",
        pod: "velero-helm-node-agent",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "velero-exposer-pod",
        pod: "velero-exposer-pod",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "velero-maintenance-job",
        pod: "velero-maintenance-job",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "plain-app",
        pod: "plain-app",
        config: None,
        services: &["harbor-core", "pg-rw"],
        decision: "not-selected",
    },
    Case {
        name: "annotation-opt-in",
        pod: "annotation-opt-in",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "user-https-proxy",
        pod: "user-https-proxy",
        config: None,
        services: &[],
        decision: "injected",
    },
    Case {
        name: "bare-pod",
        pod: "bare-pod",
        config: Some("catch-all"),
        services: &[],
        decision: "injected",
    },
    Case {
        name: "generate-name-pod",
        pod: "generate-name-pod",
        config: None,
        services: &[],
        decision: "injected",
    },
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn injector(config: Option<&str>) -> Injector {
    let config = match config {
        Some(name) => Config::load(&fixtures().join(format!("configs/{name}.yaml"))).unwrap(),
        None => Config::default(),
    };
    Injector::new(&config, &ClusterFacts::from_config(&config))
}

fn review(injector: &Injector, pod: &Value, services: &[String]) -> Mutation {
    let namespace = pod["metadata"]["namespace"]
        .as_str()
        .expect("fixtures name their namespace");
    let ctx = PodContext {
        namespace,
        operation: Operation::Create,
        services,
    };
    injector
        .review(pod, &ctx)
        .expect("fixture pods are well-formed")
}

fn as_golden(m: &Mutation) -> Value {
    json!({
        "decision": m.decision.as_str(),
        "profile": m.decision.profile(),
        "warnings": m.warnings,
        "patch": m.patch,
    })
}

#[test]
fn golden_patches() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in CASES {
        let pod = read_json(&fixtures().join(format!("pods/{}.json", case.pod)));
        let injector = injector(case.config);
        let services: Vec<String> = case.services.iter().map(|s| s.to_string()).collect();
        let mutation = review(&injector, &pod, &services);
        assert_eq!(
            mutation.decision.as_str(),
            case.decision,
            "{}: decision",
            case.name
        );

        let actual = serde_json::to_string_pretty(&as_golden(&mutation)).unwrap() + "\n";
        let path = fixtures().join(format!("expected/{}.json", case.name));
        if update {
            std::fs::write(&path, &actual).unwrap();
        } else {
            let expected = std::fs::read_to_string(&path).unwrap_or_default();
            if expected != actual {
                failures.push(format!(
                    "--- {} (run `make golden` to accept)\n{actual}",
                    case.name
                ));
            }
        }

        check_invariants(case.name, &injector, &pod, &mutation, &services);
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}

/// What must hold for every case, whatever the exact bytes.
fn check_invariants(
    name: &str,
    injector: &Injector,
    pod: &Value,
    mutation: &Mutation,
    services: &[String],
) {
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &mutation.patch.operations().unwrap())
        .unwrap_or_else(|e| panic!("{name}: patch does not apply: {e}"));
    let typed: Pod = serde_json::from_value(patched.clone())
        .unwrap_or_else(|e| panic!("{name}: not a Pod after patching: {e}"));

    let again = review(injector, &patched, services);
    assert!(
        again.patch.is_empty(),
        "{name}: second review not empty: {:?}",
        again.patch
    );
    assert_eq!(
        again.decision, mutation.decision,
        "{name}: decision changed on reinvocation"
    );

    let spec = typed.spec.expect("pods have a spec");
    let containers = spec
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers);
    let labels = typed.metadata.labels.unwrap_or_default();
    let annotations = typed.metadata.annotations.unwrap_or_default();
    if mutation.decision.profile().is_none() {
        assert!(
            mutation.patch.is_empty(),
            "{name}: not injected but patched"
        );
        return;
    }
    assert_eq!(
        labels.get("egress-gate.io/client").map(String::as_str),
        Some("true"),
        "{name}: label"
    );
    let status: Value = serde_json::from_str(&annotations["egress-gate.io/status"]).unwrap();
    let mut carrying = Vec::new();
    for c in containers {
        let env = c.env.unwrap_or_default();
        let get = |n: &str| env.iter().find(|e| e.name == n).map(|e| e.value.clone());
        for (upper, lower) in [("HTTPS_PROXY", "https_proxy"), ("NO_PROXY", "no_proxy")] {
            if let (Some(u), Some(l)) = (get(upper), get(lower)) {
                assert!(
                    u.is_some() && u == l || !mutation.warnings.is_empty(),
                    "{name}/{}: {upper} differs from {lower}",
                    c.name
                );
            }
        }
        let no_proxy = get("NO_PROXY").flatten().unwrap_or_default();
        assert!(
            !no_proxy.contains("blob.core.windows.net"),
            "{name}: blob host in NO_PROXY"
        );
        if get("HTTPS_PROXY").flatten().as_deref() == Some(injector.config().proxy_url.as_str())
            || no_proxy.starts_with("localhost,")
        {
            carrying.push(c.name.clone());
        }
    }
    assert_eq!(
        status["containers"],
        json!(carrying),
        "{name}: status lists the injected containers"
    );
}
