//! Workload identity: which pod opened a connection, from its source address (issue 14).
//!
//! - [`config`]: the `identity:` section and a rule's `from:` list, validated;
//! - [`labels`]: Kubernetes names and equality-based label selectors;
//! - [`index`]: source address -> pod, fed by watch events (pure);
//! - [`watch`]: the kube-rs pod watch feeding the index, and readiness;
//! - [`wire`]: the slim pod type the watch deserialises (never the full `Pod`);
//! - [`metrics`]: the identity gauges, fixed cardinality.
//!
//! The blob gateway's virtual accounts are meant to take the same `from:` list, as a second
//! factor beside the client key: the seam is [`WorkloadSelector`] (the schema, validated by
//! [`config::validate_from`]) and [`Caller::pod`] (who is calling, from
//! [`Identities::identify`]); nothing in them is specific to allow rules.
//!
//! Without an `identity:` section nothing here runs and the proxy has no Kubernetes client.
//! The decision is fail-closed: a rule with `from:` grants nothing to a connection that has
//! not been identified as a pod the entry selects.

pub mod config;
pub mod index;
pub mod labels;
pub mod metrics;
pub mod watch;
pub mod wire;

pub use config::{IdentityConfig, Unidentified, WorkloadSelector};
pub use index::{IndexFeeder, Lookup, PodEvent, PodIndex, SlimPod};
pub use watch::{Caller, Identities};
