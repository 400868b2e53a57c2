//! Fair share of the one door: limits per client address, checked at accept, before the
//! connection takes a tunnel slot or a task. One pod opening thousands of connections that
//! never finish their head would otherwise hold slots until `headTimeout` and lock every
//! other client out.
//!
//! Two limits per source address: connections open at once (counted from accept, so heads
//! still being sent count), and new connections per second (a token bucket). A connection
//! past either is answered `429` with `Retry-After` at once and closed, without a task, so a
//! flood costs the proxy one accept and one write per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;

/// Why 1,000: a CNPG pod's parallel base backup (barman's `--max-concurrency`, a handful of
/// connections) plus WAL archiving is far below it, and with the default `maxTunnels` of
/// 10,000 it takes ten sources acting together to fill the proxy. A cluster whose pods
/// reach the proxy through their node's address (SNAT) shares it per node.
const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// Why 200 a second: a client opens a few connections per backup step; 200 a second (with
/// a burst of twice that) is two orders of magnitude above any backup tool's pace, yet
/// bounds the accept work one source can cause.
const DEFAULT_CONNECTIONS_PER_SECOND: u32 = 200;
/// Past this many tracked sources, entries with nothing open and a full bucket are pruned
/// on the next accept: they carry no state worth keeping.
const PRUNE_ABOVE: usize = 4096;

/// The `perSource:` section of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerSourceConfig {
    /// Connections one client address may have open at once, those still sending their
    /// head included.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// New connections one client address may open per second, sustained; bursts of twice
    /// this are allowed.
    #[serde(default = "default_connections_per_second")]
    pub connections_per_second: u32,
}

impl Default for PerSourceConfig {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connections_per_second: DEFAULT_CONNECTIONS_PER_SECOND,
        }
    }
}

impl PerSourceConfig {
    /// Checks the section; the error's field is relative to `perSource`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_connections == 0 {
            return Err(("maxConnections".into(), "must be at least 1".into()));
        }
        if self.connections_per_second == 0 {
            return Err(("connectionsPerSecond".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_connections_per_second() -> u32 {
    DEFAULT_CONNECTIONS_PER_SECOND
}

/// Which per-source limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SourceLimit {
    /// The source has `maxConnections` connections open.
    #[error("too many open connections from this address")]
    Open,
    /// The source opened more than `connectionsPerSecond` allows.
    #[error("too many new connections per second from this address")]
    Rate,
}

impl SourceLimit {
    /// Stable reason for the header, the access log and `denials_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Open => "source-connection-limit",
            Self::Rate => "source-rate-limit",
        }
    }

    /// The whole answer: 429 with `Retry-After` (a second for the rate, which refills in
    /// that time; five for open connections, which close at their own pace).
    pub fn response(self) -> Vec<u8> {
        let body = format!("{self}\n");
        let retry = match self {
            Self::Open => 5,
            Self::Rate => 1,
        };
        format!(
            "HTTP/1.1 429 Too Many Requests\r\nX-Egress-Gate-Reason: {}\r\nRetry-After: {retry}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.reason(),
            body.len()
        )
        .into_bytes()
    }
}

/// One source's state.
#[derive(Debug)]
struct Source {
    /// Connections open now.
    open: usize,
    /// Tokens left in the bucket (one per new connection).
    tokens: f64,
    /// When the bucket was last refilled.
    refilled: Instant,
}

/// The per-source table, shared by the accept loops and the connection guards.
#[derive(Debug)]
pub struct PerSource {
    /// `maxConnections`, replaced on reload.
    max_open: AtomicUsize,
    /// `connectionsPerSecond`, replaced on reload.
    rate: AtomicU64,
    /// Sources with open connections or a bucket not yet full. A std lock: held for a
    /// few map operations, never across an await.
    table: Mutex<HashMap<IpAddr, Source>>,
    /// With identity on: connections open per pod (by UID), whichever of its addresses
    /// they come from; an entry lives while the pod has one open.
    pods: Mutex<HashMap<Arc<str>, usize>>,
}

/// Held for an identified connection's whole life; releases its place in the pod's count.
#[derive(Debug)]
pub struct WorkloadGuard {
    /// The table.
    table: Arc<PerSource>,
    /// The pod's UID.
    uid: Arc<str>,
}

impl Drop for WorkloadGuard {
    fn drop(&mut self) {
        let mut pods = lock(&self.table.pods);
        if let Some(open) = pods.get_mut(&self.uid) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                pods.remove(&self.uid);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Held for a connection's whole life; releases its place in the source's count on drop.
#[derive(Debug)]
pub struct SourceGuard {
    /// The table.
    table: Arc<PerSource>,
    /// The source.
    ip: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut table = self.table.lock();
        if let Some(s) = table.get_mut(&self.ip) {
            s.open = s.open.saturating_sub(1);
        }
    }
}

impl PerSource {
    /// A table enforcing `config`.
    pub fn new(config: PerSourceConfig) -> Self {
        Self {
            max_open: AtomicUsize::new(config.max_connections),
            rate: AtomicU64::new(u64::from(config.connections_per_second)),
            table: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
        }
    }

    /// With identity on, after the connection is identified: admits it against its pod's
    /// `maxConnections`, counted across all of the pod's addresses (IPv4 and IPv6).
    pub fn admit_workload(self: &Arc<Self>, uid: &str) -> Result<WorkloadGuard, SourceLimit> {
        let max_open = self.max_open.load(Ordering::Relaxed);
        let mut pods = lock(&self.pods);
        let uid: Arc<str> = match pods.get_key_value(uid) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(uid),
        };
        let open = pods.entry(Arc::clone(&uid)).or_insert(0);
        if *open >= max_open {
            return Err(SourceLimit::Open);
        }
        *open += 1;
        Ok(WorkloadGuard {
            table: Arc::clone(self),
            uid,
        })
    }

    /// Applies reloaded limits to new connections.
    pub fn set_limits(&self, config: PerSourceConfig) {
        self.max_open
            .store(config.max_connections, Ordering::Relaxed);
        self.rate
            .store(u64::from(config.connections_per_second), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Source>> {
        lock(&self.table)
    }

    /// Admits one new connection from `ip`, or says which limit it is past.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<SourceGuard, SourceLimit> {
        let ip = ip.to_canonical();
        let max_open = self.max_open.load(Ordering::Relaxed);
        #[allow(clippy::cast_precision_loss)] // a per-second rate is far below 2^52
        let rate = self.rate.load(Ordering::Relaxed) as f64;
        let burst = rate * 2.0;
        let mut table = self.lock();
        if table.len() > PRUNE_ABOVE {
            table.retain(|_, s| {
                s.open > 0 || s.tokens + s.refilled.elapsed().as_secs_f64() * rate < burst
            });
        }
        let source = table.entry(ip).or_insert(Source {
            open: 0,
            tokens: burst,
            refilled: now,
        });
        let elapsed = now.saturating_duration_since(source.refilled).as_secs_f64();
        source.tokens = (source.tokens + elapsed * rate).min(burst);
        source.refilled = now;
        if source.open >= max_open {
            return Err(SourceLimit::Open);
        }
        if source.tokens < 1.0 {
            return Err(SourceLimit::Rate);
        }
        source.tokens -= 1.0;
        source.open += 1;
        Ok(SourceGuard {
            table: Arc::clone(self),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    #[test]
    fn open_connections_are_counted_per_address_until_dropped() {
        let t = Arc::new(PerSource::new(PerSourceConfig {
            max_connections: 2,
            connections_per_second: 1000,
        }));
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = t.admit(a, now).unwrap();
        let _g2 = t.admit(a, now).unwrap();
        assert_eq!(t.admit(a, now).unwrap_err(), SourceLimit::Open);
        // The IPv4-mapped spelling is the same source.
        assert_eq!(
            t.admit("::ffff:10.0.0.1".parse().unwrap(), now)
                .unwrap_err(),
            SourceLimit::Open
        );
        let _other = t.admit(b, now).unwrap();
        drop(g1);
        assert!(t.admit(a, now).is_ok());
    }

    #[test]
    fn a_pod_is_counted_across_its_addresses() {
        let t = Arc::new(PerSource::new(PerSourceConfig {
            max_connections: 2,
            connections_per_second: 1000,
        }));
        let g1 = t.admit_workload("uid-a").unwrap();
        let _g2 = t.admit_workload("uid-a").unwrap();
        assert_eq!(t.admit_workload("uid-a").unwrap_err(), SourceLimit::Open);
        let _b = t.admit_workload("uid-b").unwrap();
        drop(g1);
        let _g3 = t.admit_workload("uid-a").unwrap();
        drop(_g2);
        drop(_g3);
        assert!(
            lock(&t.pods).get("uid-a").is_none(),
            "entries leave with the last connection"
        );
    }

    #[test]
    fn the_rate_refills_over_time() {
        let t = Arc::new(PerSource::new(PerSourceConfig {
            max_connections: 1000,
            connections_per_second: 10,
        }));
        let start = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // A burst of twice the rate, then refused.
        for _ in 0..20 {
            drop(t.admit(a, start).unwrap());
        }
        assert_eq!(t.admit(a, start).unwrap_err(), SourceLimit::Rate);
        // A tenth of a second later: one more.
        let later = start + Duration::from_millis(100);
        drop(t.admit(a, later).unwrap());
        assert_eq!(t.admit(a, later).unwrap_err(), SourceLimit::Rate);
    }

    #[test]
    fn answers_are_429_with_retry_after() {
        let r = String::from_utf8(SourceLimit::Open.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 429 Too Many Requests\r\nX-Egress-Gate-Reason: source-connection-limit\r\nRetry-After: 5\r\n"), "{r}");
        let r = String::from_utf8(SourceLimit::Rate.response()).unwrap();
        assert!(r.contains("Retry-After: 1\r\n"), "{r}");
        assert!(
            PerSourceConfig {
                max_connections: 0,
                connections_per_second: 1
            }
            .validate()
            .is_err()
        );
    }
}
