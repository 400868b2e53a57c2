//! deploy/monitoring with the real Prometheus tools: the PrometheusRule's groups pass
//! `promtool check rules` and the unit tests in tests/manifests/promtool pass
//! `promtool test rules`; every alert has a summary, a description and a runbook section in
//! docs/monitoring.md, and a unit test in which it fires; every query of the Grafana
//! dashboard parses as PromQL (through `promtool check rules`); every egress-gate metric the
//! rules and the dashboard read is one docs/monitoring.md lists as exported; and deploy/base's
//! pods carry scrape annotations for their admin ports.
//!
//! promtool comes from Debian's `prometheus` package (scripts/test-deps.sh installs it). When
//! it is absent the promtool checks print SKIPPED, unless `CI=true` or
//! `REQUIRE_PROMTOOL=1`, which make that a failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use egress_gate_manifests::{find, render, repo_root};
use serde_json::{Value, json};

/// Makes a missing promtool a failure.
const REQUIRE_ENV: &str = "REQUIRE_PROMTOOL";

fn monitoring() -> Vec<Value> {
    render(&repo_root().join("deploy/monitoring")).unwrap()
}

fn rule_groups(docs: &[Value]) -> Value {
    find(docs, "PrometheusRule", "egress-gate").unwrap()["spec"]["groups"].clone()
}

fn alerts(groups: &Value) -> Vec<Value> {
    groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

/// promtool, or `None` (after saying so) when it is absent and not required.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let required = std::env::var("CI").is_ok_and(|v| v == "true")
            || std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "promtool not found: install Debian's prometheus package (scripts/test-deps.sh)"
        );
        eprintln!("SKIPPED: promtool not found (Debian package prometheus; scripts/test-deps.sh)");
    }
    found
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "egress-gate-monitoring-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn write_rules(dir: &Path, groups: &Value) -> PathBuf {
    let path = dir.join("rules.yaml");
    let text = serde_yaml_ng::to_string(&json!({ "groups": groups })).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = scratch("rules");
    let rules = write_rules(&dir, &rule_groups(&monitoring()));
    let checked = run(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tests = dir.join("rules-test.yaml");
    std::fs::copy(
        repo_root().join("tests/manifests/promtool/rules-test.yaml"),
        &tests,
    )
    .unwrap();
    let tested = run(Command::new(&promtool).args(["test", "rules"]).arg(&tests));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_is_documented_annotated_and_unit_tested() {
    let groups = rule_groups(&monitoring());
    let docs = std::fs::read_to_string(repo_root().join("docs/monitoring.md")).unwrap();
    let tests: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("tests/manifests/promtool/rules-test.yaml"))
            .unwrap(),
    )
    .unwrap();
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap().clone())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .map(|c| c["alertname"].as_str().unwrap().to_owned())
        .collect();
    let all = alerts(&groups);
    assert!(all.len() >= 10, "{all:?}");
    for alert in all {
        let name = alert["alert"].as_str().unwrap();
        let a = &alert["annotations"];
        for key in ["summary", "description", "runbook"] {
            assert!(
                a[key].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{name}: no {key}"
            );
        }
        assert!(["warning", "critical"].contains(&alert["labels"]["severity"].as_str().unwrap()));
        let anchor = format!("docs/monitoring.md#{}", name.to_lowercase());
        assert_eq!(a["runbook"], anchor.as_str(), "{name}");
        assert!(
            docs.lines().any(|l| l == format!("### {name}")),
            "docs/monitoring.md has no runbook section `### {name}`"
        );
        assert!(fired.contains(name), "{name} fires in no unit test");
    }
}

/// Every `egress_webhook_*` and `egress_proxy_*` metric an expression reads, without the
/// histogram suffixes.
fn egress_metrics(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if expr[i..].starts_with("egress_webhook_") || expr[i..].starts_with("egress_proxy_") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            let name = &expr[i..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

fn dashboard() -> Value {
    let docs = monitoring();
    let cm = find(&docs, "ConfigMap", "egress-gate-dashboard").unwrap();
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    serde_json::from_str(cm["data"]["egress-gate.json"].as_str().unwrap()).unwrap()
}

fn dashboard_exprs() -> Vec<String> {
    dashboard()["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn rules_and_dashboard_read_only_metrics_the_binaries_export() {
    let docs = std::fs::read_to_string(repo_root().join("docs/monitoring.md")).unwrap();
    let exported: BTreeSet<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name.to_owned()))
        .filter(|n| n.starts_with("egress_"))
        .collect();
    let mut exprs = dashboard_exprs();
    exprs.extend(
        alerts(&rule_groups(&monitoring()))
            .iter()
            .map(|a| a["expr"].as_str().unwrap().to_owned()),
    );
    let mut used = BTreeSet::new();
    for expr in &exprs {
        used.extend(egress_metrics(expr));
    }
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "not in docs/monitoring.md's reference: {unknown:?}"
    );
    // The drift gauges, latency, denials and expiry are what the dashboard is for.
    for needed in [
        "egress_webhook_pods_uninjected",
        "egress_webhook_review_duration_seconds",
        "egress_webhook_certificate_expiry_timestamp_seconds",
        "egress_proxy_denials_total",
        "egress_proxy_connect_duration_seconds",
        "egress_proxy_bytes_total",
        "egress_proxy_tunnels_active",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    let Some(promtool) = promtool() else {
        return;
    };
    // Each query as a recording rule, with Grafana's interval variable as Prometheus sees it.
    let rules: Vec<Value> = dashboard_exprs()
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"record": format!("dashboard:query{i}"), "expr": e.replace("$__rate_interval", "5m")}))
        .collect();
    assert!(rules.len() >= 15);
    let dir = scratch("dashboard");
    let path = write_rules(&dir, &json!([{"name": "dashboard", "rules": rules}]));
    run(Command::new(&promtool).args(["check", "rules"]).arg(&path));
}

#[test]
fn base_pods_carry_scrape_annotations_for_their_admin_ports() {
    let docs = render(&repo_root().join("deploy/base")).unwrap();
    for name in ["egress-webhook", "egress-proxy"] {
        let template = &find(&docs, "Deployment", name).unwrap()["spec"]["template"];
        let admin = template["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "admin")
            .unwrap()["containerPort"]
            .to_string();
        let a = &template["metadata"]["annotations"];
        assert_eq!(a["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(a["prometheus.io/port"], admin.as_str(), "{name}");
        assert_eq!(a["prometheus.io/path"], "/metrics", "{name}");
    }
    // The PodMonitors scrape the same port by name.
    for monitor in ["egress-webhook", "egress-proxy"] {
        let pm = find(&monitoring(), "PodMonitor", monitor).unwrap().clone();
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "admin");
        assert_eq!(
            pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            monitor
        );
    }
}
