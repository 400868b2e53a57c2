//! egress-proxy: the egress-gate proxy. Pods reach allowlisted destinations through it and
//! nothing else (DESIGN.md section 4).
//!
//! The crate is layered; each module uses only modules above it in this list:
//! - the floor: [`policy`] (may this target be reached, at which addresses), [`identity`]
//!   (which pod is calling), [`config`] (the file, validated), [`per_source`] (fair share:
//!   limits per client address), [`dial`] (resolve, check, dial: the one way any upstream
//!   connection is made), [`metrics`], [`tls`] (listener certificates), the blob gateway's
//!   compiled accounts and upstream client (`blob::accounts`, `blob::upstream`, over `dial`),
//!   [`state`] (the reloadable settings and process-wide state every task shares), `accept`
//!   (accept-error logging);
//! - the ways out: [`tunnel`] (CONNECT: head, policy, dial, relay) and [`blob`] (the blob
//!   gateway: Shared Key verification, authorization, re-signing, `blob::serve`);
//! - the front: [`admin`] (health and metrics port) and [`listener`] (accept loops, limits,
//!   reload and drain), which hands each connection to its way out.
#![forbid(unsafe_code)]

mod accept;
pub mod admin;
pub mod blob;
pub mod config;
pub mod dial;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod per_source;
pub mod policy;
pub mod state;
pub mod tls;
pub mod tunnel;

pub use config::{Config, ConfigError};
pub use listener::{Handle, Server};
pub use state::StartError;
