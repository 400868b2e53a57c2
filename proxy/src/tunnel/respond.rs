//! Every answer the proxy gives a client, in one place: status line, reason header, body.

use super::head::HeadError;
use crate::dial::DialError;
use crate::policy::Denial;

/// Response header carrying the machine-readable reason for any non-200 answer, so a client
/// log (curl -v, an SDK's error) says why without access to the proxy's logs.
pub const REASON_HEADER: &str = "X-Egress-Gate-Reason";

/// The success answer. No headers: RFC 9110 says a 2xx to CONNECT has no body, and some
/// clients (Python's http.client) choke on anything unusual here.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Why a connection did not become a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum Reject {
    /// The head could not be read or was not an acceptable CONNECT.
    #[error(transparent)]
    Head(#[from] HeadError),
    /// The policy said no.
    #[error(transparent)]
    Denied(#[from] Denial),
    /// DNS or TCP to the destination failed, or timed out.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// `maxTunnels` tunnels are open already.
    #[error("tunnel limit reached")]
    AtCapacity,
    /// Identity is on, the connection maps to no single pod (the kind says why: `unknown`,
    /// `ambiguous` or `node`), and `identity.unidentified` is `deny`.
    #[error(
        "the proxy cannot tell which pod this connection comes from (identity: {0}), and unidentified clients are denied"
    )]
    Unidentified(&'static str),
    /// The identified pod has `perSource.maxConnections` connections open already.
    #[error("too many open connections from this workload")]
    WorkloadLimit,
    /// Identity is on and the first full pod list has not completed: nobody can be
    /// identified yet, so nobody is judged yet.
    #[error("the proxy has not finished listing pods yet; retry shortly")]
    IdentityNotSynced,
    /// The drain deadline passed while the connection was still sending its head or being
    /// connected; it is closed without an answer, like the tunnels the deadline cuts.
    #[error("drain deadline passed before the tunnel opened")]
    DrainDeadline,
}

impl Reject {
    /// Status code as DESIGN.md section 4 lists them; `None` when there is nobody to answer.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            Self::Head(HeadError::Malformed(_)) => 400,
            Self::Head(HeadError::NotConnect(_)) => 405,
            Self::Head(HeadError::Timeout) => 408,
            Self::Head(HeadError::TooLarge) => 431,
            Self::Head(HeadError::ClientGone) | Self::DrainDeadline => return None,
            Self::Denied(_) | Self::Unidentified(_) => 403,
            Self::Dial(DialError::Resolve { .. } | DialError::Connect { .. }) => 502,
            Self::Dial(DialError::Timeout(_)) => 504,
            Self::AtCapacity | Self::IdentityNotSynced => 503,
            Self::WorkloadLimit => 429,
        })
    }

    /// Stable short reason for the header, the access log and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Head(HeadError::Malformed(_)) => "malformed-request",
            Self::Head(HeadError::NotConnect(_)) => "method-not-allowed",
            Self::Head(HeadError::Timeout) => "head-timeout",
            Self::Head(HeadError::TooLarge) => "head-too-large",
            Self::Head(HeadError::ClientGone) => "client-gone",
            Self::Denied(d) => d.reason(),
            Self::Dial(DialError::Resolve { .. }) => "dns-failure",
            Self::Dial(DialError::Connect { .. }) => "connect-failure",
            Self::Dial(DialError::Timeout(_)) => "connect-timeout",
            Self::AtCapacity => "tunnel-limit",
            Self::IdentityNotSynced => "identity-not-synced",
            Self::Unidentified(_) => "unidentified-client",
            Self::WorkloadLimit => "workload-connection-limit",
            Self::DrainDeadline => "drain-deadline",
        }
    }

    /// The full HTTP response, or `None` when there is nobody to answer.
    pub fn response(&self) -> Option<Vec<u8>> {
        let status = self.status()?;
        let body = match self {
            Self::Head(HeadError::NotConnect(_)) => {
                "This proxy only tunnels: use CONNECT host:port.\n".to_owned()
            }
            other => format!("{other}\n"),
        };
        let allow = match self {
            Self::Head(HeadError::NotConnect(_)) => "Allow: CONNECT\r\n",
            // The first list of a few thousand pods takes seconds; a client that honours
            // Retry-After comes back about when the proxy is ready.
            Self::IdentityNotSynced => "Retry-After: 1\r\n",
            Self::WorkloadLimit => "Retry-After: 5\r\n",
            _ => "",
        };
        Some(
            format!(
                "HTTP/1.1 {status} {}\r\n{REASON_HEADER}: {}\r\n{allow}Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                reason_phrase(status),
                self.reason(),
                body.len(),
            )
            .into_bytes(),
        )
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn denial_response_is_exact() {
        let r = Reject::Denied(Denial::HostNotAllowed).response().unwrap();
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "HTTP/1.1 403 Forbidden\r\nX-Egress-Gate-Reason: host-not-allowed\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: 17\r\n\
             Connection: close\r\n\r\nhost not allowed\n"
        );
    }

    #[test]
    fn statuses() {
        let s = |r: Reject| r.status();
        assert_eq!(s(HeadError::Malformed("x").into()), Some(400));
        assert_eq!(s(HeadError::NotConnect("GET".into()).into()), Some(405));
        assert_eq!(s(HeadError::Timeout.into()), Some(408));
        assert_eq!(s(HeadError::TooLarge.into()), Some(431));
        assert_eq!(s(HeadError::ClientGone.into()), None);
        assert_eq!(s(Reject::DrainDeadline), None);
        assert_eq!(s(Reject::AtCapacity), Some(503));
        let early = String::from_utf8(Reject::IdentityNotSynced.response().unwrap()).unwrap();
        assert!(
            early.starts_with("HTTP/1.1 503 Service Unavailable\r\nX-Egress-Gate-Reason: identity-not-synced\r\nRetry-After: 1\r\n"),
            "{early}"
        );
        assert_eq!(
            s(DialError::Timeout(std::time::Duration::from_secs(1)).into()),
            Some(504)
        );
        let body = Reject::Head(HeadError::NotConnect("GET".into()))
            .response()
            .unwrap();
        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains("Allow: CONNECT\r\n")
        );
    }
}
