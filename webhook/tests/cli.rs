//! The `egress-webhook` command line through the real binary: exit codes, standard output
//! and standard error, in kubectl's conventions (issue 20, items 2 to 4).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_egress-webhook");

/// Runs the binary with `args` and `stdin`, without a POD_NAMESPACE from the caller.
fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/pods/{name}.json"))
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap()
}

/// Asserts the exit code, and that standard error contains every one of `needles`.
fn assert_exit(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in stderr: {err}");
    }
}

#[test]
fn usage_errors_exit_2_whichever_flag_is_wrong() {
    assert_exit(
        &run(&["inject", "--offline", "--nope", "-f", "-"], ""),
        2,
        &["--nope"],
    );
    assert_exit(
        &run(&["certs", "--validity", "10x"], ""),
        2,
        &["--validity", "10x"],
    );
    assert_exit(
        &run(&["certs", "--ip", "notanip"], ""),
        2,
        &["--ip", "notanip"],
    );
    assert_exit(
        &run(&["certs", "--secret-manifest"], ""),
        2,
        &["--secret-manifest"],
    );
    assert_exit(&run(&["inject"], ""), 2, &["--filename"]);
}

#[test]
fn config_errors_exit_64_naming_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("webhook.yaml");
    std::fs::write(
        &config,
        "clusterDomain: cluster.local\nprofiles:\n  - name: cnpg\n  - name: mine\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let expected = format!("{config}:4: profiles[1].selector: ");
    for args in [
        vec!["check-config", "--config", config],
        vec!["inject", "--offline", "-f", "-", "--config", config],
    ] {
        assert_exit(&run(&args, ""), 64, &[&expected]);
    }
    let missing = dir.path().join("absent.yaml");
    assert_exit(
        &run(&["check-config", "--config", missing.to_str().unwrap()], ""),
        64,
        &["absent.yaml"],
    );
    assert_exit(
        &run(&["check-config", "--namespace", "Not_A_Namespace"], ""),
        64,
        &["namespace", "Not_A_Namespace"],
    );
}

#[test]
fn input_that_holds_no_kubernetes_object_exits_65_and_says_why() {
    let values = "replicaCount: 2\nimage:\n  tag: v1\n";
    assert_exit(
        &run(&["inject", "--offline", "-f", "-"], values),
        65,
        &[
            "-: document 1: skipped: not a Kubernetes object",
            "no Kubernetes object in -",
        ],
    );
    assert_exit(
        &run(&["inject", "--offline", "-f", "-"], "42\n"),
        65,
        &["a scalar (42)"],
    );
    assert_exit(
        &run(&["inject", "--offline", "-f", "-"], ""),
        65,
        &["no Kubernetes object"],
    );
    assert_exit(
        &run(
            &["inject", "--offline", "-f", "-"],
            "---\n# only a comment\n",
        ),
        65,
        &["no Kubernetes object"],
    );
    let lower = "apiVersion: v1\nkind: pod\nmetadata: {name: a}\nspec: {containers: [{name: c}]}\n";
    assert_exit(
        &run(&["inject", "--offline", "-f", "-"], lower),
        65,
        &[
            "document 1: kind \"pod\" does not exist",
            "did you mean Pod?",
        ],
    );
    assert_exit(
        &run(&["inject", "--offline", "-f", "-"], "a: [b\n"),
        65,
        &["document 1: not valid YAML"],
    );
    let malformed = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: 3}\n";
    assert_exit(
        &run(&["inject", "--offline", "-f", "-"], malformed),
        65,
        &["Pod default/a", "containers"],
    );
    let dir = tempfile::tempdir().unwrap();
    assert_exit(
        &run(
            &["inject", "--offline", "-f", dir.path().to_str().unwrap()],
            "",
        ),
        65,
        &["no manifest files found"],
    );
}

#[test]
fn an_unreadable_input_exits_66() {
    assert_exit(
        &run(
            &["inject", "--offline", "-f", "/nonexistent/egh20.yaml"],
            "",
        ),
        66,
        &["cannot read /nonexistent/egh20.yaml"],
    );
}

#[test]
fn cnpg_resources_pass_through_with_the_reason_and_diff_is_empty() {
    let cnpg = "\
apiVersion: postgresql.cnpg.io/v1
kind: Cluster
metadata: {name: pg, namespace: db}
spec: {instances: 3}
---
apiVersion: barmancloud.cnpg.io/v1
kind: ObjectStore
metadata: {name: store, namespace: db}
---
apiVersion: postgresql.cnpg.io/v1
kind: ScheduledBackup
metadata: {name: nightly, namespace: db}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: db}
";
    let out = run(&["inject", "--offline", "-f", "-", "--diff"], cnpg);
    assert_exit(
        &out,
        0,
        &[
            "document 1: Cluster db/pg: passed through: not a pod; the pods CNPG creates from it match profile cnpg",
            "document 2: ObjectStore db/store: passed through: not a pod; the instance pods",
            "document 3: ScheduledBackup db/nightly: passed through: not a pod; the Cluster's instance pods",
            "document 4: ConfigMap db/settings: passed through: not a pod and holds no pod template",
        ],
    );
    assert_eq!(stdout(&out), "", "nothing changes, so the diff is empty");
    // A configuration without the cnpg profile says that no profile selects those pods.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("velero-only.yaml");
    std::fs::write(&config, "profiles: [{name: velero}]\n").unwrap();
    let out = run(
        &[
            "inject",
            "--offline",
            "-f",
            "-",
            "--config",
            config.to_str().unwrap(),
        ],
        cnpg,
    );
    assert_exit(
        &out,
        0,
        &[
            "Cluster db/pg: passed through: not a pod; no profile of this configuration selects the pods CNPG creates from it",
        ],
    );
}

#[test]
fn typed_lists_are_unwrapped_and_excluded_namespaces_are_reported() {
    let mut pod: serde_json::Value = serde_json::from_str(&fixture_text("cnpg-instance")).unwrap();
    let object = pod.as_object_mut().unwrap();
    object.remove("kind");
    object.remove("apiVersion");
    let mut system = pod.clone();
    system["metadata"]["namespace"] = "kube-system".into();
    system["metadata"]["name"] = "sys".into();
    let mut own = pod.clone();
    own["metadata"]["namespace"] = "platform-egress".into();
    own["metadata"]["name"] = "own".into();
    let list =
        serde_json::json!({"apiVersion": "v1", "kind": "PodList", "items": [pod, system, own]});
    let out = run(
        &[
            "inject",
            "--offline",
            "-f",
            "-",
            "-o",
            "json",
            "--webhook-namespace",
            "platform-egress",
        ],
        &list.to_string(),
    );
    assert_exit(
        &out,
        0,
        &[
            "-: document 1 item 1: Pod db/pg-1: injected (profile cnpg), ",
            "-: document 1 item 2: Pod kube-system/sys: excluded: the webhook configuration leaves out namespace kube-system",
            "Pod platform-egress/own: excluded: the webhook configuration leaves out namespace platform-egress",
        ],
    );
    let printed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(printed["kind"], "List");
    let items = printed["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["kind"], "Pod", "items get the list's kind");
    let env = items[0]["spec"]["containers"][0]["env"].to_string();
    assert!(
        env.contains("http://egress-proxy.platform-egress.svc.cluster.local:3128"),
        "the default proxyURL follows the webhook's namespace: {env}"
    );
    assert!(!items[1].to_string().contains("HTTPS_PROXY"));
    assert!(!items[2].to_string().contains("HTTPS_PROXY"));
    // POD_NAMESPACE does the same as --webhook-namespace, as for `serve`.
    let out = Command::new(BIN)
        .args(["inject", "--offline", "-f"])
        .arg(fixture("cnpg-instance"))
        .env("POD_NAMESPACE", "platform-egress")
        .output()
        .unwrap();
    assert_exit(&out, 0, &[]);
    assert!(stdout(&out).contains("egress-proxy.platform-egress.svc"));
}

#[test]
fn several_files_directories_and_recursion_like_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("top");
    let sub = top.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(fixture("cnpg-instance"), top.join("a.json")).unwrap();
    std::fs::copy(fixture("velero-install-server"), sub.join("b.json")).unwrap();
    std::fs::write(top.join("notes.txt"), "not a manifest").unwrap();
    let top_arg = top.to_str().unwrap();
    let plain = fixture("plain-app");
    let plain_arg = plain.to_str().unwrap();

    let flat = run(&["inject", "--offline", "-f", top_arg, "-f", plain_arg], "");
    assert_exit(
        &flat,
        0,
        &[
            "a.json: document 1: Pod db/pg-1: injected",
            "plain-app.json: document 1",
        ],
    );
    assert!(
        !stderr(&flat).contains("b.json"),
        "no -R: subdirectories are not read"
    );
    assert_eq!(stdout(&flat).matches("---\n").count(), 2);

    let deep = run(&["inject", "--offline", "-R", "-f", top_arg], "");
    assert_exit(&deep, 0, &["a.json: document 1", "sub/b.json: document 1"]);
    assert!(!stderr(&deep).contains("notes.txt"));
}

#[test]
fn diff_is_a_unified_diff_and_the_json_patch_stays_available() {
    let pod = fixture("cnpg-instance");
    let pod = pod.to_str().unwrap();
    let out = run(&["inject", "--offline", "-f", pod, "--diff"], "");
    assert_exit(&out, 0, &[]);
    let diff = stdout(&out);
    assert!(
        diff.starts_with("--- Pod db/pg-1 (given)\n+++ Pod db/pg-1 (admitted)\n@@ "),
        "{diff}"
    );
    assert!(
        diff.contains("\n+    egress-gate.io/client: 'true'\n"),
        "{diff}"
    );
    assert!(diff.contains("\n+    - name: HTTPS_PROXY\n"), "{diff}");
    assert!(
        !diff
            .lines()
            .any(|l| l.starts_with('-') && !l.starts_with("---")),
        "only additions: {diff}"
    );
    assert_eq!(
        stdout(&run(&["inject", "--offline", "-f", pod, "-o", "diff"], "")),
        diff
    );

    let out = run(&["inject", "--offline", "-f", pod, "-o", "json-patch"], "");
    assert_exit(&out, 0, &[]);
    let text = stdout(&out);
    let body = text.split_once('\n').unwrap().1;
    let patch: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
    assert!(patch.iter().all(|op| op["op"] == "add"), "{text}");

    let out = run(&["inject", "--offline", "-f", pod, "-o", "json"], "");
    let object: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        object["kind"], "Pod",
        "one object prints as itself, not a List"
    );

    assert_exit(
        &run(
            &["inject", "--offline", "-f", pod, "-o", "yaml", "--diff"],
            "",
        ),
        2,
        &["--diff"],
    );
}

#[test]
fn help_lists_every_workload_kind_and_completion_prints_a_script() {
    let out = run(&["inject", "--offline", "--help"], "");
    assert_exit(&out, 0, &[]);
    let help = stdout(&out);
    for kind in [
        "Deployments",
        "StatefulSets",
        "DaemonSets",
        "ReplicaSets",
        "ReplicationControllers",
        "Jobs",
        "CronJobs",
    ] {
        assert!(help.contains(kind), "{kind} not in --help: {help}");
    }
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef egress-webhook"),
        ("fish", "complete -c egress-webhook"),
    ] {
        let out = run(&["completion", shell], "");
        assert_exit(&out, 0, &[]);
        let script = stdout(&out);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("check-config"), "{shell}");
    }
    assert_exit(&run(&["completion", "tcsh"], ""), 2, &["tcsh"]);
}

#[test]
fn check_config_follows_the_webhooks_namespace() {
    let out = Command::new(BIN)
        .arg("check-config")
        .env("POD_NAMESPACE", "platform-egress")
        .output()
        .unwrap();
    assert_exit(&out, 0, &[]);
    assert!(
        stdout(&out)
            .contains("proxyURL: http://egress-proxy.platform-egress.svc.cluster.local:3128"),
        "{}",
        stdout(&out)
    );
    let out = run(&["check-config", "--namespace", "other"], "");
    assert!(stdout(&out).contains("egress-proxy.other.svc"));
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/config/webhook.yaml");
    let out = run(&["check-config", "--config", base.to_str().unwrap()], "");
    assert_exit(&out, 0, &["discovery: true; offline"]);
}

#[test]
fn without_offline_inject_needs_a_cluster_and_says_how_to_do_without() {
    let home = tempfile::tempdir().unwrap();
    let pod = fixture("cnpg-instance");
    let out = Command::new(BIN)
        .args(["inject", "-f"])
        .arg(&pod)
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert_exit(&out, 69, &["no cluster to preview against", "--offline"]);
    assert_eq!(stdout(&out), "");
    // A kubeconfig whose server does not answer: the same code, naming what was tried.
    let kubeconfig = home.path().join("config");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )
    .unwrap();
    let out = run(
        &[
            "inject",
            "-f",
            pod.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
        "",
    );
    assert_exit(
        &out,
        69,
        &["ConfigMap egress-gate/egress-webhook-config", "--offline"],
    );
    let out = run(
        &[
            "inject",
            "-f",
            pod.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--context",
            "nope",
        ],
        "",
    );
    assert_exit(&out, 69, &["nope"]);
    assert_exit(
        &run(&["inject", "--offline", "--kubeconfig", "x", "-f", "-"], ""),
        2,
        &["--offline"],
    );
}
