//! `egress-bench report`: min/median/max over runs per path and figure, egress-proxy's
//! ratio to every other path run by run, target/bench/proxy.json and a Markdown table.
//! It fails when the harness broke (an expected path or figure is absent), never on speed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::json;

use crate::scenarios::RunResult;
use crate::stats::{Spread, spread};

/// The path measured against everything else.
const OURS: &str = "egress-proxy";
/// The path without a proxy: the physical limit of the machine and the harness.
const DIRECT: &str = "direct";
/// Column order of the table: direct first, egress-proxy, then the peers.
const ORDER: &[&str] = &[DIRECT, OURS, "envoy", "squid", "tinyproxy"];

/// What `report` is given.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Result files (`run` output), any number per path name.
    pub inputs: Vec<PathBuf>,
    /// Combined JSON output.
    #[arg(long)]
    pub out: PathBuf,
    /// Markdown output (the tables, also printed).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Names of peers that could not be installed (reported as missing).
    #[arg(long)]
    pub missing: Vec<String>,
    /// Paths that must each have results or be listed as missing.
    #[arg(long, value_delimiter = ',')]
    pub expect: Vec<String>,
    /// Levels of the scale curve that every path must have figures for.
    #[arg(long, value_delimiter = ',')]
    pub scale: Vec<usize>,
    /// Free-text lines about the run (machine, versions, load), kept in JSON and Markdown.
    #[arg(long)]
    pub note: Vec<String>,
}

/// One row of a table.
pub(crate) struct Row {
    /// Figure name in the run results.
    pub(crate) key: String,
    /// What the reader sees.
    label: String,
    /// Whether `direct` has this figure (it has no proxy, so no proxy CPU or RSS).
    direct_too: bool,
    /// Divisor from the stored unit to the shown one (KiB -> MiB).
    div: f64,
    /// Whether egress-proxy's ratio to the others means anything (not for the harness's
    /// own CPU share or the machine's load, which only say how the run went).
    ratio: bool,
}

impl Row {
    pub(crate) fn new(key: impl Into<String>, label: impl Into<String>, direct_too: bool) -> Self {
        Self {
            key: key.into(),
            label: label.into(),
            direct_too,
            div: 1.0,
            ratio: true,
        }
    }

    /// A row that describes the run rather than compares paths: no ratio column.
    pub(crate) fn diagnostic(self) -> Self {
        Self {
            ratio: false,
            ..self
        }
    }
}

/// The main table's rows.
fn main_rows() -> Vec<Row> {
    vec![
        Row::new("bulk1_gbps", "1 tunnel bulk, Gbit/s", true),
        Row::new("bulk16_gbps", "16 tunnels bulk, Gbit/s", true),
        Row::new("setup_rate_64w", "tunnel setups/s, 64 workers", true),
        Row::new("setup_p50_us_1w", "setup p50 us, 1 worker", true),
        Row::new("rtt_p50_us", "64 B round trip p50 us", true),
        Row::new("rtt_p99_us", "64 B round trip p99 us", true),
        Row::new("idle_rss_kib_per_tunnel", "RSS KiB per idle tunnel", false),
        Row::new(
            "bulk1_proxy_cpu_s_per_gib",
            "proxy CPU s per GiB (1 tunnel)",
            false,
        ),
        Row::new(
            "bulk1_generator_cpu_share",
            "generator CPU share (1 tunnel)",
            true,
        )
        .diagnostic(),
        Row::new("bulk1_sink_cpu_share", "sink CPU share (1 tunnel)", true).diagnostic(),
        Row::new(
            "setup_rate_64w_proxy_cpu_share",
            "proxy CPU share (setup rate)",
            false,
        ),
        Row::new(
            "setup_rate_64w_generator_cpu_share",
            "generator CPU share (setup rate)",
            true,
        )
        .diagnostic(),
        Row::new(
            "loadavg_1m",
            "machine load average (1 min) at run start",
            true,
        )
        .diagnostic(),
    ]
}

/// The scale table's rows: setup rate and RSS at each level, then the generator's share.
fn scale_rows(levels: &[usize]) -> Vec<Row> {
    let mut rows = Vec::new();
    for &n in levels {
        rows.push(Row::new(
            format!("scale_{n}_setup_rate_64w"),
            format!("setups/s, 64 workers, {n} tunnels open"),
            true,
        ));
    }
    for &n in levels {
        rows.push(Row {
            div: 1024.0,
            ..Row::new(
                format!("scale_{n}_rss_kib"),
                format!("proxy RSS MiB, {n} tunnels open"),
                false,
            )
        });
    }
    if let Some(n) = levels.last() {
        rows.push(
            Row::new(
                format!("scale_{n}_setup_rate_64w_generator_cpu_share"),
                format!("generator CPU share (setup rate, {n} open)"),
                true,
            )
            .diagnostic(),
        );
    }
    rows
}

/// figure -> values over runs, in run order.
pub(crate) type Figures = BTreeMap<String, Vec<f64>>;

/// Combines the run results; see the module comment.
pub fn report(args: &ReportArgs) -> anyhow::Result<()> {
    let mut by_name: BTreeMap<String, Figures> = BTreeMap::new();
    let mut targets: BTreeMap<String, String> = BTreeMap::new();
    for path in &args.inputs {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let r: RunResult =
            serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
        let entry = by_name.entry(r.name.clone()).or_default();
        for (k, v) in r.figures {
            entry.entry(k).or_default().push(v);
        }
        targets.insert(r.name, r.connect_target);
    }
    let mut paths: Vec<String> = ORDER.iter().map(|s| s.to_string()).collect();
    paths.extend(
        by_name
            .keys()
            .filter(|n| !ORDER.contains(&n.as_str()))
            .cloned(),
    );
    for m in &args.missing {
        if !paths.contains(m) {
            paths.push(m.clone());
        }
    }
    paths.retain(|p| by_name.contains_key(p) || args.missing.contains(p));

    let main = main_rows();
    let scale = scale_rows(&args.scale);
    check(args, &by_name, main.iter().chain(&scale))?;

    let spreads: BTreeMap<&str, BTreeMap<&str, Spread>> = by_name
        .iter()
        .map(|(n, figs)| {
            let s = figs.iter().map(|(k, v)| (k.as_str(), spread(v.clone())));
            (n.as_str(), s.collect())
        })
        .collect();
    let mut ratios = BTreeMap::new();
    for row in main.iter().chain(&scale) {
        let per_base: BTreeMap<String, Option<f64>> = paths
            .iter()
            .filter(|p| *p != OURS)
            .map(|p| (format!("vs_{p}"), per_run_ratio(&by_name, &row.key, p)))
            .collect();
        ratios.insert(row.key.clone(), per_base);
    }

    let mut md = String::from("## bench-proxy\n\n");
    for n in &args.note {
        let _ = writeln!(md, "- {n}");
    }
    let mut by_target: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, target) in targets.iter().filter(|(_, t)| !t.is_empty()) {
        by_target.entry(target).or_default().push(name);
    }
    for (target, names) in by_target {
        let _ = writeln!(md, "- CONNECT target of {}: `{target}`", names.join(", "));
    }
    md.push_str("\nEach cell: median (min-max) over runs. Ratios: egress-proxy / other, run by run, then the median.\n\n");
    table(&mut md, &paths, &main, &spreads, &ratios, args);
    md.push_str("\nScale curve: N idle tunnels held open, then the setup rate on top of them.\n\n");
    table(&mut md, &paths, &scale, &spreads, &ratios, args);
    for p in &args.missing {
        let _ = writeln!(md, "\n{p}: missing (could not be installed)");
    }
    for (name, figs) in &by_name {
        for note in scale_shortfalls(figs, &args.scale) {
            let _ = writeln!(md, "\n{name}: {note}");
        }
    }
    println!("{md}");

    let doc = json!({
        "benchmark": "proxy",
        "results": spreads,
        "ratios_median_of_per_run": ratios,
        "missing": args.missing,
        "connect_targets": targets,
        "scale_levels": args.scale,
        "notes": args.note,
        "table_markdown": md,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    if let Some(path) = &args.markdown {
        std::fs::write(path, &md).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Fails when the harness broke: an expected path with neither results nor a `missing`
/// mark, or a path lacking a figure that applies to it, or one that is not a number.
pub(crate) fn check<'a>(
    args: &ReportArgs,
    by_name: &BTreeMap<String, Figures>,
    rows: impl Iterator<Item = &'a Row>,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for e in &args.expect {
        if !by_name.contains_key(e) && !args.missing.contains(e) {
            problems.push(format!("{e}: no results and not reported missing"));
        }
    }
    let rows: Vec<&Row> = rows.collect();
    for (name, figs) in by_name {
        for row in rows.iter().filter(|r| r.direct_too || name != DIRECT) {
            match figs.get(&row.key) {
                Some(v) if !v.is_empty() && v.iter().all(|x| x.is_finite()) => {}
                Some(_) => problems.push(format!("{name}: {} is not a number", row.key)),
                None => problems.push(format!("{name}: {} is absent", row.key)),
            }
        }
    }
    if !problems.is_empty() {
        bail!("the benchmark harness broke:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// Levels where a path held fewer tunnels than asked, or tunnels died before the end.
fn scale_shortfalls(figs: &Figures, levels: &[usize]) -> Vec<String> {
    let mut notes = Vec::new();
    let min = |k: &str| figs.get(k).and_then(|v| v.iter().copied().reduce(f64::min));
    for &n in levels {
        if let Some(open) = min(&format!("scale_{n}_open_tunnels"))
            && open < n as f64
        {
            notes.push(format!("held only {open} of {n} tunnels in some run"));
        }
    }
    if let (Some(&n), Some(alive)) = (levels.last(), min("scale_alive_at_end"))
        && alive < n as f64
    {
        notes.push(format!(
            "only {alive} of {n} idle tunnels still answered at the end"
        ));
    }
    notes
}

/// Median over runs of egress-proxy's figure divided by `base`'s in the same run: on a
/// shared machine the load drifts between runs, and a ratio of medians would mix moments.
pub(crate) fn per_run_ratio(
    by_name: &BTreeMap<String, Figures>,
    key: &str,
    base: &str,
) -> Option<f64> {
    let ours = by_name.get(OURS)?.get(key)?;
    let theirs = by_name.get(base)?.get(key)?;
    let r: Vec<f64> = ours
        .iter()
        .zip(theirs)
        .filter(|(_, b)| **b != 0.0)
        .map(|(a, b)| a / b)
        .collect();
    (!r.is_empty()).then(|| spread(r).median)
}

/// A value with as many decimals as its size deserves.
fn num(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

/// One Markdown table: a column per path, then egress-proxy's ratio to every other path.
pub(crate) fn table(
    md: &mut String,
    paths: &[String],
    rows: &[Row],
    spreads: &BTreeMap<&str, BTreeMap<&str, Spread>>,
    ratios: &BTreeMap<String, BTreeMap<String, Option<f64>>>,
    args: &ReportArgs,
) {
    let others: Vec<&String> = paths.iter().filter(|p| *p != OURS).collect();
    md.push_str("| figure |");
    for p in paths {
        let _ = write!(md, " {p} |");
    }
    for p in &others {
        let _ = write!(md, " {OURS} / {p} |");
    }
    md.push('\n');
    md.push_str(&"|---".repeat(1 + paths.len() + others.len()));
    md.push_str("|\n");
    for row in rows {
        let _ = write!(md, "| {} |", row.label);
        for p in paths {
            let cell = match spreads
                .get(p.as_str())
                .and_then(|f| f.get(row.key.as_str()))
            {
                _ if args.missing.contains(p) => "missing".to_owned(),
                None => "-".to_owned(),
                Some(s) => {
                    let m = num(s.median / row.div);
                    let m = if p == OURS { format!("**{m}**") } else { m };
                    if s.runs > 1 {
                        format!("{m} ({}-{})", num(s.min / row.div), num(s.max / row.div))
                    } else {
                        m
                    }
                }
            };
            let _ = write!(md, " {cell} |");
        }
        for p in &others {
            let r = ratios
                .get(&row.key)
                .filter(|_| row.ratio)
                .and_then(|r| r.get(&format!("vs_{p}")).copied().flatten());
            let _ = write!(
                md,
                " {} |",
                r.map_or("-".to_owned(), |r| format!("{r:.2}x"))
            );
        }
        md.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figs(pairs: &[(&str, f64)]) -> Figures {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), vec![*v]))
            .collect()
    }

    fn args(expect: &[&str], missing: &[&str]) -> ReportArgs {
        ReportArgs {
            inputs: Vec::new(),
            out: PathBuf::from("unused"),
            markdown: None,
            missing: missing.iter().map(|s| s.to_string()).collect(),
            expect: expect.iter().map(|s| s.to_string()).collect(),
            scale: vec![100],
            note: Vec::new(),
        }
    }

    #[test]
    fn a_missing_figure_breaks_the_harness() {
        let rows = scale_rows(&[100]);
        let mut by_name = BTreeMap::new();
        by_name.insert(
            "squid".to_owned(),
            figs(&[("scale_100_setup_rate_64w", 1.0)]),
        );
        let err = check(&args(&[], &[]), &by_name, rows.iter()).unwrap_err();
        assert!(
            err.to_string()
                .contains("squid: scale_100_rss_kib is absent")
        );
    }

    #[test]
    fn direct_needs_no_proxy_figures_and_missing_peers_pass() {
        let rows = scale_rows(&[100]);
        let mut by_name = BTreeMap::new();
        by_name.insert(
            DIRECT.to_owned(),
            figs(&[
                ("scale_100_setup_rate_64w", 1.0),
                ("scale_100_setup_rate_64w_generator_cpu_share", 0.5),
            ]),
        );
        assert!(
            check(
                &args(&["direct", "tinyproxy"], &["tinyproxy"]),
                &by_name,
                rows.iter()
            )
            .is_ok()
        );
        let err = check(&args(&["squid"], &[]), &by_name, rows.iter()).unwrap_err();
        assert!(err.to_string().contains("squid: no results"));
    }

    #[test]
    fn ratios_are_per_run() {
        let mut by_name = BTreeMap::new();
        by_name.insert(
            OURS.to_owned(),
            BTreeMap::from([("x".to_owned(), vec![2.0, 9.0, 4.0])]),
        );
        by_name.insert(
            "envoy".to_owned(),
            BTreeMap::from([("x".to_owned(), vec![1.0, 3.0, 4.0])]),
        );
        // Per run: 2, 3, 1 -> median 2 (a ratio of medians would say 4 / 3).
        assert_eq!(per_run_ratio(&by_name, "x", "envoy"), Some(2.0));
    }

    #[test]
    fn shortfalls_are_noted() {
        let f = figs(&[
            ("scale_100_open_tunnels", 90.0),
            ("scale_alive_at_end", 80.0),
        ]);
        assert_eq!(scale_shortfalls(&f, &[100]).len(), 2);
        assert!(scale_shortfalls(&figs(&[("scale_100_open_tunnels", 100.0)]), &[100]).is_empty());
    }
}
