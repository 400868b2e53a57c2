//! `egress-proxy check-config` and `egress-proxy check` through the real binary: the
//! offline answers to "is this file usable" and "would this target pass" (issue 20, item 5),
//! and the exit codes they share with egress-webhook.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("EGRESS_PROXY_CONFIG")
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config with a wildcard rule pinned to a private range, a port-only rule, an IP-literal
/// rule, a denied range, `hosts` overrides standing in for private DNS, and `localhost` so
/// that one answer comes from the real resolver.
const CONFIG: &str = "\
allow:
  - host: \"*.blob.core.windows.net\"
    cidrs: [10.20.0.0/16]
  - host: acct.blob.core.windows.net
    ports: [8443]
  - cidrs: [10.30.0.0/24]
  - host: localhost
    cidrs: [127.0.0.0/8]
denyCIDRs: [10.20.9.0/24]
hosts:
  acct.blob.core.windows.net: [10.20.0.4, 10.20.9.9]
  other.blob.core.windows.net: [10.99.0.1]
";

fn config_file(dir: &Path, text: &str) -> String {
    let path = dir.join("proxy.yaml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn check_config_lists_the_rules_and_warns_when_nothing_can_pass() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), CONFIG);
    let out = run(&["check-config", "--config", &config]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.starts_with("config ok\n"), "{stdout}");
    assert!(stdout.contains("allow: 4 rules\n"), "{stdout}");
    assert!(
        stdout
            .contains("  allow[0]: host *.blob.core.windows.net, ports 443, cidrs 10.20.0.0/16\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  allow[2]: IP literals, ports 443, cidrs 10.30.0.0/24\n"),
        "{stdout}"
    );
    assert!(stderr.is_empty(), "{stderr}");

    let empty = config_file(dir.path(), "allow: []\n");
    let out = run(&["check-config", "--config", &empty]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout.contains("allow: 0 rules"), "{stdout}");
    assert!(
        stderr.contains("warning: allow is empty: every CONNECT is refused, nothing can pass"),
        "{stderr}"
    );
    // The same config refuses everything in `check`, and the warning is repeated there.
    let out = run(&[
        "check",
        "--config",
        &empty,
        "acct.blob.core.windows.net:443",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("reason: host-not-allowed"), "{stdout}");
    assert!(stderr.contains("nothing can pass"), "{stderr}");
}

#[test]
fn check_config_errors_exit_64_with_file_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "listen: 0.0.0.0:3128\nallow:\n  - host: a.example\n    ports: []\n",
    );
    let out = run(&["check-config", "--config", &config]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "config file {config}:4: field `allow[0].ports`: must not be empty"
        )),
        "{stderr}"
    );
    let config = config_file(dir.path(), "maxTunnels: many\n");
    let (_, stderr) = text(&run(&["check-config", "--config", &config]));
    assert!(
        stderr.contains(&config) && stderr.contains("maxTunnels") && stderr.contains("line 1"),
        "{stderr}"
    );
}

#[test]
fn check_config_shows_identity_and_who_each_rule_is_for() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        "identity:\n  namespaces: [db-a, velero]\nallow:\n  - host: acct-a.blob.core.windows.net\n    from:\n      - namespaces: [db-a]\n        podLabels: {cnpg.io/cluster: pg-a}\n      - serviceAccounts: [velero/velero]\n",
    );
    let out = run(&["check-config", "--config", &config]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("  allow[0]: host acct-a.blob.core.windows.net, ports 443, from (namespaces db-a & podLabels cnpg.io/cluster=pg-a) or (serviceAccounts velero/velero)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("identity: pods egress-gate.io/client=true in namespaces db-a,velero, unknownWait 2s, unidentified deny\n"),
        "{stdout}"
    );
    let config = config_file(
        dir.path(),
        "allow:\n  - host: x.example\n    from: [{namespaces: [db-a]}]\n",
    );
    let out = run(&["check-config", "--config", &config]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "config file {config}:3: field `allow[0].from`: needs the identity: section"
        )),
        "{stderr}"
    );
}

#[test]
fn check_names_the_rule_the_addresses_and_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), CONFIG);
    let check = |target: &str| {
        let out = run(&["check", "--config", &config, target]);
        let (stdout, stderr) = text(&out);
        (out.status.code(), stdout, stderr)
    };

    let (code, stdout, stderr) = check("acct.blob.core.windows.net:443");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "target: acct.blob.core.windows.net:443\n\
         rule: allow[0]: host *.blob.core.windows.net, ports 443, cidrs 10.20.0.0/16\n\
         addresses (the hosts override):\n\
         \x20 10.20.0.4: allowed\n\
         \x20 10.20.9.9: refused, address-denied (destination address 10.20.9.9 is in a denied range)\n\
         verdict: allowed\n\
         dials: 10.20.0.4\n"
    );

    // Rule 1 names the port but no private range: the private endpoint's address is refused.
    let (code, stdout, _) = check("acct.blob.core.windows.net:8443");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("rule: allow[1]: host acct.blob.core.windows.net, ports 8443\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  10.20.0.4: refused, address-denied"),
        "{stdout}"
    );

    let (code, stdout, _) = check("other.blob.core.windows.net:443");
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("verdict: refused\nreason: address-denied (destination address 10.99.0.1 is in a denied range)"), "{stdout}");

    let (code, stdout, _) = check("x.blob.core.windows.net:80");
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains(
            "rule: allow[0] names the host, not port 80\nverdict: refused\nreason: port-not-allowed"
        ),
        "{stdout}"
    );

    let (code, stdout, _) = check("example.com:443");
    assert_eq!(code, Some(1));
    assert!(
        stdout.ends_with("verdict: refused\nreason: host-not-allowed (host not allowed)\n"),
        "{stdout}"
    );

    let (code, stdout, _) = check("10.30.0.5:443");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("addresses (the target itself):\n  10.30.0.5: allowed\n"),
        "{stdout}"
    );
    let (code, stdout, _) = check("10.31.0.5:443");
    assert_eq!(code, Some(1));
    assert!(
        stdout.contains("reason: ip-literal-not-allowed"),
        "{stdout}"
    );

    // Resolved by the system resolver, as the running proxy resolves it.
    let (code, stdout, _) = check("localhost:443");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("addresses (DNS):\n"), "{stdout}");
    assert!(stdout.contains("  127.0.0.1: allowed\n"), "{stdout}");

    let (code, _, stderr) = check("no-port");
    assert_eq!(code, Some(65), "{stderr}");
    assert!(
        stderr.contains("\"no-port\" is not a CONNECT target"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = run(&["--listen", "127.0.0.1:0", "check-config"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("HOST:PORT"));
    let out = run(&["--listen", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn completion_prints_a_script_without_reading_a_config() {
    let out = Command::new(BIN)
        .args(["completion", "bash"])
        .env("EGRESS_PROXY_CONFIG", "/nonexistent/egh20-proxy.yaml")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("complete -F") && stdout.contains("check-config"),
        "{stdout}"
    );
}

/// A rule only two workloads may use, as in docs/proxy.md's identity example.
const IDENTITY_CONFIG: &str = "\
identity:
  namespaces: [db-a, velero]
hosts:
  acct-a.blob.core.windows.net: [10.20.0.5]
allow:
  - host: acct-a.blob.core.windows.net
    cidrs: [10.20.0.0/16]
    onlyCIDRs: true
    from:
      - namespaces: [db-a]
        podLabels: {cnpg.io/cluster: pg-a}
      - serviceAccounts: [velero/velero]
";

#[test]
fn check_with_identity_answers_for_which_workload() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), IDENTITY_CONFIG);
    let target = "acct-a.blob.core.windows.net:443";
    let ask = |extra: &[&str]| {
        let mut args = vec!["check", "--config", &config, target];
        args.extend_from_slice(extra);
        let out = run(&args);
        let (stdout, stderr) = text(&out);
        (out.status.code(), stdout, stderr)
    };

    // Unidentified: refused, and the rule says whom it is for.
    let (code, stdout, _) = ask(&[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("caller: unidentified (--as-namespace asks as a pod)\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "rule: allow[0] is only for: host acct-a.blob.core.windows.net, ports 443, \
             cidrs 10.20.0.0/16, onlyCIDRs, from (namespaces db-a & podLabels \
             cnpg.io/cluster=pg-a) or (serviceAccounts velero/velero)\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("reason: workload-not-allowed"), "{stdout}");

    // The CNPG cluster's pod and Velero's service account pass; another namespace does not,
    // nor the right namespace without the label.
    let (code, stdout, _) = ask(&[
        "--as-namespace",
        "db-a",
        "--as-label",
        "cnpg.io/cluster=pg-a",
    ]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("verdict: allowed\ndials: 10.20.0.5\n"),
        "{stdout}"
    );
    let (code, stdout, _) = ask(&["--as-namespace", "velero", "--as-service-account", "velero"]);
    assert_eq!(code, Some(0), "{stdout}");
    for refused in [
        &["--as-namespace", "db-b"][..],
        &["--as-namespace", "db-a"][..],
    ] {
        let (code, stdout, _) = ask(refused);
        assert_eq!(code, Some(1), "{refused:?}: {stdout}");
        assert!(stdout.contains("reason: workload-not-allowed"), "{stdout}");
    }

    // Usage errors: a label without a namespace, a label without '='.
    let (code, _, stderr) = ask(&["--as-label", "x=y"]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, _, stderr) = ask(&["--as-namespace", "db-a", "--as-label", "bad"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--as-label \"bad\": expected KEY=VALUE"),
        "{stderr}"
    );
}
