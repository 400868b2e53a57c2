//! Listeners, limits and lifecycle. The accept loop takes a connection slot *before*
//! `accept()` (so the process never holds more sockets than it budgets for), keeps accepting
//! through errors with a backoff, and hands each connection to its own task. Shutdown follows
//! tokio's mini-redis: a watch channel tells the loops to stop, every connection task holds
//! a clone of an mpsc sender, and the server knows the last tunnel is done when the channel
//! closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::connect::tune;
use crate::metrics::{Metrics, ReasonLabel, ResultLabel};
use crate::policy::Policy;
use crate::relay;

/// Connections accepted beyond `maxTunnels`, only to be told 503: past this many the accept
/// loop waits for a slot and new clients queue in the kernel backlog, so a flood cannot
/// exhaust descriptors. 503 answers take microseconds, so a small number suffices.
const OVERFLOW_SLOTS: usize = 256;
/// First pause after a failed `accept()` (EMFILE, ENOBUFS): retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between `accept()` retries: long enough to let descriptors free up, short
/// enough that recovery is quick.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one "accept failed" line per this interval: when descriptors run out, accept
/// fails on every retry, and a line per failure would flood the log.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After the drain deadline cuts tunnels, time allowed for tasks still in their head or
/// connect phase (bounded by their own timeouts) before the process exits anyway.
const FORCE_GRACE: Duration = Duration::from_secs(2);

/// Settings that can change on reload; every connection takes the version current at accept.
#[derive(Debug)]
pub struct Live {
    /// The access policy.
    pub policy: Policy,
    /// `headTimeout`.
    pub head_timeout: Duration,
    /// `maxHeadBytes`.
    pub max_head_bytes: usize,
    /// `connectTimeout`.
    pub connect_timeout: Duration,
    /// `keepalive`.
    pub keepalive: Duration,
    /// `idleTimeout` and `maxTunnelDuration`.
    pub relay_limits: relay::Limits,
    /// `drainTimeout`.
    pub drain_timeout: Duration,
    /// The TLS listener's certificate, re-read on reload.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A start or reload that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
}

impl Live {
    /// Compiles the reloadable part of a validated config, reading TLS files.
    pub fn from_config(c: &Config) -> Result<Self, StartError> {
        let tls = c.tls.as_ref().map(load_tls).transpose()?;
        Ok(Self {
            policy: Policy::from_config(c),
            head_timeout: c.head_timeout.0,
            max_head_bytes: c.max_head_bytes,
            connect_timeout: c.connect_timeout.0,
            keepalive: c.keepalive.0,
            relay_limits: relay::Limits {
                idle: c.idle_timeout.0,
                max_duration: c.max_tunnel_duration.map(|d| d.0),
                splice: c.splice,
            },
            drain_timeout: c.drain_timeout.0,
            tls,
        })
    }
}

fn load_tls(t: &crate::config::TlsConfig) -> Result<Arc<rustls::ServerConfig>, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        StartError::Tls(format!("{what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(&t.cert_file)
        .map_err(|e| err("cannot read certFile", &t.cert_file, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err("bad certFile", &t.cert_file, &e))?;
    if certs.is_empty() {
        return Err(err("no certificate in", &t.cert_file, &"empty"));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| err("cannot read keyFile", &t.key_file, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StartError::Tls(format!("certificate and key do not match: {e}")))?;
    Ok(Arc::new(config))
}

/// State every connection task shares.
#[derive(Debug)]
pub struct Shared {
    /// The current reloadable settings; a watch channel so reload is one atomic swap and a
    /// connection reads it without locking for longer than an `Arc` clone.
    live: watch::Sender<Arc<Live>>,
    /// Metrics.
    pub metrics: Metrics,
    /// `maxTunnels` permits; a connection that gets none is answered 503.
    tunnels: Arc<Semaphore>,
    /// What `/readyz` reports; false from the first moment of a drain.
    ready: AtomicBool,
    /// Set on shutdown: the accept loops stop.
    draining: watch::Sender<bool>,
    /// Set when the drain deadline passes: open tunnels are cut.
    force: watch::Sender<bool>,
}

impl Shared {
    /// The settings current now.
    pub fn live(&self) -> Arc<Live> {
        self.live.borrow().clone()
    }

    /// Whether `/readyz` says ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Resolves when the drain deadline has passed and open tunnels must be cut.
    pub async fn force_closed(&self) {
        wait_true(&mut self.force.subscribe()).await;
    }
}

/// Resolves once the flag is true (or its sender is gone). The borrow `wait_for` returns is
/// not `Send`, so it is dropped here, before any other await.
async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}

#[cfg(test)]
pub(crate) fn test_shared(config: &Config) -> Shared {
    Shared {
        live: watch::Sender::new(Arc::new(Live::from_config(config).unwrap())),
        metrics: Metrics::new(),
        tunnels: Arc::new(Semaphore::new(1)),
        ready: AtomicBool::new(true),
        draining: watch::Sender::new(false),
        force: watch::Sender::new(false),
    }
}

/// Controls a running server from outside: reload and shutdown (signals, tests).
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Applies a new validated config to new connections; open tunnels are untouched. Fails
    /// (keeping the old settings) when TLS files cannot be loaded.
    pub fn reload(&self, config: &Config) -> Result<(), StartError> {
        let result = Live::from_config(config).map(|live| {
            self.shared.live.send_replace(Arc::new(live));
        });
        let label = if result.is_ok() { "ok" } else { "error" };
        self.shared
            .metrics
            .reloads
            .get_or_create(&ResultLabel { result: label })
            .inc();
        result
    }

    /// Counts a reload that failed before reaching [`Handle::reload`] (a bad file).
    pub fn reload_failed(&self) {
        self.shared
            .metrics
            .reloads
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
    }

    /// Starts the drain: not ready, stop accepting, let tunnels finish until `drainTimeout`.
    pub fn shutdown(&self) {
        self.shared.ready.store(false, Ordering::Relaxed);
        self.shared.draining.send_replace(true);
    }

    /// Tunnels open now.
    pub fn active_tunnels(&self) -> i64 {
        self.shared.metrics.tunnels_active.get()
    }
}

/// A bound, not yet running proxy.
#[derive(Debug)]
pub struct Server {
    /// The plain CONNECT listener.
    plain: TcpListener,
    /// The TLS CONNECT listener, when configured.
    tls: Option<TcpListener>,
    /// The admin listener.
    admin: TcpListener,
    /// State shared with every connection.
    shared: Arc<Shared>,
    /// `maxTunnels`, to size the accept slots.
    max_tunnels: usize,
}

impl Server {
    /// Binds every listener (so a port clash fails the start, not the first connection).
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let live = Live::from_config(config)?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let plain = bind(config.listen).await?;
        let tls = match &config.tls {
            Some(t) => Some(bind(t.listen).await?),
            None => None,
        };
        let admin = bind(config.admin_listen).await?;
        let shared = Arc::new(Shared {
            live: watch::Sender::new(Arc::new(live)),
            metrics: Metrics::new(),
            tunnels: Arc::new(Semaphore::new(config.max_tunnels)),
            ready: AtomicBool::new(true),
            draining: watch::Sender::new(false),
            force: watch::Sender::new(false),
        });
        Ok(Self {
            plain,
            tls,
            admin,
            shared,
            max_tunnels: config.max_tunnels,
        })
    }

    /// The CONNECT listener's address (useful when bound to port 0).
    pub fn proxy_addr(&self) -> std::io::Result<SocketAddr> {
        self.plain.local_addr()
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.tls.as_ref().map(TcpListener::local_addr)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// A handle for reload and shutdown.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until [`Handle::shutdown`], then drains: returns when every tunnel is closed
    /// or the drain deadline has cut the rest.
    pub async fn run(self) {
        let shared = self.shared;
        let slots = Arc::new(Semaphore::new(self.max_tunnels + OVERFLOW_SLOTS));
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let admin = tokio::spawn(crate::admin::serve(self.admin, shared.clone()));
        let plain = accept_loop(
            self.plain,
            Kind::Plain,
            shared.clone(),
            slots.clone(),
            done_tx.clone(),
        );
        let tls = async {
            if let Some(l) = self.tls {
                accept_loop(l, Kind::Tls, shared.clone(), slots.clone(), done_tx.clone()).await;
            }
        };
        tokio::join!(plain, tls);
        drop(done_tx);
        let drain = shared.live().drain_timeout;
        tracing::info!(
            tunnels = shared.metrics.tunnels_active.get(),
            deadline_secs = drain.as_secs(),
            "stopped accepting; draining open tunnels"
        );
        if tokio::time::timeout(drain, done_rx.recv()).await.is_err() {
            tracing::warn!(
                tunnels = shared.metrics.tunnels_active.get(),
                "drain deadline passed; closing the remaining tunnels"
            );
            shared.force.send_replace(true);
            let _ = tokio::time::timeout(FORCE_GRACE, done_rx.recv()).await;
        }
        admin.abort();
        tracing::info!("drained; exiting");
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// CONNECT over plain TCP.
    Plain,
    /// CONNECT inside TLS (the client speaks TLS to the proxy first).
    Tls,
}

/// Rate-limits one accept loop's error line: the first failure is logged at once, later
/// ones at most every [`ACCEPT_ERROR_LOG_INTERVAL`], with the number left out in between.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    /// The log message, naming the listener.
    message: &'static str,
    /// When a line was last written; `None` before the first failure.
    last_logged: Option<Instant>,
    /// Failures since that line that were not logged.
    suppressed: u64,
}

impl AcceptErrors {
    /// A limiter for the loop whose failures log `message`.
    pub(crate) fn new(message: &'static str) -> Self {
        Self {
            message,
            last_logged: None,
            suppressed: 0,
        }
    }

    /// Records a failed `accept()` at `now`; logs it unless a line went out less than the
    /// interval ago. Returns whether it logged.
    pub(crate) fn failed(&mut self, error: &std::io::Error, now: Instant) -> bool {
        let due = self
            .last_logged
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_ERROR_LOG_INTERVAL);
        if !due {
            self.suppressed += 1;
            return false;
        }
        tracing::warn!(
            error = %error,
            suppressed = self.suppressed,
            "{}", self.message
        );
        self.last_logged = Some(now);
        self.suppressed = 0;
        true
    }
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    done: mpsc::Sender<()>,
) {
    let mut draining = shared.draining.subscribe();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut errors = AcceptErrors::new("accept failed");
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            () = wait_true(&mut draining) => return,
        };
        let (socket, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    errors.failed(&e, Instant::now());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            () = wait_true(&mut draining) => return,
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let permit = shared.tunnels.clone().try_acquire_owned().ok();
        let shared = shared.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let live = shared.live();
            if let Err(e) = tune(&socket, live.keepalive) {
                tracing::debug!(error = %e, "cannot tune client socket");
            }
            match (kind, &live.tls) {
                (Kind::Plain, _) => crate::tunnel::serve(socket, peer, permit, shared).await,
                (Kind::Tls, Some(acceptor)) => {
                    // Boxed: the TLS state is large and would otherwise size every plain
                    // tunnel's task too (what an idle tunnel costs is mostly its task).
                    let acceptor = TlsAcceptor::from(acceptor.clone());
                    Box::pin(tls_serve(acceptor, socket, peer, permit, &live, shared)).await;
                }
                (Kind::Tls, None) => {}
            }
            drop(slot);
            drop(done);
        });
    }
}

async fn tls_serve(
    acceptor: TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    live: &Live,
    shared: Arc<Shared>,
) {
    match tokio::time::timeout(live.head_timeout, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => crate::tunnel::serve(stream, peer, permit, shared).await,
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
            count_tls_failure(&shared);
        }
        Err(_) => {
            tracing::debug!(client = %peer, "TLS handshake timed out");
            count_tls_failure(&shared);
        }
    }
}

fn count_tls_failure(shared: &Shared) {
    shared
        .metrics
        .denials
        .get_or_create(&ReasonLabel {
            reason: "tls-handshake".into(),
        })
        .inc();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn accept_errors_log_once_per_interval() {
        let mut errors = AcceptErrors::new("accept failed");
        let e = std::io::Error::from_raw_os_error(24); // EMFILE
        let t0 = Instant::now();
        assert!(errors.failed(&e, t0));
        // Ten a second for nine seconds: none of them logged, all counted.
        for i in 1..90 {
            assert!(!errors.failed(&e, t0 + Duration::from_millis(100 * i)));
        }
        assert_eq!(errors.suppressed, 89);
        assert!(errors.failed(&e, t0 + ACCEPT_ERROR_LOG_INTERVAL));
        assert_eq!(errors.suppressed, 0);
    }
}
