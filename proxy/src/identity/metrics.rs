//! The identity metrics: no pod, namespace or address ever becomes a label, so their
//! cardinality stays fixed however many pods the index holds.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Gauges the watcher keeps current; clones share the same values.
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    /// 1 once every watched scope has listed completely, 0 before (the proxy is not ready).
    pub synced: Gauge,
    /// Pods the index holds, live or finished: the memory it costs.
    pub index_pods: Gauge,
    /// Source addresses claimed by at least one live pod.
    pub index_addresses: Gauge,
    /// Seconds since the watch was last known to be current: 0 while it streams, growing
    /// through an API server outage, during which the last complete index keeps serving.
    pub staleness_seconds: Gauge<f64, AtomicU64>,
    /// Source-address lookups by how they ended.
    pub lookups: Family<LookupLabel, Counter>,
}

/// `result` label of `identity_lookups_total`: one of six fixed words.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabel {
    /// `pod` (in the index), `pod_after_wait` (arrived during `unknownWait`), `pod_direct`
    /// (found by the direct API lookup), `ambiguous`, `node` or `unknown`.
    pub result: &'static str,
}

impl IdentityMetrics {
    /// Registers the gauges under `identity_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "identity_synced",
            "1 once the pod watch has listed completely (identity on only)",
            m.synced.clone(),
        );
        registry.register(
            "identity_index_pods",
            "Pods held by the identity index",
            m.index_pods.clone(),
        );
        registry.register(
            "identity_index_addresses",
            "Source addresses claimed by a live pod in the identity index",
            m.index_addresses.clone(),
        );
        registry.register(
            "identity_staleness_seconds",
            "Seconds since the pod watch was last known current",
            m.staleness_seconds.clone(),
        );
        registry.register(
            "identity_lookups",
            "Source-address lookups, by result",
            m.lookups.clone(),
        );
        m
    }
}
