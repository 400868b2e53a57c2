//! From accepted socket to connected upstream: read and parse the request head, resolve the
//! target once, and dial exactly the addresses the policy checked.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::policy::{Grant, Host, Policy, Target, normalize_name};

/// httparse needs a fixed header array; 64 is far more than any CONNECT client sends and
/// more headers than this is treated like an oversized head (431).
const MAX_HEADERS: usize = 64;
/// How much the head reader asks the socket for at a time. Small, because heads are small;
/// whatever follows the head in the same read is kept and forwarded.
const HEAD_READ_CHUNK: usize = 2048;

/// Why a request head was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not HTTP, or a CONNECT target that is not `host:port`.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// A well-formed request with another method (`GET http://...` among them).
    #[error("method {0} not supported")]
    NotConnect(String),
    /// The head did not fit in `maxHeadBytes` (or had too many headers).
    #[error("request head too large")]
    TooLarge,
    /// The head was not complete within `headTimeout`.
    #[error("request head not received in time")]
    Timeout,
    /// The client closed or reset before sending a whole head; nothing to answer.
    #[error("client went away before sending a request")]
    ClientGone,
}

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where to.
    pub target: Target,
    /// HTTP minor version (0 or 1).
    pub minor_version: u8,
}

/// Parses a request head. `Ok(None)`: incomplete, read more. `Ok(Some((req, len)))`: the head
/// is `buf[..len]` and anything after it belongs to the tunnel. Pure, never panics (fuzzed).
pub fn parse_head(buf: &[u8]) -> Result<Option<(ConnectRequest, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("not an HTTP/1.x request")),
    };
    let (Some(method), Some(path), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    if method != "CONNECT" {
        return Err(HeadError::NotConnect(method.to_owned()));
    }
    let target = parse_authority(path)?;
    Ok(Some((
        ConnectRequest {
            target,
            minor_version,
        },
        len,
    )))
}

/// Parses a CONNECT request-target in authority form: `host:port`, `a.b.c.d:port` or
/// `[v6]:port`. The port is required (RFC 9110 section 9.3.6).
pub fn parse_authority(s: &str) -> Result<Target, HeadError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, port) = rest
            .split_once("]:")
            .ok_or(HeadError::Malformed("bracketed host without ]:port"))?;
        let ip: std::net::Ipv6Addr = v6
            .parse()
            .map_err(|_| HeadError::Malformed("bad IPv6 literal"))?;
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or(HeadError::Malformed("target is not host:port"))?;
        // `10.0.0.1.` is the address 10.0.0.1, as a trailing dot on a name is that name.
        let dotted = host.strip_suffix('.').unwrap_or(host);
        let host = match dotted.parse::<std::net::Ipv4Addr>() {
            Ok(ip) => Host::Ip(IpAddr::V4(ip)),
            Err(_) => {
                Host::Name(normalize_name(host).map_err(|_| HeadError::Malformed("bad host name"))?)
            }
        };
        (host, port)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadError::Malformed("bad port"));
    }
    let port: u16 = port.parse().map_err(|_| HeadError::Malformed("bad port"))?;
    if port == 0 {
        return Err(HeadError::Malformed("bad port"));
    }
    Ok(Target { host, port })
}

/// Reads until a whole head has arrived. Returns the request and the bytes the client sent
/// after the head (a pipelined TLS ClientHello), which must reach the destination.
/// The caller bounds this with `headTimeout`.
pub async fn read_head<S: AsyncRead + Unpin>(
    client: &mut S,
    max_bytes: usize,
) -> Result<(ConnectRequest, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(HEAD_READ_CHUNK);
    loop {
        let room = max_bytes.saturating_sub(buf.len()).min(HEAD_READ_CHUNK);
        if room == 0 {
            return Err(HeadError::TooLarge);
        }
        let n = (&mut *client)
            .take(room as u64)
            .read_buf(&mut buf)
            .await
            .map_err(|_| HeadError::ClientGone)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::ClientGone
            } else {
                HeadError::Malformed("connection closed inside the request head")
            });
        }
        if let Some((req, len)) = parse_head(&buf)? {
            let rest = buf.split_off(len);
            return Ok((req, rest));
        }
    }
}

/// Why no upstream connection was made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// DNS gave no answer or an error.
    #[error("cannot resolve {name}: {source}")]
    Resolve {
        /// The name.
        name: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// Every allowed address refused or failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The connect did not finish within `connectTimeout` (DNS had answered in time).
    #[error("no connection within {0:?}")]
    Timeout(Duration),
}

/// The addresses of `target` as DNS (or the `hosts` override) gives them, before the policy
/// filters them. One lookup; the caller dials only from its result.
pub async fn resolve(target: &Target, grant: &Grant) -> Result<Vec<IpAddr>, DialError> {
    if let Some(addrs) = &grant.known_addrs {
        return Ok(addrs.clone());
    }
    let name = match &target.host {
        Host::Name(n) => n.as_str(),
        Host::Ip(ip) => return Ok(vec![*ip]),
    };
    let found = tokio::net::lookup_host((name, target.port))
        .await
        .map_err(|source| DialError::Resolve {
            name: name.to_owned(),
            source,
        })?;
    let mut addrs: Vec<IpAddr> = Vec::new();
    for a in found {
        if !addrs.contains(&a.ip()) {
            addrs.push(a.ip());
        }
    }
    Ok(addrs)
}

/// Waits for `lookup` until `deadline`. A resolver that has not answered by then is a DNS
/// failure (502 `dns-failure`, naming the name), not a connect timeout: nothing was dialled,
/// and the admin should look at DNS, not at the destination.
async fn resolve_by(
    deadline: Instant,
    target: &Target,
    lookup: impl Future<Output = Result<Vec<IpAddr>, DialError>>,
) -> Result<Vec<IpAddr>, DialError> {
    match tokio::time::timeout_at(deadline, lookup).await {
        Ok(found) => found,
        Err(_) => Err(DialError::Resolve {
            name: target.host.to_string(),
            source: io::Error::new(io::ErrorKind::TimedOut, "no answer within connectTimeout"),
        }),
    }
}

/// Puts the two families in alternating order (first family first), so that a dead family
/// costs one attempt, not all of them: the ordering half of happy eyeballs (RFC 8305).
pub fn interleave(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    let first_v6 = addrs.first().is_some_and(IpAddr::is_ipv6);
    let (mut a, mut b): (Vec<IpAddr>, Vec<IpAddr>) =
        addrs.into_iter().partition(|x| x.is_ipv6() == first_v6);
    a.reverse();
    b.reverse();
    let mut out = Vec::with_capacity(a.len() + b.len());
    loop {
        match (a.pop(), b.pop()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

/// Dials the checked addresses in order until one answers, all within `deadline`.
/// `keepalive` is applied to the new socket along with TCP_NODELAY.
pub async fn dial(
    addrs: &[IpAddr],
    port: u16,
    deadline: Instant,
    timeout: Duration,
    keepalive: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let mut last = None;
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        let attempt = async {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }?;
            let stream = socket.connect(addr).await?;
            tune(&stream, keepalive)?;
            Ok::<_, io::Error>(stream)
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(stream)) => return Ok((stream, addr)),
            Ok(Err(source)) => last = Some(DialError::Connect { addr, source }),
            Err(_) => return Err(DialError::Timeout(timeout)),
        }
    }
    Err(last.unwrap_or(DialError::Connect {
        addr: SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port),
        source: io::Error::new(io::ErrorKind::NotFound, "no address to dial"),
    }))
}

/// TCP_NODELAY (a tunnel forwards whatever it has at once; batching is the endpoints' job)
/// and keepalive probes every `keepalive` (Azure drops flows idle for 4 minutes).
pub fn tune(stream: &TcpStream, keepalive: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let ka = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive);
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// Resolve, filter through the policy, dial: the whole connect step under one deadline.
pub async fn connect(
    policy: &Policy,
    grant: &Grant,
    target: &Target,
    timeout: Duration,
    keepalive: Duration,
) -> Result<Result<(TcpStream, SocketAddr), DialError>, crate::policy::Denial> {
    let deadline = Instant::now() + timeout;
    let resolved = match resolve_by(deadline, target, resolve(target, grant)).await {
        Ok(addrs) => addrs,
        Err(e) => return Ok(Err(e)),
    };
    let allowed = policy.filter(grant, &resolved)?;
    Ok(dial(
        &interleave(allowed),
        target.port,
        deadline,
        timeout,
        keepalive,
    )
    .await)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn target(s: &str) -> Target {
        parse_authority(s).unwrap()
    }

    #[test]
    fn http10_without_host() {
        let (req, len) = parse_head(b"CONNECT acct.blob.core.windows.net:443 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(len, 51);
        assert_eq!(req.minor_version, 0);
        assert_eq!(req.target, target("acct.blob.core.windows.net:443"));
    }

    #[test]
    fn http11_with_headers_and_trailing_bytes() {
        let buf =
            b"CONNECT a.com:443 HTTP/1.1\r\nHost: a.com:443\r\nUser-Agent: x\r\n\r\n\x16\x03\x01";
        let (req, len) = parse_head(buf).unwrap().unwrap();
        assert_eq!(&buf[len..], b"\x16\x03\x01");
        assert_eq!(req.minor_version, 1);
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert_eq!(parse_head(b""), Ok(None));
        assert_eq!(
            parse_head(b"CONNECT a.com:443 HTTP/1.1\r\nHost: a"),
            Ok(None)
        );
    }

    #[test]
    fn other_methods_and_garbage() {
        assert_eq!(
            parse_head(b"GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n"),
            Err(HeadError::NotConnect("GET".into()))
        );
        assert!(matches!(
            parse_head(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse_head(b"CONNECT http://a.com/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn authorities() {
        assert_eq!(target("[::1]:443").host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(
            target("[::ffff:127.0.0.1]:443").host,
            Host::Ip("::ffff:127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            target("169.254.169.254:80").host,
            Host::Ip("169.254.169.254".parse().unwrap())
        );
        assert_eq!(target("A.COM.:8443").port, 8443);
        // A trailing dot on an address is still the address (found by the fuzzer: it was
        // read as a name and printed back as an address).
        assert_eq!(
            target("16.0.0.14.:84"),
            Target {
                host: Host::Ip("16.0.0.14".parse().unwrap()),
                port: 84
            }
        );
        for bad in [
            "127.1:443",
            "0x7f.0.0.1:443",
            "2130706433:443",
            "127.0.0.1..:443",
            "a.com",
            "a.com:",
            ":443",
            "a.com:0",
            "a.com:65536",
            "a.com:+443",
            "a.com:44 3",
            "::1:443",
            "[::1]",
            "[::1]443",
            "[1.2.3.4]:443",
            "a b:443",
            "a.com:443/x",
            "user@a.com:443",
            "http://a.com:443",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_resolver_that_never_answers_is_a_dns_failure() {
        let t = target("acct.blob.core.windows.net:443");
        let deadline = Instant::now() + Duration::from_millis(20);
        let e = resolve_by(deadline, &t, std::future::pending())
            .await
            .unwrap_err();
        assert!(matches!(e, DialError::Resolve { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "cannot resolve acct.blob.core.windows.net: no answer within connectTimeout"
        );
    }

    #[test]
    fn interleaves_families() {
        let v: Vec<IpAddr> = ["::1", "::2", "1.1.1.1", "::3", "2.2.2.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let out: Vec<String> = interleave(v).iter().map(|a| a.to_string()).collect();
        assert_eq!(out, ["::1", "1.1.1.1", "::2", "2.2.2.2", "::3"]);
    }
}
