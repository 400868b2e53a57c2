//! `egress-bench plot`: PNG curves next to a benchmark's JSON. From proxy.json: setup rate
//! and RSS against open tunnels, one line per path; from webhook.json: p50 and p99 latency
//! against connections, for the webhook and its baseline. Text is drawn with DejaVu Sans,
//! compiled in, so no system font or font library is needed.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;
use serde_json::Value;

/// Image size in pixels: readable on a laptop screen and in a pull request.
const SIZE: (u32, u32) = (1000, 640);
/// Font family name the charts ask for; `register_font` maps it to the embedded font.
const FAMILY: &str = "sans-serif";
/// Colour per path, fixed so a path looks the same in every chart.
const PALETTE: &[(&str, RGBColor)] = &[
    ("direct", RGBColor(120, 120, 120)),
    ("egress-proxy", RGBColor(214, 39, 40)),
    ("envoy", RGBColor(31, 119, 180)),
    ("squid", RGBColor(44, 160, 44)),
    ("tinyproxy", RGBColor(148, 103, 189)),
    ("webhook p50", RGBColor(214, 39, 40)),
    ("webhook p99", RGBColor(255, 127, 14)),
    ("baseline p50", RGBColor(31, 119, 180)),
    ("baseline p99", RGBColor(23, 190, 207)),
];

/// One point: x, then y as min, median, max over runs.
type Point = (f64, f64, f64, f64);

/// One line of a chart.
struct Series {
    /// Legend text; also picks the colour.
    label: String,
    /// Points in ascending x.
    points: Vec<Point>,
}

/// What one chart shows.
struct Chart<'a> {
    /// Title above the plot.
    title: &'a str,
    /// X axis description.
    x_desc: &'a str,
    /// Y axis description.
    y_desc: &'a str,
    /// Lines to draw.
    series: Vec<Series>,
    /// Corner of the legend: where the lines are not (rising curves leave the upper left
    /// free, falling ones the upper right).
    legend: SeriesLabelPosition,
}

/// Writes every chart the JSON at `input` supports; returns the files written.
pub fn plot(input: &Path) -> anyhow::Result<Vec<PathBuf>> {
    plotters::style::register_font(FAMILY, FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow!("the embedded font could not be loaded"))?;
    let doc: Value = serde_json::from_slice(
        &std::fs::read(input).with_context(|| format!("read {}", input.display()))?,
    )
    .with_context(|| format!("parse {}", input.display()))?;
    let stem = input
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("bench");
    let out = |curve: &str| input.with_file_name(format!("{stem}-{curve}.png"));
    let mut written = Vec::new();
    match doc.get("benchmark").and_then(Value::as_str) {
        Some("proxy") => {
            let (rate, rss) = proxy_series(&doc)?;
            for (curve, title, y_desc, series, legend) in [
                (
                    "setup-rate",
                    "Tunnel setups/s (64 workers) with N idle tunnels open",
                    "setups/s (median; bars: min-max)",
                    rate,
                    SeriesLabelPosition::UpperRight,
                ),
                (
                    "rss",
                    "Proxy resident memory with N idle tunnels open",
                    "RSS, MiB (median; bars: min-max)",
                    rss,
                    SeriesLabelPosition::UpperLeft,
                ),
            ] {
                let chart = Chart {
                    title,
                    x_desc: "idle tunnels held open (log)",
                    y_desc,
                    series,
                    legend,
                };
                let (_, hi) = y_bounds(&chart.series);
                written.push(draw(&out(curve), &chart, 0.0..hi * 1.1)?);
            }
        }
        Some("webhook") => {
            let chart = Chart {
                title: "Admission review latency (CNPG pod, TLS + HTTP/2)",
                x_desc: "concurrent connections (log)",
                y_desc: "latency, us (log; bars: min-max)",
                series: webhook_series(&doc)?,
                legend: SeriesLabelPosition::UpperLeft,
            };
            let (lo, hi) = y_bounds(&chart.series);
            written.push(draw(
                &out("latency"),
                &chart,
                (lo / 1.5..hi * 1.5).log_scale(),
            )?);
        }
        other => bail!("{}: unknown benchmark {other:?}", input.display()),
    }
    Ok(written)
}

/// (min, median, max) of a `{min, median, max}` object; a missing min or max is the median.
fn spread_of(v: Option<&Value>) -> Option<(f64, f64, f64)> {
    let v = v?;
    let median = v.get("median")?.as_f64()?;
    let or_median = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(median);
    Some((or_median("min"), median, or_median("max")))
}

/// Setup-rate and RSS (MiB) series per path from proxy.json.
fn proxy_series(doc: &Value) -> anyhow::Result<(Vec<Series>, Vec<Series>)> {
    let levels: Vec<f64> = doc
        .get("scale_levels")
        .and_then(Value::as_array)
        .context("proxy.json has no scale_levels")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    if levels.is_empty() {
        bail!("proxy.json has no scale levels to plot");
    }
    let results = doc
        .get("results")
        .and_then(Value::as_object)
        .context("proxy.json has no results")?;
    let (mut rate, mut rss) = (Vec::new(), Vec::new());
    for (name, _) in PALETTE {
        let Some(figs) = results.get(*name) else {
            continue;
        };
        let curve = |key: &dyn Fn(f64) -> String, div: f64| -> Vec<Point> {
            levels
                .iter()
                .filter_map(|&n| {
                    let (a, m, b) = spread_of(figs.get(key(n)))?;
                    Some((n, a / div, m / div, b / div))
                })
                .collect()
        };
        let r = curve(&|n| format!("scale_{n}_setup_rate_64w"), 1.0);
        if r.len() != levels.len() {
            bail!("{name}: proxy.json lacks setup rates at some scale level");
        }
        rate.push(Series {
            label: name.to_string(),
            points: r,
        });
        let m = curve(&|n| format!("scale_{n}_rss_kib"), 1024.0);
        if !m.is_empty() {
            rss.push(Series {
                label: name.to_string(),
                points: m,
            });
        }
    }
    if rate.is_empty() {
        bail!("proxy.json has no path to plot");
    }
    Ok((rate, rss))
}

/// p50 and p99 series of the webhook and its baseline from webhook.json.
fn webhook_series(doc: &Value) -> anyhow::Result<Vec<Series>> {
    let rows = doc
        .get("rows")
        .and_then(Value::as_array)
        .context("webhook.json has no rows")?;
    if rows.is_empty() {
        bail!("webhook.json has no rows to plot");
    }
    let mut series = Vec::new();
    for (label, key) in [
        ("webhook p50", "p50_us"),
        ("webhook p99", "p99_us"),
        ("baseline p50", "baseline_p50_us"),
        ("baseline p99", "baseline_p99_us"),
    ] {
        let mut points = Vec::new();
        for row in rows {
            let conns = row
                .get("connections")
                .and_then(Value::as_f64)
                .context("webhook.json row without connections")?;
            let (a, m, b) = spread_of(row.get(key))
                .with_context(|| format!("webhook.json row without {key}"))?;
            points.push((conns, a, m, b));
        }
        series.push(Series {
            label: label.to_owned(),
            points,
        });
    }
    Ok(series)
}

/// Lowest min and highest max over every series, floored above zero for log axes.
fn y_bounds(series: &[Series]) -> (f64, f64) {
    let all = series.iter().flat_map(|s| s.points.iter());
    let lo = all.clone().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all.map(|p| p.3).fold(0.0, f64::max);
    (lo.max(1e-3).min(hi.max(1.0)), hi.max(1.0))
}

/// X range covering every point with a margin, as a log axis.
fn x_range(series: &[Series]) -> std::ops::Range<f64> {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(0.0, f64::max);
    (lo.max(1.0) / 1.6)..(hi.max(1.0) * 1.6)
}

/// An axis label with no more digits than it needs.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 10.0 || a == 0.0 => format!("{v:.0}"),
        a if a >= 1.0 => format!("{v:.1}"),
        _ => format!("{v:.2}"),
    }
}

fn color_of(label: &str) -> RGBColor {
    PALETTE
        .iter()
        .find(|(l, _)| *l == label)
        .map_or(BLACK, |(_, c)| *c)
}

/// Draws one chart with a log x axis and the given y axis; returns the file written.
fn draw<Y>(out: &Path, chart: &Chart<'_>, y: Y) -> anyhow::Result<PathBuf>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(chart.title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(x_range(&chart.series).log_scale(), y)?;
    ctx.configure_mesh()
        .x_desc(chart.x_desc)
        .y_desc(chart.y_desc)
        .axis_desc_style((FAMILY, 20))
        .label_style((FAMILY, 16))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| short(*v))
        .y_labels(12)
        .max_light_lines(4)
        .draw()?;
    for s in &chart.series {
        let color = color_of(&s.label);
        let line = s.points.iter().map(|p| (p.0, p.2));
        ctx.draw_series(LineSeries::new(line, color.stroke_width(3)))?
            .label(s.label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        ctx.draw_series(
            s.points
                .iter()
                .map(|p| Circle::new((p.0, p.2), 5, color.filled())),
        )?;
        ctx.draw_series(
            s.points
                .iter()
                .map(|p| ErrorBar::new_vertical(p.0, p.1, p.2, p.3, color.stroke_width(2), 12)),
        )?;
    }
    ctx.configure_series_labels()
        .label_font((FAMILY, 18))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(chart.legend.clone())
        .draw()?;
    root.present()
        .with_context(|| format!("write {}", out.display()))?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn draws_every_chart_from_small_documents() {
        let dir = std::env::temp_dir().join(format!("egress-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = |m: f64| json!({"min": m * 0.9, "median": m, "max": m * 1.1, "runs": 3});
        let proxy = json!({
            "benchmark": "proxy",
            "scale_levels": [100, 1000],
            "results": {
                "direct": {"scale_100_setup_rate_64w": s(9000.0), "scale_1000_setup_rate_64w": s(8000.0)},
                "egress-proxy": {
                    "scale_100_setup_rate_64w": s(5000.0), "scale_1000_setup_rate_64w": s(4500.0),
                    "scale_100_rss_kib": s(9000.0), "scale_1000_rss_kib": s(12000.0)
                }
            }
        });
        let webhook = json!({"benchmark": "webhook", "rows": [
            {"connections": 1, "p50_us": s(150.0), "p99_us": s(300.0), "baseline_p50_us": {"median": 60.0}, "baseline_p99_us": s(120.0)},
            {"connections": 8, "p50_us": s(600.0), "p99_us": s(1300.0), "baseline_p50_us": {"median": 200.0}, "baseline_p99_us": s(400.0)}
        ]});
        for (name, doc) in [("proxy.json", proxy), ("webhook.json", webhook)] {
            let path = dir.join(name);
            std::fs::write(&path, doc.to_string()).unwrap();
            for png in plot(&path).unwrap() {
                let bytes = std::fs::read(&png).unwrap();
                assert!(bytes.starts_with(b"\x89PNG"), "{}", png.display());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_level_is_an_error() {
        let doc = json!({"benchmark": "proxy", "scale_levels": [100], "results": {"direct": {}}});
        assert!(proxy_series(&doc).is_err());
    }
}
