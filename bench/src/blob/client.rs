//! The generator's storage client: one keep-alive HTTP/1.1 connection (plain to a proxy, or
//! TLS straight to the upstream) that sends Shared Key signed Put Blob and Get Blob calls,
//! built as an Azure SDK builds them: `x-ms-date`, `x-ms-version`, `x-ms-blob-type`,
//! `Content-Length`, signed in the service's header order.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, bail};
use bytes::Bytes;
use egress_proxy::blob::shared_key::{AccountKey, sign};
use http::header::{CONTENT_LENGTH, HOST};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::body::{Repeat, chunk};
use super::upstream::SIZED_BLOB;

/// The container every benchmark blob is in.
pub const CONTAINER: &str = "bench";
/// The storage service version the requests ask for, as a current SDK sends.
const SERVICE_VERSION: &str = "2021-08-06";

/// Where requests go and who signs them.
pub struct Endpoint {
    /// The address dialled (a proxy's listener, or the upstream itself).
    connect: SocketAddr,
    /// The `Host` header: the endpoint URL's authority.
    host: String,
    /// The path before `/<container>/<blob>`: `/<account>` for a path-style endpoint (the
    /// gateway's URL form), empty for an account host name.
    prefix: String,
    /// Present for an `https` endpoint: the TLS client and the name to check.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The account the requests are signed for.
    account: String,
    /// Its key.
    key: AccountKey,
    /// What every uploaded body is made of.
    chunk: Bytes,
}

impl Endpoint {
    /// `url`: `http(s)://authority[/account]`; `connect`: where to dial instead of resolving
    /// the authority; `ca`: the PEM CA an `https` endpoint's certificate is checked against.
    pub fn new(
        url: &str,
        connect: Option<SocketAddr>,
        ca: Option<&Path>,
        account: &str,
        key_file: &Path,
    ) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("--endpoint {url}"))?;
        let authority = uri
            .authority()
            .with_context(|| format!("--endpoint {url}: no host"))?
            .clone();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("--endpoint {url}: not http(s)://"),
        };
        let connect = match connect {
            Some(a) => a,
            None => authority
                .as_str()
                .parse()
                .with_context(|| format!("--endpoint {url}: give --connect for a host name"))?,
        };
        let tls = if https {
            let ca = ca.with_context(|| format!("--endpoint {url} is https: give --ca"))?;
            let name = ServerName::try_from(authority.host().to_owned())
                .with_context(|| format!("--endpoint {url}: server name"))?;
            Some((connector(ca)?, name))
        } else {
            None
        };
        let text = std::fs::read_to_string(key_file)
            .with_context(|| format!("--key-file {}", key_file.display()))?;
        let key = AccountKey::from_base64(&text)
            .with_context(|| format!("--key-file {}", key_file.display()))?;
        Ok(Self {
            connect,
            host: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            tls,
            account: account.to_owned(),
            key,
            chunk: chunk(),
        })
    }

    /// A fresh keep-alive connection.
    pub async fn connect(&self) -> anyhow::Result<Conn<'_>> {
        let tcp = TcpStream::connect(self.connect)
            .await
            .with_context(|| format!("connect {}", self.connect))?;
        tcp.set_nodelay(true)?;
        let send = match &self.tls {
            None => handshake(tcp).await?,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS to the upstream")?;
                handshake(tls).await?
            }
        };
        Ok(Conn {
            endpoint: self,
            send,
        })
    }

    /// A signed request for `/<container>/<blob>`, with a body of `len` bytes for a PUT.
    fn request(&self, method: Method, blob: &str, len: u64) -> anyhow::Result<Request<Repeat>> {
        let put = method == Method::PUT;
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}/{CONTAINER}/{blob}", self.prefix))
            .header(HOST, &self.host)
            .header("x-ms-date", httpdate::fmt_http_date(SystemTime::now()))
            .header("x-ms-version", SERVICE_VERSION);
        if put {
            b = b
                .header(CONTENT_LENGTH, len)
                .header("x-ms-blob-type", "BlockBlob");
        }
        let (mut parts, ()) = b.body(())?.into_parts();
        sign(&mut parts, &self.account, &self.key).context("sign")?;
        let body = if put {
            Repeat::new(self.chunk.clone(), len)
        } else {
            Repeat::empty()
        };
        Ok(Request::from_parts(parts, body))
    }
}

/// One connection of an [`Endpoint`].
pub struct Conn<'a> {
    /// Who the requests are for and how they are signed.
    endpoint: &'a Endpoint,
    /// hyper's half that sends requests; the connection task runs beside it.
    send: SendRequest<Repeat>,
}

impl Conn<'_> {
    /// Put Blob of `len` bytes as `blob`; fails unless the answer is 201.
    pub async fn put(&mut self, blob: &str, len: u64) -> anyhow::Result<()> {
        let req = self.endpoint.request(Method::PUT, blob, len)?;
        let resp = self.send(req).await?;
        expect(resp, StatusCode::CREATED, "Put Blob").await?;
        Ok(())
    }

    /// Get Blob of a `len`-byte blob, read to the end; fails unless it is 200 with `len` bytes.
    pub async fn get(&mut self, len: u64) -> anyhow::Result<()> {
        let req = self
            .endpoint
            .request(Method::GET, &format!("{SIZED_BLOB}{len}"), 0)?;
        let resp = self.send(req).await?;
        let got = expect(resp, StatusCode::OK, "Get Blob").await?;
        if got != len {
            bail!("Get Blob: {got} bytes of {len}");
        }
        Ok(())
    }

    async fn send(&mut self, req: Request<Repeat>) -> anyhow::Result<Response<Incoming>> {
        self.send.ready().await.context("connection closed")?;
        self.send.send_request(req).await.context("request")
    }
}

/// Reads the answer's body to the end and returns its length; fails on another status than
/// `want`, quoting the start of the body (an Azure-style error names its reason).
async fn expect(resp: Response<Incoming>, want: StatusCode, what: &str) -> anyhow::Result<u64> {
    let status = resp.status();
    let mut body = resp.into_body();
    if status != want {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(..text.len().min(300)).unwrap_or_default());
        bail!("{what}: {status}: {text}");
    }
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.context("answer body")?.data_ref() {
            n += data.len() as u64;
        }
    }
    Ok(n)
}

/// hyper's HTTP/1.1 handshake on `io`; the connection task is spawned.
async fn handshake<I>(io: I) -> anyhow::Result<SendRequest<Repeat>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// A TLS client trusting only the CA in `ca` (PEM).
fn connector(ca: &Path) -> anyhow::Result<TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("--ca {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("--ca {}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::upstream::{UpstreamArgs, accept_loop, bind};

    /// The client against the real upstream over TLS, as the direct path runs: uploads and
    /// downloads go through whole, and a refused request is an error naming the status.
    #[tokio::test]
    async fn talks_to_the_upstream_over_tls() {
        let dir = std::env::temp_dir().join(format!("egb3-blob-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let key = dir.join("real.key");
        std::fs::write(&key, "cmVhbC1rZXk=\n").unwrap();
        let name = "realacct.blob.core.windows.net";
        let bound = bind(&UpstreamArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            name: name.to_owned(),
            ca_out: ca.clone(),
        })
        .await
        .unwrap();
        let addr = bound.local_addr().unwrap();
        tokio::spawn(accept_loop(bound));
        let url = format!("https://{name}:{}", addr.port());
        let endpoint = Endpoint::new(&url, Some(addr), Some(&ca), "realacct", &key).unwrap();
        let mut conn = endpoint.connect().await.unwrap();
        conn.put("a", 3 * CHUNK_PLUS).await.unwrap();
        conn.get(3 * CHUNK_PLUS).await.unwrap();
        conn.get(0).await.unwrap();
        // The upstream knows no blob by this name: 404, reported as an error.
        let req = endpoint.request(Method::GET, "unknown", 0).unwrap();
        let resp = conn.send(req).await.unwrap();
        let err = expect(resp, StatusCode::OK, "Get Blob").await.unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        // A name the certificate does not hold: the TLS check refuses it.
        let wrong = Endpoint::new(
            &format!("https://other.example:{}", addr.port()),
            Some(addr),
            Some(&ca),
            "realacct",
            &key,
        )
        .unwrap();
        assert!(wrong.connect().await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Not a multiple of the chunk size, so the last frame is a short one.
    const CHUNK_PLUS: u64 = super::super::body::CHUNK as u64 + 7;
}
