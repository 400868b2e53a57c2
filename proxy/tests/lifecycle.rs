//! The real binary: exit code 64 on bad config, the JSON access log, SIGHUP and file-change
//! reloads (a broken file keeps the running policy), and SIGTERM draining.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

/// The binary, started on a config file, with its JSON log lines on a channel.
struct Running {
    child: Child,
    logs: mpsc::UnboundedReceiver<serde_json::Value>,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Running {
    async fn start(config: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--watch-interval", "100ms"])
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (tx, mut logs) = mpsc::unbounded_channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let started = Self::wait_for(&mut logs, "egress-proxy listening").await;
        let addr = started["listen"].as_str().unwrap().parse().unwrap();
        let admin = started["admin"].as_str().unwrap().parse().unwrap();
        Self {
            child,
            logs,
            addr,
            admin,
        }
    }

    async fn wait_for(
        logs: &mut mpsc::UnboundedReceiver<serde_json::Value>,
        message: &str,
    ) -> serde_json::Value {
        loop {
            let v = tokio::time::timeout(WAIT, logs.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line {message:?}"))
                .unwrap();
            if v["message"].as_str().is_some_and(|m| m.contains(message)) {
                return v;
            }
        }
    }

    async fn log(&mut self, message: &str) -> serde_json::Value {
        Self::wait_for(&mut self.logs, message).await
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

#[tokio::test]
async fn bad_config_exits_64_naming_the_field() {
    let dir = temp_dir("bad-config");
    for (text, field) in [
        ("maxTunnels: 0\n", "maxTunnels"),
        (
            "allow: [{host: '*.x.com', ports: [443x]}]\n",
            "allow[0].ports",
        ),
        ("idleTimout: 5m\n", "idleTimout"),
        ("keepalive: 10m\n", "keepalive"),
        (
            "allow: [{host: a.blob.core.windows.net, onlyCIDRs: true}]\n",
            "allow[0].onlyCIDRs",
        ),
    ] {
        let path = dir.join("c.yaml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["--config", path.to_str().unwrap()])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{text}: {err}");
    }
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/egress-proxy.yaml"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn text_log_has_no_colour_codes_off_a_terminal() {
    let mut child = Command::new(BIN)
        .args(["--log-format", "text"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("egress-proxy listening"), "{line:?}");
    assert!(
        !line.contains('\x1b'),
        "escape codes in a piped log: {line:?}"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn access_log_reload_and_drain() {
    let up = echo_upstream().await;
    let port = up.addr.port();
    let dir = temp_dir("lifecycle");
    let config = dir.join("proxy.yaml");
    std::fs::write(&config, policy(port)).unwrap();
    let mut bin = Running::start(&config).await;

    // One tunnel, then its access-log line with every field.
    let mut s = open_tunnel(bin.addr, port).await;
    s.write_all(b"abc").await.unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).await.unwrap();
    drop(s);
    let line = bin.log("tunnel").await;
    assert_eq!(line["target"], format!("{ACCT}:{port}"));
    assert_eq!(line["resolved"], format!("127.0.0.1:{port}"));
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_up"], 3);
    assert_eq!(line["bytes_down"], 3);
    assert_eq!(line["reason"], "closed");
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["duration_ms"].is_u64());

    // A tunnel that stays open across reloads and the drain.
    let mut long = open_tunnel(bin.addr, port).await;

    // A broken file on SIGHUP: rejected, the running policy stays.
    std::fs::write(&config, "allow: [{host: 'not a host'}]\n").unwrap();
    bin.signal("-HUP");
    bin.log("reload rejected").await;
    drop(open_tunnel(bin.addr, port).await);

    // A valid new file, noticed without a signal: the name is no longer allowed.
    std::fs::write(&config, "allow: [{host: other.example.com}]\n").unwrap();
    bin.log("configuration reloaded").await;
    assert!(
        refusal(bin.addr, &format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n"))
            .await
            .contains("host-not-allowed")
    );
    // The access log names the refusal with the header's word, and the sentence sent.
    let denied = loop {
        let line = bin.log("tunnel").await;
        if line["status"] == 403 {
            break line;
        }
    };
    assert_eq!(denied["reason"], "host-not-allowed");
    assert_eq!(denied["detail"], "host not allowed");
    long.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still");

    // SIGTERM: not ready, not accepting, the open tunnel still flows, exit when it closes.
    bin.signal("-TERM");
    bin.log("draining").await;
    assert!(
        admin_get(bin.admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 503")
    );
    eventually("the listener to close", || async {
        tokio::net::TcpStream::connect(bin.addr).await.is_err()
    })
    .await;
    long.write_all(b"drain").await.unwrap();
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"drain");
    assert!(bin.child.try_wait().unwrap().is_none());
    drop(long);
    let status = tokio::time::timeout(WAIT, bin.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn drain_deadline_cuts_a_half_sent_head_and_logs_it() {
    let up = echo_upstream().await;
    let dir = temp_dir("drain-head");
    let config = dir.join("proxy.yaml");
    // A head timeout longer than the drain deadline: the deadline must win.
    let text = policy(up.addr.port()).replace("headTimeout: 500ms", "headTimeout: 1m")
        + "drainTimeout: 300ms\n";
    std::fs::write(&config, text).unwrap();
    let mut bin = Running::start(&config).await;

    let mut half = tokio::net::TcpStream::connect(bin.addr).await.unwrap();
    half.write_all(b"CONNECT acct.blob.core.windows.net:")
        .await
        .unwrap();
    let admin = bin.admin;
    eventually("the proxy to hold the connection", || async move {
        admin_get(admin, "/metrics")
            .await
            .contains("egress_proxy_tunnels_active 1")
    })
    .await;
    bin.signal("-TERM");
    bin.log("drain deadline passed").await;
    let line = bin.log("tunnel").await;
    assert_eq!(line["status"], 0);
    assert_eq!(line["reason"], "drain-deadline");
    // Closed without an answer, and the process exits.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(WAIT, half.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&rest));
    let status = tokio::time::timeout(WAIT, bin.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// One sample's value from the admin port's metrics text.
async fn sample(admin: std::net::SocketAddr, series: &str) -> Option<f64> {
    let text = admin_get(admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn tunnel_ceiling_build_and_last_good_reload_are_exported() {
    let dir = temp_dir("ops-metrics");
    let config = dir.join("proxy.yaml");
    std::fs::write(&config, "maxTunnels: 7\n").unwrap();
    let mut bin = Running::start(&config).await;
    assert_eq!(
        sample(bin.admin, "egress_proxy_max_tunnels").await,
        Some(7.0)
    );
    let build = format!(
        "egress_proxy_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(bin.admin, &build).await, Some(1.0));
    let last = "egress_proxy_config_last_reload_success_timestamp_seconds";
    let started = sample(bin.admin, last).await.unwrap();

    // Rejected: counted, the timestamp stays. Good (a second later): it moves.
    std::fs::write(&config, "maxTunnels: 0\n").unwrap();
    bin.signal("-HUP");
    bin.log("reload rejected").await;
    let errors = "egress_proxy_config_reloads_total{result=\"error\"}";
    // At least one: the file watcher may notice the same change and reject it too.
    let rejected = sample(bin.admin, errors).await.unwrap_or(0.0);
    assert!(rejected >= 1.0, "{rejected} rejected reloads counted");
    assert_eq!(sample(bin.admin, last).await, Some(started));
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    std::fs::write(
        &config,
        "maxTunnels: 7\nallow: [{host: other.example.com}]\n",
    )
    .unwrap();
    bin.log("configuration reloaded").await;
    assert!(sample(bin.admin, last).await.unwrap() > started);
}
