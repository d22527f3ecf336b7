//! `--postgres URL` and `--replicas N`: the gateway on a PostgreSQL ledger, alone and as N
//! replicas sharing it.
//!
//! With `--postgres`, each gateway meters into that database (its own spool beside it) and the
//! benchmark's key has request and token limits the load never reaches, so every request
//! takes its share of the limits the replicas share there. Each start issues the key to a
//! new customer, and the ledger check counts that customer's records only, so the database
//! needs no reset between runs.
//!
//! With `--replicas N` (N > 1) the whole benchmark (the listed rates, then the search unless
//! `--no-search`) runs twice, each time with its own gateways: first one gateway, then N
//! sharing the database, the open-loop load sent to each replica in turn. The gateway's CPU is
//! then that of all replicas. Printed: both runs' tables and the highest sustained total rate
//! of each, with their ratio. The load generator, the upstream, PostgreSQL and every replica
//! share the machine's cores: the report says what else ran (the `others` column).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tollgate_testkit::Running;

use super::gateway::Gateway;
use super::load::Target;
use super::report::{diff, table, write_json};
use super::run::{best, broke_line, header, measure_binary, Bench, RatePoint};
use super::Options;

/// What the header says of metering.
pub fn metering_text(opts: &Options) -> String {
    match &opts.postgres {
        Some(_) => format!(
            "metering on (PostgreSQL ledger and shared limits, database key lookups, {} \
             gateway{})",
            opts.replicas,
            if opts.replicas == 1 { "" } else { "s" }
        ),
        None => "metering on (SQLite ledger, database key lookups)".into(),
    }
}

impl Bench {
    /// The gateways' process ids: the first, then the other replicas.
    pub(super) fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.gateway)
            .chain(&self.replicas)
            .map(Gateway::pid)
            .collect()
    }

    /// With metering, until every gateway's ledger has caught up.
    pub(super) async fn wait_ledgers(&self) -> anyhow::Result<()> {
        if self.opts.metering() {
            for g in std::iter::once(&self.gateway).chain(&self.replicas) {
                g.wait_ledger(&self.client).await?;
            }
        }
        Ok(())
    }

    /// Starts the replicas beyond the first (`--replicas`), each in a directory of its own
    /// under `dir`, and sends the load to all of them in turn.
    pub(super) async fn add_replicas(
        &mut self,
        binary: &Path,
        dir: &Path,
        upstream: &Running,
        extra_config: &str,
    ) -> anyhow::Result<()> {
        for i in 1..self.opts.replicas {
            let dir = dir.join(format!("replica-{i}"));
            std::fs::create_dir_all(&dir)?;
            let mut g = Gateway::start(&self.opts, binary, &dir, upstream.addr, extra_config)?;
            g.wait_ready(&self.client)
                .await
                .with_context(|| format!("replica {i}"))?;
            self.replicas.push(g);
        }
        if !self.replicas.is_empty() {
            let path = "/v1/chat/completions";
            let via = &self.via;
            self.via = Arc::new(Target {
                url: via.url.clone(),
                others: self
                    .replicas
                    .iter()
                    .map(|g| format!("{}{path}", g.base))
                    .collect(),
                auth: via.auth.clone(),
                body: via.body.clone(),
                stream: via.stream,
            });
        }
        Ok(())
    }
}

/// One gateway, then `--replicas` of them, each a whole benchmark; prints (and with `--json`
/// writes) both and the ratio of their highest sustained rates.
pub async fn run(opts: &Options, binary: &Path) -> anyhow::Result<()> {
    let mut out = String::new();
    let mut runs = Vec::new();
    let mut highest = Vec::new();
    let mut ledger_ok = true;
    for replicas in [1, opts.replicas] {
        let mut o = opts.clone();
        o.replicas = replicas;
        let (points, metering, (before, after), _) = measure_binary(&o, binary)
            .await
            .with_context(|| format!("{replicas} gateways"))?;
        let top = best(&points, |p| &p.gateway);
        let all = points.iter().all(|p| p.gateway.sustained());
        out.push_str(&format!(
            "\n{}\nload average before {before}, after {after}\n\n{}",
            header(&o),
            table(&points)
        ));
        out.push_str(&format!(
            "highest rate sustained through {replicas} gateway(s): {}{}\n",
            top.map_or_else(|| "none".into(), |r| format!("{r:.0}/s")),
            if all {
                " or more (the highest rate tried)"
            } else {
                ""
            }
        ));
        if let Some(broke) = points.iter().find(|p| !p.gateway.sustained()) {
            out.push_str(&format!("{}\n", broke_line(&broke.gateway)));
        }
        if let Some(m) = &metering {
            out.push_str(&format!("{}\n", m.line));
            ledger_ok &= m.ok;
        }
        runs.push(json!({
            "replicas": replicas,
            "load_average_before": before,
            "load_average_after": after,
            "highest_sustained_gateway": top,
            "all_sustained": all,
            "rates": points.iter().map(point_json).collect::<Vec<_>>(),
            "metering_check": metering.as_ref().map_or(Value::Null, |m| m.json.clone()),
        }));
        highest.push(top);
    }
    let ratio = match (highest[0], highest[1]) {
        (Some(one), Some(many)) if one > 0.0 => Some(many / one),
        _ => None,
    };
    out.push_str(&format!(
        "\nhighest sustained total rate: one gateway {}, {} gateways {}: {}\n",
        highest[0].map_or_else(|| "none".into(), |r| format!("{r:.0}/s")),
        opts.replicas,
        highest[1].map_or_else(|| "none".into(), |r| format!("{r:.0}/s")),
        ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}×"))
    ));
    print!("{out}");
    if let Some(path) = &opts.json {
        let doc = json!({
            "mode": super::run::mode(opts),
            "replicas": opts.replicas,
            "runs": runs,
            "ratio_of_highest_sustained": ratio,
            "provenance": crate::provenance::provenance(),
        });
        write_json(path, &doc)?;
    }
    if !ledger_ok {
        bail!("a ledger does not hold one record per gateway request");
    }
    Ok(())
}

/// One rate's figures as the JSON results hold them.
pub(super) fn point_json(p: &RatePoint) -> Value {
    json!({
        "rate": p.gateway.rate,
        "direct": p.direct.to_json(),
        "gateway": p.gateway.to_json(),
        "added_p50_ms": diff(p.gateway.quantile_ms(0.50), p.direct.quantile_ms(0.50)),
        "added_p99_ms": diff(p.gateway.quantile_ms(0.99), p.direct.quantile_ms(0.99)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_goes_to_each_replica_in_turn() {
        let mut t = Target {
            url: "a".into(),
            others: Vec::new(),
            auth: String::new(),
            body: bytes::Bytes::new(),
            stream: false,
        };
        assert_eq!((t.url_for(0), t.url_for(7)), ("a", "a"));
        t.others = vec!["b".into(), "c".into()];
        let urls: Vec<&str> = (0..6).map(|n| t.url_for(n)).collect();
        assert_eq!(urls, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn the_header_names_the_ledger_and_the_replicas() {
        use clap::Parser;
        let o = Options::try_parse_from(["overhead"]).unwrap();
        assert!(metering_text(&o).contains("SQLite"));
        let o =
            Options::try_parse_from(["overhead", "--postgres", "postgres://x", "--replicas", "2"])
                .unwrap();
        assert!(metering_text(&o).contains("PostgreSQL ledger and shared limits"));
        assert!(metering_text(&o).contains("2 gateways"));
    }
}
