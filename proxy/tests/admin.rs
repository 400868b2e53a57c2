//! The admin port under abuse (issue 21 item 1): silent, half-sent and idle keep-alive
//! connections are closed by the header timeout, and a thousand idle connections neither
//! exhaust the descriptors of a proxy sized as docs/proxy.md says nor keep `/healthz` or an
//! allowed CONNECT from being answered.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use egress_proxy::admin::{ADMIN_CONNECTION_LIFETIME, ADMIN_HEADER_TIMEOUT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

/// Margin over a timeout for the close to be seen (timer wheel, scheduling on a busy CI box).
const SLACK: Duration = Duration::from_secs(2);

/// Reads until the peer closes; returns what arrived and when the close came.
async fn until_closed(mut s: TcpStream, started: Instant) -> (String, Duration) {
    let mut out = Vec::new();
    let limit = ADMIN_HEADER_TIMEOUT + SLACK * 2;
    let read = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "connection still open after {limit:?}: {:?}",
        String::from_utf8_lossy(&out)
    );
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn silent_half_sent_and_idle_admin_connections_are_closed() {
    let p = proxy("").await;
    let started = Instant::now();
    // Connects and never sends a byte.
    let silent = TcpStream::connect(p.admin).await.unwrap();
    // Sends half a request head, then stalls.
    let mut half = TcpStream::connect(p.admin).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // One complete keep-alive request, answered, then idle.
    let mut idle = TcpStream::connect(p.admin).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    let (silent, half, idle) = tokio::join!(
        until_closed(silent, started),
        until_closed(half, started),
        until_closed(idle, started),
    );
    for (what, (got, after)) in [("silent", &silent), ("half-sent", &half), ("idle", &idle)] {
        let after = *after;
        assert!(
            after >= ADMIN_HEADER_TIMEOUT - Duration::from_millis(500),
            "{what} connection closed after {after:?}, before the header timeout"
        );
        assert!(
            after <= ADMIN_HEADER_TIMEOUT + SLACK,
            "{what} connection closed only after {after:?}: {got:?}"
        );
    }
    assert!(idle.0.starts_with("HTTP/1.1 200 OK\r\n"), "{:?}", idle.0);
    assert!(idle.0.ends_with("ok\n"), "{:?}", idle.0);
    assert!(
        ADMIN_HEADER_TIMEOUT < ADMIN_CONNECTION_LIFETIME,
        "the lifetime cap must not be what closed them"
    );
    // The port still serves.
    assert!(
        admin_get(p.admin, "/healthz")
            .await
            .starts_with("HTTP/1.1 200 OK\r\n")
    );
}

/// Raises this test process's own open-files soft limit (up to 4,096) so that it can hold
/// the idle connections; the proxy under test gets 1,024 through `ulimit`.
fn raise_own_nofile(need: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = hard.min(4096);
    assert!(
        want >= need,
        "the hard open-files limit {hard} is below the {need} this test needs"
    );
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
}

#[tokio::test]
async fn over_a_thousand_idle_admin_connections_starve_nothing() {
    raise_own_nofile(1200);
    let up = echo_upstream().await;
    let port = up.addr.port();
    let dir = temp_dir("admin-flood");
    let config = dir.join("proxy.yaml");
    // The sizing the outside review used: maxTunnels 300 in 1,024 descriptors.
    std::fs::write(&config, format!("maxTunnels: 300\n{}", policy(port))).unwrap();
    let mut child = Command::new("sh")
        .args(["-c", r#"ulimit -n 1024 && exec "$0" "$@""#, BIN])
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, mut logs) = mpsc::unbounded_channel::<serde_json::Value>();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let started = loop {
        let v = tokio::time::timeout(WAIT, logs.recv())
            .await
            .unwrap()
            .unwrap();
        if v["message"] == "egress-proxy listening" {
            break v;
        }
    };
    let addr: std::net::SocketAddr = started["listen"].as_str().unwrap().parse().unwrap();
    let admin: std::net::SocketAddr = started["admin"].as_str().unwrap().parse().unwrap();
    let limit = std::fs::read_to_string(format!("/proc/{}/limits", child.id().unwrap())).unwrap();
    assert!(
        limit
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "{limit}"
    );

    // 1,100 connections to the admin port (what exhausted the descriptors before the cap),
    // half silent and half with a half-sent head, all held open.
    let mut idle = Vec::with_capacity(1100);
    for i in 0..1100 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        }
        idle.push(s);
    }

    // An allowed CONNECT is answered 200 and tunnels; /healthz answers at once.
    let t = Instant::now();
    let mut tunnel = open_tunnel(addr, port).await;
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let health = tokio::time::timeout(Duration::from_secs(2), admin_get(admin, "/healthz"))
        .await
        .expect("/healthz did not answer within 2 s");
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n"), "{health}");
    assert!(health.ends_with("ok\n"), "{health}");
    let answered_in = t.elapsed();
    assert!(answered_in < Duration::from_secs(3), "{answered_in:?}");
    assert_eq!(up.accepted(), 1);

    // The proxy holds a handful of admin descriptors, not a thousand.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", child.id().unwrap()))
        .unwrap()
        .count();
    assert!(fds < 100, "the proxy holds {fds} descriptors");

    // Nothing ran out: no accept failures were logged.
    drop(idle);
    drop(tunnel);
    tokio::time::sleep(Duration::from_millis(200)).await;
    while let Ok(v) = logs.try_recv() {
        let message = v["message"].as_str().unwrap_or_default();
        assert!(!message.contains("accept failed"), "{v}");
    }
    child.kill().await.unwrap();
}
