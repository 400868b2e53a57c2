//! `egress-webhook serve`: the admission endpoint over TLS, the admin endpoint, reloads and
//! graceful shutdown.
//!
//! Shape: one task accepts TLS connections and serves each with hyper (HTTP/2 or HTTP/1.1 by
//! ALPN); a second serves the plain-HTTP admin port; a third owns the configuration and
//! rebuilds the engine when the file or the discovered cluster facts change. Shutdown fails
//! readiness, stops accepting, lets in-flight reviews finish and closes idle keep-alive
//! connections (HTTP/2 GOAWAY), bounded by a grace period.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use crate::admission::{self, NoServices, ReviewResult, ServiceDirectory};
use crate::bootstrap;
use crate::config::{Config, ConfigError};
use crate::discovery::{self, Discovered};
use crate::engine::Injector;
use crate::metrics::{Metrics, ProtocolLabel, ReviewLabels};
use crate::tls::{self, CertStore};
use crate::watch::FileWatch;

/// Largest AdmissionReview body accepted; larger gets 413. Pods are far smaller; the API
/// server's own request limit is 3 MiB.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// Most bytes of an oversized body read and thrown away before answering 413. Answering
/// before the client has sent everything makes an HTTP/2 client see the stream reset
/// instead of the status, and leaves an HTTP/1.1 connection unusable; draining lets both
/// read the 413 and go on with the next review. Past this, the connection is not worth
/// keeping: the answer is sent at once and the connection (HTTP/1.1) or stream closed.
pub const MAX_DRAIN_BYTES: usize = 16 * 1024 * 1024;
/// Most TLS connections served at once. The API server keeps a handful; the bound keeps a
/// misbehaving client from exhausting file descriptors.
pub const MAX_CONNECTIONS: usize = 1024;
/// A client must finish the TLS handshake within this, or it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP/1.1 client must send a request head within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (for example out of file descriptors) before retrying.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Time an admin connection may take to send a request head. hyper runs this timer
/// whenever the connection waits for a request, so it also closes silent connections and
/// idle keep-alive ones: probes and scrapes send at once.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of an admin connection, whatever it does: bounds what the header timer
/// cannot see (a body trickled after the head, a response never read).
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Admin connections open at once. Probes and a scraper need two or three; at the cap the
/// oldest connection is closed to make room, so idle connections can neither exhaust file
/// descriptors nor keep a probe waiting in the listen backlog.
pub const ADMIN_MAX_CONNECTIONS: usize = 16;
/// At most one "admin accept failed" line per this interval: out of descriptors, every
/// retry fails, and a line per retry would flood the log.
const ADMIN_ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Settings of `serve`, from the command line.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Configuration file; defaults when absent (then nothing is watched).
    pub config: Option<PathBuf>,
    /// Where the serving certificate comes from.
    pub tls: TlsSource,
    /// Address of the admission endpoint.
    pub listen: SocketAddr,
    /// Address of the plain-HTTP admin endpoint.
    pub admin_listen: SocketAddr,
    /// How long shutdown waits for in-flight reviews before closing connections anyway.
    pub grace_period: Duration,
    /// The webhook's own namespace: a default `proxyURL` names the bundled proxy there.
    pub namespace: String,
    /// Run the pod drift detector ([`crate::drift`]): watch pod metadata in opted-in
    /// namespaces and export how many selected pods were admitted without injection.
    pub watch_pods: bool,
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// PEM files, reloaded when they change (cert-manager, a mounted Secret).
    Files {
        /// The certificate chain.
        cert: PathBuf,
        /// The private key.
        key: PathBuf,
    },
    /// The webhook keeps its own CA and certificate in a Secret and the webhook
    /// configuration's `caBundle` in step (`--self-signed`).
    SelfSigned(egress_gate_certs::BootstrapParams),
}

/// Errors that stop `serve` before it starts serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration file is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// `--self-signed` could not reach the cluster or write its certificates.
    #[error("self-signed certificates: {0}")]
    Bootstrap(String),
}

/// What `/readyz` reports: ready when every part is.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Discovery caches have synced (true when discovery is off).
    discovery_synced: AtomicBool,
    /// Set on shutdown so the Service stops sending new reviews here.
    shutting_down: AtomicBool,
}

impl Readiness {
    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.shutting_down.load(Ordering::Acquire) {
            Err("shutting down")
        } else if !self.discovery_synced.load(Ordering::Acquire) {
            Err("discovery caches not synced")
        } else {
            Ok(())
        }
    }
}

struct AppState {
    injector: watch::Receiver<Arc<Injector>>,
    services: Arc<dyn ServiceDirectory>,
    metrics: Arc<Metrics>,
}

/// Serves until `shutdown` completes, then drains. Config and TLS are loaded before anything
/// listens, so a bad file stops the process with a message instead of serving nothing.
pub async fn run(options: ServeOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = read_config(&options).map_err(StartError::from)?;
    let metrics = Arc::new(Metrics::default());
    let certs = match &options.tls {
        TlsSource::Files { cert, key } => {
            CertStore::new(tls::load_pair(cert, key).map_err(StartError::from)?)
        }
        TlsSource::SelfSigned(params) => {
            start_self_signed(params.clone(), Arc::clone(&metrics)).await?
        }
    };
    certs.track_expiry(metrics.certificate_expiry.clone());
    let tls_config = tls::server_config(Arc::clone(&certs)).map_err(StartError::from)?;
    let readiness = Arc::new(Readiness::default());

    let (services, discovered): (Arc<dyn ServiceDirectory>, watch::Receiver<Discovered>) =
        if config.discovery {
            let handle = discovery::start(Arc::clone(&metrics)).await;
            readiness_follow(handle.synced.clone(), Arc::clone(&readiness));
            (handle.services, handle.facts)
        } else {
            readiness.discovery_synced.store(true, Ordering::Release);
            (
                Arc::new(NoServices),
                watch::channel(Discovered::from_environment()).1,
            )
        };

    let (injector_tx, injector_rx) =
        watch::channel(Arc::new(build_injector(&config, &discovered.borrow())));
    tokio::spawn(keep_current(
        watch_files(&options),
        options.clone(),
        config,
        discovered,
        injector_tx,
        Arc::clone(&certs),
        Arc::clone(&metrics),
    ));

    // The detector runs on a thread of its own (see `drift::start`) and stops with the server.
    let drift = if options.watch_pods {
        match kube::Config::infer().await {
            Ok(client_config) => match crate::drift::start(
                client_config,
                &options.namespace,
                injector_rx.clone(),
                Arc::clone(&services),
                Arc::clone(&metrics),
            ) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    warn!(error = %e, "--watch-pods is on but the detector could not start; pod drift is not tracked");
                    None
                }
            },
            Err(e) => {
                warn!(error = %e, "--watch-pods is on but no Kubernetes client configuration was found; pod drift is not tracked");
                None
            }
        }
    } else {
        None
    };

    let router = admission_router(injector_rx, services, Arc::clone(&metrics));

    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let admin = TcpListener::bind(options.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.admin_listen))?;
    info!(listen = %listener.local_addr()?, admin = %admin.local_addr()?, "serving admission reviews");

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(serve_admin(
        admin,
        admin_router(Arc::clone(&readiness), Arc::clone(&metrics)),
    ));
    let serve_task = tokio::spawn(serve_tls(
        listener,
        TlsAcceptor::from(Arc::new(tls_config)),
        router,
        stop_rx,
        options.grace_period,
    ));

    shutdown.await;
    info!("shutdown requested: not ready, no new connections, finishing in-flight reviews");
    readiness.shutting_down.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    if let Err(e) = serve_task.await {
        error!(error = %e, "admission server task failed");
    }
    admin_task.abort();
    if let Some(drift) = drift {
        // Joining waits for the detector's runtime to drop its tasks: off the async threads.
        if let Err(e) = tokio::task::spawn_blocking(move || drift.stop()).await {
            error!(error = %e, "pod drift detector did not stop cleanly");
        }
    }
    info!("stopped");
    Ok(())
}

fn readiness_follow(mut synced: watch::Receiver<bool>, readiness: Arc<Readiness>) {
    tokio::spawn(async move {
        loop {
            readiness
                .discovery_synced
                .store(*synced.borrow_and_update(), Ordering::Release);
            if synced.changed().await.is_err() {
                return;
            }
        }
    });
}

/// `--self-signed`: ensures the certificates once (failing the start if that is impossible),
/// then keeps them fresh in the background, swapping renewed ones in.
async fn start_self_signed(
    params: egress_gate_certs::BootstrapParams,
    metrics: Arc<Metrics>,
) -> Result<Arc<CertStore>, StartError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| StartError::Bootstrap(format!("no Kubernetes client: {e}")))?;
    let store = bootstrap::KubeStore::new(client, &params.identity.namespace);
    let material = bootstrap::ensure(&store, &params)
        .await
        .map_err(|e| StartError::Bootstrap(e.to_string()))?;
    info!(secret = ?material.secret, ca_bundle = ?material.bundle, "serving certificate ready");
    let certs = CertStore::new(material_pair(&material)?);
    let renewing = Arc::clone(&certs);
    tokio::spawn(async move {
        let mut wait = bootstrap::next_wait(&material, std::time::SystemTime::now());
        loop {
            tokio::time::sleep(wait).await;
            match bootstrap::ensure(&store, &params).await {
                Ok(material) => match material_pair(&material) {
                    Ok(pair) => {
                        renewing.replace(pair);
                        Metrics::reload(&metrics.tls_reloads, true);
                        debug!(secret = ?material.secret, ca_bundle = ?material.bundle, "certificates checked");
                        wait = bootstrap::next_wait(&material, std::time::SystemTime::now());
                    }
                    Err(e) => {
                        Metrics::reload(&metrics.tls_reloads, false);
                        warn!(error = %e, "certificate from the Secret rejected; the previous one stays");
                        wait = bootstrap::RETRY_INTERVAL;
                    }
                },
                Err(e) => {
                    Metrics::reload(&metrics.tls_reloads, false);
                    warn!(error = %e, "certificate check failed; retrying");
                    wait = bootstrap::RETRY_INTERVAL;
                }
            }
        }
    });
    Ok(certs)
}

fn material_pair(
    material: &egress_gate_certs::ServingMaterial,
) -> Result<rustls::sign::CertifiedKey, StartError> {
    let secret = std::path::Path::new("Secret tls.crt");
    let key = std::path::Path::new("Secret tls.key");
    Ok(tls::pair_from_pem(
        material.cert_pem.as_bytes(),
        material.key_pem.as_bytes(),
        secret,
        key,
    )?)
}

/// The engine for a configuration and what discovery found.
fn build_injector(config: &Config, discovered: &Discovered) -> Injector {
    let facts = discovered.facts_for(config);
    Injector::new(config, &facts)
}

/// Watches the certificate (when it comes from files) and the config file. Set up before the
/// server listens, so no change made after start can be missed.
fn watch_files(options: &ServeOptions) -> Option<FileWatch> {
    let mut files = Vec::new();
    if let TlsSource::Files { cert, key } = &options.tls {
        files.extend([cert.as_path(), key.as_path()]);
    }
    if let Some(path) = &options.config {
        files.push(path.as_path());
    }
    if files.is_empty() {
        return None;
    }
    match FileWatch::new(&files) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch files; config and certificate reloads are off");
            None
        }
    }
}

/// Reloads the configuration and the certificate when their files change, and rebuilds the
/// engine when the configuration or the discovered facts change. Invalid new files are
/// logged and counted; what is in force stays.
async fn keep_current(
    mut watch: Option<FileWatch>,
    options: ServeOptions,
    mut config: Config,
    mut discovered: watch::Receiver<Discovered>,
    injector: watch::Sender<Arc<Injector>>,
    certs: Arc<CertStore>,
    metrics: Arc<Metrics>,
) {
    let mut discovery_alive = true;
    loop {
        let discovery_change = async {
            if discovery_alive {
                discovered.changed().await
            } else {
                std::future::pending().await
            }
        };
        let file_change = async {
            match watch.as_mut() {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = file_change => {
                if changed.is_none() {
                    watch = None;
                    continue;
                }
                reload_tls(&options, &certs, &metrics);
                if let Some(path) = &options.config {
                    match read_config(&options) {
                        Ok(next) if next == config => {}
                        Ok(next) => {
                            if next.discovery != config.discovery {
                                warn!(
                                    discovery = next.discovery,
                                    "`discovery` changed in the configuration; it takes effect when the webhook restarts, everything else now"
                                );
                            }
                            config = next;
                            Metrics::reload(&metrics.config_reloads, true);
                            metrics.config_reloaded();
                            metrics.config_valid.set(1);
                            info!(path = %path.display(), "configuration reloaded");
                        }
                        Err(e) => {
                            Metrics::reload(&metrics.config_reloads, false);
                            metrics.config_valid.set(0);
                            error!(error = %e, "new configuration rejected; the previous one stays in force");
                            continue;
                        }
                    }
                }
            }
            changed = discovery_change => {
                if changed.is_err() {
                    // Discovery stopped; keep what it found and watch only files from now on.
                    discovery_alive = false;
                    continue;
                }
            }
        }
        let next = Arc::new(build_injector(&config, &discovered.borrow_and_update()));
        injector.send_replace(next);
    }
}

/// The configuration `options` name (the defaults without a file), placed in the webhook's
/// namespace: what start and every reload read.
fn read_config(options: &ServeOptions) -> Result<Config, ConfigError> {
    match &options.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    }
    .and_then(|c| c.in_namespace(&options.namespace))
}

fn reload_tls(options: &ServeOptions, certs: &CertStore, metrics: &Metrics) {
    let TlsSource::Files { cert, key } = &options.tls else {
        return;
    };
    match tls::load_pair(cert, key) {
        Ok(pair) => {
            certs.replace(pair);
            Metrics::reload(&metrics.tls_reloads, true);
            debug!("serving certificate reloaded");
        }
        Err(e) => {
            // Writers replace the two files one at a time; a half-updated pair settles on
            // the next change. Until then the previous pair keeps serving.
            Metrics::reload(&metrics.tls_reloads, false);
            warn!(error = %e, "new certificate or key rejected; the previous pair stays in force");
        }
    }
}

/// The admission endpoint: `POST /mutate` (any query, such as `?timeout=5s`), bodies up to
/// [`MAX_BODY_BYTES`]; larger ones get 413 (see [`MAX_DRAIN_BYTES`]).
pub fn admission_router(
    injector: watch::Receiver<Arc<Injector>>,
    services: Arc<dyn ServiceDirectory>,
    metrics: Arc<Metrics>,
) -> Router {
    let state = Arc::new(AppState {
        injector,
        services,
        metrics,
    });
    Router::new()
        .route("/mutate", post(mutate))
        // The handler bounds the body itself (`read_body`): the default limit would answer
        // 413 before the body is read, which HTTP/2 clients never see.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// A request body read with a bound.
enum BodyRead {
    /// The whole body, at most [`MAX_BODY_BYTES`].
    Complete(Bytes),
    /// Larger than [`MAX_BODY_BYTES`]; `drained` when it was read to the end (at most
    /// [`MAX_DRAIN_BYTES`]), so the connection can carry the next request.
    TooLarge {
        /// Whether the client's whole body was consumed.
        drained: bool,
    },
    /// The client broke off or sent a malformed body.
    Failed(String),
}

/// Reads `body`, keeping at most [`MAX_BODY_BYTES`] and discarding up to
/// [`MAX_DRAIN_BYTES`] of an oversized one.
async fn read_body(headers: &HeaderMap, body: Body) -> BodyRead {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_DRAIN_BYTES as u64) {
        return BodyRead::TooLarge { drained: false };
    }
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => return BodyRead::Failed(e.to_string()),
        };
        total = total.saturating_add(chunk.len());
        if total > MAX_DRAIN_BYTES {
            return BodyRead::TooLarge { drained: false };
        }
        if total <= MAX_BODY_BYTES {
            kept.extend_from_slice(&chunk);
        } else if !kept.is_empty() {
            // Over the limit: what was kept is of no use any more.
            kept = Vec::new();
        }
    }
    if total > MAX_BODY_BYTES {
        BodyRead::TooLarge { drained: true }
    } else {
        BodyRead::Complete(Bytes::from(kept))
    }
}

/// The 413 answer; `Connection: close` on HTTP/1.1 when the body was left unread, since the
/// connection then holds the rest of it.
fn too_large(version: Version, drained: bool) -> Response {
    let text = format!("AdmissionReview body over {MAX_BODY_BYTES} bytes\n");
    let mut response = (
        StatusCode::PAYLOAD_TOO_LARGE,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response();
    if !drained && version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn mutate(
    State(state): State<Arc<AppState>>,
    version: Version,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state
        .metrics
        .requests
        .get_or_create(&ProtocolLabel {
            protocol: format!("{version:?}"),
        })
        .inc();
    let body = match read_body(&headers, body).await {
        BodyRead::Complete(body) => body,
        BodyRead::TooLarge { drained } => {
            warn!(limit = MAX_BODY_BYTES, drained, "review body too large");
            return too_large(version, drained);
        }
        BodyRead::Failed(error) => {
            debug!(%error, "reading the review body failed");
            return (
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {error}\n"),
            )
                .into_response();
        }
    };
    let started = Instant::now();
    let injector = Arc::clone(&state.injector.borrow());
    let reply = admission::review(&injector, state.services.as_ref(), &body);
    let elapsed = started.elapsed();

    let record = &reply.record;
    state.metrics.review_duration.observe(elapsed.as_secs_f64());
    state
        .metrics
        .reviews
        .get_or_create(&ReviewLabels {
            result: reply.result.as_str().to_string(),
            profile: record.profile.clone().unwrap_or_default(),
        })
        .inc();
    state
        .metrics
        .patch_operations
        .inc_by(record.patch_ops as u64);
    let duration_us = elapsed.as_micros() as u64;
    match reply.result {
        ReviewResult::BadRequest | ReviewResult::Unparseable | ReviewResult::NotPodCreate => warn!(
            uid = %record.uid, namespace = %record.namespace, pod = %record.pod,
            result = reply.result.as_str(), reason = record.reason.as_deref().unwrap_or_default(),
            duration_us, "review"
        ),
        ReviewResult::Patched | ReviewResult::Unchanged => info!(
            uid = %record.uid, namespace = %record.namespace, pod = %record.pod,
            profile = record.profile.as_deref().unwrap_or_default(),
            decision = record.decision.as_deref().unwrap_or_default(),
            result = reply.result.as_str(), patch_ops = record.patch_ops, dry_run = record.dry_run,
            duration_us, "review"
        ),
    }
    let content_type = if reply.status == 200 {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, content_type)], reply.body).into_response()
}

/// Completes once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts TLS connections until `stop` turns true, then drains them: in-flight requests
/// finish, idle keep-alive connections close, HTTP/2 connections get GOAWAY, all within
/// `grace_period`.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    mut stop: watch::Receiver<bool>,
    grace_period: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));

    loop {
        // Take a permit before accepting, so the limit holds without a race.
        let permit = tokio::select! {
            p = Arc::clone(&limit).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stopped(&mut stop) => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections closed"),
        _ = tokio::time::sleep(grace_period) => warn!(?grace_period, "grace period over; closing remaining connections"),
    }
}

/// The plain-HTTP admin endpoint: `/healthz`, `/readyz`, `/metrics`.
pub fn admin_router(readiness: Arc<Readiness>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", {
            let readiness = Arc::clone(&readiness);
            get(move || {
                let readiness = Arc::clone(&readiness);
                async move {
                    match readiness.check() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            })
        })
        .route(
            "/metrics",
            get(move || {
                let metrics = Arc::clone(&metrics);
                let ready = readiness.check().is_ok();
                async move {
                    metrics.ready.set(i64::from(ready));
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
}

/// The admin port keeps answering during the drain, so probes see "not ready" rather than
/// a refused connection; it stops with the process. HTTP/1.1 only (probes and scrapers speak
/// it), with [`ADMIN_HEADER_TIMEOUT`], [`ADMIN_CONNECTION_LIFETIME`] and
/// [`ADMIN_MAX_CONNECTIONS`] so that idle connections cannot starve the process.
async fn serve_admin(listener: TcpListener, router: Router) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT);
    let http = Arc::new(http);
    let mut open: VecDeque<AbortHandle> = VecDeque::with_capacity(ADMIN_MAX_CONNECTIONS);
    let mut last_error_log: Option<Instant> = None;
    let mut suppressed: u64 = 0;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() >= ADMIN_ACCEPT_ERROR_LOG_INTERVAL) {
                    warn!(error = %e, suppressed, "admin accept failed");
                    last_error_log = Some(Instant::now());
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        open.retain(|task| !task.is_finished());
        if open.len() >= ADMIN_MAX_CONNECTIONS
            && let Some(oldest) = open.pop_front()
        {
            debug!("admin connection limit reached: closing the oldest");
            oldest.abort();
        }
        let service = TowerToHyperService::new(router.clone());
        let http = Arc::clone(&http);
        let task = tokio::spawn(async move {
            let conn = http.serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, conn).await;
        });
        open.push_back(task.abort_handle());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Margin over a timeout for the close to be seen on a busy machine.
    const SLACK: Duration = Duration::from_secs(2);

    async fn admin() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/healthz", get(|| async { "ok\n" }));
        tokio::spawn(serve_admin(listener, router));
        addr
    }

    async fn healthz(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads to EOF; returns what came and how long after `since` the close was.
    async fn until_closed(mut s: TcpStream, since: Instant) -> (String, Duration) {
        let mut out = Vec::new();
        tokio::time::timeout(ADMIN_HEADER_TIMEOUT + SLACK * 2, s.read_to_end(&mut out))
            .await
            .expect("admin connection still open past the header timeout")
            .unwrap();
        (String::from_utf8_lossy(&out).into_owned(), since.elapsed())
    }

    #[tokio::test]
    async fn silent_half_sent_and_idle_connections_are_closed() {
        let addr = admin().await;
        let since = Instant::now();
        let silent = TcpStream::connect(addr).await.unwrap();
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let results = tokio::join!(
            until_closed(silent, since),
            until_closed(half, since),
            until_closed(idle, since)
        );
        for (what, (_, after)) in [
            ("silent", &results.0),
            ("half-sent", &results.1),
            ("idle", &results.2),
        ] {
            assert!(
                *after >= ADMIN_HEADER_TIMEOUT - Duration::from_millis(500)
                    && *after <= ADMIN_HEADER_TIMEOUT + SLACK,
                "{what} connection closed after {after:?}"
            );
        }
        assert!(
            results.2.0.starts_with("HTTP/1.1 200 OK\r\n"),
            "{}",
            results.2.0
        );
    }

    #[tokio::test]
    async fn idle_connections_past_the_cap_make_room_for_a_probe() {
        let addr = admin().await;
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = fds();
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let answer = tokio::time::timeout(SLACK, healthz(addr))
            .await
            .expect("/healthz not answered while idle connections are open");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        // This process holds the 300 client ends; the server side holds at most the cap (plus
        // what other tests open meanwhile), not another 300.
        let held = fds() - before;
        assert!(
            held < 300 + ADMIN_MAX_CONNECTIONS + 64,
            "{held} descriptors for 300 idle admin connections"
        );
        // The oldest connections were closed by the server.
        let mut first = idle.remove(0);
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(SLACK, first.read(&mut buf))
            .await
            .expect("the oldest idle connection is still open")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
