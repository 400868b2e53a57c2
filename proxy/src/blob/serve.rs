//! One gateway connection and its requests, top to bottom: authenticate the workload,
//! authorize the operation, rewrite and re-sign for the real account, stream it upstream,
//! stream the answer back, and write one access-log line when the answer is done. Every
//! refusal is an Azure-style XML error sent before anything reaches the upstream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OnceCell;

use super::accounts::Account;
use super::attempt::{self, Attempt, token_refusal};
use super::metered::Metered;
use super::operation::{Operation, classify};
use super::sas::{self, Grant, SasError, Transport};
use super::shared_key::{self, verify};
use super::stall::{IdleBody, Progress, Stall};
use crate::identity::config::admits;
use crate::identity::{Caller, Unidentified};
use crate::metrics::BlobLabels;
use crate::state::Shared;

/// `x-ms-error-code` of a refusal by identity: Azure's own code for a request its
/// authorization rules refuse (a firewall or network rule), which is what this is.
const IDENTITY_ERROR_CODE: &str = "AuthorizationFailure";

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and `Expect`: they describe the client's
/// connection to the gateway, which answers `100 Continue` itself, not the upstream leg.
/// None of them is signed, so dropping them leaves the signature intact.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// The response body: the upstream's, streamed (and cut if it stalls), or the gateway's own
/// error document.
type DownBody = Metered<Either<IdleBody<Incoming>, Full<Bytes>>>;

/// Serves one client connection (plain or TLS, as `transport` says) until it closes, the
/// drain ends it between requests, or the drain deadline cuts it.
pub async fn connection<I>(io: I, peer: SocketAddr, transport: Transport, shared: Arc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let head_timeout = shared.live().head_timeout;
    let svc_shared = shared.clone();
    // Who is calling, asked once per connection: a connection stays with the pod that
    // opened it even if its address passes to another pod meanwhile.
    let caller = Arc::new(OnceCell::new());
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let caller = caller.clone();
        async move { Ok::<_, Infallible>(request(req, peer, transport, &shared, &caller).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => log_connection_end(r, peer),
        () = shared.draining() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => log_connection_end(r, peer),
                () = shared.force_closed() => {}
            }
        }
    }
}

fn log_connection_end(result: Result<(), hyper::Error>, peer: SocketAddr) {
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "blob gateway connection ended with an error");
    }
}

/// What the access-log line and the metrics say about one request.
#[derive(Debug)]
struct Entry {
    /// Virtual account, `-` until the path names a configured one.
    account: String,
    /// Operation name, `-` until classified.
    operation: &'static str,
    /// Container, as in the path.
    container: String,
    /// `forwarded` or the refusal's reason.
    result: &'static str,
    /// Status the client got.
    status: u16,
    /// Status the upstream gave, when it was asked.
    upstream_status: Option<u16>,
    /// Client address.
    client: SocketAddr,
    /// When the request head was complete.
    start: Instant,
    /// Who is calling, when identity is on.
    caller: Option<Caller>,
}

/// A refusal or failure: status, `x-ms-error-code`, short reason, sentence.
pub(super) struct Refuse {
    /// HTTP status.
    pub(super) status: StatusCode,
    /// `x-ms-error-code` and `<Code>`.
    pub(super) code: &'static str,
    /// Stable reason for the log and metrics.
    pub(super) reason: &'static str,
    /// `<Message>`.
    pub(super) message: String,
}

impl Refuse {
    pub(super) fn forbidden(code: &'static str, reason: &'static str, message: String) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            code,
            reason,
            message,
        }
    }
}

/// Handles one request; always answers.
async fn request(
    req: Request<Incoming>,
    peer: SocketAddr,
    transport: Transport,
    shared: &Arc<Shared>,
    caller: &OnceCell<Caller>,
) -> Response<DownBody> {
    let mut entry = Entry {
        account: "-".into(),
        operation: "-",
        container: "-".into(),
        result: "forwarded",
        status: 0,
        upstream_status: None,
        client: peer,
        start: Instant::now(),
        caller: None,
    };
    let up = Arc::new(AtomicU64::new(0));
    // Without a `blob:` section the request is refused before any body is read.
    let limit = shared
        .live()
        .blob
        .as_ref()
        .map_or(crate::config::DEFAULT_BLOB_BODY_IDLE_TIMEOUT, |a| {
            a.body_idle_timeout
        });
    let progress = Arc::new(Progress::new(limit));
    let result = forward(req, transport, shared, &mut entry, &up, &progress, caller).await;
    let response = match result {
        Ok(r) => r,
        Err(refuse) => {
            entry.result = refuse.reason;
            error_response(&refuse)
        }
    };
    entry.status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let shared = shared.clone();
    let body = Metered::new(body, Arc::new(AtomicU64::new(0))).on_end(move |down| {
        let mut entry = entry;
        if let Some(stall) = progress.stall() {
            entry.result = stall.reason();
            warn_stall(&entry, stall, progress.limit());
        }
        finish(&entry, up.load(Ordering::Relaxed), down, &shared);
    });
    Response::from_parts(parts, body)
}

/// Authenticate, authorize, rewrite, send. Refusals return before anything is sent.
async fn forward(
    req: Request<Incoming>,
    transport: Transport,
    shared: &Shared,
    entry: &mut Entry,
    up: &Arc<AtomicU64>,
    progress: &Arc<Progress>,
    caller: &OnceCell<Caller>,
) -> Result<Response<Either<IdleBody<Incoming>, Full<Bytes>>>, Refuse> {
    let live = shared.live();
    let accounts = live.blob.clone().ok_or_else(|| Refuse {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "ServerBusy",
        reason: "gateway-off",
        message: "the blob gateway is not configured".into(),
    })?;
    let (mut parts, body) = req.into_parts();
    let body = IdleBody::request(body, progress.clone());
    let name = parts
        .uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_owned();
    let account: Arc<Account> = accounts.get(&name).ok_or_else(|| {
        Refuse::forbidden(
            shared_key::ERROR_CODE,
            "unknown-account",
            "the path does not start with a configured account".into(),
        )
    })?;
    entry.account = name.clone();
    let now = SystemTime::now();
    let sas = authenticate(&parts, &name, &account, transport, entry.client, now)?;
    check_workload(shared, &name, &account, caller, entry).await?;
    let classified = classify(&parts, &name)
        .map_err(|r| Refuse::forbidden(r.error_code(), r.reason(), r.to_string()))?;
    entry.operation = classified.operation.name();
    entry.container = classified.resource.container.to_owned();
    account
        .scope
        .authorize(&classified)
        .map_err(|r| Refuse::forbidden(r.error_code(), r.reason(), r.to_string()))?;
    if let Some(grant) = &sas {
        grant.permits(&classified).map_err(sas_refusal)?;
    }
    let is_batch = classified.operation == Operation::BlobBatch;
    let container = classified.resource.container.to_owned();
    for header in HOP_BY_HOP {
        parts.headers.remove(header);
    }
    if let Some(grant) = &sas {
        grant.prepare_upstream(&mut parts, now);
    }
    let credential = account
        .auth
        .credential(&shared.tokens)
        .await
        .map_err(token_refusal)?;
    let (replay, stream) =
        attempt::split_body(&parts, body, is_batch, &credential, progress).await?;
    let attempt = Attempt {
        template: &parts,
        name: &name,
        container: &container,
        account: &account,
        replay: replay.as_ref(),
        up,
        now,
        progress,
    };
    let response = attempt.run(&credential, stream, &shared.tokens).await?;
    entry.upstream_status = Some(response.status().as_u16());
    let progress = progress.clone();
    Ok(response.map(|body| Either::Left(IdleBody::response(body, progress))))
}

/// The second factor beside the key, when identity is on: the calling pod must be one the
/// account's `from:` admits, with the same meaning as an allow rule's (`identity.unidentified:
/// deny` refuses a caller that is not one pod on every account; an account with `from:`
/// refuses it always).
async fn check_workload(
    shared: &Shared,
    name: &str,
    account: &Account,
    caller: &OnceCell<Caller>,
    entry: &mut Entry,
) -> Result<(), Refuse> {
    // Without identity no account has from: (the configuration is refused).
    let Some(identities) = &shared.identity else {
        return Ok(());
    };
    if shared.identity_pending() {
        return Err(Refuse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "ServerBusy",
            reason: "identity-not-synced",
            message: "the gateway has not listed the cluster's pods yet; retry shortly".into(),
        });
    }
    let caller = caller
        .get_or_init(|| identities.identify(entry.client.ip()))
        .await;
    entry.caller = Some(caller.clone());
    let pod = caller.pod();
    if pod.is_none() && identities.unidentified() == Unidentified::Deny {
        return Err(Refuse::forbidden(
            IDENTITY_ERROR_CODE,
            "unidentified",
            format!(
                "the gateway cannot tell which pod is calling from {} (identity: {}), and identity.unidentified is deny",
                entry.client.ip(),
                caller.kind()
            ),
        ));
    }
    if admits(&account.from, pod) {
        return Ok(());
    }
    Err(Refuse::forbidden(
        IDENTITY_ERROR_CODE,
        "workload-not-allowed",
        match pod {
            Some(pod) => format!(
                "pod {}/{} (service account {}) is not among the workloads account {name} admits (from:)",
                pod.namespace, pod.name, pod.service_account
            ),
            None => format!(
                "account {name} admits only identified workloads (from:), and the caller from {} is not one pod (identity: {})",
                entry.client.ip(),
                caller.kind()
            ),
        },
    ))
}

/// Shared Key when the request has an `Authorization` header; otherwise a service SAS
/// when its query has `sig` (`Some` with what the SAS grants); anything else is refused as
/// Shared Key refuses an anonymous request.
fn authenticate(
    parts: &http::request::Parts,
    name: &str,
    account: &Account,
    transport: Transport,
    client: SocketAddr,
    now: SystemTime,
) -> Result<Option<Grant>, Refuse> {
    if sas::carries_sas(parts) {
        let context = sas::Context {
            now,
            transport,
            client: client.ip(),
        };
        return sas::verify(parts, name, &account.client_key, &context)
            .map(Some)
            .map_err(sas_refusal);
    }
    verify(parts, name, &account.client_key, now)
        .map(|()| None)
        .map_err(|e| Refuse::forbidden(e.error_code(), e.reason(), e.to_string()))
}

/// A SAS refusal as the Azure-style 403 it is answered with.
fn sas_refusal(e: SasError) -> Refuse {
    Refuse::forbidden(e.error_code(), e.reason(), e.to_string())
}

/// The answer to a request that stalled before the upstream's answer began: 408 when the
/// client stopped sending its body, 504 when the upstream stopped reading it or answering.
pub(super) fn stalled(stall: Stall, limit: std::time::Duration) -> Refuse {
    let (status, message) = match stall {
        Stall::ClientBody => (
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body stopped: no byte for {limit:?} (blob.bodyIdleTimeout)"),
        ),
        Stall::Upstream | Stall::UpstreamBody => (
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the storage account stopped: nothing moved for {limit:?} (blob.bodyIdleTimeout)"
            ),
        ),
    };
    Refuse {
        status,
        code: "OperationTimedOut",
        reason: stall.reason(),
        message,
    }
}

/// The warning beside the access-log line of a request a stall ended.
fn warn_stall(entry: &Entry, stall: Stall, limit: std::time::Duration) {
    tracing::warn!(
        account = %entry.account,
        operation = entry.operation,
        client = %entry.client,
        reason = stall.reason(),
        limit_secs = limit.as_secs_f64(),
        "blob request aborted: no byte moved within blob.bodyIdleTimeout; both connections closed"
    );
}

/// An Azure-style error: status, `x-ms-error-code`, and the XML `<Error>` document.
fn error_response(r: &Refuse) -> Response<Either<IdleBody<Incoming>, Full<Bytes>>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>{}</Code><Message>{}</Message></Error>",
        r.code,
        xml_escape(&r.message)
    );
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = r.status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    h.insert("x-ms-error-code", HeaderValue::from_static(r.code));
    response
}

/// Escapes text for an XML element (the message may quote a client's container name).
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Writes the access-log line and counts the metrics, once the response body is done.
fn finish(entry: &Entry, bytes_up: u64, bytes_down: u64, shared: &Shared) {
    tracing::info!(
        kind = "blob",
        account = %entry.account,
        operation = entry.operation,
        container = %entry.container,
        result = entry.result,
        status = entry.status,
        upstream_status = entry.upstream_status,
        bytes_up,
        bytes_down,
        latency_ms = entry.start.elapsed().as_secs_f64() * 1000.0,
        client = %entry.client,
        identity = entry.caller.as_ref().map_or("-", Caller::kind),
        src_namespace = entry.caller.as_ref().and_then(Caller::pod).map_or("-", |p| &*p.namespace),
        src_pod = entry.caller.as_ref().and_then(Caller::pod).map_or("-", |p| &*p.name),
        "blob request"
    );
    let m = &shared.metrics;
    m.blob_requests
        .get_or_create(&BlobLabels {
            account: entry.account.clone(),
            operation: entry.operation,
            result: entry.result,
        })
        .inc();
    m.blob_bytes_up.inc_by(bytes_up);
    m.blob_bytes_down.inc_by(bytes_down);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_messages_are_escaped() {
        assert_eq!(
            xml_escape("container \"<a&b>\" isn't"),
            "container &quot;&lt;a&amp;b&gt;&quot; isn&apos;t"
        );
    }
}
