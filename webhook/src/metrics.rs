//! Prometheus metrics for the admin port. One struct owns every metric so the names and
//! label sets are defined in one place.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the reviews counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    /// `patched`, `unchanged`, `not-pod-create`, `unparseable`, `bad-request`.
    pub result: String,
    /// The selecting profile, empty when none.
    pub profile: String,
}

/// Labels that carry only an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: String,
}

/// Labels of the requests counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// The HTTP version of the request: `HTTP/2.0` (what the API server speaks when the
    /// webhook offers it) or `HTTP/1.1`.
    pub protocol: String,
}

/// Labels of the discovery cache gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    /// `services`, `servicecidrs` or `nodes`.
    pub cache: String,
}

/// Labels of the pod drift gauges: bounded by namespaces and profiles, never pod names.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct PodLabels {
    /// The opted-in namespace.
    pub namespace: String,
    /// The selecting profile, or `annotation` for a per-pod opt-in.
    pub profile: String,
}

/// Every metric the webhook exports.
#[derive(Debug)]
pub struct Metrics {
    /// The registry the admin port encodes.
    pub registry: Registry,
    /// Requests to the admission endpoint, by HTTP version (including those refused
    /// before a review, such as bodies over the limit).
    pub requests: Family<ProtocolLabel, Counter>,
    /// Reviews answered, by result and profile.
    pub reviews: Family<ReviewLabels, Counter>,
    /// Patch operations returned, summed over reviews.
    pub patch_operations: Counter,
    /// Time to answer one review (parse, decide, serialize), in seconds.
    pub review_duration: Histogram,
    /// Objects in each discovery cache.
    pub cache_objects: Family<CacheLabel, Gauge>,
    /// Configuration reloads, by result.
    pub config_reloads: Family<ResultLabel, Counter>,
    /// 1 while the file on disk is the configuration in force, 0 after a rejected reload.
    pub config_valid: Gauge,
    /// Certificate reloads, by result.
    pub tls_reloads: Family<ResultLabel, Counter>,
    /// Pods in opted-in namespaces that a profile or the opt-in annotation selects.
    pub pods_selected: Family<PodLabels, Gauge>,
    /// Selected pods carrying egress-gate's status annotation (the webhook mutated them).
    pub pods_injected: Family<PodLabels, Gauge>,
    /// Injected pods whose status records other values than egress-gate injects now.
    pub pods_stale: Family<PodLabels, Gauge>,
    /// Selected pods without the status annotation: admitted bare, not using the proxy.
    pub pods_uninjected: Family<PodLabels, Gauge>,
    /// 1 once the pod drift watches have listed the cluster; 0 before or when they are off.
    pub pod_watch_synced: Gauge,
    /// End of validity of the serving certificate in force, in Unix seconds.
    pub certificate_expiry: Gauge,
    /// When the configuration in force was loaded (start or last good reload), Unix seconds.
    pub config_last_reload_success: Gauge,
    /// 1 while `/readyz` would answer ready, set at each scrape.
    pub ready: Gauge,
    /// Always 1, labelled with the version: joins other series to the running build.
    pub build_info: Family<BuildLabels, Gauge>,
}

/// Review latency buckets, seconds: a small pod takes tens of microseconds, a CNPG instance
/// pod with its podSpec annotation a few hundred; the top buckets reach the API server's
/// 5 s `timeoutSeconds`, past which the review counts as failed (and the pod is admitted
/// bare with `failurePolicy: Ignore`).
const LATENCY_BUCKETS: [f64; 17] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Labels of the build info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version the binary was built from.
    pub version: String,
}

/// Seconds since the Unix epoch now, for timestamp gauges.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("egress_webhook");
        let requests = Family::<ProtocolLabel, Counter>::default();
        registry.register(
            "requests",
            "Requests to the admission endpoint, by HTTP version",
            requests.clone(),
        );
        let reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "reviews",
            "Admission reviews answered, by result and profile",
            reviews.clone(),
        );
        let patch_operations = Counter::default();
        registry.register(
            "patch_operations",
            "JSON patch operations returned",
            patch_operations.clone(),
        );
        let review_duration = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "review_duration_seconds",
            "Time to answer one admission review",
            review_duration.clone(),
        );
        let cache_objects = Family::<CacheLabel, Gauge>::default();
        registry.register(
            "discovery_cache_objects",
            "Objects held in each discovery cache",
            cache_objects.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        let config_valid = Gauge::default();
        config_valid.set(1);
        registry.register(
            "config_valid",
            "1 while the configuration file on disk is the one in force, 0 after a rejected reload",
            config_valid.clone(),
        );
        let tls_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "tls_reloads",
            "Serving certificate reloads, by result",
            tls_reloads.clone(),
        );
        let pod_gauge = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<PodLabels, Gauge>::default();
            registry.register(name, help, family.clone());
            family
        };
        let pods_selected = pod_gauge(
            &mut registry,
            "pods_selected",
            "Pods in opted-in namespaces selected by a profile or the opt-in annotation",
        );
        let pods_injected = pod_gauge(
            &mut registry,
            "pods_injected",
            "Selected pods the webhook mutated (status annotation present)",
        );
        let pods_stale = pod_gauge(
            &mut registry,
            "pods_stale",
            "Injected pods whose status annotation records other values than egress-gate injects now",
        );
        let pods_uninjected = pod_gauge(
            &mut registry,
            "pods_uninjected",
            "Selected pods admitted without injection (no status annotation): they bypass the proxy",
        );
        let pod_watch_synced = Gauge::default();
        registry.register(
            "pod_watch_synced",
            "1 once the pod drift watches have listed the cluster",
            pod_watch_synced.clone(),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "End of validity of the serving certificate in force, in Unix seconds",
            certificate_expiry.clone(),
        );
        let config_last_reload_success = Gauge::default();
        config_last_reload_success.set(unix_now());
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (start or last good reload), in Unix seconds",
            config_last_reload_success.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while /readyz answers ready (config and certificate loaded, discovery synced, not shutting down)",
            ready.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version egress-webhook was built from",
            build_info.clone(),
        );
        Self {
            registry,
            certificate_expiry,
            config_last_reload_success,
            build_info,
            ready,
            pods_selected,
            pods_injected,
            pods_stale,
            pods_uninjected,
            pod_watch_synced,
            requests,
            reviews,
            patch_operations,
            review_duration,
            cache_objects,
            config_reloads,
            config_valid,
            tls_reloads,
        }
    }
}

impl Metrics {
    /// The registry in Prometheus/OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Records a good configuration reload's time.
    pub fn config_reloaded(&self) {
        self.config_last_reload_success.set(unix_now());
    }

    /// Counts a reload of the configuration or certificates.
    pub fn reload(family: &Family<ResultLabel, Counter>, ok: bool) {
        family
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }
}
