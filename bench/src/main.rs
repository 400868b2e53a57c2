//! `egress-bench`: the load generator behind `make bench` (issue 7). Commands: `sink` (the
//! destination: discards or echoes), `run` (the scenarios against one path: direct, or
//! through a CONNECT proxy), `identity` (workload identity off vs on against a real
//! kube-apiserver), `report` (min/median/max over runs, ratios, Markdown and JSON) and
//! `plot` (PNG curves from a benchmark's JSON); `blob` holds the blob gateway's benchmark
//! (issue 13). It measures and never asserts on speed.
#![forbid(unsafe_code)]

mod blob;
mod identity;
mod plot;
mod procfs;
mod report;
mod scenarios;
mod sink;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Worker threads of the generator's runtime: one per core of the 2-core benchmark machine,
/// so the generator is never held back by its own scheduling.
const GENERATOR_THREADS: usize = 2;

#[derive(Debug, Parser)]
#[command(about = "egress-gate benchmark harness")]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The destination server: prints `listening ADDR`, then serves forever.
    Sink {
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Runs every scenario against one path and writes one JSON result.
    Run(scenarios::RunArgs),
    /// Workload identity off vs on, with a real kube-apiserver's pods indexed.
    Identity(identity::IdentityArgs),
    /// Combines results into target/bench/proxy.json and a Markdown table.
    Report(report::ReportArgs),
    /// Draws PNG curves next to a benchmark's JSON (proxy.json or webhook.json).
    Plot {
        /// The benchmark's JSON.
        #[arg(long = "in")]
        input: PathBuf,
    },
    /// The blob gateway's benchmark: the TLS upstream, the scenarios, the report.
    #[command(subcommand)]
    Blob(blob::BlobCmd),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(GENERATOR_THREADS)
            .enable_all()
            .build()
    };
    match cli.cmd {
        Cmd::Sink { listen } => rt()?.block_on(sink::serve(listen)),
        Cmd::Run(args) => rt()?.block_on(scenarios::run(args)),
        Cmd::Identity(args) => rt()?.block_on(identity::run(args)),
        Cmd::Report(args) => report::report(&args),
        Cmd::Plot { input } => {
            for png in plot::plot(&input)? {
                eprintln!("egress-bench: wrote {}", png.display());
            }
            Ok(())
        }
        Cmd::Blob(blob::BlobCmd::Upstream(args)) => rt()?.block_on(blob::upstream::serve(args)),
        Cmd::Blob(blob::BlobCmd::Run(args)) => rt()?.block_on(blob::run::run(args)),
        Cmd::Blob(blob::BlobCmd::Report(args)) => blob::report::report(&args),
    }
}
