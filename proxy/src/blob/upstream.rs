//! The gateway's client for the real account: a hyper keep-alive pool whose connector dials
//! through [`crate::dial::connect`], so an upstream is reached exactly as a CONNECT target
//! would be (allow rules, private-endpoint CIDRs, deny ranges, rebinding-safe dial), then
//! speaks TLS with the public web roots plus an optional extra CA.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::rewrite::Upstream;
use crate::dial;
use crate::policy::{Host, Policy, Target, normalize_name};

/// A pooled connection to an upstream nobody used for this long is closed: Azure's load
/// balancer drops flows idle for 4 minutes, and a closed one costs a handshake, not a failure.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream: a backup uploads a few blobs at once, and more
/// sockets than that only wait.
const POOL_MAX_IDLE: usize = 32;

/// A request body the gateway forwards: the client's, streamed (and cut if it stalls), or
/// a rewritten batch body.
pub type UpBody =
    Either<super::metered::Metered<super::stall::IdleBody<Incoming>>, http_body_util::Full<Bytes>>;

/// What every upstream client shares, from the reloadable settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The access policy upstream dials are checked against.
    pub policy: Policy,
    /// `connectTimeout`.
    pub connect_timeout: Duration,
    /// `keepalive`.
    pub keepalive: Duration,
}

/// The pooled client of one upstream.
#[derive(Debug, Clone)]
pub struct Client {
    /// hyper's pool over the policy-checked connector.
    inner: hyper_util::client::legacy::Client<Connector, UpBody>,
}

impl Client {
    /// A client for `upstream`, trusting the public web roots and the PEM certificates in
    /// `ca_file`. The error is a message naming the file.
    pub fn new(
        settings: &ClientSettings,
        upstream: &Upstream,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let tls = if upstream.is_https() {
            Some(TlsConnector::from(tls_config(ca_file)?))
        } else {
            None
        };
        let connector = Connector {
            inner: Arc::new(ConnectorInner {
                settings: settings.clone(),
                tls,
            }),
        };
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(connector);
        Ok(Self { inner })
    }

    /// Sends a rewritten request; the response streams back.
    pub async fn send(
        &self,
        request: http::Request<UpBody>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        self.inner.request(request).await
    }
}

/// rustls client side: ring, safe defaults, HTTP/1.1, web roots plus `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("no certificate in {}", path.display()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("unusable certificate in {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why no upstream connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint's host or port cannot be a dial target.
    #[error("upstream {0:?} is not a host and port")]
    Target(String),
    /// The policy refuses the upstream.
    #[error("the policy refuses the upstream: {0}")]
    Denied(#[from] crate::policy::Denial),
    /// Resolve or connect failed.
    #[error(transparent)]
    Dial(#[from] dial::DialError),
    /// The TLS handshake failed.
    #[error("TLS to the upstream: {0}")]
    Tls(io::Error),
}

/// A tower service from URI to connection, as hyper's pool needs.
#[derive(Debug, Clone)]
pub struct Connector {
    /// Shared by every clone the pool makes.
    inner: Arc<ConnectorInner>,
}

/// The connector's settings.
struct ConnectorInner {
    /// Policy and timeouts.
    settings: ClientSettings,
    /// Set for `https` upstreams.
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for ConnectorInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorInner")
            .field("settings", &self.settings)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.connect(&uri).await })
    }
}

impl ConnectorInner {
    /// Policy check, dial, then TLS when the upstream is `https`.
    async fn connect(&self, uri: &Uri) -> Result<Conn, ConnectError> {
        let (target, host) = target(uri)?;
        let s = &self.settings;
        let grant = s.policy.authorize(&target)?;
        let (tcp, _) =
            dial::connect(&s.policy, &grant, &target, s.connect_timeout, s.keepalive).await??;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let name = ServerName::try_from(host)
                    .map_err(|_| ConnectError::Target(uri.to_string()))?;
                Box::new(tls.connect(name, tcp).await.map_err(ConnectError::Tls)?)
            }
        };
        Ok(Conn(TokioIo::new(io)))
    }
}

/// The dial target of an upstream URI, and the host name TLS verifies.
fn target(uri: &Uri) -> Result<(Target, String), ConnectError> {
    let bad = || ConnectError::Target(uri.to_string());
    let host = uri.host().ok_or_else(bad)?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let target_host = match bare.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(normalize_name(bare).map_err(|_| bad())?),
    };
    Ok((
        Target {
            host: target_host,
            port,
        },
        bare.to_owned(),
    ))
}

/// A plain or TLS upstream stream.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One upstream connection, as hyper's client reads and writes it.
pub struct Conn(TokioIo<Box<dyn Io>>);

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Conn")
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
