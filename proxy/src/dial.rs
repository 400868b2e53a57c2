//! The resolve-check-dial path, shared by every way out: resolve the target once, let the
//! policy filter the addresses, and dial exactly the addresses it kept (so a DNS answer that
//! changes between check and connect cannot redirect the connection). The CONNECT tunnel
//! calls [`connect`]; so will the blob gateway's upstream client.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::policy::{Denial, Grant, Host, Policy, Target};

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
) -> Result<Result<(TcpStream, SocketAddr), DialError>, Denial> {
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

    #[tokio::test]
    async fn a_resolver_that_never_answers_is_a_dns_failure() {
        let t = Target {
            host: Host::Name("acct.blob.core.windows.net".into()),
            port: 443,
        };
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
