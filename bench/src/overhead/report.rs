//! The printed table and the raw per-request files.

use std::fmt::Write as _;
use std::path::Path;

use super::gateway::PHASES;
use super::load::Run;
use super::run::RatePoint;

/// Every request of a run as CSV: scheduled send (ms from the run's start), latency (ms), ok.
pub fn write_raw(path: &Path, run: &Run) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = String::from("scheduled_ms,latency_ms,ok\n");
    for (at, latency, ok) in &run.samples {
        let _ = writeln!(
            out,
            "{:.3},{:.3},{}",
            at.as_secs_f64() * 1e3,
            latency.as_secs_f64() * 1e3,
            u8::from(*ok)
        );
    }
    std::fs::write(path, out)
}

/// Writes a JSON result file.
pub fn write_json(path: &Path, doc: &serde_json::Value) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write(path, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3} ms"))
}

pub fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

pub fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "-".into())
}

/// One table row: the cells right-aligned under the header's widths, the path left-aligned.
fn row(out: &mut String, cells: &[String]) {
    const WIDTHS: [usize; 15] = [7, 8, 6, 6, 6, 10, 8, 8, 8, 8, 9, 7, 7, 6, 6];
    for (i, (c, w)) in cells.iter().zip(WIDTHS).enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = if i == 1 {
            write!(out, "{sep}{c:<w$}")
        } else {
            write!(out, "{sep}{c:>w$}")
        };
    }
    let _ = writeln!(out);
}

/// The table's two header rows: the columns and their units.
const HEAD: [[&str; 15]; 2] = [
    [
        "rate/s",
        "path",
        "sent",
        "ok",
        "errors",
        "achieved/s",
        "p50",
        "p99",
        "p99.9",
        "max",
        "sustained",
        "gw CPU",
        "ledger",
        "others",
        "steal",
    ],
    [
        "", "", "", "", "", "", "ms", "ms", "ms", "ms", "", "µs/req", "wait ms", "CPU %", "CPU %",
    ],
];

/// Both paths at every rate, the `added` rows, and the metering phases through the gateway.
pub fn table(points: &[RatePoint]) -> String {
    let mut out = String::new();
    for head in HEAD {
        row(&mut out, &head.map(str::to_string));
    }
    for p in points {
        for (name, r) in [("direct", &p.direct), ("gateway", &p.gateway)] {
            let gateway_cpu = if name == "gateway" {
                cell(r.gateway_cpu_us_per_request(), 0)
            } else {
                String::new()
            };
            row(
                &mut out,
                &[
                    format!("{:.0}", r.rate),
                    name.to_string(),
                    r.sent.to_string(),
                    r.ok.to_string(),
                    r.error_count().to_string(),
                    format!("{:.1}", r.achieved()),
                    cell(r.quantile_ms(0.50), 3),
                    cell(r.quantile_ms(0.99), 3),
                    cell(r.quantile_ms(0.999), 3),
                    cell(r.max_ms(), 3),
                    (if r.sustained() { "yes" } else { "NO" }).to_string(),
                    gateway_cpu,
                    cell(r.record_wait_ms(), 3),
                    cell(r.cpu.others_pct, 0),
                    cell(r.cpu.steal_pct, 0),
                ],
            );
        }
        let (g, d) = (&p.gateway, &p.direct);
        let added = |q| cell(diff(g.quantile_ms(q), d.quantile_ms(q)), 3);
        let blank = String::new;
        row(
            &mut out,
            &[
                format!("{:.0}", g.rate),
                "added".into(),
                blank(),
                blank(),
                blank(),
                blank(),
                added(0.50),
                added(0.99),
                added(0.999),
            ],
        );
    }
    phases(&mut out, points);
    out
}

/// The metering phases through the gateway at each rate that has them.
fn phases(out: &mut String, points: &[RatePoint]) {
    if points.iter().any(|p| !p.gateway.phases.is_empty()) {
        out.push_str(
            "\nmetering phases through the gateway (mean ms / the bucket bound under which 99% fall):\n",
        );
        for p in points.iter().filter(|p| !p.gateway.phases.is_empty()) {
            let _ = write!(out, "{:>7.0}", p.gateway.rate);
            for (name, h) in PHASES.iter().zip(&p.gateway.phases) {
                let _ = write!(
                    out,
                    "  {name} {} / p99 ≤ {}",
                    cell(h.mean_ms(), 3),
                    cell(h.quantile_bound_ms(0.99), 3)
                );
            }
            out.push('\n');
        }
    }
}
