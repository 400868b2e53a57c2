//! The blob gateway against peers that misbehave, over real sockets: a client that stalls
//! mid-upload (and one that is slow but moving), stand-in upstreams that stall mid-response
//! or never answer, slow and idle request heads, the connection cap, `Expect:
//! 100-continue`, chunked uploads, and the real binary's file watcher picking up the key
//! files of an account a reload added. The upstreams here are stand-ins written for the
//! test (a hyper server that checks the real key's signature, and raw sockets that stall on
//! purpose); the clients write raw HTTP/1.1 so every byte and every pause is the test's.
#![allow(clippy::unwrap_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{WAIT, eventually, metric};
use egress_proxy::blob::shared_key::{AccountKey, sign, verify};
use egress_proxy::{Config, Server};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The workload's gateway-only key.
const CLIENT_KEY: &str = "Y2xpZW50LWtleS1mb3ItcGctcHJvZC1vbmx5LWF0LXRoZS1nYXRld2F5IQ==";
/// The storage account's real key; only the gateway and the stand-in upstream know it.
const REAL_KEY: &str = "cmVhbC1hY2NvdW50LWtleS10aGF0LW5ldmVyLWxlYXZlcy10aGUtZ2F0ZXdheQ==";
/// `blob.bodyIdleTimeout` in these tests.
const IDLE: Duration = Duration::from_secs(1);

/// One request as the answering stand-in upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: http::HeaderMap,
    body: Vec<u8>,
    /// Whether the real key's signature held.
    signed_ok: bool,
}

/// A stand-in upstream (plain HTTP, path-style account `realacct`) that reads each request
/// whole, checks its signature with the real key, and answers 201 (200 for GET).
async fn answering_upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let key = AccountKey::from_base64(REAL_KEY).unwrap();
                        let signed_ok = verify(&parts, "realacct", &key, SystemTime::now()).is_ok();
                        let body = body.collect().await.unwrap().to_bytes().to_vec();
                        log.lock().unwrap().push(Seen {
                            path: parts.uri.to_string(),
                            headers: parts.headers.clone(),
                            body,
                            signed_ok,
                        });
                        let status = match (signed_ok, parts.method.as_str()) {
                            (false, _) => 403,
                            (true, "GET") => 200,
                            (true, _) => 201,
                        };
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// What a stalling stand-in upstream does after reading a request head.
#[derive(Debug, Clone, Copy)]
enum Stalling {
    /// Reads whatever comes and never answers.
    NeverAnswer,
    /// Answers a head promising 1,000 bytes, sends 100, then nothing.
    StopMidResponse,
}

/// A stand-in upstream on a raw socket that stalls on purpose. For each connection it
/// reports, once the gateway has closed it, how many bytes arrived after the head.
async fn stalling_upstream(how: Stalling) -> (SocketAddr, mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                if let Stalling::StopMidResponse = how {
                    let mut answer =
                        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nx-ms-request-id: stand-in\r\n\r\n"
                            .to_vec();
                    answer.extend_from_slice(&[b'a'; 100]);
                    socket.write_all(&answer).await.unwrap();
                }
                // Hold the connection until the gateway closes it.
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(got.len() - head_end);
            });
        }
    });
    (addr, rx)
}

/// A gateway on a plain listener in front of the upstream at `port`; `pg-prod` may read,
/// list and write `pgbackups` on `realacct`. `extra` goes into the `blob:` section.
struct Gateway {
    addr: SocketAddr,
    admin: SocketAddr,
    /// Holds the key files for the test's duration.
    _dir: tempfile::TempDir,
}

async fn gateway(port: u16, head_timeout: &str, extra: &str) -> Gateway {
    gateway_with(port, head_timeout, extra, "[read, list, write]").await
}

/// [`gateway`] with `pg-prod`'s permissions given.
async fn gateway_with(port: u16, head_timeout: &str, extra: &str, permissions: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::write(dir.path().join("client.key"), CLIENT_KEY).unwrap();
    std::fs::write(dir.path().join("real.key"), REAL_KEY).unwrap();
    let yaml = format!(
        r#"
listen: 127.0.0.1:0
adminListen: 127.0.0.1:0
headTimeout: {head_timeout}
connectTimeout: 2s
allow:
  - cidrs: [127.0.0.1/32]
    ports: [{port}]
blob:
  listen: 127.0.0.1:0
  bodyIdleTimeout: {idle}ms
{extra}
  accounts:
    - name: pg-prod
      clientKeyFile: {d}/client.key
      containers: [pgbackups]
      permissions: {permissions}
      upstream:
        endpoint: http://127.0.0.1:{port}/realacct
        account: realacct
        sharedKeyFile: {d}/real.key
"#,
        idle = IDLE.as_millis()
    );
    let config = Config::parse(&yaml, "test").unwrap();
    let server = Server::bind(&config).await.unwrap();
    let addr = server.blob_addrs().0.unwrap();
    let admin = server.admin_addr().unwrap();
    tokio::spawn(server.run());
    Gateway {
        addr,
        admin,
        _dir: dir,
    }
}

/// A request head signed with `key` for `account` as a storage client signs it, written
/// out as raw HTTP/1.1. `headers` are sent (and signed where Shared Key signs them).
fn signed_head(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    account: &str,
    key: &str,
) -> Vec<u8> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "egress-gate-blob")
        .header("x-ms-date", httpdate::fmt_http_date(SystemTime::now()))
        .header("x-ms-version", "2021-08-06");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (mut parts, ()) = b.body(()).unwrap().into_parts();
    sign(&mut parts, account, &AccountKey::from_base64(key).unwrap()).unwrap();
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in &parts.headers {
        out.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// [`signed_head`] for `pg-prod` with its client key.
fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    signed_head(method, path, headers, "pg-prod", CLIENT_KEY)
}

/// Reads one response (head and `Content-Length` body) without consuming more.
async fn read_response(s: &mut TcpStream) -> String {
    let head = common::read_head(s).await;
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .unwrap()
        .unwrap();
    format!("{head}{}", String::from_utf8_lossy(&body))
}

/// Reads until the peer closes; returns what came and how long the close took.
async fn read_to_close(s: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "still open after {WAIT:?}: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

/// Whether the peer keeps the connection open (no byte, no close) for `d`.
async fn stays_open(s: &mut TcpStream, d: Duration) -> bool {
    let mut b = [0u8; 1];
    tokio::time::timeout(d, s.read(&mut b)).await.is_err()
}

/// The count of gateway requests that ended with `result`.
async fn results(admin: SocketAddr, operation: &str, result: &str) -> f64 {
    metric(
        admin,
        &format!(
            "egress_proxy_blob_requests_total{{account=\"pg-prod\",operation=\"{operation}\",result=\"{result}\"}}"
        ),
    )
    .await
}

#[tokio::test]
async fn a_client_stalled_mid_body_is_cut_and_its_upstream_request_aborted() {
    let (up, mut closed) = stalling_upstream(Stalling::NeverAnswer).await;
    let gw = gateway(up.port(), "10s", "").await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(&head(
        "PUT",
        "/pg-prod/pgbackups/wal/1",
        &[("content-length", "1000"), ("x-ms-blob-type", "BlockBlob")],
    ))
    .await
    .unwrap();
    c.write_all(&[7u8; 100]).await.unwrap();
    // ...and nothing more: the gateway answers 408 and closes, after about the limit.
    let (answer, took) = read_to_close(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        answer.contains("x-ms-error-code: OperationTimedOut"),
        "{answer}"
    );
    assert!(took >= IDLE / 2 && took < IDLE * 5, "{took:?}");
    // The upstream got the 100 bytes, then its connection was closed.
    let forwarded = tokio::time::timeout(WAIT, closed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(forwarded, 100);
    eventually("the stall counted with its reason", || async {
        results(gw.admin, "put-blob", "client-body-idle").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_slow_but_moving_upload_passes() {
    let (up, seen) = answering_upstream().await;
    let gw = gateway(up.port(), "10s", "").await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(&head(
        "PUT",
        "/pg-prod/pgbackups/wal/2",
        &[("content-length", "32"), ("x-ms-blob-type", "BlockBlob")],
    ))
    .await
    .unwrap();
    // 4 bytes every 400 ms: 3.2 s in all, three times the limit, never idle for it.
    let start = Instant::now();
    for i in 0..8u8 {
        tokio::time::sleep(IDLE * 2 / 5).await;
        c.write_all(&[b'a' + i; 4]).await.unwrap();
    }
    let answer = read_response(&mut c).await;
    assert!(start.elapsed() > IDLE * 3);
    assert!(answer.starts_with("HTTP/1.1 201 "), "{answer}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].signed_ok);
    assert_eq!(seen[0].body, b"aaaabbbbccccddddeeeeffffgggghhhh");
}

#[tokio::test]
async fn an_upstream_stalled_mid_response_is_cut_on_both_sides() {
    let (up, mut closed) = stalling_upstream(Stalling::StopMidResponse).await;
    let gw = gateway(up.port(), "10s", "").await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(&head("GET", "/pg-prod/pgbackups/base/data.tar", &[]))
        .await
        .unwrap();
    // The head and the 100 bytes pass; then the gateway closes the client's connection
    // (the response cannot be completed) and the upstream's.
    let (answer, took) = read_to_close(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with(&"a".repeat(100)), "{answer}");
    assert!(took >= IDLE / 2 && took < IDLE * 5, "{took:?}");
    tokio::time::timeout(WAIT, closed.recv())
        .await
        .unwrap()
        .unwrap();
    eventually("the stall counted with its reason", || async {
        results(gw.admin, "get-blob", "upstream-body-idle").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_504() {
    let (up, mut closed) = stalling_upstream(Stalling::NeverAnswer).await;
    let gw = gateway(up.port(), "10s", "").await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(&head("GET", "/pg-prod/pgbackups/base/data.tar", &[]))
        .await
        .unwrap();
    let start = Instant::now();
    let answer = read_response(&mut c).await;
    let took = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 504 "), "{answer}");
    assert!(
        answer.contains("<Code>OperationTimedOut</Code>"),
        "{answer}"
    );
    assert!(took >= IDLE / 2 && took < IDLE * 5, "{took:?}");
    let forwarded = tokio::time::timeout(WAIT, closed.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(forwarded, 0);
    eventually("the stall counted with its reason", || async {
        results(gw.admin, "get-blob", "upstream-idle").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn slow_heads_and_idle_keep_alive_connections_are_closed_after_head_timeout() {
    let (up, _seen) = answering_upstream().await;
    let gw = gateway(up.port(), "1s", "").await;
    // Half a head, then nothing.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /pg-prod/pgbackups/x HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (_, took) = read_to_close(&mut slow).await;
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // A finished request on a keep-alive connection, then silence: open for a while
    // (another request would be served), closed once the head timeout passes.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(&head("GET", "/pg-prod/pgbackups/x", &[]))
        .await
        .unwrap();
    let answer = read_response(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(stays_open(&mut idle, Duration::from_millis(300)).await);
    let (rest, took) = read_to_close(&mut idle).await;
    assert_eq!(rest, "");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn connections_past_max_connections_wait_for_a_slot() {
    let (up, _seen) = answering_upstream().await;
    let gw = gateway(up.port(), "30s", "  maxConnections: 2").await;
    let first = TcpStream::connect(gw.addr).await.unwrap();
    let _second = TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The third is in the kernel's backlog: its request gets no answer...
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third
        .write_all(&head("GET", "/pg-prod/pgbackups/x", &[]))
        .await
        .unwrap();
    assert!(stays_open(&mut third, Duration::from_secs(1)).await);
    // ...until a connection closes and frees a slot.
    drop(first);
    let answer = read_response(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_and_refusals_skip_it() {
    let (up, seen) = answering_upstream().await;
    let gw = gateway(up.port(), "10s", "").await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(&head(
        "PUT",
        "/pg-prod/pgbackups/wal/3",
        &[
            ("content-length", "5"),
            ("x-ms-blob-type", "BlockBlob"),
            ("expect", "100-continue"),
        ],
    ))
    .await
    .unwrap();
    // The client waits for the interim answer before it sends a byte of the body.
    assert_eq!(
        common::read_head(&mut c).await,
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    c.write_all(b"hello").await.unwrap();
    let answer = read_response(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 201 "), "{answer}");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].body, b"hello");
        assert!(seen[0].signed_ok);
        assert!(!seen[0].headers.contains_key("expect"));
    }

    // A refused upload gets its 403 at once: no 100 Continue, so no body is sent.
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(&head(
        "PUT",
        "/pg-prod/secrets/wal/3",
        &[("content-length", "5000000"), ("expect", "100-continue")],
    ))
    .await
    .unwrap();
    let answer = read_response(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing more went upstream");
}

#[tokio::test]
async fn chunked_uploads_stream_through_chunked_and_signed() {
    let (up, seen) = answering_upstream().await;
    let gw = gateway(up.port(), "10s", "").await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    // As Go's net/http and .NET's HttpClient send a body of unknown length: no
    // Content-Length (so it is signed as an empty line), chunked framing.
    c.write_all(&head(
        "PUT",
        "/pg-prod/pgbackups/base/1?comp=block&blockid=AAAA",
        &[("transfer-encoding", "chunked")],
    ))
    .await
    .unwrap();
    for chunk in ["first ", "second ", "third"] {
        c.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_response(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 201 "), "{answer}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].signed_ok,
        "the re-signed request verifies with the real key"
    );
    assert_eq!(
        seen[0].path,
        "/realacct/pgbackups/base/1?comp=block&blockid=AAAA"
    );
    assert_eq!(seen[0].body, b"first second third");
    // Passed on as it came: chunked, not buffered to find a length.
    assert_eq!(seen[0].headers["transfer-encoding"], "chunked");
    assert!(!seen[0].headers.contains_key("content-length"));
}

#[tokio::test]
async fn a_chunked_blob_batch_is_forwarded_with_its_new_length() {
    let (up, seen) = answering_upstream().await;
    let gw = gateway_with(up.port(), "10s", "", "[read, delete]").await;
    // One Delete Blob part, signed with the client key as the SDKs sign batch parts.
    let (mut part, ()) = http::Request::builder()
        .method("DELETE")
        .uri("/pg-prod/pgbackups/wal/9")
        .header("x-ms-date", httpdate::fmt_http_date(SystemTime::now()))
        .header("content-length", "0")
        .body(())
        .unwrap()
        .into_parts();
    sign(
        &mut part,
        "pg-prod",
        &AccountKey::from_base64(CLIENT_KEY).unwrap(),
    )
    .unwrap();
    let mut body = String::from(
        "--batch_b8\r\nContent-Type: application/http\r\nContent-ID: 0\r\nContent-Transfer-Encoding: binary\r\n\r\nDELETE /pg-prod/pgbackups/wal/9 HTTP/1.1\r\n",
    );
    for (k, v) in &part.headers {
        body.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    body.push_str("\r\n\r\n--batch_b8--\r\n");
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(&head(
        "POST",
        "/pg-prod/pgbackups?restype=container&comp=batch",
        &[
            ("content-type", "multipart/mixed; boundary=batch_b8"),
            ("transfer-encoding", "chunked"),
        ],
    ))
    .await
    .unwrap();
    let (a, b) = body.split_at(body.len() / 2);
    for chunk in [a, b] {
        c.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
    }
    c.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_response(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 201 "), "{answer}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].signed_ok);
    assert!(!seen[0].headers.contains_key("transfer-encoding"));
    assert_eq!(
        seen[0].headers["content-length"],
        seen[0].body.len().to_string().as_str()
    );
    let forwarded = String::from_utf8(seen[0].body.clone()).unwrap();
    assert!(
        forwarded.contains("DELETE /realacct/pgbackups/wal/9 HTTP/1.1\r\n"),
        "{forwarded}"
    );
    assert!(forwarded.contains("SharedKey realacct:"), "{forwarded}");
}

/// The real binary, started on `config`, with its JSON log on a channel.
struct Binary {
    _child: tokio::process::Child,
    blob: SocketAddr,
}

impl Binary {
    async fn start(config: &std::path::Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
            .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
            .args(["--watch-interval", "100ms"])
            .env_remove("EGRESS_PROXY_CONFIG")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let blob = loop {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("no `blob gateway listening` line")
                .unwrap()
                .expect("the proxy exited");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["message"] == "blob gateway listening" {
                let text = v["listen"].as_str().unwrap();
                let addr = text.trim_start_matches("Some(").trim_end_matches(')');
                break addr.parse().unwrap();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            _child: child,
            blob,
        }
    }
}

/// Status of a GET signed as `account` with `key` through the gateway at `addr`.
async fn status_as(addr: SocketAddr, account: &str, key: &str) -> String {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let path = format!("/{account}/pgbackups/x");
    c.write_all(&signed_head("GET", &path, &[], account, key))
        .await
        .unwrap();
    let answer = read_response(&mut c).await;
    answer.split(' ').nth(1).unwrap_or("").to_owned()
}

#[tokio::test]
async fn an_account_added_by_a_reload_has_its_key_rotation_picked_up() {
    let (up, _seen) = answering_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let account = |name: &str| {
        format!(
            "    - name: {name}\n      clientKeyFile: {d}/{name}.key\n      containers: [pgbackups]\n      permissions: [read]\n      upstream: {{endpoint: 'http://127.0.0.1:{port}/realacct', account: realacct, sharedKeyFile: {d}/real.key}}\n",
            port = up.port()
        )
    };
    let yaml = |accounts: &str| {
        format!(
            "listen: 127.0.0.1:0\nadminListen: 127.0.0.1:0\nallow:\n  - cidrs: [127.0.0.1/32]\n    ports: [{}]\nblob:\n  listen: 127.0.0.1:0\n  accounts:\n{accounts}",
            up.port()
        )
    };
    let key = |text: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(text)
    };
    let (key_a, key_b1, key_b2) = (
        key(b"key of a"),
        key(b"first key of b"),
        key(b"second key of b"),
    );
    std::fs::write(dir.path().join("real.key"), REAL_KEY).unwrap();
    std::fs::write(dir.path().join("a.key"), &key_a).unwrap();
    std::fs::write(dir.path().join("b.key"), &key_b1).unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml(&account("a"))).unwrap();
    let bin = Binary::start(&config).await;
    assert_eq!(status_as(bin.blob, "a", &key_a).await, "200");
    assert_eq!(status_as(bin.blob, "b", &key_b1).await, "403");

    // A reload (the file changed) adds account b.
    std::fs::write(&config, yaml(&format!("{}{}", account("a"), account("b")))).unwrap();
    eventually("account b served after the reload", || async {
        status_as(bin.blob, "b", &key_b1).await == "200"
    })
    .await;

    // Only b's key file changes: the watcher must see it, with no other reload.
    std::fs::write(dir.path().join("b.key"), &key_b2).unwrap();
    eventually("b's rotated key in force", || async {
        status_as(bin.blob, "b", &key_b2).await == "200"
    })
    .await;
    assert_eq!(status_as(bin.blob, "b", &key_b1).await, "403");
    assert_eq!(status_as(bin.blob, "a", &key_a).await, "200");
}
