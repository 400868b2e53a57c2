//! The first way out: the CONNECT tunnel. A pod sends `CONNECT host:443`, the proxy checks
//! the target against the policy, dials it through [`crate::dial`], answers 200 and then
//! moves opaque bytes both ways; the TLS inside is the pod's own, end to end.
//!
//! Read top to bottom: `serve` handles one connection, [`head`] reads and parses the
//! request head, [`respond`] words every answer, [`relay`] moves the bytes.

pub mod head;
pub mod relay;
pub mod respond;
mod serve;

pub(crate) use serve::serve;
