//! The second way out: the blob gateway, a reverse proxy that holds the storage account
//! keys so workloads do not. A workload signs its request with a gateway-only
//! client key; the gateway checks that signature, rewrites the request for the real account
//! and signs it again with the real key.
//!
//! Built so far, all pure code on [`http::request::Parts`]: [`shared_key`] (string-to-sign,
//! signing, verification) with [`collation`] (the service's header order), [`operation`]
//! (what a request does, and whether the account may), [`rewrite`] (the request for the
//! real account, re-signed) and [`batch`] (the same for every part of a Blob Batch). The
//! listener, configuration and upstream client come next.

pub mod batch;
pub mod collation;
pub mod operation;
pub mod rewrite;
pub mod shared_key;
