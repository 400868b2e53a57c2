//! The CONNECT request head: read it from the client within its byte budget and parse it
//! into a target. Pure parsing (fuzzed) plus the one read loop; what happens to the target
//! next is the policy's and [`crate::dial`]'s business.

use std::net::IpAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::policy::{Host, Target, normalize_name};

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
}
