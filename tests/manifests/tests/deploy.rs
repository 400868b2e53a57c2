//! `deploy/` keeps egress-gate's contracts: everything renders, the webhook and proxy run as
//! decided and hardened, RBAC is exactly what the code calls, the configs load with the real
//! loaders, and objects of CRD kinds carry the fields their CRDs require.
//!
//! OpenAPI validation of the built-in kinds and `egress-webhook check-config` run in
//! `scripts/test-manifests.sh`.

// Test code: a panic is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use egress_gate_manifests::{
    doc_files, find, id, kustomizations, manifest_files, parse_file, render, repo_root, require,
};
use serde_json::{Value, json};

const NS: &str = "egress-gate";
const IMAGE: &str = "ghcr.io/egress-gate/egress-gate:0.1.0";

/// The rendered output of a kustomization directory, relative to the repo root.
fn rendered(dir: &str) -> Vec<Value> {
    render(&repo_root().join(dir)).unwrap()
}

fn base() -> &'static [Value] {
    static BASE: OnceLock<Vec<Value>> = OnceLock::new();
    BASE.get_or_init(|| rendered("deploy/base"))
}

/// The element of the list `list` whose `key` equals `value`.
fn item<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|entry| entry[key] == value)
        .unwrap_or_else(|| panic!("no entry with {key} = {value:?} in {list}"))
}

/// Checks that Service `name` selects `deployment`'s pods and sends `port` to the container
/// port named `target`, which must be `container_port`.
fn assert_service_fronts(
    deployment: &Value,
    name: &str,
    port: u16,
    target: &str,
    container_port: u16,
) {
    let svc = find(base(), "Service", name).unwrap();
    let svc_port = &svc["spec"]["ports"][0];
    assert_eq!(svc_port["port"], port, "Service {name}");
    assert_eq!(svc_port["targetPort"], target, "Service {name}");
    assert_eq!(
        svc["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"],
        "Service {name}"
    );
    let ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert_eq!(
        item(ports, "name", target)["containerPort"],
        container_port,
        "Service {name}"
    );
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn every_kustomization_renders_to_well_formed_unique_objects() {
    let dirs = kustomizations();
    let names: Vec<String> = dirs
        .iter()
        .map(|d| d.strip_prefix(repo_root()).unwrap().display().to_string())
        .collect();
    for expected in [
        "deploy/base",
        "deploy/cert-manager",
        "deploy/netpol/cilium",
        "deploy/netpol/cilium/in-cluster",
        "deploy/netpol/cilium/external-fqdn",
        "deploy/netpol/cilium/external-cidr",
        "deploy/netpol/cilium/external-entra-arm",
        "deploy/netpol/cilium/aks",
        "deploy/netpol/kubernetes",
        "deploy/envoy-gateway",
        "deploy/envoy-gateway/webhook-overlay",
        "deploy/examples/cnpg",
        "deploy/examples/cnpg-legacy",
        "deploy/examples/namespace",
        "deploy/examples/velero",
        "deploy/blob-gateway",
        "deploy/blob-gateway/netpol/cilium",
        "deploy/blob-gateway/netpol/kubernetes",
        "deploy/examples/cnpg-blob-gateway",
        "deploy/examples/cnpg-legacy-blob-gateway",
        "deploy/examples/velero-blob-gateway",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    for dir in &dirs {
        let docs = render(dir).unwrap();
        assert!(!docs.is_empty(), "{} renders nothing", dir.display());
        let mut seen = BTreeSet::new();
        for doc in &docs {
            for field in ["apiVersion", "kind", "metadata.name"] {
                require(doc, field)
                    .unwrap_or_else(|e| panic!("{}: {}: {e}", dir.display(), id(doc)));
            }
            let key = (
                doc["kind"].to_string(),
                doc["metadata"]["namespace"].to_string(),
                doc["metadata"]["name"].to_string(),
            );
            assert!(seen.insert(key), "{}: {} twice", dir.display(), id(doc));
        }
    }
}

/// Required fields of the CRD-based kinds we ship, kept by hand from each project's CRD
/// (`required:` lists and the fields their controllers cannot work without).
fn crd_required(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    Some(match (api_version, kind) {
        ("cilium.io/v2", "CiliumNetworkPolicy") => &["metadata.namespace", "spec.endpointSelector"],
        ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => {
            &["spec.endpointSelector", "spec.egress[]"]
        }
        ("gateway.networking.k8s.io/v1", "Gateway") => &[
            "spec.gatewayClassName",
            "spec.listeners[].name",
            "spec.listeners[].port",
            "spec.listeners[].protocol",
        ],
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => &[
            "spec.parentRefs[].name",
            "spec.hostnames[]",
            "spec.rules[].backendRefs[].name",
        ],
        ("gateway.envoyproxy.io/v1alpha1", "EnvoyProxy") => &["spec.provider.type"],
        ("gateway.envoyproxy.io/v1alpha1", "Backend") => &[
            "spec.endpoints[].fqdn.hostname",
            "spec.endpoints[].fqdn.port",
        ],
        ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy") => &[
            "spec.targetRefs[].group",
            "spec.targetRefs[].kind",
            "spec.targetRefs[].name",
        ],
        ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy") => &[
            "spec.targetRefs[].group",
            "spec.targetRefs[].kind",
            "spec.targetRefs[].name",
        ],
        ("postgresql.cnpg.io/v1", "Cluster") => &["spec.instances", "spec.storage.size"],
        ("postgresql.cnpg.io/v1", "ScheduledBackup") => &["spec.schedule", "spec.cluster.name"],
        ("barmancloud.cnpg.io/v1", "ObjectStore") => &["spec.configuration.destinationPath"],
        ("cert-manager.io/v1", "Issuer") => &["spec"],
        ("cert-manager.io/v1", "Certificate") => &["spec.secretName", "spec.issuerRef.name"],
        // prometheus-operator: PodMonitor requires `selector`, a rule group `name` and
        // `rules`, a rule `expr`.
        ("monitoring.coreos.com/v1", "PodMonitor") => &["spec.selector"],
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            &["spec.groups[].name", "spec.groups[].rules[].expr"]
        }
        ("velero.io/v1", "BackupStorageLocation") => {
            &["spec.provider", "spec.objectStorage.bucket"]
        }
        _ => return None,
    })
}

/// Kinds the Kubernetes OpenAPI schema covers (validated by scripts/test-manifests.sh).
const BUILT_IN: &[&str] = &[
    "Namespace",
    "ServiceAccount",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "MutatingWebhookConfiguration",
    "NetworkPolicy",
];

#[test]
fn crd_objects_carry_their_required_fields() {
    let mut docs: Vec<(String, Value)> = Vec::new();
    for file in manifest_files() {
        for doc in parse_file(&file).unwrap() {
            docs.push((file.display().to_string(), doc));
        }
    }
    for dir in kustomizations() {
        for doc in render(&dir).unwrap() {
            docs.push((dir.display().to_string(), doc));
        }
    }
    let mut crd_kinds = BTreeSet::new();
    for (origin, doc) in &docs {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        // Core groups have no dot (`v1`, `apps/v1`, `policy/v1`) or end in `.k8s.io/v1`.
        let core_group = !api_version.contains('.') || api_version.ends_with(".k8s.io/v1");
        if core_group && BUILT_IN.contains(&kind) {
            continue;
        }
        let required = crd_required(api_version, kind).unwrap_or_else(|| {
            panic!(
                "{origin}: {api_version} {kind}: add its CRD's required fields to crd_required()"
            )
        });
        for field in required {
            require(doc, field).unwrap_or_else(|e| panic!("{origin}: {}: {e}", id(doc)));
        }
        crd_kinds.insert(kind.to_owned());
    }
    // Every CRD family the issue names is present.
    for kind in [
        "CiliumNetworkPolicy",
        "CiliumClusterwideNetworkPolicy",
        "EnvoyProxy",
        "Gateway",
        "HTTPRoute",
        "Backend",
        "BackendTrafficPolicy",
        "ClientTrafficPolicy",
        "Cluster",
        "ObjectStore",
        "BackupStorageLocation",
    ] {
        assert!(crd_kinds.contains(kind), "no {kind} in deploy/");
    }
}

#[test]
fn the_base_installs_what_docs_install_md_describes() {
    let docs = base();
    let kinds: BTreeSet<String> = docs.iter().map(id).collect();
    let expected: BTreeSet<String> = [
        "Namespace/egress-gate",
        "ServiceAccount/egress-webhook",
        "ServiceAccount/egress-proxy",
        "ClusterRole/egress-webhook",
        "ClusterRoleBinding/egress-webhook",
        "Role/egress-webhook",
        "RoleBinding/egress-webhook",
        "ConfigMap/egress-webhook-config",
        "ConfigMap/egress-proxy-config",
        "Deployment/egress-webhook",
        "Deployment/egress-proxy",
        "PodDisruptionBudget/egress-webhook",
        "PodDisruptionBudget/egress-proxy",
        "Service/egress-webhook",
        "Service/egress-proxy",
        "MutatingWebhookConfiguration/egress-gate",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(kinds, expected);
    for doc in docs {
        let cluster_scoped = [
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "MutatingWebhookConfiguration",
        ];
        if !cluster_scoped.contains(&doc["kind"].as_str().unwrap()) {
            assert_eq!(doc["metadata"]["namespace"], NS, "{}", id(doc));
        }
    }
}

/// Checks the hardening both Deployments share and returns the container.
fn hardened_container(deployment: &Value, admin_port: u16) -> &Value {
    let name = id(deployment);
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 2, "{name}");
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{name}"
    );
    let selector = &spec["selector"]["matchLabels"];
    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        [0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname", "{name}");
    assert_eq!(&anti["labelSelector"]["matchLabels"], selector, "{name}");
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{name}");
    let c = &containers[0];
    assert_eq!(c["image"], IMAGE, "{name}");
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(sc["runAsNonRoot"], true, "{name}");
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
    for field in [
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ] {
        require(&c["resources"], field).unwrap_or_else(|e| panic!("{name}: resources{e}"));
    }
    let admin = item(&c["ports"], "name", "admin");
    assert_eq!(admin["containerPort"], admin_port, "{name}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{name}: {probe}");
    }
    let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0);
    assert!(pause > 0, "{name}: preStop sleep");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > pause,
        "{name}: grace period must outlast the preStop pause"
    );

    // A PDB that selects these pods.
    let pdb = find(
        base(),
        "PodDisruptionBudget",
        deployment["metadata"]["name"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        &pdb["spec"]["selector"]["matchLabels"], selector,
        "{name}: PDB selector"
    );
    c
}

/// `--flag value` pairs and bare flags of a container's args.
fn arg_value<'a>(args: &'a [&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1).copied())
}

/// The file a `--config` path names, found through the container's mounts in the ConfigMap.
fn config_from_mount(deployment: &Value, args: &[&str]) -> (String, String) {
    let path = Path::new(arg_value(args, "--config").unwrap());
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("{}: --config is not under a mount", id(deployment)));
    let volume = item(&pod["volumes"], "name", mount["name"].as_str().unwrap());
    let key = path
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap()
        .display()
        .to_string();
    (
        volume["configMap"]["name"].as_str().unwrap().to_owned(),
        key,
    )
}

#[test]
fn webhook_deployment_runs_serve_as_decided() {
    let deployment = find(base(), "Deployment", "egress-webhook").unwrap();
    let c = hardened_container(deployment, 9443);
    assert_eq!(c["command"], json!(["/usr/local/bin/egress-webhook"]));
    assert_eq!(
        strings(&c["args"]),
        [
            "serve",
            "--config",
            "/etc/egress-gate/webhook.yaml",
            "--listen",
            "0.0.0.0:8443",
            "--admin-listen",
            "0.0.0.0:9443",
            "--watch-pods",
            "--self-signed",
            "--secret-name",
            "egress-webhook-tls",
            "--webhook-config-name",
            "egress-gate",
            "--service-name",
            "egress-webhook",
        ]
    );
    let env = &c["env"][0];
    assert_eq!(env["name"], "POD_NAMESPACE");
    assert_eq!(
        env["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "egress-webhook"
    );

    assert_service_fronts(deployment, "egress-webhook", 443, "https", 8443);
}

#[test]
fn proxy_deployment_runs_as_decided() {
    let deployment = find(base(), "Deployment", "egress-proxy").unwrap();
    let c = hardened_container(deployment, 9090);
    assert_eq!(c["command"], json!(["/usr/local/bin/egress-proxy"]));
    assert_eq!(
        strings(&c["args"]),
        [
            "--config",
            "/etc/egress-proxy/proxy.yaml",
            "--listen",
            "0.0.0.0:3128",
            "--admin-listen",
            "0.0.0.0:9090"
        ]
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "the proxy never calls the API"
    );
    assert_service_fronts(deployment, "egress-proxy", 3128, "proxy", 3128);
    // Draining tunnels (drainTimeout, 600 s by default) must fit in the grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace >= 600,
        "grace period {grace}s is shorter than the proxy's drain"
    );
}

#[test]
fn mutating_webhook_configuration_is_as_decided() {
    let mwc = find(base(), "MutatingWebhookConfiguration", "egress-gate").unwrap();
    assert_eq!(
        mwc["metadata"]["annotations"]["admissions.enforcer/disabled"],
        "true"
    );
    let hooks = mwc["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    let w = &hooks[0];
    assert_eq!(w["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(w["sideEffects"], "None");
    assert_eq!(w["timeoutSeconds"], 5);
    assert_eq!(w["reinvocationPolicy"], "IfNeeded");
    assert_eq!(w["failurePolicy"], "Ignore");
    assert_eq!(
        w["clientConfig"]["service"],
        json!({"name": "egress-webhook", "namespace": NS, "path": "/mutate", "port": 443})
    );
    assert!(
        w["clientConfig"]["caBundle"].is_null(),
        "caBundle is the webhook's to set"
    );
    assert_eq!(
        w["rules"],
        json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}])
    );
    assert_eq!(
        w["namespaceSelector"],
        json!({"matchExpressions": [
            {"key": "egress-gate.io/injection", "operator": "In", "values": ["enabled"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NS]},
        ]})
    );
}

/// One RBAC permission: (apiGroup, resource, verb, resourceName or "*").
type Grant = (String, String, String, String);

fn grants(role: &Value) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() { vec!["*"] } else { names };
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    for name in &names {
                        out.insert((group.into(), resource.into(), verb.into(), (*name).into()));
                    }
                }
            }
        }
    }
    out
}

fn expect(list: &[(&str, &str, &[&str], &str)]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for (group, resource, verbs, name) in list {
        for verb in *verbs {
            out.insert((
                (*group).into(),
                (*resource).into(),
                (*verb).into(),
                (*name).into(),
            ));
        }
    }
    out
}

#[test]
fn rbac_is_exactly_what_the_webhook_calls() {
    let docs = base();
    let cluster = find(docs, "ClusterRole", "egress-webhook").unwrap();
    assert_eq!(
        grants(cluster),
        expect(&[
            ("", "services", &["get", "list", "watch"], "*"),
            ("", "nodes", &["get", "list", "watch"], "*"),
            (
                "networking.k8s.io",
                "servicecidrs",
                &["get", "list", "watch"],
                "*"
            ),
            (
                "admissionregistration.k8s.io",
                "mutatingwebhookconfigurations",
                &["get", "patch"],
                "egress-gate"
            ),
            ("", "pods", &["list", "watch"], "*"),
            ("", "namespaces", &["list", "watch"], "*"),
        ])
    );
    let role = find(docs, "Role", "egress-webhook").unwrap();
    assert_eq!(role["metadata"]["namespace"], NS);
    assert_eq!(
        grants(role),
        expect(&[
            ("", "secrets", &["create"], "*"),
            ("", "secrets", &["get", "update"], "egress-webhook-tls"),
        ])
    );
    // The names the RBAC trusts are the names the webhook is told to use.
    let deployment = find(docs, "Deployment", "egress-webhook").unwrap();
    let args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert_eq!(
        arg_value(&args, "--secret-name"),
        Some("egress-webhook-tls")
    );
    assert_eq!(
        arg_value(&args, "--webhook-config-name"),
        Some("egress-gate")
    );
    // The pod and namespace grants are for the drift detector, which the flag turns on.
    assert!(args.contains(&"--watch-pods"));

    for (kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let binding = find(docs, kind, "egress-webhook").unwrap();
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        assert_eq!(binding["roleRef"]["name"], "egress-webhook");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "egress-webhook", "namespace": NS}])
        );
    }
    let roles = docs
        .iter()
        .filter(|d| {
            d["kind"]
                .as_str()
                .is_some_and(|k| k.ends_with("Role") || k.ends_with("RoleBinding"))
        })
        .count();
    assert_eq!(roles, 4, "no other roles or bindings: the proxy gets none");
}

fn config_map_file(docs: &[Value], name: &str, key: &str) -> String {
    find(docs, "ConfigMap", name).unwrap()["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {name} has no {key}"))
        .to_owned()
}

#[test]
fn configs_in_the_config_maps_load_with_the_real_loaders() {
    let docs = base();
    for (deployment, loader) in [("egress-webhook", "webhook"), ("egress-proxy", "proxy")] {
        let d = find(docs, "Deployment", deployment).unwrap();
        let args = strings(&d["spec"]["template"]["spec"]["containers"][0]["args"]);
        let (config_map, key) = config_from_mount(d, &args);
        let text = config_map_file(docs, &config_map, &key);
        match loader {
            "webhook" => {
                let config = egress_webhook::config::Config::from_yaml(&text).unwrap();
                assert_eq!(
                    config.proxy_url,
                    "http://egress-proxy.egress-gate.svc.cluster.local:3128"
                );
                assert!(config.discovery, "the base learns the cluster's ranges");
            }
            _ => {
                let config = egress_proxy::Config::parse(&text, &key).unwrap();
                assert!(!config.allow.is_empty());
            }
        }
    }
}

#[test]
fn envoy_gateway_terminates_connect_for_the_allowlisted_hosts() {
    let docs = rendered("deploy/envoy-gateway");
    let route = docs.iter().find(|d| d["kind"] == "HTTPRoute").unwrap();
    let route_name = route["metadata"]["name"].as_str().unwrap();
    let hostnames = strings(&route["spec"]["hostnames"]);
    assert!(
        hostnames
            .iter()
            .all(|h| h.ends_with(".blob.core.windows.net")),
        "{hostnames:?}"
    );

    let btp = docs
        .iter()
        .find(|d| d["kind"] == "BackendTrafficPolicy")
        .unwrap();
    assert_eq!(btp["spec"]["targetRefs"][0]["kind"], "HTTPRoute");
    assert_eq!(btp["spec"]["targetRefs"][0]["name"], route_name);
    assert_eq!(
        btp["spec"]["httpUpgrade"],
        json!([{"type": "CONNECT", "connect": {"terminate": true}}])
    );

    // The route sends to a Backend for the same host, on 443.
    let backend_ref = &route["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!(backend_ref["kind"], "Backend");
    let backend = find(&docs, "Backend", backend_ref["name"].as_str().unwrap()).unwrap();
    let fqdn = &backend["spec"]["endpoints"][0]["fqdn"];
    assert_eq!(hostnames, [fqdn["hostname"].as_str().unwrap()]);
    assert_eq!(fqdn["port"], 443);

    let gateway = docs.iter().find(|d| d["kind"] == "Gateway").unwrap();
    let listener = &gateway["spec"]["listeners"][0];
    assert_eq!(
        (listener["protocol"].as_str(), listener["port"].as_u64()),
        (Some("HTTP"), Some(3128))
    );
    let proxy = find(
        &docs,
        "EnvoyProxy",
        gateway["spec"]["infrastructure"]["parametersRef"]["name"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let service = &proxy["spec"]["provider"]["kubernetes"]["envoyService"];
    assert_eq!(service["type"], "ClusterIP");

    let ctp = docs
        .iter()
        .find(|d| d["kind"] == "ClientTrafficPolicy")
        .unwrap();
    assert_eq!(
        ctp["spec"]["targetRefs"][0]["name"],
        gateway["metadata"]["name"]
    );
    let idle = ctp["spec"]["timeout"]["http"]["streamIdleTimeout"]
        .as_str()
        .unwrap();
    assert!(
        idle.ends_with('h'),
        "stream idle timeout {idle} must exceed Envoy's 5 minutes"
    );
    // barman-cloud on Python 3.11 sends `CONNECT ... HTTP/1.0`; Envoy answers 426 without this.
    assert!(
        ctp["spec"]["http1"]["http10"].is_object(),
        "the listener must accept HTTP/1.0: {}",
        ctp["spec"]
    );

    // The overlay points the webhook at that Service and drops the bundled proxy.
    let overlay = rendered("deploy/envoy-gateway/webhook-overlay");
    let text = config_map_file(&overlay, "egress-webhook-config", "webhook.yaml");
    let config = egress_webhook::config::Config::from_yaml(&text).unwrap();
    let expected = format!(
        "http://{}.envoy-gateway-system.svc.cluster.local:{}",
        service["name"].as_str().unwrap(),
        listener["port"]
    );
    assert_eq!(config.proxy_url, expected);
    assert!(overlay.iter().all(|d| {
        !d["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("egress-proxy")
    }));
    assert!(find(&overlay, "Deployment", "egress-webhook").is_ok());
}

/// The policies of `docs` that select pods labelled `app.kubernetes.io/name: <app>`.
fn policies_for<'a>(docs: &'a [Value], app: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| {
            d["spec"]["endpointSelector"]["matchLabels"]["app.kubernetes.io/name"] == app
                || d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == app
        })
        .collect()
}

/// Whether a Cilium rule list opens `port`/TCP (a rule without toPorts opens every port).
fn opens_port(rule: &Value, port: &str) -> bool {
    let Some(to_ports) = rule["toPorts"].as_array() else {
        return true;
    };
    to_ports.iter().any(|tp| {
        tp["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["port"] == port && p["protocol"] == "TCP")
    })
}

#[test]
fn network_policies_cover_the_four_flows_and_isolate_the_external_one() {
    let flavours = [
        ("deploy/netpol/cilium", 4),
        ("deploy/netpol/cilium/aks", 5),
        ("deploy/netpol/kubernetes", 3),
    ];
    for (dir, count) in flavours {
        let docs = rendered(dir);
        assert_eq!(docs.len(), count, "{dir}");
        // Exactly one policy lets the proxy out, under the one name approvals refer to.
        let external: Vec<&Value> = docs
            .iter()
            .filter(|d| d["metadata"]["annotations"]["egress-gate.io/approval"].is_string())
            .collect();
        assert_eq!(external.len(), 1, "{dir}");
        assert_eq!(
            external[0]["metadata"]["name"],
            "egress-proxy-to-azure-blob"
        );
        for name in ["egress-proxy-ingress", "egress-webhook-ingress"] {
            assert!(
                docs.iter().any(|d| d["metadata"]["name"] == name),
                "{dir}: {name}"
            );
        }
    }
    // Only the external policies' files let traffic leave the cluster, one policy each.
    let netpol = repo_root().join("deploy/netpol");
    for file in manifest_files().iter().filter(|f| f.starts_with(&netpol)) {
        let text = serde_json::to_string(&parse_file(file).unwrap()).unwrap();
        let external = ["\"toFQDNs\"", "\"toCIDR", "\"toEntities\"", "\"ipBlock\""]
            .iter()
            .any(|k| text.contains(k));
        let is_external_file = file.ends_with("proxy-egress-external.yaml");
        assert_eq!(external, is_external_file, "{}", file.display());
        if is_external_file {
            assert_eq!(parse_file(file).unwrap().len(), 1, "{}", file.display());
        }
    }
    // Policy 1 stays additive (Cilium 1.16+), and is limited to opted-in namespaces.
    let cilium = rendered("deploy/netpol/cilium");
    let client = find(
        &cilium,
        "CiliumClusterwideNetworkPolicy",
        "egress-gate-client-to-proxy",
    )
    .unwrap();
    let selector = &client["spec"]["endpointSelector"]["matchLabels"];
    assert_eq!(selector["egress-gate.io/client"], "true");
    assert_eq!(selector[OPTED_IN_NAMESPACE], "enabled");
    assert_eq!(
        client["spec"]["enableDefaultDeny"]["egress"], false,
        "must not cut clients' other egress"
    );
    assert!(opens_port(&client["spec"]["egress"][0], "3128"));
}

/// Cilium's label for a namespace label, as seen on the pods in that namespace.
const OPTED_IN_NAMESPACE: &str = "k8s:io.cilium.k8s.namespace.labels.egress-gate.io/injection";

#[test]
fn proxy_admits_clients_only_from_opted_in_namespaces() {
    for dir in ["deploy/netpol/cilium", "deploy/netpol/cilium/aks"] {
        let docs = rendered(dir);
        let ingress = find(&docs, "CiliumNetworkPolicy", "egress-proxy-ingress").unwrap();
        let rules = ingress["spec"]["ingress"].as_array().unwrap();
        assert!(!rules.is_empty());
        for rule in rules {
            let peers = rule["fromEndpoints"].as_array();
            assert!(peers.is_some(), "{dir}: only endpoint peers: {rule}");
            for peer in peers.into_iter().flatten() {
                assert_eq!(
                    peer["matchLabels"]["egress-gate.io/client"], "true",
                    "{dir}"
                );
                assert_eq!(peer["matchLabels"][OPTED_IN_NAMESPACE], "enabled", "{dir}");
            }
        }
        // No other policy opens the proxy's port.
        for policy in policies_for(&docs, "egress-proxy") {
            if policy["metadata"]["name"] != "egress-proxy-ingress" {
                assert!(policy["spec"]["ingress"].is_null(), "{dir}: {}", id(policy));
            }
        }
    }
    let plain = rendered("deploy/netpol/kubernetes");
    let ingress = find(&plain, "NetworkPolicy", "egress-proxy-ingress").unwrap();
    for rule in ingress["spec"]["ingress"].as_array().unwrap() {
        for peer in rule["from"].as_array().unwrap() {
            // One `from` entry holding both selectors: a pod must match both.
            assert_eq!(
                peer["podSelector"]["matchLabels"]["egress-gate.io/client"],
                "true"
            );
            assert_eq!(
                peer["namespaceSelector"]["matchLabels"]["egress-gate.io/injection"],
                "enabled"
            );
        }
    }
}

#[test]
fn webhook_ingress_admits_the_aks_admission_path() {
    let generic = rendered("deploy/netpol/cilium");
    let webhook = find(&generic, "CiliumNetworkPolicy", "egress-webhook-ingress").unwrap();
    assert_eq!(
        webhook["spec"]["ingress"][0]["fromEntities"],
        json!(["kube-apiserver"])
    );

    let aks = rendered("deploy/netpol/cilium/aks");
    let rules: Vec<&Value> = policies_for(&aks, "egress-webhook")
        .into_iter()
        .flat_map(|p| p["spec"]["ingress"].as_array().unwrap())
        .filter(|r| opens_port(r, "8443"))
        .collect();
    let entities: Vec<&str> = rules
        .iter()
        .flat_map(|r| strings(&r["fromEntities"]))
        .collect();
    // The API server as Cilium sees it on AKS (konnectivity, NAT), and where it is intact.
    for entity in ["kube-apiserver", "remote-node"] {
        assert!(entities.contains(&entity), "{entity}: {entities:?}");
    }
    assert!(
        rules.iter().any(|r| {
            r["fromEndpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| {
                    e["matchLabels"]["k8s:io.kubernetes.pod.namespace"] == "kube-system"
                        && e["matchLabels"]["app"] == "konnectivity-agent"
                })
        }),
        "the konnectivity agents: {rules:?}"
    );
    // Nothing wider than that: no `world`, `all` or `cluster`.
    for wide in ["world", "all", "cluster"] {
        assert!(!entities.contains(&wide), "{wide}: {entities:?}");
    }
}

/// The DNS peer of a proxy egress policy: kube-dns on 53 over UDP and TCP.
fn assert_dns_to_kube_dns(rule: &Value) {
    assert_eq!(
        rule["toEndpoints"][0]["matchLabels"],
        json!({"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"})
    );
    let ports = &rule["toPorts"][0]["ports"];
    assert_eq!(
        *ports,
        json!([{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "TCP"}])
    );
}

#[test]
fn external_cidr_flavour_reaches_the_private_endpoint_subnet_only() {
    let aks = rendered("deploy/netpol/cilium/aks");
    let external = find(&aks, "CiliumNetworkPolicy", "egress-proxy-to-azure-blob").unwrap();
    assert_eq!(
        *external,
        rendered("deploy/netpol/cilium/external-cidr")[0],
        "aks/ uses external-cidr/"
    );
    let text = serde_json::to_string(external).unwrap();
    // No FQDN rule and no DNS rule: nothing that needs Cilium's DNS proxy (ACNS on AKS).
    for key in ["toFQDNs", "\"dns\"", "toEntities", "toServices"] {
        assert!(!text.contains(key), "{key} in {text}");
    }
    let rules = external["spec"]["egress"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_dns_to_kube_dns(&rules[0]);
    let subnet = &rules[1];
    let cidrs: Vec<&Value> = subnet["toCIDRSet"].as_array().unwrap().iter().collect();
    assert_eq!(cidrs.len(), 1);
    let cidr = cidrs[0]["cidr"].as_str().unwrap();
    let (addr, _len) = cidr.split_once('/').unwrap();
    let addr: std::net::Ipv4Addr = addr.parse().unwrap();
    assert!(
        addr.is_private(),
        "a private endpoint subnet, not a public range: {cidr}"
    );
    assert_eq!(
        subnet["toPorts"],
        json!([{"ports": [{"port": "443", "protocol": "TCP"}]}])
    );
    // The proxy's own config names the same subnet for its rules.
    let proxy_yaml = config_map_file(base(), "egress-proxy-config", "proxy.yaml");
    assert!(
        proxy_yaml.contains(cidr),
        "deploy/base/config/proxy.yaml should list {cidr}"
    );
}

#[test]
fn external_fqdn_flavour_names_azure_blob_only() {
    let docs = rendered("deploy/netpol/cilium/external-fqdn");
    let external = find(&docs, "CiliumNetworkPolicy", "egress-proxy-to-azure-blob").unwrap();
    let rules = external["spec"]["egress"].as_array().unwrap();
    assert_dns_to_kube_dns(&rules[0]);
    let dns: Vec<&str> = rules[0]["toPorts"][0]["rules"]["dns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["matchPattern"].as_str().or(r["matchName"].as_str()))
        .collect();
    let fqdns: Vec<&str> = rules
        .iter()
        .flat_map(|r| r["toFQDNs"].as_array().into_iter().flatten())
        .filter_map(|f| f["matchPattern"].as_str().or(f["matchName"].as_str()))
        .collect();
    assert!(!dns.is_empty() && !fqdns.is_empty());
    // No universal pattern (ACNS refuses it, and it would let the proxy resolve anything).
    // A `*` stands for one label in Cilium: one account label (or any one) under Blob's own
    // domains, nothing more.
    for pattern in dns.iter().chain(&fqdns) {
        let (_account, domain) = pattern.split_once('.').unwrap();
        assert!(
            ["blob.core.windows.net", "privatelink.blob.core.windows.net"].contains(&domain),
            "{pattern}"
        );
    }
    assert!(
        fqdns.contains(&"*.privatelink.blob.core.windows.net"),
        "{fqdns:?}"
    );
}

#[test]
fn entra_and_arm_policy_names_exactly_two_hosts() {
    let docs = rendered("deploy/netpol/cilium/external-entra-arm");
    assert_eq!(docs.len(), 1);
    let policy = &docs[0];
    assert!(policy["metadata"]["annotations"]["egress-gate.io/approval"].is_string());
    let rules = policy["spec"]["egress"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_dns_to_kube_dns(&rules[0]);
    let hosts = json!([
        {"matchName": "login.microsoftonline.com"},
        {"matchName": "management.azure.com"}
    ]);
    assert_eq!(rules[0]["toPorts"][0]["rules"]["dns"], hosts);
    assert_eq!(rules[1]["toFQDNs"], hosts);
    assert_eq!(
        rules[1]["toPorts"],
        json!([{"ports": [{"port": "443", "protocol": "TCP"}]}])
    );
}

#[test]
fn every_kustomization_creates_the_namespaces_it_fills() {
    // A folder may rely on the base's namespace only if it is a set of policies (or the
    // monitoring) applied onto an install; anything else must be appliable first on a fresh
    // cluster.
    for dir in kustomizations() {
        let name = dir.strip_prefix(repo_root()).unwrap().display().to_string();
        let docs = render(&dir).unwrap();
        let created: BTreeSet<&str> = docs
            .iter()
            .filter(|d| d["kind"] == "Namespace")
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        for doc in &docs {
            let Some(ns) = doc["metadata"]["namespace"].as_str() else {
                continue;
            };
            // Network policies and monitoring are added to a running install.
            let onto_install = ns == NS
                && (name.starts_with("deploy/netpol/")
                    || name.starts_with("deploy/identity/netpol/")
                    || name.starts_with("deploy/blob-gateway")
                    || name == "deploy/monitoring");
            assert!(
                created.contains(ns) || onto_install,
                "{name}: {} is in namespace {ns}, which it does not create",
                id(doc)
            );
        }
    }
}

#[test]
fn proxy_resolves_outside_names_without_walking_the_search_list() {
    let deployment = find(base(), "Deployment", "egress-proxy").unwrap();
    let options = &deployment["spec"]["template"]["spec"]["dnsConfig"]["options"];
    // acct.blob.core.windows.net has 4 dots: under ndots 5 every search domain is tried first.
    let ndots: u32 = item(options, "name", "ndots")["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ndots <= 4, "ndots {ndots}");
    assert_ne!(
        deployment["spec"]["template"]["spec"]["dnsPolicy"], "None",
        "keep the cluster's resolver"
    );
}

#[test]
fn cert_manager_overlay_serves_mounted_files_with_less_rbac() {
    let docs = rendered("deploy/cert-manager");
    let deployment = find(&docs, "Deployment", "egress-webhook").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let args = strings(&pod["containers"][0]["args"]);
    assert!(!args.contains(&"--self-signed"));
    assert_eq!(arg_value(&args, "--tls-cert"), Some("/tls/tls.crt"));
    assert_eq!(arg_value(&args, "--tls-key"), Some("/tls/tls.key"));
    let mount = item(&pod["containers"][0]["volumeMounts"], "mountPath", "/tls");
    let volume = item(&pod["volumes"], "name", mount["name"].as_str().unwrap());
    let secret = volume["secret"]["secretName"].as_str().unwrap();

    // cert-manager writes that Secret, for the names the API server and clients use: the
    // same names the self-signed mode puts in its certificate.
    let serving = docs
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["spec"]["secretName"] == secret)
        .unwrap();
    let identity = egress_gate_certs::ServiceIdentity::new("egress-webhook", NS);
    assert_eq!(strings(&serving["spec"]["dnsNames"]), identity.dns_names());
    let mwc = find(&docs, "MutatingWebhookConfiguration", "egress-gate").unwrap();
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!("{NS}/{}", serving["metadata"]["name"].as_str().unwrap())
    );

    // Without self-signing the webhook writes neither its Secret nor caBundle.
    assert_eq!(
        grants(find(&docs, "ClusterRole", "egress-webhook").unwrap()),
        expect(&[
            ("", "services", &["get", "list", "watch"], "*"),
            ("", "nodes", &["get", "list", "watch"], "*"),
            (
                "networking.k8s.io",
                "servicecidrs",
                &["get", "list", "watch"],
                "*"
            ),
            ("", "pods", &["list", "watch"], "*"),
            ("", "namespaces", &["list", "watch"], "*"),
        ])
    );
    assert!(
        args.contains(&"--watch-pods"),
        "the overlay keeps the drift detector"
    );
    assert!(find(&docs, "Role", "egress-webhook").is_err());
    assert!(find(&docs, "RoleBinding", "egress-webhook").is_err());
}

#[test]
fn aks_runbook_overlays_render_and_configure_as_written() {
    let files = doc_files("docs/aks.md");
    let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    for expected in [
        "my-cluster/kustomization.yaml",
        "my-cluster/proxy.yaml",
        "my-cluster/webhook.yaml",
        "my-netpol/kustomization.yaml",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} not in docs/aks.md: {names:?}"
        );
    }
    // The overlays sit beside a copy of deploy/, as the runbook's `../deploy/...` assumes.
    let dir = std::env::temp_dir().join(format!("egress-gate-aks-doc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, text) in &files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    std::os::unix::fs::symlink(repo_root().join("deploy"), dir.join("deploy")).unwrap();
    let cluster = render(&dir.join("my-cluster"));
    let netpol = render(&dir.join("my-netpol"));
    std::fs::remove_dir_all(&dir).unwrap();
    let (cluster, netpol) = (cluster.unwrap(), netpol.unwrap());

    // The webhook config the runbook writes loads, with the AKS API server name.
    let webhook = config_map_file(&cluster, "egress-webhook-config", "webhook.yaml");
    let config = egress_webhook::config::Config::from_yaml(&webhook).unwrap();
    assert!(
        config.api_server.iter().any(|a| a.ends_with(".azmk8s.io")),
        "{:?}",
        config.api_server
    );
    // The proxy config names an account, not all of Azure Blob, reachable only in the subnet.
    let proxy = config_map_file(&cluster, "egress-proxy-config", "proxy.yaml");
    // The real loader takes it (onlyCIDRs with its cidrs, the rule's fields spelled right).
    let loaded = egress_proxy::Config::parse(&proxy, "docs/aks.md my-cluster/proxy.yaml").unwrap();
    assert!(
        loaded.allow.iter().all(|r| r.only_cidrs),
        "{:?}",
        loaded.allow
    );
    let proxy: Value = serde_yaml_ng::from_str(&proxy).unwrap();
    let rule = &proxy["allow"][0];
    assert_eq!(rule["host"], "myaccount.blob.core.windows.net");
    assert_eq!(rule["onlyCIDRs"], true);
    // Policy 3 of the AKS flavour, patched as the runbook shows, names the same subnet.
    let external = find(&netpol, "CiliumNetworkPolicy", "egress-proxy-to-azure-blob").unwrap();
    assert_eq!(
        external["spec"]["egress"][1]["toCIDRSet"][0]["cidr"],
        rule["cidrs"][0]
    );
    assert_eq!(netpol.len(), 5, "the whole AKS flavour");
}

#[test]
fn identity_component_grants_the_pod_watch_and_nothing_more() {
    // The base alone: no token, no RBAC for the proxy (checked above as well).
    let proxy_sa = find(base(), "ServiceAccount", "egress-proxy").unwrap();
    assert_eq!(proxy_sa["automountServiceAccountToken"], false);
    // The component alone renders only cluster-scoped RBAC.
    let component = rendered("deploy/identity");
    assert_eq!(component.len(), 2);
    let role = find(&component, "ClusterRole", "egress-proxy-pods").unwrap();
    assert_eq!(
        grants(role),
        expect(&[("", "pods", &["list", "watch"], "*")]),
        "the watch and the direct lookup by status.podIP, nothing else"
    );
    // With the base: the binding names the proxy's account, and the token is mounted.
    let docs = render(&repo_root().join("tests/manifests/fixtures/identity-overlay")).unwrap();
    let binding = find(&docs, "ClusterRoleBinding", "egress-proxy-pods").unwrap();
    assert_eq!(binding["roleRef"]["name"], "egress-proxy-pods");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "egress-proxy", "namespace": NS}])
    );
    let sa = find(&docs, "ServiceAccount", "egress-proxy").unwrap();
    assert_eq!(sa["automountServiceAccountToken"], true);
    let deployment = find(&docs, "Deployment", "egress-proxy").unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["automountServiceAccountToken"],
        true
    );
    // Everything else is the base, unchanged.
    assert_eq!(docs.len(), base().len() + 2);
    let webhook = find(&docs, "Deployment", "egress-webhook").unwrap();
    assert_eq!(
        webhook,
        find(base(), "Deployment", "egress-webhook").unwrap()
    );

    // The proxy -> API server path, in both flavours, for the proxy only, on the API ports.
    for dir in [
        "deploy/identity/netpol/kubernetes",
        "deploy/identity/netpol/cilium",
    ] {
        let docs = rendered(dir);
        assert_eq!(docs.len(), 1, "{dir}");
        let policy = &docs[0];
        assert_eq!(
            policy["metadata"]["name"], "egress-proxy-to-apiserver",
            "{dir}"
        );
        assert_eq!(policy["metadata"]["namespace"], NS, "{dir}");
        assert_eq!(policies_for(&docs, "egress-proxy").len(), 1, "{dir}");
        let text = policy.to_string();
        assert!(
            text.contains("443") && text.contains("6443"),
            "{dir}: {text}"
        );
        // Not an egress out of the cluster: no approval annotation.
        assert!(policy["metadata"]["annotations"]["egress-gate.io/approval"].is_null());
    }
    let cilium = rendered("deploy/identity/netpol/cilium");
    assert_eq!(
        cilium[0]["spec"]["egress"][0]["toEntities"],
        json!(["kube-apiserver"])
    );
}
