//! Certificates for the egress-gate admission webhook.
//!
//! This crate will create the webhook's CA and serving certificates with rcgen, load them
//! from disk and decide when to renew them. It is a placeholder until that work lands; the
//! workspace keeps one crate per concern so the layout reads from the tree.
#![forbid(unsafe_code)]
