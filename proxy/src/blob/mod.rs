//! The second way out: the blob gateway, a reverse proxy that holds the storage account
//! keys so workloads do not. A workload signs its request with a gateway-only
//! client key; the gateway checks that signature, rewrites the request for the real account
//! and signs it again with the real key.
//!
//! Pure code on [`http::request::Parts`]: [`shared_key`] (string-to-sign, signing,
//! verification) with [`collation`] (the service's header order), [`sas`] (a service SAS
//! signed with the client key: string-to-sign, verification, what it permits), [`operation`] (what a
//! request does, and whether the account may), [`rewrite`] (the request for the real
//! account, re-signed) and [`batch`] (the same for every part of a Blob Batch). On top:
//! [`upstream`] (the pooled client that dials through the policy), [`accounts`] (the
//! `blob:` section with its keys read), [`metered`] (bodies counted as they stream) and [`serve`] (a connection and its requests).

pub mod accounts;
pub mod batch;
pub mod collation;
pub mod metered;
pub mod operation;
pub mod rewrite;
pub mod sas;
pub mod serve;
pub mod shared_key;
pub mod upstream;
