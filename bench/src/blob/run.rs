//! `egress-bench blob run`: the blob scenarios against one path (direct to the upstream,
//! through the gateway, or through Envoy), written as one JSON result in the same form as
//! the CONNECT benchmark's runs. Measures, never asserts: a scenario fails only when the path
//! does not work at all (a refused request, a short body).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::client::{Conn, Endpoint};
use crate::procfs;
use crate::scenarios::{RunResult, record_cpu};
use crate::stats::pct;

/// Bytes in a MiB.
const MIB: u64 = 1 << 20;
/// Size of the small Get Blob whose latency is the per-request overhead: a `backup.info` or
/// a WAL listing page is a few KiB.
const SMALL_GET: u64 = 1024;
/// The small-GET scenario never runs longer than this: thousands of samples are plenty.
const SMALL_GET_MAX_SECONDS: f64 = 3.0;

/// What `blob run` is told about the path under test.
#[derive(Debug, Clone, clap::Args)]
pub struct BlobRunArgs {
    /// Name of the path: `direct`, `egress-proxy`, `envoy`.
    #[arg(long)]
    pub name: String,
    /// Base URL of the requests: `http://127.0.0.1:PORT/<account>` (path style, through a
    /// proxy) or `https://<account host>:PORT` (straight to the upstream).
    #[arg(long)]
    pub endpoint: String,
    /// Address to dial instead of resolving the endpoint's host.
    #[arg(long)]
    pub connect: Option<SocketAddr>,
    /// PEM CA of an `https` endpoint.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Account the requests are signed for.
    #[arg(long)]
    pub account: String,
    /// File with that account's key (base64).
    #[arg(long)]
    pub key_file: PathBuf,
    /// The proxy's pid, for its CPU time.
    #[arg(long)]
    pub proxy_pid: Option<u32>,
    /// The upstream's pid, to report the harness's own CPU share.
    #[arg(long)]
    pub sink_pid: Option<u32>,
    /// Seconds per scenario.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Size of each Put Blob and Get Blob of the throughput scenarios, in MiB (64: the
    /// largest single Put Blob barman-cloud sends).
    #[arg(long, default_value_t = 64)]
    pub blob_mib: u64,
    /// The scenarios to run (all by default; fewer to profile one of them, e.g. with
    /// `perf record -p <proxy pid>`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "upload,download,small-get"
    )]
    pub scenarios: Vec<Scenario>,
    /// Where to write the result.
    #[arg(long)]
    pub out: PathBuf,
}

/// One of the blob scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Put Blob after Put Blob.
    Upload,
    /// Get Blob after Get Blob.
    Download,
    /// Small Get Blobs: the per-request overhead.
    SmallGet,
}

/// Which way the bulk scenario moves bytes.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// Put Blob: the backup direction.
    Upload,
    /// Get Blob: the restore direction.
    Download,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Self::Upload => "upload",
            Self::Download => "download",
        }
    }
}

/// Runs every blob scenario against one path and writes its result.
pub async fn run(args: BlobRunArgs) -> anyhow::Result<()> {
    let endpoint = Endpoint::new(
        &args.endpoint,
        args.connect,
        args.ca.as_deref(),
        &args.account,
        &args.key_file,
    )?;
    let mut fig = BTreeMap::new();
    if let Some(load) = procfs::loadavg_1m() {
        fig.insert("loadavg_1m".into(), load);
    }
    for (scenario, dir) in [
        (Scenario::Upload, Direction::Upload),
        (Scenario::Download, Direction::Download),
    ] {
        if args.scenarios.contains(&scenario) {
            bulk(&args, &endpoint, dir, &mut fig)
                .await
                .with_context(|| dir.name())?;
        }
    }
    if args.scenarios.contains(&Scenario::SmallGet) {
        small_get(&args, &endpoint, &mut fig)
            .await
            .context("small GET")?;
    }
    let result = RunResult {
        name: args.name.clone(),
        connect_target: args.endpoint.clone(),
        figures: fig,
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    eprintln!("{}: {:?}", result.name, result.figures);
    Ok(())
}

/// CPU seconds of the proxy, this generator and the upstream, by role.
fn cpu_now(args: &BlobRunArgs) -> [(&'static str, Option<f64>); 3] {
    let cpu = |pid: Option<u32>| pid.and_then(procfs::usage).map(|u| u.cpu_s);
    [
        ("proxy", cpu(args.proxy_pid)),
        ("generator", cpu(Some(std::process::id()))),
        ("sink", cpu(args.sink_pid)),
    ]
}

/// A connection that has carried one small GET, so the proxy's pooled upstream connection
/// and its TLS handshake are in place before anything is timed.
async fn warm(endpoint: &Endpoint) -> anyhow::Result<Conn<'_>> {
    let mut conn = endpoint.connect().await?;
    conn.get(SMALL_GET).await.context("first request")?;
    Ok(conn)
}

/// Whole blobs of `blob_mib` one after another on one connection until `seconds` have
/// passed: Gbit/s, and the CPU of every process involved per GiB and as cores busy.
async fn bulk(
    args: &BlobRunArgs,
    endpoint: &Endpoint,
    dir: Direction,
    fig: &mut BTreeMap<String, f64>,
) -> anyhow::Result<()> {
    let mut conn = warm(endpoint).await?;
    let len = args.blob_mib * MIB;
    let before = cpu_now(args);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut total = 0u64;
    let mut i = 0u64;
    while total == 0 || Instant::now() < deadline {
        match dir {
            Direction::Upload => conn.put(&format!("upload-{i}"), len).await?,
            Direction::Download => conn.get(len).await?,
        }
        total += len;
        i += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let gib = total as f64 / (1u64 << 30) as f64;
    let prefix = dir.name();
    fig.insert(format!("{prefix}_gbps"), total as f64 * 8.0 / secs / 1e9);
    fig.insert(format!("{prefix}_gib"), gib);
    record_cpu(fig, prefix, before, cpu_now(args), secs, Some(gib));
    Ok(())
}

/// Small Get Blobs one after another on one keep-alive connection: p50 and p99 latency, and
/// the proxy's CPU per request.
async fn small_get(
    args: &BlobRunArgs,
    endpoint: &Endpoint,
    fig: &mut BTreeMap<String, f64>,
) -> anyhow::Result<()> {
    let mut conn = warm(endpoint).await?;
    let before = cpu_now(args);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds.min(SMALL_GET_MAX_SECONDS));
    let mut lat = Vec::new();
    while lat.is_empty() || Instant::now() < deadline {
        let t0 = Instant::now();
        conn.get(SMALL_GET).await?;
        lat.push(t0.elapsed());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    fig.insert("small_get_p50_us".into(), pct(&lat, 0.5));
    fig.insert("small_get_p99_us".into(), pct(&lat, 0.99));
    fig.insert("small_get_per_s".into(), lat.len() as f64 / secs);
    let after = cpu_now(args);
    if let (Some(b), Some(a)) = (before[0].1, after[0].1) {
        fig.insert(
            "small_get_proxy_cpu_us_per_req".into(),
            (a - b) * 1e6 / lat.len() as f64,
        );
    }
    record_cpu(fig, "small_get", before, after, secs, None);
    Ok(())
}
