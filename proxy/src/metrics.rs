//! Prometheus metrics, registered once; the data path only touches atomics it was handed.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Connect latency buckets, seconds: a private endpoint in the VNet answers in about a
/// millisecond, a cross-region one in tens; the top buckets catch timeouts.
const CONNECT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// `code` label of `tunnels_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// HTTP status the client got (`200` for a tunnel), or `none` when the client left
    /// before there was anything to answer.
    pub code: String,
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Short stable reason, as in the reason header.
    pub reason: String,
}

/// `direction` label of `bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `up` (client -> destination) or `down`.
    pub direction: &'static str,
}

/// `result` label of `config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of `blob_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BlobLabels {
    /// Virtual account, `-` when the path named none that is configured (so a client
    /// cannot grow the label set).
    pub account: String,
    /// Operation (`put-blob`, `blob-batch`...), `-` when refused before it was classified.
    pub operation: &'static str,
    /// `forwarded`, or the refusal's reason (`bad-signature`, `permission-denied`...).
    pub result: &'static str,
}

/// Labels of `build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version the binary was built from.
    pub version: &'static str,
}

/// Seconds since the Unix epoch now, for timestamp gauges.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Process-wide byte counters (the `bytes_total` metric), updated as bytes move so that a
/// tunnel open for hours still shows up in the rate.
#[derive(Debug, Clone, Default)]
pub struct ByteCounters {
    /// Client -> upstream.
    pub up: Counter,
    /// Upstream -> client.
    pub down: Counter,
}

/// All the proxy's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Tunnels (connections past accept) open now.
    pub tunnels_active: Gauge,
    /// Connections by the status they got.
    pub tunnels: Family<CodeLabel, Counter>,
    /// Refusals by reason (policy, limits, malformed input, upstream failures).
    pub denials: Family<ReasonLabel, Counter>,
    /// Bytes relayed, handed to the relay.
    pub bytes: ByteCounters,
    /// Time from the parsed head to a connected upstream (resolve + dial).
    pub connect_seconds: Histogram,
    /// Config reloads by outcome.
    pub reloads: Family<ResultLabel, Counter>,
    /// Blob gateway requests by virtual account, operation and result.
    pub blob_requests: Family<BlobLabels, Counter>,
    /// Blob gateway request-body bytes forwarded upstream.
    pub blob_bytes_up: Counter,
    /// Blob gateway response-body bytes returned to clients.
    pub blob_bytes_down: Counter,
    /// The blob gateway's upstream tokens: `token_refresh_total`, `token_expiry_seconds`.
    pub tokens: crate::blob::token::TokenMetrics,
    /// Workload identity (issue 14): its own block, registered under `identity_`.
    pub identity: crate::identity::metrics::IdentityMetrics,
    /// When the configuration in force was loaded (start or last good reload), Unix seconds.
    pub config_last_reload_success: Gauge,
    /// `maxTunnels` in force: the ceiling `tunnels_active` is compared with.
    pub max_tunnels: Gauge,
    /// Always 1, labelled with the version.
    pub build_info: Family<BuildLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything under the `egress_proxy` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("egress_proxy");
        let tunnels_active = Gauge::default();
        registry.register(
            "tunnels_active",
            "Tunnels open now (connections past accept)",
            tunnels_active.clone(),
        );
        let tunnels = Family::<CodeLabel, Counter>::default();
        registry.register(
            "tunnels",
            "Connections handled, by the HTTP status they got",
            tunnels.clone(),
        );
        let denials = Family::<ReasonLabel, Counter>::default();
        registry.register("denials", "Connections refused, by reason", denials.clone());
        let bytes_family = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "bytes",
            "Bytes relayed, by direction (up: client to destination)",
            bytes_family.clone(),
        );
        // One statement each: the guard `get_or_create` returns must be gone before the
        // next call, which may need the family's write lock.
        let up = bytes_family
            .get_or_create(&DirectionLabel { direction: "up" })
            .clone();
        let down = bytes_family
            .get_or_create(&DirectionLabel { direction: "down" })
            .clone();
        let bytes = ByteCounters { up, down };
        let connect_seconds = Histogram::new(CONNECT_BUCKETS);
        registry.register(
            "connect_duration_seconds",
            "Resolve and connect time to the destination",
            connect_seconds.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            reloads.clone(),
        );
        let blob_requests = Family::<BlobLabels, Counter>::default();
        registry.register(
            "blob_requests",
            "Blob gateway requests, by virtual account, operation and result",
            blob_requests.clone(),
        );
        let blob_bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "blob_bytes",
            "Blob gateway body bytes, by direction (up: client to storage)",
            blob_bytes.clone(),
        );
        let blob_bytes_up = blob_bytes
            .get_or_create(&DirectionLabel { direction: "up" })
            .clone();
        let blob_bytes_down = blob_bytes
            .get_or_create(&DirectionLabel { direction: "down" })
            .clone();
        let tokens = crate::blob::token::TokenMetrics::register(&mut registry);
        // Workload identity: registered whether or not it is configured, so dashboards see
        // `identity_synced 0` rather than no series.
        let identity = crate::identity::metrics::IdentityMetrics::register(&mut registry);
        let config_last_reload_success = Gauge::default();
        config_last_reload_success.set(unix_now());
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (start or last good reload), in Unix seconds",
            config_last_reload_success.clone(),
        );
        let max_tunnels = Gauge::default();
        registry.register(
            "max_tunnels",
            "maxTunnels in force: tunnels beyond it are answered 503",
            max_tunnels.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version egress-proxy was built from",
            build_info.clone(),
        );
        Self {
            registry,
            tokens,
            identity,
            config_last_reload_success,
            max_tunnels,
            build_info,
            tunnels_active,
            tunnels,
            denials,
            bytes,
            connect_seconds,
            reloads,
            blob_requests,
            blob_bytes_up,
            blob_bytes_down,
        }
    }

    /// Counts a reload attempt in `config_reloads_total`; a good one also sets
    /// `config_last_reload_success_timestamp_seconds`.
    pub fn count_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
        if ok {
            self.config_last_reload_success.set(unix_now());
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an error would only mean an empty scrape.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
