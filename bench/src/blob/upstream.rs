//! `egress-bench blob upstream`: the storage account every blob path ends at. An HTTPS
//! server (hyper over rustls, with a certificate made fresh at start) that takes Put Blob
//! and answers Get Blob the way the Blob service does for these calls, and nothing more: it
//! reads every uploaded byte and discards it, and serves `bytes-N` as a blob of N bytes. It
//! checks no signature (the Envoy path carries the client's, the gateway's path the real
//! key's), so it costs the same whichever proxy is in front of it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::body::{Repeat, chunk};

/// Prefix of a blob name that the upstream serves as that many bytes: `bytes-1024`.
pub const SIZED_BLOB: &str = "bytes-";
/// Largest blob the upstream serves (1 TiB), so a typo cannot ask for an endless answer.
const MAX_BLOB: u64 = 1 << 40;
/// Pause after a failed accept (out of descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The storage service version the answers claim, as a real account's would.
const SERVICE_VERSION: &str = "2021-08-06";

/// What `blob upstream` is told.
#[derive(Debug, clap::Args)]
pub struct UpstreamArgs {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The host name its certificate is for (besides 127.0.0.1): the real account's.
    #[arg(long, default_value = "realacct.blob.core.windows.net")]
    pub name: String,
    /// Where to write the PEM certificate of the CA that issued the upstream's certificate,
    /// for the proxies (and the direct path) to trust.
    #[arg(long)]
    pub ca_out: PathBuf,
}

/// Writes the CA, prints `listening ADDR`, then serves until killed.
pub async fn serve(args: UpstreamArgs) -> anyhow::Result<()> {
    let bound = bind(&args).await?;
    println!("listening {}", bound.local_addr()?);
    accept_loop(bound).await
}

/// A bound upstream: its certificate made and the CA written, not yet serving.
pub struct Bound {
    /// The listening socket.
    listener: TcpListener,
    /// The TLS side of every connection it accepts.
    acceptor: TlsAcceptor,
}

impl Bound {
    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Makes the certificate, writes the CA to `args.ca_out` and binds `args.listen`.
pub async fn bind(args: &UpstreamArgs) -> anyhow::Result<Bound> {
    let (ca_pem, tls) = certificate(&args.name)?;
    std::fs::write(&args.ca_out, ca_pem)
        .with_context(|| format!("write {}", args.ca_out.display()))?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    Ok(Bound {
        listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
    })
}

/// Serves a bound upstream until the process ends.
pub async fn accept_loop(bound: Bound) -> anyhow::Result<()> {
    let Bound { listener, acceptor } = bound;
    let body = chunk();
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let _ = socket.set_nodelay(true);
            let Ok(stream) = acceptor.accept(socket).await else {
                return;
            };
            let service = service_fn(move |req| answer(req, body.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A CA and a certificate it issued for `name` and 127.0.0.1: (the CA's PEM, the server
/// configuration holding the issued certificate and its key).
fn certificate(name: &str) -> anyhow::Result<(String, rustls::ServerConfig)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "egress-bench blob upstream CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec![name.to_owned(), "127.0.0.1".to_owned()])
        .with_context(|| format!("certificate for {name}"))?;
    let cert = params.signed_by(&key, &ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    Ok((ca.pem(), tls))
}

/// Put Blob: every byte read, then 201. Get Blob of `bytes-N`: N bytes. Anything else: 404
/// or 405, which the generator reports as a broken harness.
async fn answer(req: Request<Incoming>, chunk: Bytes) -> Result<Response<Repeat>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let status = match parts.method {
        Method::PUT => {
            // A body cut short (the proxy gave up half-way) is an error here, never a 201.
            let mut whole = true;
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    whole = false;
                    break;
                }
            }
            if whole {
                StatusCode::CREATED
            } else {
                StatusCode::BAD_REQUEST
            }
        }
        Method::GET => match sized_blob(parts.uri.path()) {
            Some(len) => return Ok(blob(chunk, len)),
            None => StatusCode::NOT_FOUND,
        },
        _ => StatusCode::METHOD_NOT_ALLOWED,
    };
    Ok(reply(status, Repeat::empty(), None))
}

/// The size a `bytes-N` blob name asks for, if the path's last segment is one.
fn sized_blob(path: &str) -> Option<u64> {
    let name = path.rsplit('/').next()?;
    let len: u64 = name.strip_prefix(SIZED_BLOB)?.parse().ok()?;
    (len <= MAX_BLOB).then_some(len)
}

/// A Get Blob answer of `len` bytes.
fn blob(chunk: Bytes, len: u64) -> Response<Repeat> {
    reply(StatusCode::OK, Repeat::new(chunk, len), Some(len))
}

/// An answer with the headers the Blob service always sends.
fn reply(status: StatusCode, body: Repeat, len: Option<u64>) -> Response<Repeat> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "x-ms-version",
        http::HeaderValue::from_static(SERVICE_VERSION),
    );
    h.insert(
        "x-ms-request-id",
        http::HeaderValue::from_static("egress-bench"),
    );
    if len.is_some() {
        h.insert(
            "x-ms-blob-type",
            http::HeaderValue::from_static("BlockBlob"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_blob_names() {
        assert_eq!(sized_blob("/acct/bench/bytes-1024"), Some(1024));
        assert_eq!(sized_blob("/bench/bytes-0"), Some(0));
        assert_eq!(sized_blob("/bench/other"), None);
        assert_eq!(sized_blob("/bench/bytes-x"), None);
        assert_eq!(sized_blob(&format!("/b/bytes-{}", MAX_BLOB + 1)), None);
    }
}
