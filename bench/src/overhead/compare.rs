//! `--baseline`: today's gateway (`--binary`) against an older one, alternately in one run
//! (round 1 runs today's first, round 2 the older one first, and so on), each round a whole
//! benchmark of the listed rates (no search) with its own gateway, ledger and upstream; then
//! the medians over the rounds and their ratios (today's ÷ the older one's: below 1 is less).

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::report::{diff, write_json};
use super::run::{header, measure_binary, mode, RatePoint};
use super::Options;

/// One whole benchmark of one binary.
struct Round {
    today: bool,
    round: u32,
    points: Vec<RatePoint>,
    metering_ok: Option<bool>,
    load: (String, String),
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// One figure of one rate: its value in each round of each binary.
fn figure(rounds: &[Round], today: bool, rate: f64, f: fn(&RatePoint) -> Option<f64>) -> Vec<f64> {
    rounds
        .iter()
        .filter(|r| r.today == today)
        .filter_map(|r| r.points.iter().find(|p| p.gateway.rate == rate))
        .filter_map(f)
        .collect()
}

fn cpu(p: &RatePoint) -> Option<f64> {
    p.gateway.gateway_cpu_us_per_request()
}

fn added_p50(p: &RatePoint) -> Option<f64> {
    diff(p.gateway.quantile_ms(0.50), p.direct.quantile_ms(0.50))
}

fn added_p99(p: &RatePoint) -> Option<f64> {
    diff(p.gateway.quantile_ms(0.99), p.direct.quantile_ms(0.99))
}

fn errors(p: &RatePoint) -> Option<f64> {
    Some(p.gateway.error_count() as f64)
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b > 0.0).then(|| a / b)
}

/// Runs both binaries alternately and prints (and with `--json` writes) the comparison.
pub async fn compare(opts: &Options, today: &Path, older: &Path) -> anyhow::Result<()> {
    let mut opts = opts.clone();
    opts.no_search = true;
    let rounds = run_rounds(&opts, today, older).await?;
    let mut out = String::new();
    out.push_str(&format!("{}\n", header(&opts)));
    out.push_str(&format!(
        "today's binary: {}\nolder binary:   {}\n{} rounds, alternating (odd rounds today's first)\n\n",
        today.display(),
        older.display(),
        opts.rounds
    ));
    let summary = summarize(&opts, &rounds, &mut out);
    let ledger_ok = rounds.iter().all(|r| r.metering_ok != Some(false));
    out.push_str(&format!(
        "\nledger check (one record per request answered) in every run: {}\n",
        if ledger_ok { "OK" } else { "MISMATCH" }
    ));
    for r in &rounds {
        out.push_str(&format!(
            "round {} {}: load average before {}, after {}\n",
            r.round,
            if r.today { "today's" } else { "older" },
            r.load.0,
            r.load.1
        ));
    }
    print!("{out}");
    if let Some(path) = &opts.json {
        let doc = json!({
            "mode": mode(&opts),
            "metering": opts.metering(),
            "gateway_log": opts.gateway_log,
            "duration_secs": opts.duration.as_secs_f64(),
            "warmup_secs": opts.warmup.as_secs_f64(),
            "today": today.display().to_string(),
            "older": older.display().to_string(),
            "rounds": opts.rounds,
            "summary": summary,
            "runs": rounds.iter().map(round_json).collect::<Vec<_>>(),
            "provenance": crate::provenance::provenance(),
        });
        write_json(path, &doc)?;
    }
    if !ledger_ok {
        bail!("a ledger does not hold one record per gateway request");
    }
    Ok(())
}

/// The rounds, each a whole benchmark of both binaries: odd rounds today's first.
async fn run_rounds(opts: &Options, today: &Path, older: &Path) -> anyhow::Result<Vec<Round>> {
    let mut rounds = Vec::new();
    for round in 1..=opts.rounds {
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for is_today in order {
            let binary = if is_today { today } else { older };
            let (points, metering, load, _) = measure_binary(opts, binary)
                .await
                .with_context(|| format!("round {round}, {}", binary.display()))?;
            rounds.push(Round {
                today: is_today,
                round,
                points,
                metering_ok: metering.map(|m| m.ok),
                load,
            });
        }
    }
    Ok(rounds)
}

/// The table of each rate's figures, each round's and the ratio of their medians, written to
/// `out`; returns its rows as JSON.
fn summarize(opts: &Options, rounds: &[Round], out: &mut String) -> Vec<Value> {
    out.push_str(
        " rate/s  figure                      today (each round)         older (each round)         \
         today ÷ older (medians)\n",
    );
    let mut summary = Vec::new();
    for &rate in &opts.rates {
        let mut row = json!({"rate": rate});
        for (name, f, decimals) in [
            (
                "gateway_cpu_us_per_request",
                cpu as fn(&RatePoint) -> Option<f64>,
                0,
            ),
            ("added_p50_ms", added_p50, 3),
            ("added_p99_ms", added_p99, 3),
            ("gateway_errors", errors, 0),
        ] {
            let (a, b) = (
                figure(rounds, true, rate, f),
                figure(rounds, false, rate, f),
            );
            let r = ratio(median(a.clone()), median(b.clone()));
            out.push_str(&format!(
                "{rate:>7.0}  {name:<26}  {:<25}  {:<25}  {}\n",
                list(&a, decimals),
                list(&b, decimals),
                r.map_or_else(|| "-".into(), |r| format!("{r:.2}"))
            ));
            row[name] = json!({"today": a, "older": b, "ratio_of_medians": r});
        }
        summary.push(row);
    }
    summary
}

/// One round of one binary, as the `--json` file's `runs` hold it.
fn round_json(r: &Round) -> Value {
    json!({
        "binary": if r.today { "today" } else { "older" },
        "round": r.round,
        "load_average_before": r.load.0,
        "load_average_after": r.load.1,
        "ledger_check_ok": r.metering_ok,
        "rates": r.points.iter().map(|p| json!({
            "rate": p.gateway.rate,
            "direct": p.direct.to_json(),
            "gateway": p.gateway.to_json(),
            "added_p50_ms": added_p50(p),
            "added_p99_ms": added_p99(p),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }
}
