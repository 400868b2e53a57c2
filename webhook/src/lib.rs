//! egress-gate's admission webhook: decides which pods reach Azure through the egress proxy
//! and writes the JSON patch that gives them `HTTPS_PROXY`, `NO_PROXY` and the client label.
//!
//! The crate is split by concern:
//! - [`config`] reads and validates the one YAML configuration file;
//! - [`engine`] is the pure injection logic (pod JSON in, RFC 6902 operations out), which
//!   knows nothing of HTTP;
//! - [`manifest`] applies the engine to whole manifests for the offline `inject` command.
#![forbid(unsafe_code)]

pub mod admission;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod drift;
pub mod engine;
pub mod manifest;
pub mod metrics;
pub mod preview;
pub mod server;
pub mod status;
pub mod tls;
pub mod watch;
