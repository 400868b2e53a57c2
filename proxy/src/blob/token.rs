//! The gateway's own Entra ID tokens for bearer upstreams (workload identity, managed
//! identity): one cache entry per (authority, tenant, client, scope), shared by every
//! virtual account that uses it and kept across reloads. An entry is fetched on first use,
//! then refreshed in the background before it expires, with at most one fetch in flight;
//! requests keep getting the current token while a refresh runs. A 401 with a bearer
//! challenge invalidates a token ([`TokenEntry::refresh_after_rejection`]). Tokens never
//! appear in the log or the metrics.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::imds::Imds;
use super::workload_identity::WorkloadIdentity;
use crate::metrics::ResultLabel;

/// The scope (v2 endpoint) or resource (IMDS) of Azure Storage.
pub const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";
/// Refresh once this share of a token's lifetime has passed (azure-identity does the same
/// order of thing), so an Entra outage shorter than the rest does not stop backups.
const REFRESH_AT: f64 = 0.8;
/// ... and at the latest this long before expiry, for long-lived tokens.
const REFRESH_LEAD: Duration = Duration::from_secs(5 * 60);
/// A token is not handed out this close to its expiry (capped at a tenth of its lifetime):
/// a request must still reach the account before the token lapses.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Wait after a failed background refresh before the next try (capped at a tenth of the
/// lifetime, so short test tokens retry quickly too).
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Largest token response read: an Entra answer is a few KiB.
pub const MAX_RESPONSE: usize = 64 * 1024;
/// Time allowed for one whole token request.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// What identifies a token: one cache entry each.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The authority (workload identity) or the IMDS endpoint.
    pub authority: String,
    /// The tenant, empty for IMDS (the VM's).
    pub tenant: String,
    /// The client ID, empty for a system-assigned identity.
    pub client: String,
    /// The scope asked for.
    pub scope: String,
}

/// A token as fetched: the value and how long it lives.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The access token (never logged).
    pub token: String,
    /// `expires_in` from the answer.
    pub lifetime: Duration,
}

/// Why no token was obtained. Never carries a token or an assertion.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The federated token file could not be read.
    #[error("cannot read the federated token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token endpoint could not be reached or did not answer in time.
    #[error("token request to {endpoint}: {source}")]
    Request {
        /// Where it went.
        endpoint: String,
        /// What went wrong.
        source: reqwest::Error,
    },
    /// The token endpoint refused (its `error` and description, no secrets).
    #[error("{endpoint} answered {status}: {detail}")]
    Refused {
        /// Where it went.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// Entra's `error` / `error_description`, shortened.
        detail: String,
    },
    /// The answer is not a token response.
    #[error("{endpoint} sent an unusable answer: {what}")]
    BadAnswer {
        /// Where it went.
        endpoint: String,
        /// What is wrong with it.
        what: &'static str,
    },
}

/// Where tokens come from.
#[derive(Debug)]
pub enum TokenSource {
    /// Client-credentials exchange of the federated token.
    WorkloadIdentity(WorkloadIdentity),
    /// The instance metadata service.
    ManagedIdentity(Imds),
}

impl TokenSource {
    /// The cache key.
    pub fn key(&self) -> &TokenKey {
        match self {
            Self::WorkloadIdentity(w) => w.key(),
            Self::ManagedIdentity(m) => m.key(),
        }
    }

    /// The `identity` label: which identity, never a secret.
    pub fn label(&self) -> String {
        let k = self.key();
        match self {
            Self::WorkloadIdentity(_) => format!("workload-identity/{}/{}", k.tenant, k.client),
            Self::ManagedIdentity(_) if k.client.is_empty() => "managed-identity/system".into(),
            Self::ManagedIdentity(_) => format!("managed-identity/{}", k.client),
        }
    }

    /// One fetch.
    async fn fetch(&self) -> Result<Fetched, FetchError> {
        match self {
            Self::WorkloadIdentity(w) => w.fetch().await,
            Self::ManagedIdentity(m) => m.fetch().await,
        }
    }
}

/// A token in the cache.
#[derive(Debug, Clone)]
pub struct Token {
    /// The value (never logged).
    pub value: Arc<str>,
    /// When it was fetched.
    fetched: Instant,
    /// When the background refresh starts.
    refresh_at: Instant,
    /// When it is no longer handed out.
    usable_until: Instant,
    /// The wall-clock expiry, for the metric.
    expires: SystemTime,
    /// The lifetime it came with.
    lifetime: Duration,
}

impl Token {
    fn new(fetched: Fetched) -> Self {
        let now = Instant::now();
        let ttl = fetched.lifetime;
        let refresh_in = ttl
            .mul_f64(REFRESH_AT)
            .min(ttl.saturating_sub(REFRESH_LEAD))
            .max(ttl / 2);
        let margin = EXPIRY_MARGIN.min(ttl / 10);
        Self {
            value: fetched.token.into(),
            fetched: now,
            refresh_at: now + refresh_in,
            usable_until: now + ttl.saturating_sub(margin),
            expires: SystemTime::now() + ttl,
            lifetime: ttl,
        }
    }
}

/// Process-wide token cache; lives in [`crate::state::Shared`] so reloads keep it.
#[derive(Debug)]
pub struct TokenCache {
    /// The entries by key.
    entries: Mutex<HashMap<TokenKey, Arc<TokenEntry>>>,
    /// Shared with every entry.
    metrics: TokenMetrics,
}

impl TokenCache {
    /// An empty cache reporting into `metrics`.
    pub fn new(metrics: TokenMetrics) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The entry for `source`'s key; a reload's newer source (another token file, another
    /// CA) replaces the one the entry had.
    pub fn entry(&self, source: &Arc<TokenSource>) -> Arc<TokenEntry> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries
            .entry(source.key().clone())
            .or_insert_with(|| {
                Arc::new(TokenEntry {
                    label: source.label(),
                    source: Mutex::new(source.clone()),
                    current: Mutex::new(None),
                    fetching: tokio::sync::Mutex::new(()),
                    refresher: AtomicBool::new(false),
                    last_used: Mutex::new(Instant::now()),
                    metrics: self.metrics.clone(),
                })
            })
            .clone();
        drop(entries);
        let mut current = entry.source.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&current, source) {
            *current = source.clone();
        }
        drop(current);
        entry
    }
}

/// One identity's token and its refresh.
#[derive(Debug)]
pub struct TokenEntry {
    /// The metric label and log field.
    label: String,
    /// How to fetch (replaced on reload).
    source: Mutex<Arc<TokenSource>>,
    /// The token handed out now.
    current: Mutex<Option<Token>>,
    /// Held while a fetch runs: one at a time.
    fetching: tokio::sync::Mutex<()>,
    /// Whether a background refresh task runs.
    refresher: AtomicBool,
    /// When a request last asked; the refresher stops once nobody has for a whole lifetime.
    last_used: Mutex<Instant>,
    /// Counters and the expiry gauge.
    metrics: TokenMetrics,
}

impl TokenEntry {
    /// The current token, fetched first when there is none usable.
    pub async fn token(self: &Arc<Self>) -> Result<Arc<str>, FetchError> {
        *self
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        if let Some(t) = self.usable() {
            self.start_refresher();
            return Ok(t.value);
        }
        self.refresh(None).await.map(|t| t.value)
    }

    /// Drops `rejected` if it is still the current token, so the next request fetches.
    pub fn invalidate(&self, rejected: &str) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|t| &*t.value == rejected) {
            *current = None;
            tracing::info!(identity = %self.label, "upstream refused the token (401 bearer challenge); the next request fetches a new one");
        }
    }

    /// After the upstream refused `rejected` with a bearer challenge: drops it and fetches
    /// a new one (or returns the one another request fetched meanwhile).
    pub async fn refresh_after_rejection(
        self: &Arc<Self>,
        rejected: &str,
    ) -> Result<Arc<str>, FetchError> {
        self.invalidate(rejected);
        self.refresh(Some(rejected)).await.map(|t| t.value)
    }

    /// The current token if it may still be handed out.
    fn usable(&self) -> Option<Token> {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|t| Instant::now() < t.usable_until)
            .cloned()
    }

    /// Fetches unless another fetch, finished while this one waited, left a token that is
    /// neither `rejected` nor due for refresh.
    async fn refresh(self: &Arc<Self>, rejected: Option<&str>) -> Result<Token, FetchError> {
        let started = Instant::now();
        let _one = self.fetching.lock().await;
        if let Some(t) = self.usable()
            && Some(&*t.value) != rejected
            && (t.fetched >= started || Instant::now() < t.refresh_at)
        {
            return Ok(t);
        }
        let source = self
            .source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match source.fetch().await {
            Ok(fetched) => {
                let token = Token::new(fetched);
                self.metrics.count(true);
                self.metrics.set_expiry(&self.label, token.expires);
                tracing::info!(identity = %self.label, expires_in_s = token.lifetime.as_secs(), "upstream token fetched");
                *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(token.clone());
                self.start_refresher();
                Ok(token)
            }
            Err(e) => {
                self.metrics.count(false);
                tracing::warn!(identity = %self.label, error = %e, "upstream token fetch failed");
                Err(e)
            }
        }
    }

    /// Starts the background refresh unless it runs.
    fn start_refresher(self: &Arc<Self>) {
        if self.refresher.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.refresher.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        runtime.spawn(refresh_loop(weak));
    }
}

/// Sleeps until the current token's refresh time, refreshes, repeats; stops when the entry
/// is gone, has no token, or nobody asked for a token during the last lifetime (the next
/// request then fetches and starts it again).
async fn refresh_loop(weak: Weak<TokenEntry>) {
    loop {
        let Some(entry) = weak.upgrade() else { return };
        let current = entry
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let last_used = *entry
            .last_used
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let idle = |t: &Token| last_used + t.lifetime < Instant::now();
        let Some(token) = current.filter(|t| !idle(t)) else {
            entry.refresher.store(false, Ordering::Release);
            return;
        };
        drop(entry);
        tokio::time::sleep_until(token.refresh_at.into()).await;
        let Some(entry) = weak.upgrade() else { return };
        if entry.refresh(None).await.is_err() {
            let retry = RETRY_AFTER.min(token.lifetime / 10);
            drop(entry);
            tokio::time::sleep(retry).await;
        }
    }
}

/// Builds the HTTP client a token source uses: no proxy from the environment, no redirects
/// (the proxy talks to exactly the configured endpoint, which is how it may bypass its own
/// deny list), the public roots plus `ca_file`.
pub fn http_client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(FETCH_TIMEOUT);
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// Reads a token answer: bounded, JSON with `access_token` and `expires_in` (a number from
/// Entra, a string from IMDS).
pub async fn read_answer(
    endpoint: &str,
    mut response: reqwest::Response,
) -> Result<Fetched, FetchError> {
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|source| FetchError::Request {
            endpoint: endpoint.to_owned(),
            source,
        })?
    {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(FetchError::BadAnswer {
                endpoint: endpoint.to_owned(),
                what: "larger than 64 KiB",
            });
        }
        body.extend_from_slice(&chunk);
    }
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        let text = |k: &str| json.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let mut detail = format!("{} {}", text("error"), text("error_description"));
        detail.truncate(300);
        return Err(FetchError::Refused {
            endpoint: endpoint.to_owned(),
            status: status.as_u16(),
            detail: detail.trim().to_owned(),
        });
    }
    let bad = |what| FetchError::BadAnswer {
        endpoint: endpoint.to_owned(),
        what,
    };
    let token = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| bad("no usable access_token"))?;
    let seconds = match json.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .filter(|s| *s > 0)
    .ok_or_else(|| bad("no expires_in"))?;
    Ok(Fetched {
        token: token.to_owned(),
        lifetime: Duration::from_secs(seconds),
    })
}

/// The token metrics: `token_refresh_total{result}` and
/// `token_expiry_seconds{identity}` (seconds left, computed at scrape).
#[derive(Debug, Clone, Default)]
pub struct TokenMetrics {
    /// Fetches by outcome.
    refresh: Family<ResultLabel, Counter>,
    /// Wall-clock expiry of each identity's current token.
    expiry: Arc<Mutex<BTreeMap<String, SystemTime>>>,
}

impl TokenMetrics {
    /// Registers both metrics (present, at zero, even when no bearer upstream is set).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "token_refresh",
            "Upstream token fetches (workload or managed identity), by result",
            m.refresh.clone(),
        );
        for result in ["ok", "error"] {
            let _ = m.refresh.get_or_create(&ResultLabel { result });
        }
        registry.register_collector(Box::new(ExpiryCollector {
            expiry: m.expiry.clone(),
        }));
        m
    }

    fn count(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.refresh.get_or_create(&ResultLabel { result }).inc();
    }

    fn set_expiry(&self, identity: &str, at: SystemTime) {
        self.expiry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(identity.to_owned(), at);
    }
}

/// `identity` label of the expiry gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct IdentityLabel {
    /// `workload-identity/<tenant>/<client>` or `managed-identity/<client|system>`.
    identity: String,
}

/// Computes seconds to expiry at scrape time, so the gauge is never stale.
#[derive(Debug)]
struct ExpiryCollector {
    /// Shared with [`TokenMetrics`].
    expiry: Arc<Mutex<BTreeMap<String, SystemTime>>>,
}

impl Collector for ExpiryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let expiry = self
            .expiry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now = SystemTime::now();
        let mut family = encoder.encode_descriptor(
            "token_expiry_seconds",
            "Seconds until the current upstream token expires (negative: expired), by identity",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (identity, at) in expiry {
            let left = match at.duration_since(now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            let label = IdentityLabel { identity };
            ConstGauge::new(left).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token(seconds: u64) -> Token {
        Token::new(Fetched {
            token: "t".into(),
            lifetime: Duration::from_secs(seconds),
        })
    }

    #[test]
    fn refresh_and_hand_out_times() {
        let due = |t: &Token| (t.refresh_at - t.fetched).as_secs_f64();
        let usable = |t: &Token| (t.usable_until - t.fetched).as_secs_f64();
        // An Entra token (about an hour): at 80%, handed out until 30 s before expiry.
        let hour = token(3600);
        assert_eq!(due(&hour), 2880.0);
        assert_eq!(usable(&hour), 3570.0);
        // Twenty minutes: 80% would leave 4 minutes; 5 minutes before expiry is the latest.
        assert_eq!(due(&token(1200)), 900.0);
        // Ten minutes: 5 minutes before expiry is also half of it.
        assert_eq!(due(&token(600)), 300.0);
        // Short (test) tokens: never before half, margin a tenth.
        let short = token(4);
        assert_eq!(due(&short), 2.0);
        assert!((usable(&short) - 3.6).abs() < 1e-9);
    }
}
