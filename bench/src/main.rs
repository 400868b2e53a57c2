//! `egress-bench`: the load generator behind `make bench-proxy` (issue 7). Three commands:
//! `sink` (the destination: discards or echoes), `run` (the scenarios against one path:
//! direct, or through a CONNECT proxy), `report` (min/median/max over runs, ratios, Markdown
//! and JSON). It measures and never asserts.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// First byte a client sends to the sink: discard everything that follows.
const MODE_DISCARD: u8 = b'D';
/// First byte a client sends to the sink: echo everything, this byte included.
const MODE_ECHO: u8 = b'E';
/// Write size of the bulk scenarios: large enough that the generator's per-write overhead is
/// negligible, so the path under test is the bottleneck.
const BULK_WRITE: usize = 256 * 1024;
/// Round-trip payload, as the issue specifies (a small TLS record, an HTTP/2 ping).
const RTT_BYTES: usize = 64;
/// Linux reports CPU times in clock ticks of 1/100 s (`getconf CLK_TCK`).
const CLK_TCK: f64 = 100.0;

#[derive(Debug, Parser)]
#[command(about = "egress-gate proxy load generator")]
struct Cli {
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
    Run(RunArgs),
    /// Combines results into target/bench/proxy.json and a Markdown table.
    Report {
        /// Result files (`run` output), any number per path name.
        inputs: Vec<PathBuf>,
        /// Combined JSON output.
        #[arg(long)]
        out: PathBuf,
        /// Names of peers that could not be installed (reported as missing).
        #[arg(long)]
        missing: Vec<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Name of the path: `direct`, `egress-proxy`, `envoy`.
    #[arg(long)]
    name: String,
    /// The sink's address.
    #[arg(long)]
    sink: SocketAddr,
    /// CONNECT proxy to go through; absent: connect to the sink directly.
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// The proxy's pid, for its CPU time and RSS.
    #[arg(long)]
    proxy_pid: Option<u32>,
    /// The sink's pid, to report the harness's own CPU share.
    #[arg(long)]
    sink_pid: Option<u32>,
    /// Host name sent in CONNECT (the proxy maps it to the sink).
    #[arg(long, default_value = "acct.blob.core.windows.net")]
    host: String,
    /// Seconds per throughput and rate scenario.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Tunnels held open for the idle-RSS scenario.
    #[arg(long, default_value_t = 5000)]
    idle_tunnels: usize,
    /// Workers of the setup-rate scenario.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Where to write the result.
    #[arg(long)]
    out: PathBuf,
}

/// One run's figures (absent where a figure does not apply, e.g. RSS for `direct`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct RunResult {
    name: String,
    figures: BTreeMap<String, f64>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Sink { listen } => rt.block_on(sink(listen)),
        Cmd::Run(args) => rt.block_on(run(args)),
        Cmd::Report {
            inputs,
            out,
            missing,
        } => report(&inputs, &out, &missing),
    }
}

async fn sink(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (mut s, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            if mode[0] == MODE_ECHO {
                let _ = s.write_all(&mode).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            } else {
                let mut buf = vec![0u8; BULK_WRITE];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
        });
    }
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
        if resp.len() > 8192 {
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
    Ok(())
}

fn echo_payload() -> [u8; RTT_BYTES] {
    let mut p = [b'x'; RTT_BYTES];
    p[0] = MODE_ECHO;
    p
}

/// (user + system CPU seconds, RSS KiB) of a process, from /proc.
fn proc_usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks / CLK_TCK, rss))
}

fn self_pid() -> u32 {
    std::process::id()
}

/// Bulk upload over `n` tunnels: Gbit/s, plus CPU seconds per GiB of every process involved.
async fn bulk(args: &RunArgs, n: usize, fig: &mut BTreeMap<String, f64>) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = open(args).await?;
        s.write_all(&[MODE_DISCARD]).await?;
        conns.push(s);
    }
    let before = usage_all(args);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for mut s in conns {
        tasks.push(tokio::spawn(async move {
            let buf = vec![0x5au8; BULK_WRITE];
            let mut sent = 0u64;
            while Instant::now() < deadline {
                if s.write_all(&buf).await.is_err() {
                    break;
                }
                sent += BULK_WRITE as u64;
            }
            sent
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let after = usage_all(args);
    let gib = total as f64 / (1u64 << 30) as f64;
    fig.insert(format!("bulk{n}_gbps"), total as f64 * 8.0 / secs / 1e9);
    for (who, b, a) in [
        ("proxy", before.0, after.0),
        ("generator", before.1, after.1),
        ("sink", before.2, after.2),
    ] {
        if let (Some(b), Some(a)) = (b, a) {
            fig.insert(format!("bulk{n}_{who}_cpu_s_per_gib"), (a - b) / gib);
            fig.insert(format!("bulk{n}_{who}_cpu_share"), (a - b) / secs);
        }
    }
    Ok(())
}

/// CPU seconds of (proxy, this generator, sink).
fn usage_all(args: &RunArgs) -> (Option<f64>, Option<f64>, Option<f64>) {
    let cpu = |pid: Option<u32>| pid.and_then(proc_usage).map(|u| u.0);
    (
        cpu(args.proxy_pid),
        cpu(Some(self_pid())),
        cpu(args.sink_pid),
    )
}

/// Tunnel setups per second (connect + CONNECT + one round trip + close) with `workers`
/// concurrent loops; returns (rate, sorted setup latencies).
async fn setups(args: &RunArgs, workers: usize) -> anyhow::Result<(f64, Vec<Duration>)> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let payload = echo_payload();
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let ok = async {
                    let mut s = open(&args).await?;
                    round_trip(&mut s, &payload).await
                }
                .await;
                match ok {
                    Ok(()) => lat.push(t0.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    if errors > 0 {
        eprintln!(
            "{}: {errors} failed setups with {workers} workers",
            args.name
        );
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    Ok((all.len() as f64 / secs, all))
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted
        .get(i.min(sorted.len() - 1))
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

/// 64-byte round trips through one open tunnel: p50/p99 in microseconds.
async fn rtt(args: &RunArgs, fig: &mut BTreeMap<String, f64>) -> anyhow::Result<()> {
    let mut s = open(args).await?;
    let payload = echo_payload();
    round_trip(&mut s, &payload).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds.min(3.0));
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

/// RSS growth of the proxy per idle tunnel, each having carried one round trip.
async fn idle_rss(args: &RunArgs, fig: &mut BTreeMap<String, f64>) -> anyhow::Result<()> {
    let Some(pid) = args.proxy_pid else {
        return Ok(());
    };
    let payload = echo_payload();
    // Warm up: one tunnel, so one-time allocations are not charged to the idle ones.
    let mut warm = open(args).await?;
    round_trip(&mut warm, &payload).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = proc_usage(pid).context("proxy RSS")?.1;
    let mut held = Vec::with_capacity(args.idle_tunnels);
    for chunk in 0..args.idle_tunnels.div_ceil(100) {
        let n = (args.idle_tunnels - chunk * 100).min(100);
        let mut batch = Vec::new();
        for _ in 0..n {
            let a = args.clone();
            batch.push(tokio::spawn(async move {
                let mut s = open(&a).await?;
                round_trip(&mut s, &echo_payload()).await?;
                anyhow::Ok(s)
            }));
        }
        for b in batch {
            held.push(b.await??);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = proc_usage(pid).context("proxy RSS")?.1;
    fig.insert("idle_tunnels".into(), held.len() as f64);
    fig.insert(
        "idle_rss_kib_per_tunnel".into(),
        (after - before) / held.len() as f64,
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut fig = BTreeMap::new();
    bulk(&args, 1, &mut fig).await.context("bulk x1")?;
    bulk(&args, 16, &mut fig).await.context("bulk x16")?;
    let (rate, _) = setups(&args, args.workers).await.context("setup rate")?;
    fig.insert(format!("setup_rate_{}w", args.workers), rate);
    let (_, lat) = setups(&args, 1).await.context("setup latency")?;
    fig.insert("setup_p50_us_1w".into(), pct(&lat, 0.5));
    rtt(&args, &mut fig).await.context("round trip")?;
    idle_rss(&args, &mut fig).await.context("idle RSS")?;
    let result = RunResult {
        name: args.name.clone(),
        figures: fig,
    };
    std::fs::write(&args.out, serde_json::to_vec_pretty(&result)?)?;
    eprintln!("{}: {:?}", result.name, result.figures);
    Ok(())
}

/// min / median / max of one figure over runs.
#[derive(Debug, Serialize)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
    runs: usize,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let at = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
    Spread {
        min: at(0),
        median: at(v.len() / 2),
        max: at(v.len().saturating_sub(1)),
        runs: v.len(),
    }
}

/// Rows of the table: (figure, label, higher is better).
const ROWS: &[(&str, &str, bool)] = &[
    ("bulk1_gbps", "1 tunnel bulk, Gbit/s", true),
    ("bulk16_gbps", "16 tunnels bulk, Gbit/s", true),
    ("setup_rate_64w", "tunnel setups/s, 64 workers", true),
    ("setup_p50_us_1w", "setup p50 us, 1 worker", false),
    ("rtt_p50_us", "64 B round trip p50 us", false),
    ("rtt_p99_us", "64 B round trip p99 us", false),
    ("idle_rss_kib_per_tunnel", "RSS KiB per idle tunnel", false),
    (
        "bulk1_proxy_cpu_s_per_gib",
        "proxy CPU s per GiB (1 tunnel)",
        false,
    ),
    (
        "bulk1_generator_cpu_share",
        "generator CPU share (1 tunnel)",
        false,
    ),
    ("bulk1_sink_cpu_share", "sink CPU share (1 tunnel)", false),
];

fn report(inputs: &[PathBuf], out: &PathBuf, missing: &[String]) -> anyhow::Result<()> {
    let mut by_name: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for path in inputs {
        let r: RunResult = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("read {}", path.display()))?,
        )?;
        let entry = by_name.entry(r.name).or_default();
        for (k, v) in r.figures {
            entry.entry(k).or_default().push(v);
        }
    }
    // Ratios are taken run by run (run i of egress-proxy against run i of the baseline,
    // measured moments apart), then summarised: on a shared machine the background load
    // drifts between runs, and a ratio of medians would mix different moments.
    let per_run_ratio = |key: &str, base: &str| -> Option<f64> {
        let ours = by_name.get("egress-proxy")?.get(key)?;
        let theirs = by_name.get(base)?.get(key)?;
        let r: Vec<f64> = ours
            .iter()
            .zip(theirs)
            .filter(|(_, b)| **b != 0.0)
            .map(|(a, b)| a / b)
            .collect();
        (!r.is_empty()).then(|| spread(r).median)
    };
    let ratio_table: BTreeMap<&str, (Option<f64>, Option<f64>)> = ROWS
        .iter()
        .map(|(k, _, _)| (*k, (per_run_ratio(k, "direct"), per_run_ratio(k, "envoy"))))
        .collect();
    let spreads: BTreeMap<String, BTreeMap<String, Spread>> = by_name
        .into_iter()
        .map(|(n, figs)| (n, figs.into_iter().map(|(k, v)| (k, spread(v))).collect()))
        .collect();
    let median =
        |name: &str, key: &str| spreads.get(name).and_then(|f| f.get(key)).map(|s| s.median);
    let mut table = String::from(
        "| figure | direct (median) | egress-proxy (min / median / max) | envoy (median) | egress-proxy / direct | egress-proxy / envoy |\n|---|---|---|---|---|---|\n",
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let mut ratios = BTreeMap::new();
    for (key, label, _) in ROWS {
        let ours = spreads.get("egress-proxy").and_then(|f| f.get(*key));
        let ours_s = ours.map_or("-".to_owned(), |s| {
            format!("{:.2} / **{:.2}** / {:.2}", s.min, s.median, s.max)
        });
        let d = median("direct", key);
        let e = median("envoy", key);
        let (rd, re) = ratio_table.get(key).copied().unwrap_or((None, None));
        ratios.insert(
            key.to_string(),
            serde_json::json!({"vs_direct": rd, "vs_envoy": re}),
        );
        table.push_str(&format!(
            "| {label} | {} | {ours_s} | {} | {} | {} |\n",
            fmt(d),
            fmt(e),
            rd.map_or("-".into(), |r| format!("{r:.2}x")),
            re.map_or("-".into(), |r| format!("{r:.2}x")),
        ));
    }
    for m in missing {
        table.push_str(&format!(
            "\n{m}: missing (could not be installed or started)\n"
        ));
    }
    println!("{table}");
    let json = serde_json::json!({
        "results": spreads,
        "ratios_median_of_per_run": ratios,
        "missing": missing,
        "table_markdown": table,
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_vec_pretty(&json)?)?;
    Ok(())
}
