//! The admin port: `/healthz` (the process serves), `/readyz` (it takes new tunnels; 503 once
//! draining, so the Service stops sending clients here) and `/metrics` (Prometheus text).
//! Its connections count against the same descriptor budget as the tunnels, so they are
//! bounded: a header timeout (also the idle timeout), a lifetime, and a small cap at which
//! the oldest connection makes room for the newest.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::accept::AcceptErrors;
use crate::state::Shared;

/// Content type of the exposition format prometheus-client writes.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Time a connection may take to send a request head. hyper arms this timer whenever the
/// connection waits for a request, so it also closes silent connections and idle
/// keep-alive ones between requests: probes and scrapes send at once, and a scraper that
/// keeps its connection open between scrapes simply reconnects.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of an admin connection, whatever it is doing: bounds what the header timer
/// cannot see (a body trickled after the head, a response never read).
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Admin connections open at once. Probes and a scraper need two or three; when a new one
/// arrives at the cap, the oldest is closed, so a pile of idle connections can neither
/// exhaust descriptors nor keep the kubelet's probe waiting in the backlog.
pub const ADMIN_MAX_CONNECTIONS: usize = 16;
/// Pause after a failed `accept()` (EMFILE) before the next try.
const ADMIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the admin port until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT);
    let http = Arc::new(http);
    let mut open: VecDeque<AbortHandle> = VecDeque::with_capacity(ADMIN_MAX_CONNECTIONS);
    let mut errors = AcceptErrors::new("admin accept failed");
    loop {
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                errors.failed(&e, Instant::now());
                tokio::time::sleep(ADMIN_ACCEPT_BACKOFF).await;
                continue;
            }
        };
        open.retain(|task| !task.is_finished());
        if open.len() >= ADMIN_MAX_CONNECTIONS
            && let Some(oldest) = open.pop_front()
        {
            tracing::debug!("admin connection limit reached: closing the oldest");
            oldest.abort();
        }
        let shared = shared.clone();
        let http = http.clone();
        let task = tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&req, &shared)) }
            });
            let conn = http.serve_connection(TokioIo::new(socket), svc);
            let _ = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, conn).await;
        });
        open.push_back(task.abort_handle());
    }
}

fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| (status, "text/plain", body.to_owned());
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => match shared.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            METRICS_CONTENT_TYPE,
            shared.metrics.encode(),
        ),
        (&Method::GET, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
