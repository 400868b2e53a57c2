//! Listeners, limits and lifecycle. The accept loop takes a connection slot *before*
//! `accept()` (so the process never holds more sockets than it budgets for), keeps accepting
//! through errors with a backoff, and hands each connection to its own task. Shutdown follows
//! tokio's mini-redis: a watch channel tells the loops to stop, every connection task holds
//! a clone of an mpsc sender, and the server knows the last tunnel is done when the channel
//! closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use crate::accept::AcceptErrors;
use crate::config::Config;
use crate::dial::tune;
use crate::identity::Identities;
use crate::metrics::ReasonLabel;
use crate::state::{Live, Shared, StartError};
use crate::{admin, blob, tunnel};

/// Connections accepted beyond `maxTunnels`, only to be told 503: past this many the accept
/// loop waits for a slot and new clients queue in the kernel backlog, so a flood cannot
/// exhaust descriptors. 503 answers take microseconds, so a small number suffices.
const OVERFLOW_SLOTS: usize = 256;
/// First pause after a failed `accept()` (EMFILE, ENOBUFS): retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between `accept()` retries: long enough to let descriptors free up, short
/// enough that recovery is quick.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After the drain deadline cuts tunnels, time allowed for tasks still in their head or
/// connect phase (bounded by their own timeouts) before the process exits anyway.
const FORCE_GRACE: Duration = Duration::from_secs(2);

/// The blob gateway's listeners (`blob.listen`, `blob.tls.listen`).
#[derive(Debug, Default)]
struct BlobListeners {
    /// Plain HTTP.
    plain: Option<TcpListener>,
    /// HTTPS.
    tls: Option<TcpListener>,
    /// `blob.maxConnections`: the slots both listeners take before `accept()`.
    max_connections: usize,
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
        let result = Live::from_config(config).map(|live| self.shared.replace_live(live));
        if result.is_ok() {
            self.shared.per_source.set_limits(config.per_source);
        }
        self.shared.count_reload(result.is_ok());
        result
    }

    /// Counts a reload that failed before reaching [`Handle::reload`] (a bad file).
    pub fn reload_failed(&self) {
        self.shared.count_reload(false);
    }

    /// Starts the drain: not ready, stop accepting, let tunnels finish until `drainTimeout`.
    pub fn shutdown(&self) {
        self.shared.start_drain();
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
    /// The blob gateway's plain and TLS listeners, when configured.
    blob: BlobListeners,
    /// State shared with every connection.
    shared: Arc<Shared>,
    /// `maxTunnels`, to size the accept slots.
    max_tunnels: usize,
}

impl Server {
    /// Binds every listener (so a port clash fails the start, not the first connection).
    /// With `identity:`, the Kubernetes client comes from the environment: the service
    /// account's in-cluster config in a pod, else `KUBECONFIG` or `~/.kube/config`.
    pub async fn bind(config: &Config) -> Result<Self, StartError> {
        let client = match &config.identity {
            Some(_) => Some(kube::Client::try_default().await?),
            None => None,
        };
        Self::bind_with_client(config, client).await
    }

    /// [`Server::bind`] with a given Kubernetes client for the pod watch (tests, embedders);
    /// ignored without `identity:`. With `identity:` and no client, it is an error.
    pub async fn bind_with_client(
        config: &Config,
        client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
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
        let mut blob = BlobListeners::default();
        if let Some(b) = &config.blob {
            if let Some(addr) = b.listen {
                blob.plain = Some(bind(addr).await?);
            }
            if let Some(t) = &b.tls {
                blob.tls = Some(bind(t.listen).await?);
            }
            blob.max_connections = b.max_connections;
        }
        let mut shared = Shared::new(live, config.max_tunnels);
        shared.per_source.set_limits(config.per_source);
        if let Some(identity) = &config.identity {
            let client = client.ok_or(StartError::NoKubeClient)?;
            shared.identity = Some(Identities::start(
                identity,
                client,
                shared.metrics.identity.clone(),
            ));
        }
        let shared = Arc::new(shared);
        Ok(Self {
            plain,
            tls,
            admin,
            blob,
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

    /// The blob gateway's plain and TLS listener addresses, when configured.
    pub fn blob_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        (addr(&self.blob.plain), addr(&self.blob.tls))
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
        let admin = tokio::spawn(admin::serve(self.admin, shared.clone()));
        let plain = accept_loop(
            self.plain,
            Kind::Plain,
            shared.clone(),
            slots.clone(),
            done_tx.clone(),
        );
        let optional = |listener: Option<TcpListener>, kind: Kind| {
            let (shared, slots, done) = (shared.clone(), slots.clone(), done_tx.clone());
            async move {
                if let Some(l) = listener {
                    accept_loop(l, kind, shared, slots, done).await;
                }
            }
        };
        // The gateway's connections take their own slots (`blob.maxConnections`), before
        // `accept()` like the tunnels': a full gateway leaves new clients in the backlog
        // (they are served as connections close) and never takes the tunnels' slots.
        let blob_slots = Arc::new(Semaphore::new(self.blob.max_connections));
        let blob_loop = |listener: Option<TcpListener>, kind: Kind| {
            let (shared, slots, done) = (shared.clone(), blob_slots.clone(), done_tx.clone());
            async move {
                if let Some(l) = listener {
                    accept_loop(l, kind, shared, slots, done).await;
                }
            }
        };
        tokio::join!(
            plain,
            optional(self.tls, Kind::Tls),
            blob_loop(self.blob.plain, Kind::Blob),
            blob_loop(self.blob.tls, Kind::BlobTls),
        );
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
            shared.force_close();
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
    /// Blob gateway, plain HTTP.
    Blob,
    /// Blob gateway, HTTPS.
    BlobTls,
}

async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    done: mpsc::Sender<()>,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut errors = AcceptErrors::new("accept failed");
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            () = shared.draining() => return,
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
            () = shared.draining() => return,
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let source = match shared.per_source.admit(peer.ip(), Instant::now()) {
            Ok(guard) => guard,
            Err(limit) => {
                refuse_source(&socket, kind, peer, limit, &shared);
                continue;
            }
        };
        // Gateway connections are bounded by their accept slots; tunnel permits are the
        // CONNECT path's budget.
        let permit = match kind {
            Kind::Plain | Kind::Tls => shared.try_tunnel_permit(),
            Kind::Blob | Kind::BlobTls => None,
        };
        let shared = shared.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let live = shared.live();
            if let Err(e) = tune(&socket, live.keepalive) {
                tracing::debug!(error = %e, "cannot tune client socket");
            }
            match (kind, &live.tls) {
                (Kind::Plain, _) => tunnel::serve(socket, peer, permit, shared).await,
                (Kind::Tls, Some(acceptor)) => {
                    // Boxed: the TLS state is large and would otherwise size every plain
                    // tunnel's task too (what an idle tunnel costs is mostly its task).
                    let acceptor = TlsAcceptor::from(acceptor.clone());
                    Box::pin(tls_serve(acceptor, socket, peer, permit, &live, shared)).await;
                }
                (Kind::Tls, None) => {}
                (Kind::Blob, _) => {
                    blob::serve::connection(socket, peer, blob::sas::Transport::Plain, shared).await
                }
                (Kind::BlobTls, _) => {
                    if let Some(config) = live.blob_tls.clone() {
                        let acceptor = TlsAcceptor::from(config);
                        Box::pin(blob_tls_serve(acceptor, socket, peer, &live, shared)).await;
                    }
                }
            }
            drop(source);
            drop(slot);
            drop(done);
        });
    }
}

/// Answers a connection past its source's limit at once, without a task or a tunnel slot,
/// and closes it: the answer fits in an empty socket buffer, so a non-blocking write
/// suffices. TLS clients are closed without an answer (there is no handshake to spend on
/// them). Logged at debug only: a flood would otherwise flood the log; the metrics count it.
fn refuse_source(
    socket: &TcpStream,
    kind: Kind,
    peer: SocketAddr,
    limit: crate::per_source::SourceLimit,
    shared: &Shared,
) {
    // Plain-text listeners can be told why; a TLS client would see bytes before its handshake.
    if matches!(kind, Kind::Plain | Kind::Blob) {
        let _ = socket.try_write(&limit.response());
    }
    tracing::debug!(client = %peer, reason = limit.reason(), "refused: per-source limit");
    shared
        .metrics
        .tunnels
        .get_or_create(&crate::metrics::CodeLabel { code: "429".into() })
        .inc();
    shared
        .metrics
        .denials
        .get_or_create(&ReasonLabel {
            reason: limit.reason().to_owned(),
        })
        .inc();
}

async fn tls_serve(
    acceptor: TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    live: &Live,
    shared: Arc<Shared>,
) {
    match tokio::time::timeout(live.head_timeout, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => tunnel::serve(stream, peer, permit, shared).await,
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

async fn blob_tls_serve(
    acceptor: TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
    live: &Live,
    shared: Arc<Shared>,
) {
    match tokio::time::timeout(live.head_timeout, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => {
            blob::serve::connection(stream, peer, blob::sas::Transport::Tls, shared).await
        }
        Ok(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "blob gateway TLS handshake failed");
            count_tls_failure(&shared);
        }
        Err(_) => {
            tracing::debug!(client = %peer, "blob gateway TLS handshake timed out");
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
