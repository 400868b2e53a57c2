//! `egress-bench blob report`: the blob runs combined into target/bench/blob.json and
//! blob.md, in the CONNECT report's form (min/median/max over runs, egress-proxy's ratio to
//! every other path run by run), plus the targets against Envoy, each met or missed.
//! It fails when the harness broke (an expected path or figure is absent), never on speed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use serde_json::json;

use crate::report::{Figures, ReportArgs, Row, check, per_run_ratio, table};
use crate::scenarios::RunResult;
use crate::stats::{Spread, spread};

/// The peer the targets are set against.
const PEER: &str = "envoy";
/// Column order: the upstream straight, the gateway, Envoy.
const ORDER: &[&str] = &["direct", "egress-proxy", PEER];

/// One of the targets: egress-proxy's figure over Envoy's, run by run.
struct Target {
    /// Figure name.
    key: &'static str,
    /// What the reader sees.
    label: &'static str,
    /// The bound on the ratio.
    bound: f64,
    /// Whether the ratio must be at least `bound` (throughput) or at most (CPU, latency).
    at_least: bool,
}

/// The targets (issue 13, "Benchmark").
const TARGETS: &[Target] = &[
    Target {
        key: "upload_gbps",
        label: "upload throughput",
        bound: 1.2,
        at_least: true,
    },
    Target {
        key: "download_gbps",
        label: "download throughput",
        bound: 1.2,
        at_least: true,
    },
    Target {
        key: "upload_proxy_cpu_s_per_gib",
        label: "CPU per GiB, upload",
        bound: 0.8,
        at_least: false,
    },
    Target {
        key: "download_proxy_cpu_s_per_gib",
        label: "CPU per GiB, download",
        bound: 0.8,
        at_least: false,
    },
    Target {
        key: "small_get_p50_us",
        label: "small GET p50",
        bound: 1.5,
        at_least: false,
    },
];

/// The table's rows.
fn rows() -> Vec<Row> {
    let mut rows = vec![
        Row::new(
            "upload_gbps",
            "upload Gbit/s (Put Blob, 1 connection)",
            true,
        ),
        Row::new(
            "download_gbps",
            "download Gbit/s (Get Blob, 1 connection)",
            true,
        ),
        Row::new(
            "upload_proxy_cpu_s_per_gib",
            "proxy CPU s per GiB, upload",
            false,
        ),
        Row::new(
            "download_proxy_cpu_s_per_gib",
            "proxy CPU s per GiB, download",
            false,
        ),
        Row::new("small_get_p50_us", "small GET (1 KiB) p50 us", true),
        Row::new("small_get_p99_us", "small GET (1 KiB) p99 us", true),
        Row::new(
            "small_get_proxy_cpu_us_per_req",
            "proxy CPU us per small GET",
            false,
        ),
    ];
    for dir in ["upload", "download", "small_get"] {
        for (role, direct_too) in [("proxy", false), ("generator", true), ("sink", true)] {
            let what = if role == "sink" { "upstream" } else { role };
            rows.push(
                Row::new(
                    format!("{dir}_{role}_cpu_share"),
                    format!("{what} CPU share ({})", dir.replace('_', " ")),
                    direct_too,
                )
                .diagnostic(),
            );
        }
    }
    rows.push(
        Row::new(
            "loadavg_1m",
            "machine load average (1 min) at run start",
            true,
        )
        .diagnostic(),
    );
    rows
}

/// Combines the blob runs; see the module comment.
pub fn report(args: &ReportArgs) -> anyhow::Result<()> {
    let mut by_name: BTreeMap<String, Figures> = BTreeMap::new();
    for path in &args.inputs {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let r: RunResult =
            serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
        let entry = by_name.entry(r.name).or_default();
        for (k, v) in r.figures {
            entry.entry(k).or_default().push(v);
        }
    }
    let paths: Vec<String> = ORDER
        .iter()
        .map(|s| s.to_string())
        .chain(
            by_name
                .keys()
                .filter(|n| !ORDER.contains(&n.as_str()))
                .cloned(),
        )
        .filter(|p| by_name.contains_key(p) || args.missing.contains(p))
        .collect();
    let rows = rows();
    check(args, &by_name, rows.iter())?;

    let spreads: BTreeMap<&str, BTreeMap<&str, Spread>> = by_name
        .iter()
        .map(|(n, figs)| {
            let s = figs.iter().map(|(k, v)| (k.as_str(), spread(v.clone())));
            (n.as_str(), s.collect())
        })
        .collect();
    let mut ratios = BTreeMap::new();
    for row in &rows {
        let per_base: BTreeMap<String, Option<f64>> = paths
            .iter()
            .filter(|p| *p != "egress-proxy")
            .map(|p| (format!("vs_{p}"), per_run_ratio(&by_name, &row.key, p)))
            .collect();
        ratios.insert(row.key.clone(), per_base);
    }

    let mut md = String::from("## bench-blob\n\n");
    for n in &args.note {
        let _ = writeln!(md, "- {n}");
    }
    md.push_str("\nEach cell: median (min-max) over runs. Ratios: egress-proxy / other, run by run, then the median.\n\n");
    table(&mut md, &paths, &rows, &spreads, &ratios, args);
    let verdicts = targets(&by_name);
    md.push_str("\nTargets (egress-proxy / envoy, median of the per-run ratios):\n\n");
    md.push_str("| target | bound | ratio | |\n|---|---|---|---|\n");
    for (t, ratio) in &verdicts {
        let bound = format!("{} {:.1}x", if t.at_least { ">=" } else { "<=" }, t.bound);
        let (shown, verdict) = match ratio {
            Some(r) if (t.at_least && *r >= t.bound) || (!t.at_least && *r <= t.bound) => {
                (format!("{r:.2}x"), "met")
            }
            Some(r) => (format!("{r:.2}x"), "missed"),
            None => ("-".to_owned(), "not measured"),
        };
        let _ = writeln!(md, "| {} | {bound} | {shown} | {verdict} |", t.label);
    }
    for p in &args.missing {
        let _ = writeln!(md, "\n{p}: missing (could not be installed)");
    }
    println!("{md}");

    let target_json: BTreeMap<&str, serde_json::Value> = verdicts
        .iter()
        .map(|(t, r)| {
            let v = json!({"ratio": r, "bound": t.bound, "at_least": t.at_least});
            (t.key, v)
        })
        .collect();
    let doc = json!({
        "benchmark": "blob",
        "results": spreads,
        "ratios_median_of_per_run": ratios,
        "targets_vs_envoy": target_json,
        "missing": args.missing,
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

/// Every target with egress-proxy's ratio to Envoy (None when Envoy is missing).
fn targets(by_name: &BTreeMap<String, Figures>) -> Vec<(&'static Target, Option<f64>)> {
    TARGETS
        .iter()
        .map(|t| (t, per_run_ratio(by_name, t.key, PEER)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn args(expect: &[&str], missing: &[&str]) -> ReportArgs {
        ReportArgs {
            inputs: Vec::new(),
            out: PathBuf::from("unused"),
            markdown: None,
            missing: missing.iter().map(|s| s.to_string()).collect(),
            expect: expect.iter().map(|s| s.to_string()).collect(),
            scale: Vec::new(),
            note: Vec::new(),
        }
    }

    #[test]
    fn a_path_without_a_figure_breaks_the_harness() {
        let mut by_name = BTreeMap::new();
        by_name.insert(
            "egress-proxy".to_owned(),
            BTreeMap::from([("upload_gbps".to_owned(), vec![1.0])]),
        );
        let err = check(&args(&[], &[]), &by_name, rows().iter()).unwrap_err();
        assert!(
            err.to_string()
                .contains("egress-proxy: download_gbps is absent")
        );
        let err = check(&args(&["envoy"], &[]), &by_name, rows().iter()).unwrap_err();
        assert!(err.to_string().contains("envoy: no results"));
    }

    #[test]
    fn targets_use_envoy_run_by_run() {
        let mut by_name = BTreeMap::new();
        by_name.insert(
            "egress-proxy".to_owned(),
            BTreeMap::from([("upload_gbps".to_owned(), vec![3.0, 2.0])]),
        );
        by_name.insert(
            PEER.to_owned(),
            BTreeMap::from([("upload_gbps".to_owned(), vec![2.0, 2.0])]),
        );
        let t = targets(&by_name);
        let upload = t.iter().find(|(t, _)| t.key == "upload_gbps");
        // Per run 1.5 and 1.0: the median of two is the upper one.
        assert_eq!(upload.and_then(|(_, r)| *r), Some(1.5));
        assert!(
            t.iter()
                .any(|(t, r)| t.key == "download_gbps" && r.is_none())
        );
    }
}
