//! A real Prometheus (Debian's `prometheus` package) scraping the real `egress-webhook serve`
//! and `egress-proxy` on loopback, with deploy/monitoring's rules loaded. The test drives
//! traffic (an allowed and a denied tunnel, an admission review, a rejected reload of each
//! configuration) and asks Prometheus's HTTP API that the series exist with the values the
//! traffic implies, that every rule and dashboard expression is accepted by Prometheus, and
//! that the denial alert fires. The rules' `for` durations are set to 0 here, so alerts
//! fire within the test's minute; their timing is what the promtool unit tests check.
//!
//! Skipped (with a line saying so) without `prometheus` and `curl` on PATH, unless `CI=true`
//! or `REQUIRE_PROMTOOL=1` (make test).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use egress_gate_manifests::{find, render, repo_root};
use serde_json::{Value, json};

/// The storage account name the proxy maps to the loopback echo server.
const ACCT: &str = "acct.blob.core.windows.net";
/// How long Prometheus may take to show a change (1 s scrapes and evaluations).
const SETTLE: Duration = Duration::from_secs(40);

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A child process killed on drop, its JSON log lines on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Proc {
    fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&line).unwrap_or(json!({"raw": line})));
            }
        });
        Self { child, lines }
    }

    /// Waits for the log line whose message contains `message`.
    fn wait_for(&self, message: &str) -> Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line {message:?}"));
            if line["message"]
                .as_str()
                .is_some_and(|m| m.contains(message))
            {
                return line;
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace's debug binaries, built now (cargo reuses what is up to date).
fn binaries() -> (PathBuf, PathBuf) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "build",
            "--quiet",
            "-p",
            "egress-webhook",
            "-p",
            "egress-proxy",
            "--bins",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    // This test runs from <target>/debug/deps.
    let debug = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    (debug.join("egress-webhook"), debug.join("egress-proxy"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An echo server on loopback, as the destination of allowed tunnels.
fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    addr
}

/// Sends a CONNECT and returns the status line of the answer.
fn connect(proxy: SocketAddr, target: &str) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if status.contains(" 200 ") {
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    }
    status
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `GET /api/v1/query?query=EXPR` on Prometheus: the `data` of a successful answer.
fn query(prom: u16, expr: &str) -> Value {
    let url = format!("http://127.0.0.1:{prom}/api/v1/query");
    let body: Value = serde_json::from_str(&curl(&[
        "-G",
        &url,
        "--data-urlencode",
        &format!("query={expr}"),
    ]))
    .unwrap();
    assert_eq!(body["status"], "success", "{expr}: {body}");
    body["data"].clone()
}

/// The first sample's value of an instant query, when there is one.
fn value(prom: u16, expr: &str) -> Option<f64> {
    query(prom, expr)["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
}

fn until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // A plain #[test] on its own thread, no async runtime to block.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Like [`until`], for a count that should reach a bound: probes until `probe` says done or
/// the settle time is over, and returns the last count either way (the caller asserts on it,
/// with its own message).
fn until_or_last(mut probe: impl FnMut() -> (bool, usize)) -> usize {
    let deadline = Instant::now() + SETTLE;
    loop {
        let (done, count) = probe();
        if done || Instant::now() >= deadline {
            return count;
        }
        // A plain #[test] on its own thread, no async runtime to block.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn prometheus_scrapes_both_binaries_and_the_rules_work_on_their_series() {
    let (Some(prometheus), Some(_)) = (on_path("prometheus"), on_path("curl")) else {
        let required = std::env::var("CI").is_ok_and(|v| v == "true")
            || std::env::var("REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "prometheus or curl not found (scripts/test-deps.sh)"
        );
        eprintln!("SKIPPED: prometheus or curl not found (Debian packages prometheus, curl)");
        return;
    };
    let (webhook_bin, proxy_bin) = binaries();
    let dir = std::env::temp_dir().join(format!("egress-gate-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // The proxy: one account mapped to the loopback echo server.
    let upstream = echo_upstream();
    let proxy_config = dir.join("proxy.yaml");
    let policy = format!(
        "allow:\n  - host: '*.blob.core.windows.net'\n    ports: [{port}]\n    cidrs: [127.0.0.0/8]\nhosts:\n  {ACCT}: [127.0.0.1]\nmaxTunnels: 50\n",
        port = upstream.port()
    );
    std::fs::write(&proxy_config, &policy).unwrap();
    let proxy = Proc::start(
        Command::new(&proxy_bin)
            .arg("--config")
            .arg(&proxy_config)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--log-format", "json", "--watch-interval", "100ms"]),
    );
    let started = proxy.wait_for("egress-proxy listening");
    let proxy_addr: SocketAddr = started["listen"].as_str().unwrap().parse().unwrap();
    let proxy_admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();

    // The webhook, with a certificate from its own `certs` command.
    let tls = dir.join("tls");
    let out = Command::new(&webhook_bin)
        .args(["certs", "--out-dir"])
        .arg(&tls)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let webhook_config = dir.join("webhook").join("webhook.yaml");
    std::fs::create_dir_all(webhook_config.parent().unwrap()).unwrap();
    std::fs::write(&webhook_config, "discovery: false\n").unwrap();
    let webhook = Proc::start(
        Command::new(&webhook_bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--log-format", "json", "--config"])
            .arg(&webhook_config)
            .arg("--tls-cert")
            .arg(tls.join("tls.crt"))
            .arg("--tls-key")
            .arg(tls.join("tls.key"))
            .env_remove("KUBERNETES_SERVICE_HOST"),
    );
    let started = webhook.wait_for("serving admission reviews");
    let webhook_addr: SocketAddr = started["listen"].as_str().unwrap().parse().unwrap();
    let webhook_admin: SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();

    // Prometheus: both admin ports every second, deploy/monitoring's rules with `for: 0s`.
    let mut groups = find(
        &render(&repo_root().join("deploy/monitoring")).unwrap(),
        "PrometheusRule",
        "egress-gate",
    )
    .unwrap()["spec"]["groups"]
        .clone();
    for group in groups.as_array_mut().unwrap() {
        group["interval"] = json!("1s");
        for rule in group["rules"].as_array_mut().unwrap() {
            rule["for"] = json!("0s");
        }
    }
    let rules = dir.join("rules.yaml");
    std::fs::write(
        &rules,
        serde_yaml_ng::to_string(&json!({"groups": groups})).unwrap(),
    )
    .unwrap();
    let prom_config = dir.join("prometheus.yml");
    let scrape = |job: &str, addr: SocketAddr, pod: &str| {
        json!({"job_name": job, "scrape_interval": "1s", "honor_labels": true,
               "static_configs": [{"targets": [addr.to_string()],
                                   "labels": {"namespace": "egress-gate", "pod": pod}}]})
    };
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules.display().to_string()],
        "scrape_configs": [
            scrape("egress-webhook", webhook_admin, "egress-webhook-0"),
            scrape("egress-proxy", proxy_admin, "egress-proxy-0"),
        ],
    });
    std::fs::write(&prom_config, serde_yaml_ng::to_string(&config).unwrap()).unwrap();
    let prom = free_port();
    let _prometheus = Proc::start(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
            .arg("--log.format=json"),
    );
    until("both targets up", || {
        let up = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "2",
                "-G",
                &format!("http://127.0.0.1:{prom}/api/v1/query"),
            ])
            .args(["--data-urlencode", "query=sum(up)"])
            .output()
            .ok()?;
        let body: Value = serde_json::from_slice(&up.stdout).ok()?;
        (body["data"]["result"][0]["value"][1] == "2").then_some(())
    });

    // Traffic: tunnels allowed and denied, an admission review, rejected reloads.
    for _ in 0..3 {
        assert!(connect(proxy_addr, &format!("{ACCT}:{}", upstream.port())).contains(" 200 "));
    }
    // A counter series appears with its first increment: let Prometheus see the first
    // denial before the others, so that rate() has an increase to see, as in a live cluster.
    assert!(connect(proxy_addr, "evil.example.com:443").contains(" 403 "));
    until("the first denial scraped", || {
        (value(
            prom,
            r#"egress_proxy_denials_total{reason="host-not-allowed"}"#,
        ) == Some(1.0))
        .then_some(())
    });
    for _ in 0..4 {
        assert!(connect(proxy_addr, "evil.example.com:443").contains(" 403 "));
    }
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "prometheus-test", "operation": "CREATE", "namespace": "db",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "pg-1", "labels": {"cnpg.io/podRole": "instance"}},
                       "spec": {"containers": [{"name": "postgres", "image": "pg"}]}},
        },
    });
    let host = "egress-webhook.egress-gate.svc";
    let answer = curl(&[
        "--cacert",
        tls.join("ca.crt").to_str().unwrap(),
        "--resolve",
        &format!("{host}:{}:127.0.0.1", webhook_addr.port()),
        "-H",
        "content-type: application/json",
        "--data-binary",
        &review.to_string(),
        &format!("https://{host}:{}/mutate", webhook_addr.port()),
    ]);
    assert!(answer.contains("\"patchType\":\"JSONPatch\""), "{answer}");
    std::fs::write(&proxy_config, "maxTunnels: 0\n").unwrap();
    proxy.wait_for("reload rejected");
    std::fs::write(&webhook_config, "proxyURL: ftp://nope\n").unwrap();
    webhook.wait_for("rejected");

    // The series, as Prometheus stored them.
    let expect = |expr: &str, want: f64| {
        until(&format!("{expr} == {want}"), || {
            (value(prom, expr) == Some(want)).then_some(())
        })
    };
    expect(r#"egress_proxy_tunnels_total{code="200"}"#, 3.0);
    expect(
        r#"egress_proxy_denials_total{reason="host-not-allowed"}"#,
        5.0,
    );
    expect(r#"egress_proxy_bytes_total{direction="up"}"#, 12.0);
    expect(r#"egress_proxy_connect_duration_seconds_count"#, 3.0);
    expect(r#"egress_proxy_max_tunnels"#, 50.0);
    expect(r#"egress_proxy_config_reloads_total{result="error"}"#, 1.0);
    expect(
        r#"egress_webhook_reviews_total{result="patched", profile="cnpg"}"#,
        1.0,
    );
    expect(r#"egress_webhook_review_duration_seconds_count"#, 1.0);
    expect(
        r#"egress_webhook_config_reloads_total{result="error"}"#,
        1.0,
    );
    expect(r#"egress_webhook_config_valid"#, 0.0);
    expect(r#"egress_webhook_ready"#, 1.0);
    let expiry = value(prom, "egress_webhook_certificate_expiry_timestamp_seconds").unwrap();
    // `time()` is a scalar, not a vector: its value is the result itself.
    let now: f64 = query(prom, "time()")["result"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        expiry - now > 300.0 * 86_400.0,
        "certs default to 365 days: {expiry} vs {now}"
    );

    // The denial alert fires (and the webhook's config alert), as Prometheus evaluates it.
    until("EgressGateProxyDenialsAfterReload firing", || {
        let alerts: Value =
            serde_json::from_str(&curl(&[&format!("http://127.0.0.1:{prom}/api/v1/alerts")]))
                .ok()?;
        let firing: Vec<&str> = alerts["data"]["alerts"]
            .as_array()?
            .iter()
            .filter(|a| a["state"] == "firing")
            .filter_map(|a| a["labels"]["alertname"].as_str())
            .collect();
        (firing.contains(&"EgressGateProxyDenialsAfterReload")
            && firing.contains(&"EgressGateWebhookConfigRejected"))
        .then_some(())
    });

    // Every rule and dashboard expression is accepted by this Prometheus; those about what
    // the traffic produced return data.
    let docs = render(&repo_root().join("deploy/monitoring")).unwrap();
    let dashboard: Value = serde_json::from_str(
        find(&docs, "ConfigMap", "egress-gate-dashboard").unwrap()["data"]["egress-gate.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
        })
        .collect();
    let dashboard_count = exprs.len();
    for group in groups.as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    // All but the API server's own series and the pod watch (off here) have data. Rates need
    // two scrapes inside their window, so a loaded machine may take a few more seconds:
    // count again until enough answer, and name the silent ones if they never do.
    let enough = dashboard_count - 6;
    let mut silent = Vec::new();
    let counted = until_or_last(|| {
        silent = exprs
            .iter()
            .filter(|expr| {
                query(prom, expr)["result"]
                    .as_array()
                    .is_none_or(|r| r.is_empty())
            })
            .cloned()
            .collect();
        let with_data = exprs.len() - silent.len();
        (with_data >= enough, with_data)
    });
    assert!(
        counted >= enough,
        "{counted} of {} returned data, {enough} needed; without data: {silent:#?}",
        exprs.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
