//! One client connection, top to bottom: head, policy, connect, answer, relay, access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::head::{self, HeadError};
use super::relay::{self, ClientIo, Close};
use super::respond::{ESTABLISHED, Reject};
use crate::dial;
use crate::identity::{Caller, Unidentified};
use crate::metrics::{CodeLabel, ReasonLabel};
use crate::per_source::WorkloadGuard;
use crate::policy::Target;
use crate::state::{Live, Shared};

/// After an error answer the proxy reads and discards what the client still sends, for at
/// most this long, so that closing with unread bytes does not turn into a TCP reset that
/// destroys the answer before the client reads it (the "lingering close" of nginx/Apache).
const LINGER_TIME: Duration = Duration::from_secs(2);
/// ... and at most this many bytes.
const LINGER_BYTES: u64 = 256 * 1024;
/// Writing an error answer to a client that does not read must not hold a slot forever.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the access log says about one connection.
struct Entry {
    /// The client's address.
    client: SocketAddr,
    /// The CONNECT target, once the head is parsed.
    target: Option<Target>,
    /// The address dialled, once connected.
    resolved: Option<SocketAddr>,
    /// Who the connection comes from, when identity is on and the head was read.
    caller: Option<Caller>,
    /// Positions in `allow` of the rules that granted the target.
    rules: Option<Vec<usize>>,
    /// The identified pod's place in its connection count, held until the connection ends.
    workload: Option<WorkloadGuard>,
}

/// Serves one accepted client connection. `permit` is `None` when `maxTunnels` tunnels are
/// open already: the client then gets 503.
pub(crate) async fn serve<C: ClientIo>(
    mut client: C,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let live = shared.live();
    let metrics = &shared.metrics;
    metrics.tunnels_active.inc();
    let mut entry = Entry {
        client: peer,
        target: None,
        resolved: None,
        caller: None,
        rules: None,
        workload: None,
    };
    let outcome = if permit.is_some() {
        // The head and connect phases have their own timeouts, which can outlast the drain
        // deadline: cut them there too, so the connection still gets its access-log line.
        tokio::select! {
            outcome = establish(&mut client, &live, &shared, &mut entry) => outcome,
            () = shared.force_closed() => Err(Reject::DrainDeadline),
        }
    } else {
        Err(Reject::AtCapacity)
    };
    match outcome {
        Err(reject) => {
            if let Some(answer) = reject.response() {
                // Boxed: a cold path that should not size every tunnel's task.
                let linger = Box::pin(answer_and_linger(client, &answer));
                let _ = tokio::time::timeout(ANSWER_TIMEOUT, linger).await;
            }
            let code = reject
                .status()
                .map_or_else(|| "none".to_owned(), |s| s.to_string());
            metrics.tunnels.get_or_create(&CodeLabel { code }).inc();
            metrics
                .denials
                .get_or_create(&ReasonLabel {
                    reason: reject.reason().to_owned(),
                })
                .inc();
            let detail = reject.to_string();
            let close = Logged {
                reason: reject.reason(),
                detail: Some(&detail),
            };
            log(&entry, reject.status(), 0, 0, started, close);
        }
        Ok((upstream, pipelined)) => {
            metrics
                .tunnels
                .get_or_create(&CodeLabel { code: "200".into() })
                .inc();
            let stats = open(client, upstream, &pipelined, &live, &shared).await;
            log(
                &entry,
                Some(200),
                stats.up,
                stats.down,
                started,
                Logged {
                    reason: &stats.close.reason(),
                    detail: None,
                },
            );
        }
    }
    metrics.tunnels_active.dec();
    // The tunnel slot is held until here, through the whole relay.
    drop(permit);
}

/// Head, policy, connect. On success the upstream is connected and the bytes the client sent
/// after its head are returned for forwarding.
async fn establish<C: AsyncRead + Unpin>(
    client: &mut C,
    live: &Live,
    shared: &Shared,
    entry: &mut Entry,
) -> Result<(TcpStream, Vec<u8>), Reject> {
    let (req, pipelined) = tokio::time::timeout(
        live.head_timeout,
        head::read_head(client, live.max_head_bytes),
    )
    .await
    .map_err(|_| HeadError::Timeout)??;
    entry.target = Some(req.target.clone());
    if shared.identity_pending() {
        return Err(Reject::IdentityNotSynced);
    }
    let mut unidentified = Unidentified::Global;
    if let Some(identities) = &shared.identity {
        // Boxed: the wait for an unknown address is a cold path that should not size
        // every tunnel's task.
        entry.caller = Some(Box::pin(identities.identify(entry.client.ip())).await);
        unidentified = identities.unidentified();
    }
    let pod = match &entry.caller {
        Some(caller) => match caller.pod() {
            Some(pod) => {
                let guard = shared
                    .per_source
                    .admit_workload(&pod.uid)
                    .map_err(|_| Reject::WorkloadLimit)?;
                entry.workload = Some(guard);
                Some(pod)
            }
            None if unidentified == Unidentified::Deny => {
                return Err(Reject::Unidentified(caller.kind()));
            }
            None => None,
        },
        None => None,
    };
    let grant = live.policy.authorize_for(&req.target, pod)?;
    entry.rules = Some(grant.rules.clone());
    let t0 = Instant::now();
    let (upstream, addr) = dial::connect(
        &live.policy,
        &grant,
        &req.target,
        live.connect_timeout,
        live.keepalive,
    )
    .await??;
    shared
        .metrics
        .connect_seconds
        .observe(t0.elapsed().as_secs_f64());
    entry.resolved = Some(addr);
    Ok((upstream, pipelined))
}

/// Answers 200, forwards the pipelined bytes and relays until the tunnel ends.
async fn open<C: ClientIo>(
    mut client: C,
    mut upstream: TcpStream,
    pipelined: &[u8],
    live: &Live,
    shared: &Shared,
) -> relay::Stats {
    let early = |side, e: std::io::Error| relay::Stats {
        up: 0,
        down: 0,
        close: Close::Error(side, e.kind()),
    };
    if let Err(e) = upstream.write_all(pipelined).await {
        return early(relay::Side::Upstream, e);
    }
    if let Err(e) = async {
        client.write_all(ESTABLISHED).await?;
        client.flush().await
    }
    .await
    {
        return early(relay::Side::Client, e);
    }
    let mut stats = relay::relay(
        client,
        upstream,
        relay::Limits {
            idle: live.idle_timeout,
            max_duration: live.max_tunnel_duration,
            splice: live.splice,
        },
        &shared.metrics.bytes,
        shared.force_closed(),
    )
    .await;
    stats.up += pipelined.len() as u64;
    shared.metrics.bytes.up.inc_by(pipelined.len() as u64);
    stats
}

/// Writes an error answer, half-closes, then drains what the client still sends (bounded) so
/// the answer is not lost to a reset.
async fn answer_and_linger<C: AsyncRead + AsyncWrite + Unpin>(
    mut client: C,
    answer: &[u8],
) -> std::io::Result<()> {
    client.write_all(answer).await?;
    client.flush().await?;
    client.shutdown().await?;
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(
        LINGER_TIME,
        tokio::io::copy(&mut (&mut client).take(LINGER_BYTES), &mut sink),
    )
    .await;
    Ok(())
}

/// Why a connection ended, as the access log states it.
struct Logged<'a> {
    /// The short reason: the same word as the refusal's header and the denial metric, or the
    /// tunnel's close reason.
    reason: &'a str,
    /// For refusals, the sentence the client was sent (it names the rule or the error).
    detail: Option<&'a str>,
}

/// The access-log line: one per connection, at close.
fn log(entry: &Entry, status: Option<u16>, up: u64, down: u64, started: Instant, close: Logged) {
    let Logged { reason, detail } = close;
    let target = entry.target.as_ref().map(ToString::to_string);
    let resolved = entry.resolved.map(|a| a.to_string());
    let pod = entry.caller.as_ref().and_then(Caller::pod);
    let service_account = pod.map(|p| format!("{}/{}", p.namespace, p.service_account));
    let rule = entry.rules.as_ref().map(|rules| {
        rules
            .iter()
            .map(|i| format!("allow[{i}]"))
            .collect::<Vec<_>>()
            .join(",")
    });
    tracing::info!(
        target: "egress_proxy::access",
        client = %entry.client,
        target = target.as_deref().unwrap_or("-"),
        resolved = resolved.as_deref().unwrap_or("-"),
        identity = entry.caller.as_ref().map_or("-", Caller::kind),
        src_namespace = pod.map_or("-", |p| &*p.namespace),
        src_pod = pod.map_or("-", |p| &*p.name),
        src_sa = service_account.as_deref().unwrap_or("-"),
        rule = rule.as_deref().unwrap_or("-"),
        status = status.unwrap_or(0),
        bytes_up = up,
        bytes_down = down,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        reason,
        detail,
        "tunnel"
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// What an idle tunnel costs is mostly its task: the `serve` future. Boxing the cold and
    /// short-lived parts (TLS handshake, connect, error answers) keeps it small; this guards
    /// the 8 KiB-per-idle-tunnel budget against a future that silently grows.
    #[tokio::test]
    async fn a_tunnel_task_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let c = tokio::net::TcpStream::connect(a).await.unwrap();
        let shared = std::sync::Arc::new(crate::state::test_shared(&crate::Config::default()));
        let f = super::serve(c, a, None, shared);
        let size = std::mem::size_of_val(&f);
        assert!(size <= 3 * 1024, "serve future is {size} bytes");
    }
}
