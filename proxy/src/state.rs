//! The process-wide state every listener and connection task shares: the reloadable settings
//! ([`Live`], swapped whole on reload), the metrics, the tunnel budget and the drain flags
//! ([`Shared`]). It sits beneath the listeners, the tunnel path and the admin port, which all
//! read it and none of which it knows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::blob::accounts::{Accounts, LoadError};
use crate::blob::token::TokenCache;
use crate::blob::upstream::ClientSettings;
use crate::config::Config;
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::per_source::PerSource;
use crate::policy::Policy;
use crate::tls::{TlsError, load_server_config};

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
    /// `idleTimeout`: a tunnel idle both ways this long is closed.
    pub idle_timeout: Duration,
    /// `maxTunnelDuration`: `None` = tunnels may stay open as long as they are used.
    pub max_tunnel_duration: Option<Duration>,
    /// `splice`: relay bulk data kernel to kernel.
    pub splice: bool,
    /// `drainTimeout`.
    pub drain_timeout: Duration,
    /// The TLS listener's certificate, re-read on reload.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The blob gateway's accounts, keys re-read on reload; `None` when `blob:` is absent.
    pub blob: Option<Arc<Accounts>>,
    /// The blob gateway's TLS listener certificate, re-read on reload.
    pub blob_tls: Option<Arc<rustls::ServerConfig>>,
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
    Tls(#[from] TlsError),
    /// A blob gateway key or CA file could not be used.
    #[error(transparent)]
    Blob(#[from] LoadError),
    /// `identity:` is configured and no Kubernetes client could be built (neither the
    /// in-cluster service account nor `KUBECONFIG` / `~/.kube/config` is usable).
    #[error("identity: cannot build a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Kube(#[from] kube::Error),
    /// `identity:` is configured and the embedder passed no client.
    #[error("identity: configured, but no Kubernetes client was given")]
    NoKubeClient,
}

impl Live {
    /// Compiles the reloadable part of a validated config, reading TLS files.
    pub fn from_config(c: &Config) -> Result<Self, StartError> {
        let tls = c.tls.as_ref().map(load_server_config).transpose()?;
        let settings = ClientSettings {
            policy: c.policy(),
            connect_timeout: c.connect_timeout.0,
            keepalive: c.keepalive.0,
        };
        let blob = c
            .blob
            .as_ref()
            .map(|b| Accounts::load(b, &settings).map(Arc::new))
            .transpose()?;
        let blob_tls = c
            .blob
            .as_ref()
            .and_then(|b| b.tls.as_ref())
            .map(load_server_config)
            .transpose()?;
        Ok(Self {
            policy: c.policy(),
            head_timeout: c.head_timeout.0,
            max_head_bytes: c.max_head_bytes,
            connect_timeout: c.connect_timeout.0,
            keepalive: c.keepalive.0,
            idle_timeout: c.idle_timeout.0,
            max_tunnel_duration: c.max_tunnel_duration.map(|d| d.0),
            splice: c.splice,
            drain_timeout: c.drain_timeout.0,
            tls,
            blob,
            blob_tls,
        })
    }
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
    /// The pod watch, when `identity:` is configured; `None` = no Kubernetes client at all.
    pub identity: Option<Identities>,
    /// Open connections and connection rate per client address.
    pub per_source: Arc<PerSource>,
    /// The blob gateway's upstream tokens; here, not in [`Live`], so a reload keeps them.
    pub tokens: TokenCache,
}

impl Shared {
    /// Fresh state: ready, not draining, `max_tunnels` tunnel permits.
    pub fn new(live: Live, max_tunnels: usize) -> Self {
        let metrics = Metrics::new();
        let tokens = TokenCache::new(metrics.tokens.clone());
        metrics
            .max_tunnels
            .set(i64::try_from(max_tunnels).unwrap_or(i64::MAX));
        Self {
            live: watch::Sender::new(Arc::new(live)),
            metrics,
            tunnels: Arc::new(Semaphore::new(max_tunnels)),
            ready: AtomicBool::new(true),
            draining: watch::Sender::new(false),
            force: watch::Sender::new(false),
            identity: None,
            per_source: Arc::new(PerSource::new(Default::default())),
            tokens,
        }
    }

    /// The settings current now.
    pub fn live(&self) -> Arc<Live> {
        self.live.borrow().clone()
    }

    /// Makes `live` the settings of every connection accepted from now on.
    pub fn replace_live(&self, live: Live) {
        self.live.send_replace(Arc::new(live));
    }

    /// Counts a reload attempt in `config_reloads_total`.
    pub fn count_reload(&self, ok: bool) {
        self.metrics.count_reload(ok);
    }

    /// A tunnel slot, or `None` when `maxTunnels` tunnels are open (the client gets 503).
    pub fn try_tunnel_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.tunnels.clone().try_acquire_owned().ok()
    }

    /// Whether `/readyz` says ready: not draining, and the pod index (if any) has synced.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why `/readyz` fails, or `None` when ready.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Relaxed) {
            Some("draining")
        } else if self.identity_pending() {
            Some("identity index not synced")
        } else {
            None
        }
    }

    /// Whether identity is on and its first full pod list has not completed: tunnels wait.
    pub fn identity_pending(&self) -> bool {
        self.identity.as_ref().is_some_and(|i| !i.synced())
    }

    /// Starts the drain: `/readyz` fails and the accept loops stop.
    pub fn start_drain(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.draining.send_replace(true);
    }

    /// Resolves once the drain has started.
    pub async fn draining(&self) {
        wait_true(&mut self.draining.subscribe()).await;
    }

    /// Tells every open tunnel to close now: the drain deadline has passed.
    pub fn force_close(&self) {
        self.force.send_replace(true);
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

/// State for unit tests that drive a connection task without a listener: one tunnel slot.
#[cfg(test)]
pub(crate) fn test_shared(config: &Config) -> Shared {
    #[allow(clippy::unwrap_used)]
    Shared::new(Live::from_config(config).unwrap(), 1)
}
