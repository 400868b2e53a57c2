//! `egress-bench blob`: the blob gateway's benchmark (issue 13, `make bench-blob`). A local
//! TLS storage upstream ([`upstream`]), a storage client that signs real Shared Key requests
//! ([`client`]) over bodies that cost nothing to make ([`body`]), the scenarios against one
//! path ([`run`]: upload, download, small GET) and the combined report ([`report`]).

mod body;
mod client;
pub mod report;
pub mod run;
pub mod upstream;

/// The blob benchmark's commands.
#[derive(Debug, clap::Subcommand)]
pub enum BlobCmd {
    /// The TLS storage upstream: writes its CA, prints `listening ADDR`, serves forever.
    Upstream(upstream::UpstreamArgs),
    /// Runs the blob scenarios against one path and writes one JSON result.
    Run(run::BlobRunArgs),
    /// Combines blob results into target/bench/blob.json and a Markdown table.
    Report(crate::report::ReportArgs),
}
