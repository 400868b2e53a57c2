//! Fair share of the one door (issue 14): one client address holding thousands of stalled
//! heads is refused past its limit, while another address still sets tunnels up at the rate
//! it had before the flood (rates compared within the run, not against a clock).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn raise_own_nofile(need: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = hard.min(8192);
    assert!(
        want >= need,
        "the hard open-files limit {hard} is below the {need} this test needs"
    );
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
}

async fn connect_from(proxy: SocketAddr, src: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
    socket.connect(proxy).await.unwrap()
}

/// Tunnels set up per second from `src`: `n` in a row, each CONNECT answered 200 and closed.
async fn setup_rate(proxy: SocketAddr, src: &str, port: u16, n: u32) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        let mut s = connect_from(proxy, src).await;
        s.write_all(format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_head(&mut s).await, ESTABLISHED);
    }
    f64::from(n) / t0.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_heads_from_one_address_do_not_lock_out_another() {
    const LIMIT: usize = 500;
    const STALLED: usize = 2000;
    raise_own_nofile(6000);
    let up = echo_upstream().await;
    let port = up.addr.port();
    let proxy = proxy(&format!(
        "perSource: {{maxConnections: {LIMIT}, connectionsPerSecond: 100000}}\n{}",
        policy(port).replace("headTimeout: 500ms", "headTimeout: 60s")
    ))
    .await;
    // Warm-up (first connections pay for task and buffer allocation), then the baseline.
    setup_rate(proxy.addr, "127.0.0.3", port, 100).await;
    let before = setup_rate(proxy.addr, "127.0.0.3", port, 300).await;

    // Half a CONNECT head each, never finished.
    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut s = connect_from(proxy.addr, "127.0.0.2").await;
        let _ = s
            .write_all(format!("CONNECT {ACCT}:{port} HTTP/1.1\r\nHo").as_bytes())
            .await;
        stalled.push(s);
    }
    let refused = (STALLED - LIMIT) as f64;
    eventually("the flood past the limit refused", || async {
        metric(
            proxy.admin,
            "egress_proxy_denials_total{reason=\"source-connection-limit\"} ",
        )
        .await
            == refused
    })
    .await;
    // Exactly the limit is held; the rest were closed at accept.
    assert_eq!(
        metric(proxy.admin, "egress_proxy_tunnels_active ").await,
        LIMIT as f64
    );
    // A refused connection was told why, unless its unread head turned the close into a reset.
    let mut last = stalled.pop().unwrap();
    let mut answer = Vec::new();
    if tokio::time::timeout(WAIT, last.read_to_end(&mut answer))
        .await
        .unwrap()
        .is_ok()
    {
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 429 Too Many Requests\r\nX-Egress-Gate-Reason: source-connection-limit\r\nRetry-After: 5\r\n"), "{answer}");
    }

    // Another address sets tunnels up as before.
    let during = setup_rate(proxy.addr, "127.0.0.3", port, 300).await;
    eprintln!(
        "setup rate from a second address: {before:.0}/s before, {during:.0}/s with {LIMIT} stalled heads held and {refused} refused"
    );
    assert!(
        // Generous: the machine is shared and a rate is noisy. What must hold is that the
        // flood costs the second address little: past the limit it holds nothing.
        during >= before * 0.3,
        "setup rate from another address fell from {before:.0}/s to {during:.0}/s"
    );
    drop(stalled);
    eventually("the held heads released", || async {
        metric(proxy.admin, "egress_proxy_tunnels_active ").await == 0.0
    })
    .await;
    // With its connections closed, the first address may connect again.
    assert!(setup_rate(proxy.addr, "127.0.0.2", port, 1).await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_past_the_rate_get_429_with_retry_after() {
    let up = echo_upstream().await;
    let port = up.addr.port();
    let proxy = proxy(&format!(
        "perSource: {{connectionsPerSecond: 5}}\n{}",
        policy(port)
    ))
    .await;
    // A burst of twice the rate passes (held open, so none of it is refilled by waiting).
    let mut open = Vec::new();
    for _ in 0..10 {
        let mut s = connect_from(proxy.addr, "127.0.0.4").await;
        s.write_all(format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_head(&mut s).await, ESTABLISHED);
        open.push(s);
    }
    let mut s = connect_from(proxy.addr, "127.0.0.4").await;
    let answer = read_all(&mut s).await;
    assert!(
        answer.starts_with("HTTP/1.1 429 Too Many Requests\r\nX-Egress-Gate-Reason: source-rate-limit\r\nRetry-After: 1\r\n"),
        "{answer}"
    );
    // Another address is not affected; after a second the first may connect again.
    assert!(setup_rate(proxy.addr, "127.0.0.5", port, 1).await > 0.0);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(setup_rate(proxy.addr, "127.0.0.4", port, 1).await > 0.0);
}
