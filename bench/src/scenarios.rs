//! `egress-bench run`: every scenario against one path (direct, or through one CONNECT
//! proxy), written as one JSON result. Measures, never asserts: a scenario fails only when
//! the path does not work at all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::procfs;
use crate::sink::{MODE_DISCARD, MODE_ECHO};
use crate::stats::pct;

/// Write size of the bulk scenarios: large enough that the generator's per-write overhead is
/// negligible, so the path under test is the bottleneck.
const BULK_WRITE: usize = 256 * 1024;
/// Round-trip payload, as the issue specifies (a small TLS record, an HTTP/2 ping).
const RTT_BYTES: usize = 64;
/// Longest a CONNECT answer may be before the proxy is taken to misbehave.
const MAX_CONNECT_ANSWER: usize = 8192;
/// Tunnels opened at once while filling a scale level: enough to fill 8,000 in seconds,
/// few enough that no peer's accept backlog (Squid's and tinyproxy's are small) overflows.
const OPEN_BATCH: usize = 100;
/// Wait after opening or closing many tunnels before reading RSS, so the proxy has
/// finished its bookkeeping for them.
const SETTLE: Duration = Duration::from_millis(300);
/// The round-trip scenario never runs longer than this: thousands of samples are plenty.
const RTT_MAX_SECONDS: f64 = 3.0;

/// What `run` is told about the path under test.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Name of the path: `direct`, `egress-proxy`, `envoy`, `squid`, `tinyproxy`.
    #[arg(long)]
    pub name: String,
    /// The sink's address.
    #[arg(long)]
    pub sink: SocketAddr,
    /// CONNECT proxy to go through; absent: connect to the sink directly.
    #[arg(long)]
    pub proxy: Option<SocketAddr>,
    /// The proxy's pid, for its CPU time and RSS.
    #[arg(long)]
    pub proxy_pid: Option<u32>,
    /// The sink's pid, to report the harness's own CPU share.
    #[arg(long)]
    pub sink_pid: Option<u32>,
    /// Host sent in CONNECT (the proxy maps it to the sink); a peer that cannot map names
    /// is given 127.0.0.1.
    #[arg(long, default_value = "acct.blob.core.windows.net")]
    pub host: String,
    /// Seconds per throughput and rate scenario.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Open-tunnel levels of the scale curve, ascending: at each, the proxy's RSS and the
    /// setup rate with that many idle tunnels held open.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,8000")]
    pub scale: Vec<usize>,
    /// Workers of the setup-rate scenarios.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Where to write the result.
    #[arg(long)]
    pub out: PathBuf,
}

/// One run's figures (absent where a figure does not apply, e.g. RSS for `direct`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    /// The path's name, which the report groups runs by.
    pub name: String,
    /// The `host:port` sent in CONNECT (empty for direct), since peers differ in it.
    #[serde(default)]
    pub connect_target: String,
    /// Figure name -> value.
    pub figures: BTreeMap<String, f64>,
}

/// Runs every scenario against one path and writes its result.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut fig = BTreeMap::new();
    if let Some(load) = procfs::loadavg_1m() {
        fig.insert("loadavg_1m".into(), load);
    }
    bulk(&args, 1, &mut fig).await.context("bulk x1")?;
    bulk(&args, 16, &mut fig).await.context("bulk x16")?;
    let key = format!("setup_rate_{}w", args.workers);
    setup_rate(&args, &key, &mut fig)
        .await
        .context("setup rate")?;
    let (_, lat) = setups(&args, 1).await.context("setup latency")?;
    fig.insert("setup_p50_us_1w".into(), pct(&lat, 0.5));
    rtt(&args, &mut fig).await.context("round trip")?;
    scale(&args, &mut fig).await.context("scale curve")?;
    let result = RunResult {
        name: args.name.clone(),
        connect_target: args
            .proxy
            .map(|_| format!("{}:{}", args.host, args.sink.port()))
            .unwrap_or_default(),
        figures: fig,
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    eprintln!("{}: {:?}", result.name, result.figures);
    Ok(())
}

/// Opens a connection to the sink, through the proxy when there is one.
async fn open(args: &RunArgs) -> anyhow::Result<TcpStream> {
    let Some(proxy) = args.proxy else {
        let s = TcpStream::connect(args.sink).await?;
        s.set_nodelay(true)?;
        return Ok(s);
    };
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let head = format!(
        "CONNECT {0}:{1} HTTP/1.1\r\nHost: {0}:{1}\r\n\r\n",
        args.host,
        args.sink.port()
    );
    s.write_all(head.as_bytes()).await?;
    // The sink never speaks first, so everything before the blank line is the proxy's.
    let mut resp = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !resp.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("proxy closed during CONNECT");
        }
        resp.extend_from_slice(buf.get(..n).unwrap_or_default());
        if resp.len() > MAX_CONNECT_ANSWER {
            bail!("CONNECT answer too long");
        }
    }
    if !(resp.starts_with(b"HTTP/1.1 200") || resp.starts_with(b"HTTP/1.0 200")) {
        bail!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(&resp).lines().next().unwrap_or("")
        );
    }
    Ok(s)
}

/// One 64-byte round trip on an echo connection.
async fn round_trip(s: &mut TcpStream, payload: &[u8; RTT_BYTES]) -> anyhow::Result<()> {
    s.write_all(payload).await?;
    let mut back = [0u8; RTT_BYTES];
    s.read_exact(&mut back).await?;
    if back != *payload {
        bail!("echo came back altered");
    }
    Ok(())
}

fn echo_payload() -> [u8; RTT_BYTES] {
    let mut p = [b'x'; RTT_BYTES];
    p[0] = MODE_ECHO;
    p
}

/// A tunnel that has carried one round trip, as an idle tunnel of a real client has.
async fn open_echo(args: &RunArgs) -> anyhow::Result<TcpStream> {
    let mut s = open(args).await?;
    round_trip(&mut s, &echo_payload()).await?;
    Ok(s)
}

/// CPU seconds of the proxy, this generator and the sink, by role.
fn cpu_now(args: &RunArgs) -> [(&'static str, Option<f64>); 3] {
    let cpu = |pid: Option<u32>| pid.and_then(procfs::usage).map(|u| u.cpu_s);
    [
        ("proxy", cpu(args.proxy_pid)),
        ("generator", cpu(Some(std::process::id()))),
        ("sink", cpu(args.sink_pid)),
    ]
}

/// Records `{prefix}_{role}_cpu_share` (cores busy) for every role measured both times,
/// and `{prefix}_{role}_cpu_s_per_gib` when bytes were moved.
pub(crate) fn record_cpu(
    fig: &mut BTreeMap<String, f64>,
    prefix: &str,
    before: [(&'static str, Option<f64>); 3],
    after: [(&'static str, Option<f64>); 3],
    secs: f64,
    gib: Option<f64>,
) {
    for ((who, b), (_, a)) in before.into_iter().zip(after) {
        if let (Some(b), Some(a)) = (b, a) {
            fig.insert(format!("{prefix}_{who}_cpu_share"), (a - b) / secs);
            if let Some(gib) = gib {
                fig.insert(format!("{prefix}_{who}_cpu_s_per_gib"), (a - b) / gib);
            }
        }
    }
}

/// Bulk upload over `n` tunnels: Gbit/s, plus CPU of every process involved.
async fn bulk(args: &RunArgs, n: usize, fig: &mut BTreeMap<String, f64>) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = open(args).await?;
        s.write_all(&[MODE_DISCARD]).await?;
        conns.push(s);
    }
    let before = cpu_now(args);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = JoinSet::new();
    for mut s in conns {
        tasks.spawn(async move {
            let buf = vec![0x5au8; BULK_WRITE];
            let mut sent = 0u64;
            while Instant::now() < deadline {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
                sent += BULK_WRITE as u64;
            }
            sent
        });
    }
    let mut total = 0u64;
    while let Some(sent) = tasks.join_next().await {
        total += sent?;
    }
    let secs = started.elapsed().as_secs_f64();
    let gib = total as f64 / (1u64 << 30) as f64;
    fig.insert(format!("bulk{n}_gbps"), total as f64 * 8.0 / secs / 1e9);
    record_cpu(
        fig,
        &format!("bulk{n}"),
        before,
        cpu_now(args),
        secs,
        Some(gib),
    );
    Ok(())
}

/// Tunnel setups per second (connect + CONNECT + one round trip + close) with `workers`
/// concurrent loops; returns (rate, sorted setup latencies). Fails if none succeeded.
pub(crate) async fn setups(args: &RunArgs, workers: usize) -> anyhow::Result<(f64, Vec<Duration>)> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let args = args.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match open_echo(&args).await {
                    Ok(_) => lat.push(t0.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (l, e) = done?;
        all.extend(l);
        errors += e;
    }
    if errors > 0 {
        eprintln!(
            "{}: {errors} failed setups with {workers} workers",
            args.name
        );
    }
    if all.is_empty() {
        bail!("no tunnel could be set up ({errors} attempts failed)");
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    Ok((all.len() as f64 / secs, all))
}

/// `setups` with `args.workers` loops, recorded as `key`, with every role's CPU share
/// under `{key}_{role}_cpu_share` (the generator's tells whether it was the limit).
async fn setup_rate(
    args: &RunArgs,
    key: &str,
    fig: &mut BTreeMap<String, f64>,
) -> anyhow::Result<()> {
    let before = cpu_now(args);
    let started = Instant::now();
    let (rate, _) = setups(args, args.workers).await?;
    let secs = started.elapsed().as_secs_f64();
    fig.insert(key.to_owned(), rate);
    record_cpu(fig, key, before, cpu_now(args), secs, None);
    Ok(())
}

/// 64-byte round trips through one open tunnel: p50/p99 in microseconds.
async fn rtt(args: &RunArgs, fig: &mut BTreeMap<String, f64>) -> anyhow::Result<()> {
    let mut s = open_echo(args).await?;
    let payload = echo_payload();
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds.min(RTT_MAX_SECONDS));
    let mut lat = Vec::new();
    while Instant::now() < deadline {
        let t0 = Instant::now();
        round_trip(&mut s, &payload).await?;
        lat.push(t0.elapsed());
    }
    lat.sort();
    fig.insert("rtt_p50_us".into(), pct(&lat, 0.5));
    fig.insert("rtt_p99_us".into(), pct(&lat, 0.99));
    Ok(())
}

/// Opens `count` more idle tunnels into `held`, `OPEN_BATCH` at a time; returns how many
/// attempts failed (a peer may refuse past its own limit: that is a finding, not a crash).
async fn open_idle(args: &RunArgs, count: usize, held: &mut Vec<TcpStream>) -> usize {
    let mut failed = 0;
    let mut left = count;
    while left > 0 {
        let n = left.min(OPEN_BATCH);
        left -= n;
        let mut batch = JoinSet::new();
        for _ in 0..n {
            let a = args.clone();
            batch.spawn(async move { open_echo(&a).await });
        }
        while let Some(done) = batch.join_next().await {
            match done {
                Ok(Ok(s)) => held.push(s),
                _ => failed += 1,
            }
        }
    }
    failed
}

/// Round trip on every held tunnel, concurrently; returns the ones that still work.
async fn alive(held: Vec<TcpStream>) -> Vec<TcpStream> {
    let mut checks = JoinSet::new();
    for mut s in held {
        checks.spawn(async move {
            round_trip(&mut s, &echo_payload()).await?;
            anyhow::Ok(s)
        });
    }
    let mut ok = Vec::new();
    while let Some(done) = checks.join_next().await {
        if let Ok(Ok(s)) = done {
            ok.push(s);
        }
    }
    ok
}

/// The scale curve, in two passes over the levels N.
///
/// Fill, ascending, each level adding to the last: hold N idle tunnels open (each has
/// carried one round trip), then read the proxy's RSS. No setups run during the fill, so
/// the RSS difference between two levels is what the idle tunnels cost (RSS per idle
/// tunnel: the slope between the lowest and the highest level).
///
/// Rates, descending, closing tunnels down to each level: the `workers`-loop setup rate on
/// top of N open tunnels. After the highest level's rate, every held tunnel does one more
/// round trip, and the report says so if any did not answer.
async fn scale(args: &RunArgs, fig: &mut BTreeMap<String, f64>) -> anyhow::Result<()> {
    let mut levels = args.scale.clone();
    levels.sort_unstable();
    levels.dedup();
    let rss = || args.proxy_pid.and_then(procfs::usage).map(|u| u.rss_kib);
    let mut held = Vec::new();
    let mut curve = Vec::new();
    for &n in &levels {
        let failed = open_idle(args, n.saturating_sub(held.len()), &mut held).await;
        if failed > 0 {
            eprintln!(
                "{}: {failed} idle tunnels failed to open at level {n}",
                args.name
            );
        }
        fig.insert(format!("scale_{n}_open_tunnels"), held.len() as f64);
        tokio::time::sleep(SETTLE).await;
        if let Some(kib) = rss() {
            fig.insert(format!("scale_{n}_rss_kib"), kib);
            curve.push((held.len(), kib));
        }
    }
    if let (Some(&(n0, r0)), Some(&(n1, r1))) = (curve.first(), curve.last())
        && n1 > n0
    {
        fig.insert(
            "idle_rss_kib_per_tunnel".into(),
            (r1 - r0) / (n1 - n0) as f64,
        );
    }
    for (i, &n) in levels.iter().rev().enumerate() {
        if held.len() > n {
            held.truncate(n);
            tokio::time::sleep(SETTLE).await;
        }
        let key = format!("scale_{n}_setup_rate_{}w", args.workers);
        setup_rate(args, &key, fig)
            .await
            .with_context(|| format!("setup rate with {n} tunnels open"))?;
        if i == 0 {
            held = alive(held).await;
            fig.insert("scale_alive_at_end".into(), held.len() as f64);
        }
    }
    drop(held);
    tokio::time::sleep(SETTLE).await;
    Ok(())
}
