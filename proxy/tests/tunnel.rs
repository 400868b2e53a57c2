//! The proxy over real sockets: what it tunnels, what it refuses, and the exact bytes it
//! answers with. Every case of issue 4's "bad input and security" list is a test here or in
//! `clients.rs` / `lifecycle.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn http10_without_host_tunnels_bytes_both_ways() {
    let (up, p) = setup().await;
    // Exactly what barman-cloud on Python 3.11 sends.
    let head = format!("CONNECT {ACCT}:{} HTTP/1.0\r\n\r\n", up.addr.port());
    let mut s = send(p.addr, head.as_bytes()).await;
    assert_eq!(read_head(&mut s).await, ESTABLISHED);
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn bytes_pipelined_after_the_head_are_not_lost() {
    let (up, p) = setup().await;
    // Head, and a ClientHello-like payload in the same segment; then half-close.
    let head = format!(
        "CONNECT {ACCT}:{0} HTTP/1.1\r\nHost: {ACCT}:{0}\r\n\r\n\x16\x03\x01hello",
        up.addr.port()
    );
    let mut s = send(p.addr, head.as_bytes()).await;
    s.shutdown().await.unwrap();
    assert_eq!(
        read_all(&mut s).await,
        format!("{ESTABLISHED}\x16\x03\x01hello")
    );
}

#[tokio::test]
async fn denied_host_gets_403_and_no_outbound_connection() {
    let (up, p) = setup().await;
    assert_eq!(
        refusal(
            p.addr,
            &format!(
                "CONNECT example.com:{} HTTP/1.1\r\nHost: example.com\r\n\r\n",
                up.addr.port()
            )
        )
        .await,
        answer(
            "403 Forbidden",
            "host-not-allowed",
            "host not allowed\n",
            false
        )
    );
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn ip_literals_are_denied_without_a_cidr_rule() {
    let (up, p) = setup().await;
    let port = up.addr.port();
    for target in [
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1.:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        "169.254.169.254:80".to_owned(),
        "169.254.169.254:443".to_owned(),
    ] {
        assert_eq!(
            refusal(p.addr, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await,
            answer(
                "403 Forbidden",
                "ip-literal-not-allowed",
                "IP-literal target not allowed\n",
                false
            ),
            "{target}"
        );
    }
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn ip_literal_inside_a_hostless_cidr_rule_tunnels() {
    let up = echo_upstream().await;
    let port = up.addr.port();
    let p = proxy(&format!(
        "allow:\n  - cidrs: [127.0.0.0/8]\n    ports: [{port}]\n"
    ))
    .await;
    let mut s = send(
        p.addr,
        format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(read_head(&mut s).await, ESTABLISHED);
    // The mapped form names the same range and is allowed too; 127.0.0.1 on another port is not.
    let mut s = send(
        p.addr,
        format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", port ^ 1).as_bytes(),
    )
    .await;
    assert!(read_all(&mut s).await.starts_with("HTTP/1.1 403 "));
    // A name is not an IP literal: no host rule, so denied.
    let mut s = send(
        p.addr,
        format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(read_all(&mut s).await.contains("host-not-allowed"));
    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn names_resolving_into_denied_ranges_are_refused() {
    let up = echo_upstream().await;
    let port = up.addr.port();
    let p = proxy(&policy(port)).await;
    for (name, addr) in [
        ("metadata.blob.core.windows.net", "169.254.169.254"),
        ("private.blob.core.windows.net", "10.1.2.3"),
        // IPv4-mapped is the IPv4 address itself, and is named as such.
        ("mapped.blob.core.windows.net", "169.254.169.254"),
    ] {
        assert_eq!(
            refusal(p.addr, &format!("CONNECT {name}:{port} HTTP/1.1\r\n\r\n")).await,
            answer(
                "403 Forbidden",
                "address-denied",
                &format!("destination address {addr} is in a denied range\n"),
                false
            )
        );
    }
    // The same name and upstream as the tunnelling tests, but the rule names no CIDR: the
    // loopback address it resolves to is in the default deny, and nothing is dialled.
    let strict = proxy(&format!(
        "allow:\n  - host: '*.blob.core.windows.net'\n    ports: [{port}]\nhosts:\n  {ACCT}: [127.0.0.1]\n"
    ))
    .await;
    let mut s = send(
        strict.addr,
        format!("CONNECT {ACCT}:{port} HTTP/1.0\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        read_all(&mut s)
            .await
            .starts_with("HTTP/1.1 403 Forbidden\r\nX-Egress-Gate-Reason: address-denied\r\n")
    );
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn other_ports_are_denied() {
    let (up, p) = setup().await;
    assert_eq!(
        refusal(p.addr, &format!("CONNECT {ACCT}:22 HTTP/1.1\r\n\r\n")).await,
        answer(
            "403 Forbidden",
            "port-not-allowed",
            "port not allowed\n",
            false
        )
    );
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn get_in_absolute_form_is_405() {
    let (up, p) = setup().await;
    assert_eq!(
        refusal(
            p.addr,
            &format!(
                "GET http://{ACCT}:{}/ HTTP/1.1\r\nHost: {ACCT}\r\n\r\n",
                up.addr.port()
            )
        )
        .await,
        answer(
            "405 Method Not Allowed",
            "method-not-allowed",
            "This proxy only tunnels: use CONNECT host:port.\n",
            true
        )
    );
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn malformed_heads_are_400() {
    let (up, p) = setup().await;
    let heads: [(&[u8], &str); 6] = [
        (
            b"CONNECT acct.blob.core.windows.net HTTP/1.1\r\n\r\n",
            "target is not host:port",
        ),
        (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", "bad host name"),
        // What a resolver reads as 127.0.0.1 is neither a name nor an address here.
        (b"CONNECT 127.1:443 HTTP/1.1\r\n\r\n", "bad host name"),
        (b"CONNECT 2130706433:443 HTTP/1.1\r\n\r\n", "bad host name"),
        (
            b"CONNECT acct.blob.core.windows.net:99999 HTTP/1.1\r\n\r\n",
            "bad port",
        ),
        (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
            "not an HTTP/1.x request",
        ),
    ];
    for (head, detail) in heads {
        let mut s = send(p.addr, head).await;
        let body = format!("malformed request: {detail}\n");
        assert_eq!(
            read_all(&mut s).await,
            answer("400 Bad Request", "malformed-request", &body, false),
            "{head:?}"
        );
    }
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn a_64k_head_is_431() {
    let (up, p) = setup().await;
    let mut head = format!("CONNECT {ACCT}:{} HTTP/1.1\r\n", up.addr.port()).into_bytes();
    while head.len() < 64 * 1024 {
        head.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let mut s = send(p.addr, &head).await;
    assert_eq!(
        read_all(&mut s).await,
        answer(
            "431 Request Header Fields Too Large",
            "head-too-large",
            "request head too large\n",
            false
        )
    );
    // Too many (small) headers is the same answer.
    let mut many = format!("CONNECT {ACCT}:{} HTTP/1.1\r\n", up.addr.port());
    for i in 0..100 {
        many.push_str(&format!("X-{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    let mut s = send(p.addr, many.as_bytes()).await;
    assert!(read_all(&mut s).await.starts_with("HTTP/1.1 431 "));
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn half_a_head_then_stall_is_408() {
    let (up, p) = setup().await; // headTimeout: 500ms
    let started = std::time::Instant::now();
    assert_eq!(
        refusal(
            p.addr,
            &format!("CONNECT {ACCT}:{} HTTP/1.1\r\nHo", up.addr.port())
        )
        .await,
        answer(
            "408 Request Timeout",
            "head-timeout",
            "request head not received in time\n",
            false
        )
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(up.accepted(), 0);
}

#[tokio::test]
async fn upstream_refusing_is_502() {
    // Bind, learn the port, close: connecting there is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let p = proxy(&policy(port)).await;
    let mut s = send(
        p.addr,
        format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    let got = read_all(&mut s).await;
    assert!(
        got.starts_with("HTTP/1.1 502 Bad Gateway\r\nX-Egress-Gate-Reason: connect-failure\r\n"),
        "{got}"
    );
    assert!(
        got.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{got}"
    );
}

#[tokio::test]
async fn upstream_never_answering_is_504() {
    // A listener with a full accept queue drops SYNs, so connect() hangs like a black hole.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            fillers.push(c);
        }
    }
    let p = proxy(&policy(addr.port())).await; // connectTimeout: 1s
    let started = std::time::Instant::now();
    assert_eq!(
        refusal(
            p.addr,
            &format!("CONNECT {ACCT}:{} HTTP/1.1\r\n\r\n", addr.port())
        )
        .await,
        answer(
            "504 Gateway Timeout",
            "connect-timeout",
            "no connection within 1s\n",
            false
        )
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    drop(sock);
}

#[tokio::test]
async fn client_half_close_with_download_still_flowing() {
    // The upstream reads the whole upload, then sends 1 MiB back and closes.
    let up = upstream(|mut s| async move {
        let mut upload = Vec::new();
        s.read_to_end(&mut upload).await.unwrap();
        assert_eq!(upload, b"the whole request");
        s.write_all(&vec![7u8; 1 << 20]).await.unwrap();
    })
    .await;
    let p = proxy(&policy(up.addr.port())).await;
    let mut s = open_tunnel(p.addr, up.addr.port()).await;
    s.write_all(b"the whole request").await.unwrap();
    s.shutdown().await.unwrap();
    let mut down = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut down))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(down.len(), 1 << 20);
}

#[tokio::test]
async fn upstream_half_close_with_transfer_still_flowing() {
    // The upstream says hello and half-closes at once, then keeps reading the client's
    // 1 MiB upload and reports its size on a side channel.
    let (tx, rx) = tokio::sync::oneshot::channel::<usize>();
    let tx = std::sync::Mutex::new(Some(tx));
    let up = upstream(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            let mut n = 0;
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(n);
            }
        }
    })
    .await;
    let p = proxy(&policy(up.addr.port())).await;
    let mut s = open_tunnel(p.addr, up.addr.port()).await;
    // The client sees the upstream's FIN ...
    assert_eq!(read_all(&mut s).await, "bye");
    // ... and can still upload through the tunnel.
    s.write_all(&vec![1u8; 1 << 20]).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, rx).await.unwrap().unwrap(),
        1 << 20
    );
}

#[tokio::test]
async fn client_disconnecting_mid_tunnel_closes_the_upstream_leg() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let tx = std::sync::Mutex::new(Some(tx));
    // The upstream streams data until its writes fail, then reports.
    let up = upstream(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            let chunk = vec![0u8; 16 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
            if let Some(tx) = tx {
                let _ = tx.send(());
            }
        }
    })
    .await;
    let p = proxy(&policy(up.addr.port())).await;
    let mut s = open_tunnel(p.addr, up.addr.port()).await;
    let mut buf = vec![0u8; 4096];
    s.read_exact(&mut buf).await.unwrap();
    // Close with unread data: the kernel sends a reset.
    drop(s);
    tokio::time::timeout(WAIT, rx).await.unwrap().unwrap();
    eventually("tunnel count back to 0", || async {
        metric(p.admin, "egress_proxy_tunnels_active").await == 0.0
    })
    .await;
}

#[tokio::test]
async fn tunnel_limit_answers_503_and_accept_keeps_working() {
    let up = echo_upstream().await;
    let p = proxy(&format!("maxTunnels: 2\n{}", policy(up.addr.port()))).await;
    let head = format!("CONNECT {ACCT}:{} HTTP/1.1\r\n\r\n", up.addr.port());
    let mut a = send(p.addr, head.as_bytes()).await;
    assert_eq!(read_head(&mut a).await, ESTABLISHED);
    let mut b = send(p.addr, head.as_bytes()).await;
    assert_eq!(read_head(&mut b).await, ESTABLISHED);
    for _ in 0..20 {
        let mut c = send(p.addr, head.as_bytes()).await;
        assert_eq!(
            read_all(&mut c).await,
            answer(
                "503 Service Unavailable",
                "tunnel-limit",
                "tunnel limit reached\n",
                false
            )
        );
    }
    drop(a);
    eventually("a slot to free up", || async {
        let mut c = send(p.addr, head.as_bytes()).await;
        read_head(&mut c).await == ESTABLISHED
    })
    .await;
    drop(b);
}

#[tokio::test]
async fn idle_timeout_needs_both_directions_idle() {
    // The upstream sends one byte every 100 ms for 1.2 s, then goes quiet.
    let up = upstream(|mut s| async move {
        for _ in 0..12 {
            if s.write_all(b".").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut buf = [0u8; 1];
        let _ = s.read(&mut buf).await;
    })
    .await;
    let p = proxy(&format!("idleTimeout: 400ms\n{}", policy(up.addr.port()))).await;
    let mut s = open_tunnel(p.addr, up.addr.port()).await;
    let started = std::time::Instant::now();
    // The client never sends; downstream traffic alone keeps the tunnel open past 400 ms.
    let all = read_all(&mut s).await;
    let took = started.elapsed();
    assert_eq!(all, "............");
    assert!(took >= Duration::from_millis(1400), "closed after {took:?}");
}

#[tokio::test]
async fn admin_endpoints_and_metrics() {
    let (up, p) = setup().await;
    assert!(
        admin_get(p.admin, "/healthz")
            .await
            .starts_with("HTTP/1.1 200 OK")
    );
    assert!(
        admin_get(p.admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 200 OK")
    );
    assert!(
        admin_get(p.admin, "/nope")
            .await
            .starts_with("HTTP/1.1 404")
    );
    let mut s = open_tunnel(p.addr, up.addr.port()).await;
    s.write_all(b"12345").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(metric(p.admin, "egress_proxy_tunnels_active").await, 1.0);
    drop(s);
    let mut d = send(p.addr, b"CONNECT example.com:443 HTTP/1.1\r\n\r\n").await;
    read_all(&mut d).await;
    eventually("tunnel count back to 0", || async {
        metric(p.admin, "egress_proxy_tunnels_active").await == 0.0
    })
    .await;
    let m = admin_get(p.admin, "/metrics").await;
    for line in [
        "egress_proxy_tunnels_total{code=\"200\"} 1",
        "egress_proxy_tunnels_total{code=\"403\"} 1",
        "egress_proxy_denials_total{reason=\"host-not-allowed\"} 1",
        "egress_proxy_bytes_total{direction=\"up\"} 5",
        "egress_proxy_bytes_total{direction=\"down\"} 5",
        "egress_proxy_connect_duration_seconds_count 1",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
}

#[tokio::test]
async fn shutdown_drains_open_tunnels_then_exits() {
    let (up, p) = setup().await;
    let head = format!("CONNECT {ACCT}:{} HTTP/1.1\r\n\r\n", up.addr.port());
    let mut s = send(p.addr, head.as_bytes()).await;
    assert_eq!(read_head(&mut s).await, ESTABLISHED);
    p.handle.shutdown();
    // Not ready, and no longer accepting ...
    assert!(
        admin_get(p.admin, "/readyz")
            .await
            .starts_with("HTTP/1.1 503")
    );
    eventually("the listener to close", || async {
        TcpStream::connect(p.addr).await.is_err()
    })
    .await;
    // ... while the open tunnel keeps working.
    s.write_all(b"drain").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"drain");
    assert!(!p.task.is_finished());
    drop(s);
    tokio::time::timeout(WAIT, p.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn drain_deadline_cuts_remaining_tunnels() {
    let up = echo_upstream().await;
    let p = proxy(&format!("drainTimeout: 300ms\n{}", policy(up.addr.port()))).await;
    let head = format!("CONNECT {ACCT}:{} HTTP/1.1\r\n\r\n", up.addr.port());
    let mut s = send(p.addr, head.as_bytes()).await;
    assert_eq!(read_head(&mut s).await, ESTABLISHED);
    let started = std::time::Instant::now();
    p.handle.shutdown();
    tokio::time::timeout(WAIT, p.task).await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The tunnel was closed by the proxy.
    assert_eq!(read_all(&mut s).await, "");
}

#[tokio::test]
async fn reload_applies_to_new_tunnels_and_keeps_open_ones() {
    let up = echo_upstream().await;
    let port = up.addr.port();
    let p = proxy(&policy(port)).await;
    let head = format!("CONNECT {ACCT}:{port} HTTP/1.1\r\n\r\n");
    let mut open = send(p.addr, head.as_bytes()).await;
    assert_eq!(read_head(&mut open).await, ESTABLISHED);
    // New policy: blob storage no longer allowed.
    let next = egress_proxy::Config::parse("allow: [{host: other.example.com}]", "t").unwrap();
    p.handle.reload(&next).unwrap();
    let mut s = send(p.addr, head.as_bytes()).await;
    assert!(read_all(&mut s).await.contains("host-not-allowed"));
    // The tunnel opened before the reload still works.
    open.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
}

#[tokio::test]
async fn max_tunnel_duration_cuts_even_a_busy_tunnel() {
    let (up, p) = {
        let up = echo_upstream().await;
        let p = proxy(&format!(
            "maxTunnelDuration: 300ms\n{}",
            policy(up.addr.port())
        ))
        .await;
        (up, p)
    };
    let mut s = open_tunnel(p.addr, up.addr.port()).await;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1];
    // Keep traffic flowing until the proxy cuts the tunnel.
    loop {
        if s.write_all(b"x").await.is_err() || s.read(&mut buf).await.unwrap_or(0) == 0 {
            break;
        }
        assert!(started.elapsed() < WAIT, "never cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn bulk_bytes_arrive_intact_with_and_without_splice() {
    for splice in [true, false] {
        let up = echo_upstream().await;
        let p = proxy(&format!("splice: {splice}\n{}", policy(up.addr.port()))).await;
        let s = open_tunnel(p.addr, up.addr.port()).await;
        let (mut r, mut w) = s.into_split();
        // 8 MiB of a pattern that would show any reordering, loss or duplication.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, r.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert!(
            back == expected,
            "splice {splice}: {} bytes back",
            back.len()
        );
        eventually("bytes counted", || async {
            metric(p.admin, "egress_proxy_bytes_total{direction=\"down\"}").await
                == (8u32 << 20) as f64
        })
        .await;
    }
}

#[tokio::test]
async fn only_cidrs_pins_a_name_to_its_private_endpoint() {
    // The private endpoint: an echo server on 127.0.0.2, the one address the rule allows,
    // and a listener on 127.0.0.3 with the same port, outside the rule: it must see nothing.
    // The port is free on 127.0.0.2; another socket may hold it on 127.0.0.3, so try again.
    let (endpoint, outside) = loop {
        let endpoint = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = endpoint.local_addr().unwrap().port();
        match tokio::net::TcpListener::bind(("127.0.0.3", port)).await {
            Ok(outside) => break (endpoint, upstream_from(outside)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("bind 127.0.0.3:{port}: {e}"),
        }
    };
    let port = endpoint.local_addr().unwrap().port();
    let accepts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepts.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = endpoint.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let p = proxy(&format!(
        "allow:\n  - host: myaccount.blob.core.windows.net\n    ports: [{port}]\n    cidrs: [127.0.0.2/32]\n    onlyCIDRs: true\n\
         hosts:\n  myaccount.blob.core.windows.net: [127.0.0.2]\n"
    ))
    .await;
    let mut s = send(
        p.addr,
        format!("CONNECT myaccount.blob.core.windows.net:{port} HTTP/1.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(read_head(&mut s).await, ESTABLISHED);
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(accepts.load(std::sync::atomic::Ordering::SeqCst), 1);

    // No private DNS zone: the name resolves to the account's public address. Refused, the
    // reason naming the address, and nothing dialled. So is another private address.
    for addr in ["198.51.100.20", "127.0.0.3"] {
        let p = proxy(&format!(
            "allow:\n  - host: myaccount.blob.core.windows.net\n    ports: [{port}]\n    cidrs: [127.0.0.2/32]\n    onlyCIDRs: true\n\
             hosts:\n  myaccount.blob.core.windows.net: [{addr}]\n"
        ))
        .await;
        let got = refusal(
            p.addr,
            &format!("CONNECT myaccount.blob.core.windows.net:{port} HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert_eq!(
            got,
            answer(
                "403 Forbidden",
                "address-outside-cidrs",
                &format!(
                    "destination address {addr} is outside the cidrs of the matching rule (onlyCIDRs: true); for a private endpoint this usually means its private DNS zone is missing\n"
                ),
                false
            )
        );
    }
    assert_eq!(outside.accepted(), 0);
    assert_eq!(accepts.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A listener that counts the connections it accepts.
fn upstream_from(listener: tokio::net::TcpListener) -> Upstream {
    let accepts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepts.clone();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((_s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    Upstream { addr, accepts }
}
