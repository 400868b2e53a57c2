//! egress-proxy: the egress-gate CONNECT proxy. It tunnels pods' TLS to allowlisted
//! destinations and nothing else (DESIGN.md section 4). The data path reads top to bottom:
//! [`listener`] accepts within limits, `tunnel` serves one connection, [`connect`] parses
//! the head and dials, [`policy`] decides, [`respond`] answers, [`relay`] moves the bytes.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod connect;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod respond;
mod tunnel;

pub use config::{Config, ConfigError};
pub use listener::{Handle, Server, StartError};
