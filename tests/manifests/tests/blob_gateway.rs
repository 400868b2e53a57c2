//! The blob gateway's install keeps its contracts: the component adds the gateway to the
//! proxy pods and leaves the config to the admin's overlay, the config beside it loads with
//! the proxy's own loader and finds every file it names on a mount, the overlay
//! docs/blob-gateway.md shows renders with its own accounts, the policies admit opted-in
//! clients on the listener the config opens, and the CNPG and Velero examples say exactly
//! what `egress-proxy blob client-config` prints for their virtual accounts (the binary is
//! run).
//!
//! The strict server-side apply of the same objects is in `apply.rs`.

// Test code: a panic is a failed test (see clippy.toml).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use egress_gate_manifests::{find, id, parse_documents, parse_file, render, repo_root};
use serde_json::{Value, json};

const NS: &str = "egress-gate";
/// The component, and the overlay docs/blob-gateway.md tells admins to write.
const COMPONENT: &str = "deploy/blob-gateway";
const OVERLAY: &str = "tests/manifests/fixtures/blob-gateway-overlay";
/// The gateway's Service: the name `blob client-config` puts in the URLs it prints.
const SERVICE: &str = "egress-gate-blob";
/// Where the component mounts the three Secrets, by Secret name.
const MOUNTS: &[(&str, &str)] = &[
    ("egress-gate-blob-clients", "/etc/egress-gate-blob/clients"),
    (
        "egress-gate-blob-upstream",
        "/etc/egress-gate-blob/upstream",
    ),
    ("egress-gate-blob-tls", "/etc/egress-gate-blob/tls"),
];
/// Names a prebuilt `egress-proxy` binary; without it the test builds one with cargo.
const PROXY_BIN_ENV: &str = "EGRESS_PROXY_BIN";

fn rendered(dir: &str) -> Vec<Value> {
    render(&repo_root().join(dir)).unwrap()
}

fn base() -> &'static [Value] {
    static BASE: OnceLock<Vec<Value>> = OnceLock::new();
    BASE.get_or_init(|| rendered("deploy/base"))
}

fn overlay() -> &'static [Value] {
    static OVERLAY_DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    OVERLAY_DOCS.get_or_init(|| rendered(OVERLAY))
}

/// The element of the list `list` whose `key` equals `value`.
fn item<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|entry| entry[key] == value)
        .unwrap_or_else(|| panic!("no entry with {key} = {value:?} in {list}"))
}

/// `proxy.yaml` of the egress-proxy-config ConfigMap in `docs`.
fn proxy_yaml(docs: &[Value]) -> String {
    find(docs, "ConfigMap", "egress-proxy-config").unwrap()["data"]["proxy.yaml"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The proxy config to start from, beside the component: the base's with a blob: section.
const CONFIG: &str = "deploy/blob-gateway/config/proxy.yaml";

fn component_config_file() -> PathBuf {
    repo_root().join(CONFIG)
}

#[test]
fn component_adds_the_gateway_to_the_proxy_pods_and_nothing_else() {
    // Alone, the component renders only its Service; everything else patches the base.
    let alone = rendered(COMPONENT);
    assert_eq!(
        alone.iter().map(id).collect::<Vec<_>>(),
        ["Service/egress-gate-blob"]
    );

    let docs = overlay();
    assert_eq!(docs.len(), base().len() + 1, "the base and one Service");
    assert_eq!(
        find(docs, "Deployment", "egress-webhook").unwrap(),
        find(base(), "Deployment", "egress-webhook").unwrap()
    );
    let deployment = find(docs, "Deployment", "egress-proxy").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let base_container = &find(base(), "Deployment", "egress-proxy").unwrap()["spec"]["template"]["spec"]
        ["containers"][0];
    // Same program, same flags, same probes: the gateway is configured in the file only.
    for field in [
        "image",
        "command",
        "args",
        "livenessProbe",
        "readinessProbe",
        "securityContext",
    ] {
        assert_eq!(container[field], base_container[field], "{field}");
    }

    // The Service reaches the proxy pods on the gateway's named container ports.
    let service = find(docs, "Service", SERVICE).unwrap();
    assert_eq!(service["metadata"]["namespace"], NS);
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let mut container_ports = BTreeMap::new();
    for port in service["spec"]["ports"].as_array().unwrap() {
        let target = port["targetPort"].as_str().unwrap();
        let c_port = item(&container["ports"], "name", target)["containerPort"]
            .as_u64()
            .unwrap();
        container_ports.insert(target.to_owned(), (port["port"].as_u64().unwrap(), c_port));
    }
    assert_eq!(
        container_ports.keys().collect::<Vec<_>>(),
        ["blob", "blob-tls"],
        "a plain and a TLS port"
    );

    // The config: the base's, unchanged, plus blob:, loaded by the proxy's own loader.
    let text = proxy_yaml(docs);
    let config = egress_proxy::Config::parse(&text, CONFIG).unwrap();
    let blob = config.blob.as_ref().expect("a blob: section");
    let mut with_blob: Value = serde_yaml_ng::from_str(&text).unwrap();
    with_blob.as_object_mut().unwrap().remove("blob");
    let base_config: Value = serde_yaml_ng::from_str(&proxy_yaml(base())).unwrap();
    assert_eq!(
        with_blob, base_config,
        "everything but blob: must stay deploy/base/config/proxy.yaml"
    );
    // TLS only, as docs/blob-gateway.md's threat model asks; its port is the Service's.
    assert!(
        blob.listen.is_none(),
        "the plain listener stays off by default"
    );
    let tls = blob.tls.as_ref().expect("the TLS listener");
    assert_eq!(
        container_ports["blob-tls"],
        (u64::from(tls.listen.port()), u64::from(tls.listen.port()))
    );
    assert_eq!(container_ports["blob"], (10_000, 10_000), "Azurite's port");

    // Every file the config names is on a mount of the Secret meant for it.
    let mounts: BTreeMap<&str, &str> = MOUNTS.iter().copied().collect();
    for (secret, path) in MOUNTS {
        let mount = item(&container["volumeMounts"], "mountPath", path);
        assert_eq!(mount["readOnly"], true, "{path}");
        let volume = item(&pod["volumes"], "name", mount["name"].as_str().unwrap());
        assert_eq!(volume["secret"]["secretName"], *secret, "{path}");
        assert!(
            volume["secret"]["items"].is_null(),
            "{secret}: whole Secret, so every key and every rotation reaches the files"
        );
        // Readable by the proxy's group (fsGroup), by nobody else.
        assert_eq!(volume["secret"]["defaultMode"], 0o440, "{secret}");
    }
    assert_eq!(
        pod["securityContext"]["fsGroup"],
        pod["securityContext"]["runAsGroup"]
    );
    assert!(
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["subPath"].is_null())
    );
    let under = |file: &Path, secret: &str| {
        assert!(
            file.starts_with(mounts[secret]),
            "{} is not in Secret {secret} ({})",
            file.display(),
            mounts[secret]
        );
    };
    under(&tls.cert_file, "egress-gate-blob-tls");
    under(&tls.key_file, "egress-gate-blob-tls");
    assert!(!blob.accounts.is_empty());
    for account in &blob.accounts {
        under(&account.client_key_file, "egress-gate-blob-clients");
        // The config beside the component uses the real key (the mode Azurite and every
        // account support); the keyless modes need no Secret.
        let real_key = account
            .upstream
            .shared_key_file
            .as_ref()
            .expect("sharedKeyFile");
        under(real_key, "egress-gate-blob-upstream");
        // The gateway dials the upstream through the allow policy: a rule must name it.
        let host = account
            .upstream
            .endpoint
            .strip_prefix("https://")
            .expect("an https upstream");
        assert!(
            config
                .allow
                .iter()
                .any(|r| r.host.as_deref() == Some(host) && r.ports.contains(&443)),
            "{}: no allow rule for {host}:443",
            account.name
        );
    }
}

/// The gateway's TLS port, as the component's config opens it.
fn tls_port() -> u16 {
    let config = egress_proxy::Config::parse(&proxy_yaml(overlay()), "blob-gateway").unwrap();
    config.blob.unwrap().tls.unwrap().listen.port()
}

#[test]
fn policies_admit_opted_in_clients_on_the_tls_port_only() {
    let port = tls_port();
    let plain = rendered("deploy/blob-gateway/netpol/kubernetes");
    assert_eq!(plain.len(), 1);
    let ingress = find(&plain, "NetworkPolicy", "egress-gate-blob-ingress").unwrap();
    assert_eq!(ingress["metadata"]["namespace"], NS);
    assert_eq!(
        ingress["spec"]["podSelector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "egress-proxy"})
    );
    assert_eq!(
        ingress["spec"]["ingress"],
        json!([{
            "from": [{
                "namespaceSelector": {"matchLabels": {"egress-gate.io/injection": "enabled"}},
                "podSelector": {"matchLabels": {"egress-gate.io/client": "true"}},
            }],
            "ports": [{"port": port, "protocol": "TCP"}],
        }])
    );
    // The per-namespace client policy, for namespaces with a default-deny egress policy.
    let client = &parse_file(
        &repo_root().join("deploy/blob-gateway/netpol/kubernetes/client-to-gateway.yaml"),
    )
    .unwrap()[0];
    assert!(client["metadata"]["namespace"].is_null(), "applied with -n");
    assert_eq!(
        client["spec"]["egress"][0]["ports"],
        json!([{"port": port, "protocol": "TCP"}])
    );
    assert_eq!(
        client["spec"]["egress"][0]["to"][0]["podSelector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "egress-proxy"})
    );

    let cilium = rendered("deploy/blob-gateway/netpol/cilium");
    assert_eq!(cilium.len(), 2);
    let opted_in_client = json!({
        "egress-gate.io/client": "true",
        "k8s:io.cilium.k8s.namespace.labels.egress-gate.io/injection": "enabled",
    });
    let ingress = find(&cilium, "CiliumNetworkPolicy", "egress-gate-blob-ingress").unwrap();
    assert_eq!(ingress["metadata"]["namespace"], NS);
    assert_eq!(
        ingress["spec"]["ingress"],
        json!([{
            "fromEndpoints": [{"matchLabels": opted_in_client}],
            "toPorts": [{"ports": [{"port": port.to_string(), "protocol": "TCP"}]}],
        }])
    );
    let client = find(
        &cilium,
        "CiliumClusterwideNetworkPolicy",
        "egress-gate-client-to-blob-gateway",
    )
    .unwrap();
    assert_eq!(
        client["spec"]["endpointSelector"]["matchLabels"],
        opted_in_client
    );
    assert_eq!(
        client["spec"]["enableDefaultDeny"]["egress"], false,
        "must not cut the clients' other egress"
    );
    assert_eq!(
        client["spec"]["egress"][0]["toPorts"],
        json!([{"ports": [{"port": port.to_string(), "protocol": "TCP"}]}])
    );
    // In-cluster policies: none of them needs the external approval.
    for policy in plain.iter().chain(&cilium) {
        assert!(policy["metadata"]["annotations"]["egress-gate.io/approval"].is_null());
    }
}

/// `egress-proxy`, prebuilt (`EGRESS_PROXY_BIN`) or built now beside this test binary.
fn proxy_bin() -> PathBuf {
    if let Some(path) = std::env::var_os(PROXY_BIN_ENV) {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<this test> -> target/<profile>/egress-proxy
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The same build as prometheus.rs's, so the two tests share one set of artifacts.
    let mut build = Command::new(cargo);
    build.current_dir(repo_root()).args([
        "build",
        "--quiet",
        "-p",
        "egress-webhook",
        "-p",
        "egress-proxy",
        "--bins",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build.status().unwrap();
    assert!(status.success(), "cargo build egress-proxy: {status}");
    profile_dir.join("egress-proxy")
}

/// What `egress-proxy blob client-config --account <account>` prints for the component's
/// config: the generated key, and the objects by `Kind/name`.
fn client_config(bin: &Path, account: &str) -> (String, BTreeMap<String, Value>) {
    let out = Command::new(bin)
        .args(["blob", "client-config", "--account", account, "--config"])
        .arg(component_config_file())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client-config {account}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let objects = parse_documents(&text)
        .unwrap()
        .into_iter()
        .map(|o| (id(&o), o))
        .collect();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("#   "))
        .expect("the key comment")
        .to_owned();
    (key, objects)
}

/// A connection string's `key=value` pairs.
fn connection_pairs(connection: &str) -> BTreeMap<String, String> {
    connection
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Checks that the example's connection-string Secret is the printed one, but for the key.
fn assert_same_connection_string(example: &Value, printed: &Value, key: &str) {
    let field = "AZURE_STORAGE_CONNECTION_STRING";
    let mut ours = connection_pairs(example["stringData"][field].as_str().unwrap());
    let mut theirs = connection_pairs(printed["stringData"][field].as_str().unwrap());
    assert_eq!(theirs.remove("AccountKey").as_deref(), Some(key));
    let placeholder = ours.remove("AccountKey").unwrap();
    assert!(
        placeholder.starts_with("REPLACE"),
        "{}: the example carries a placeholder, never a key: {placeholder}",
        id(example)
    );
    assert_eq!(ours, theirs, "{}", id(example));
    assert_eq!(
        example["stringData"].as_object().unwrap().len(),
        1,
        "{}",
        id(example)
    );
}

/// The fields of the barman-cloud configuration `blob client-config` prints.
const BARMAN_FIELDS: &[&str] = &["destinationPath", "endpointCA", "azureCredentials"];

#[test]
fn examples_say_what_blob_client_config_prints() {
    let bin = proxy_bin();

    // CNPG, plugin and in-tree: virtual account pg-prod.
    let (key, printed) = client_config(&bin, "pg-prod");
    let secret = &printed["Secret/pg-prod-blob"];
    let store = &printed["ObjectStore/pg-prod"]["spec"]["configuration"];
    let plugin = rendered("deploy/examples/cnpg-blob-gateway");
    let legacy = rendered("deploy/examples/cnpg-legacy-blob-gateway");
    for docs in [&plugin, &legacy] {
        assert_same_connection_string(find(docs, "Secret", "pg-prod-blob").unwrap(), secret, &key);
    }
    let ours = &find(&plugin, "ObjectStore", "pg-prod").unwrap()["spec"]["configuration"];
    let cluster = find(&plugin, "Cluster", "pg-prod").unwrap();
    assert_eq!(
        cluster["spec"]["plugins"][0]["parameters"]["barmanObjectName"],
        "pg-prod"
    );
    let in_tree =
        &find(&legacy, "Cluster", "pg-prod-legacy").unwrap()["spec"]["backup"]["barmanObjectStore"];
    for field in BARMAN_FIELDS {
        assert!(!store[field].is_null(), "client-config prints {field}");
        assert_eq!(ours[field], store[field], "ObjectStore {field}");
        assert_eq!(in_tree[field], store[field], "barmanObjectStore {field}");
    }
    // Only a connection string: barman-cloud reaches a custom endpoint with nothing else.
    assert_eq!(ours["azureCredentials"].as_object().unwrap().len(), 1);

    // Velero: virtual account velero-prod.
    let (key, printed) = client_config(&bin, "velero-prod");
    let velero = rendered("deploy/examples/velero-blob-gateway");
    let ours = find(&velero, "Secret", "velero-prod-velero").unwrap();
    let theirs = &printed["Secret/velero-prod-velero"];
    let file = |secret: &Value| -> BTreeMap<String, String> {
        secret["stringData"]["cloud"]
            .as_str()
            .unwrap()
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    };
    let (ours_file, theirs_file) = (file(ours), file(theirs));
    assert_eq!(
        ours_file.keys().collect::<Vec<_>>(),
        theirs_file.keys().collect::<Vec<_>>()
    );
    assert!(theirs_file.values().all(|v| *v == key));
    assert!(ours_file.values().all(|v| v.starts_with("REPLACE")));
    let bsl = &find(&velero, "BackupStorageLocation", "velero-prod").unwrap()["spec"];
    let theirs = &printed["BackupStorageLocation/velero-prod"]["spec"];
    for field in ["provider", "credential", "config"] {
        assert_eq!(bsl[field], theirs[field], "BackupStorageLocation {field}");
    }
    for field in ["bucket", "caCertRef"] {
        assert_eq!(
            bsl["objectStorage"][field], theirs["objectStorage"][field],
            "BackupStorageLocation objectStorage.{field}"
        );
    }
    // The credential Secret the BSL names is the one in the example.
    assert_eq!(bsl["credential"]["name"], ours["metadata"]["name"]);
    assert_eq!(
        bsl["config"]["storageAccountKeyEnvVar"].as_str(),
        ours_file.keys().next().map(String::as_str)
    );
}

#[test]
fn examples_reach_the_gateway_through_its_service_and_tls_port() {
    let expected = format!("https://{SERVICE}.{NS}.svc:{}", tls_port());
    let config = egress_proxy::Config::parse(&proxy_yaml(overlay()), "blob-gateway").unwrap();
    let accounts = &config.blob.unwrap().accounts;
    let container_of = |name: &str| -> Vec<String> {
        accounts
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("no virtual account {name}"))
            .containers
            .clone()
    };
    let plugin = rendered("deploy/examples/cnpg-blob-gateway");
    let path = find(&plugin, "ObjectStore", "pg-prod").unwrap()["spec"]["configuration"]
        ["destinationPath"]
        .as_str()
        .unwrap()
        .to_owned();
    // <endpoint>/<virtualAccount>/<container>/
    let rest = path.strip_prefix(&format!("{expected}/")).unwrap();
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    assert_eq!(segments.len(), 2, "{path}");
    assert!(
        container_of(segments[0]).contains(&segments[1].to_owned()),
        "{path}"
    );

    let velero = rendered("deploy/examples/velero-blob-gateway");
    let bsl = &find(&velero, "BackupStorageLocation", "velero-prod").unwrap()["spec"];
    let account = bsl["config"]["storageAccount"].as_str().unwrap();
    assert_eq!(
        bsl["config"]["storageAccountURI"],
        format!("{expected}/{account}")
    );
    let bucket = bsl["objectStorage"]["bucket"].as_str().unwrap().to_owned();
    assert!(container_of(account).contains(&bucket));
}

#[test]
fn docs_overlay_renders_with_its_own_accounts() {
    let files = egress_gate_manifests::doc_files("docs/blob-gateway.md");
    let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        ["my-cluster/kustomization.yaml", "my-cluster/proxy.yaml"],
        "the overlay docs/blob-gateway.md shows"
    );
    // The overlay sits beside a copy of deploy/, as its `../deploy/...` assumes.
    let dir = std::env::temp_dir().join(format!("egress-gate-blob-doc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, text) in &files {
        let file = dir.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }
    std::os::unix::fs::symlink(repo_root().join("deploy"), dir.join("deploy")).unwrap();
    let docs = render(&dir.join("my-cluster"));
    std::fs::remove_dir_all(&dir).unwrap();
    let docs = docs.unwrap();

    // The overlay's proxy.yaml replaces the component's, and the proxy's loader takes it.
    let text = proxy_yaml(&docs);
    assert_eq!(text, files[1].1, "the overlay's proxy.yaml, as written");
    let config = egress_proxy::Config::parse(&text, "docs/blob-gateway.md proxy.yaml").unwrap();
    let blob = config.blob.as_ref().unwrap();
    // The component's Service and mounts are still there, and the overlay's files are on them.
    find(&docs, "Service", SERVICE).unwrap();
    let deployment = find(&docs, "Deployment", "egress-proxy").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mounted = |file: &Path| {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
    };
    let tls = blob.tls.as_ref().unwrap();
    assert_eq!(
        item(&container["ports"], "name", "blob-tls")["containerPort"],
        tls.listen.port()
    );
    for file in [&tls.cert_file, &tls.key_file] {
        assert!(mounted(file), "{}", file.display());
    }
    for account in &blob.accounts {
        let files = [
            Some(&account.client_key_file),
            account.upstream.shared_key_file.as_ref(),
        ];
        for file in files.into_iter().flatten() {
            assert!(mounted(file), "{}", file.display());
        }
        let host = account.upstream.endpoint.trim_start_matches("https://");
        assert!(
            config.allow.iter().any(|r| r.host.as_deref() == Some(host)),
            "{host} needs an allow rule"
        );
    }
}
