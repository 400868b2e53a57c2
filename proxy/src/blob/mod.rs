//! The second way out: the blob gateway, a reverse proxy that holds the storage account
//! keys so workloads do not. A workload signs its request with a gateway-only
//! client key; the gateway checks that signature, rewrites the request for the real account
//! and signs it again with the real key.
//!
//! Built so far: the Shared Key core both halves need, [`shared_key`] (string-to-sign,
//! signing, verification) and [`collation`] (the service's header order). The listener,
//! configuration, authorization and upstream client come next.

pub mod collation;
pub mod shared_key;
