//! The second way out: the blob gateway, a reverse proxy that holds the storage account
//! keys so workloads do not. A workload signs its request with a gateway-only
//! client key; the gateway checks that signature, rewrites the request for the real account
//! and signs it again with the real key, or sends its own Entra token or a SAS instead
//! (then it holds no key at all). `attempt` sends one upstream request and retries it once
//! after a 401 bearer challenge.
//!
//! Pure code on [`http::request::Parts`]: [`shared_key`] (string-to-sign, signing,
//! verification) with [`collation`] (the service's header order), [`sas`] (a service SAS
//! signed with the client key: string-to-sign, verification, what it permits), [`operation`] (what a
//! request does, and whether the account may), [`rewrite`] (the request for the real
//! account, re-signed) and [`batch`] (the same for every part of a Blob Batch). On top:
//! [`upstream`] (the pooled client that dials through the policy), [`upstream_auth`] (how
//! the gateway authenticates upstream: real key, [`token`]s from [`workload_identity`] or
//! [`imds`], or a [`sas_file`]), [`accounts`] (the
//! `blob:` section with its keys read), [`metered`] (bodies counted as they stream), [`stall`] (`bodyIdleTimeout`: stuck peers cut off) and [`serve`] (a connection and its requests).

pub mod accounts;
mod attempt;
pub mod batch;
pub mod collation;
pub mod imds;
pub mod metered;
pub mod operation;
pub mod rewrite;
pub mod sas;
pub mod sas_file;
pub mod serve;
pub mod shared_key;
pub mod stall;
pub mod token;
pub mod upstream;
pub mod upstream_auth;
pub mod workload_identity;
