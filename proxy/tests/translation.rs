//! IPv6 forms of denied IPv4 addresses (issue 21 items 2 and 3), run as the outside review
//! ran them: inside a network namespace of its own, with only loopback, so that no dial can
//! leave the machine. Every IPv6 form is assigned to the namespace's loopback with a
//! listener on it, so a dial the proxy should not make would be accepted and counted.
//!
//! The outer test creates the namespace and runs this same test binary inside it
//! (`ip netns exec`), where the inner test does the work. Without root, or where the kernel
//! refuses `ip netns add`, the outer test says so on stderr and skips.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use tokio::net::TcpListener;

/// Prefix of the namespaces this test creates, so a leftover one is easy to spot and delete.
const NETNS_PREFIX: &str = "egh21-";
/// Set (to the namespace's name) for the inner run; the inner test refuses to run without it.
const NETNS_ENV: &str = "EGRESS_PROXY_TEST_NETNS";
/// The inner test's name, for `--exact`.
const INNER: &str = "inner_translation_forms_are_refused_without_a_dial";

/// Deletes the namespace when the outer test ends, pass or fail.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn ipv6_translation_forms_in_a_network_namespace() {
    let name = format!("{NETNS_PREFIX}{}", std::process::id());
    if !run("ip", &["netns", "add", &name]) {
        eprintln!(
            "SKIPPED ipv6_translation_forms_in_a_network_namespace: `ip netns add` was refused (needs root and a kernel that allows network namespaces)"
        );
        return;
    }
    let ns = Netns(name);
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args([
            "--exact",
            INNER,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(NETNS_ENV, &ns.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "inner run failed:\n{stdout}\n{stderr}"
    );
}

/// A listener counting its accepts on `addr`.
async fn counting(addr: SocketAddr) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let accepts = Arc::new(AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    accepts
}

fn ip(args: &[&str]) {
    assert!(run("ip", args), "ip {}", args.join(" "));
}

#[tokio::test]
#[ignore = "runs inside the namespace that ipv6_translation_forms_in_a_network_namespace creates"]
async fn inner_translation_forms_are_refused_without_a_dial() {
    let ns = std::env::var(NETNS_ENV)
        .unwrap_or_else(|_| panic!("run by ipv6_translation_forms_in_a_network_namespace only"));
    assert!(ns.starts_with(NETNS_PREFIX), "{ns}");
    // This namespace has loopback and nothing else: no route leaves it.
    ip(&["link", "set", "lo", "up"]);
    ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    let v6 = [
        "64:ff9b::7f00:2",      // NAT64, embeds 127.0.0.2
        "2002:7f00:2::1",       // 6to4, embeds 127.0.0.2
        "2002:7f00:2:beef::42", // another address of that 6to4 /48
        "::7f00:2",             // IPv4-compatible, embeds 127.0.0.2
        "64:ff9b:1::a9fe:a9fe", // local-use NAT64, embeds 169.254.169.254
        "::ffff:0:7f00:1",      // SIIT, embeds 127.0.0.1
        "2001:0:a9fe:a9fe::1",  // Teredo, server field 169.254.169.254
        "fd00:e9::1",           // control: an IPv6 address a rule does allow
    ];
    for a in v6 {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
    }

    // One port for every listener, so each target below would reach one if it were dialled.
    let first = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = first.local_addr().unwrap().port();
    drop(first);
    let mut listeners = Vec::new();
    for a in ["127.0.0.1", "127.0.0.2", "169.254.169.254"]
        .iter()
        .chain(&v6)
    {
        let addr = SocketAddr::new(a.parse::<IpAddr>().unwrap(), port);
        listeners.push((*a, counting(addr).await));
    }
    let accepted = |a: &str| {
        listeners
            .iter()
            .find(|(l, _)| *l == a)
            .map(|(_, n)| n.load(Ordering::SeqCst))
            .unwrap()
    };

    // The review's rule (a host-less 127.0.0.2/32), an IPv6 range for the control, and a
    // name rule that opens the IPv4 ranges the names below embed: the IPv6 forms of those
    // ranges must stay shut all the same.
    let p = proxy(&format!(
        "headTimeout: 2s\nconnectTimeout: 2s\nallow:\n\
         - {{cidrs: [127.0.0.2/32, 'fd00:e9::/64'], ports: [{port}]}}\n\
         - {{host: '*.blob.core.windows.net', ports: [{port}], cidrs: [127.0.0.0/8, 169.254.0.0/16]}}\n\
         hosts:\n  nat64-local.blob.core.windows.net: ['64:ff9b:1::a9fe:a9fe']\n\
         \x20 siit.blob.core.windows.net: ['::ffff:0:7f00:1']\n\
         \x20 nat64.blob.core.windows.net: ['64:ff9b::7f00:2']\n\
         \x20 sixtofour.blob.core.windows.net: ['2002:7f00:2::1']\n\
         \x20 teredo.blob.core.windows.net: ['2001:0:a9fe:a9fe::1']\n\
         \x20 loopback.blob.core.windows.net: [127.0.0.1]\n"
    ))
    .await;

    // IPv6 literals embedding 127.0.0.2: an IPv4 range does not allow them.
    for literal in [
        "64:ff9b::7f00:2",
        "2002:7f00:2::1",
        "2002:7f00:2:beef::42",
        "::7f00:2",
    ] {
        let got = refusal(
            p.addr,
            &format!("CONNECT [{literal}]:{port} HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(
            got.starts_with(
                "HTTP/1.1 403 Forbidden\r\nX-Egress-Gate-Reason: ip-literal-not-allowed\r\n"
            ),
            "{literal}: {got}"
        );
        assert!(
            got.contains("embeds the IPv4 address 127.0.0.2 ("),
            "{literal}: {got}"
        );
    }
    // Names resolving to translation forms of metadata and loopback.
    for (name, embedded) in [
        ("nat64-local", "169.254.169.254"),
        ("siit", "127.0.0.1"),
        ("nat64", "127.0.0.2"),
        ("sixtofour", "127.0.0.2"),
        ("teredo", "169.254.169.254"),
    ] {
        let got = refusal(
            p.addr,
            &format!("CONNECT {name}.blob.core.windows.net:{port} HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(
            got.starts_with("HTTP/1.1 403 Forbidden\r\nX-Egress-Gate-Reason: address-denied\r\n"),
            "{name}: {got}"
        );
        assert!(
            got.contains(&format!("embeds the IPv4 address {embedded} (")),
            "{name}: {got}"
        );
    }
    for a in v6 {
        assert_eq!(accepted(a), 0, "{a} was dialled");
    }
    for a in ["127.0.0.1", "127.0.0.2", "169.254.169.254"] {
        assert_eq!(accepted(a), 0, "{a} was dialled");
    }

    // Controls: what the rules do allow is dialled and counted, over IPv4 and IPv6 alike,
    // so the zero counts above mean "not dialled", not "not countable".
    for (target, listener) in [
        ("127.0.0.2", "127.0.0.2"),
        ("[fd00:e9::1]", "fd00:e9::1"),
        ("loopback.blob.core.windows.net", "127.0.0.1"),
    ] {
        let mut s = send(
            p.addr,
            format!("CONNECT {target}:{port} HTTP/1.1\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(read_head(&mut s).await, ESTABLISHED, "{target}");
        eventually(listener, || async { accepted(listener) == 1 }).await;
    }
}
