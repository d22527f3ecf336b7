//! The overhead benchmark's command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// overhead: the latency the Tollgate gateway adds in front of an OpenAI-compatible upstream
#[derive(Debug, Clone, Parser)]
#[command(name = "overhead", version)]
pub struct Options {
    /// Request rates per second, run in ascending order
    #[arg(long, value_name = "R1,R2,...", value_delimiter = ',', value_parser = positive,
          default_value = "250,500,1000,2000")]
    pub rates: Vec<f64>,
    /// Measured seconds per rate and path
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    pub duration: Duration,
    /// Unmeasured seconds before each run
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "2")]
    pub warmup: Duration,
    /// Only the listed rates (default: keep raising the rate until it breaks)
    #[arg(long)]
    pub no_search: bool,
    /// Rate multiplier while searching
    #[arg(long, value_name = "FACTOR", value_parser = above_one, default_value = "1.25")]
    pub step: f64,
    /// Then halve the gap between the last good and the first bad rate N times
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub refine: u32,
    /// Stop searching here
    #[arg(long, value_name = "R", default_value_t = 50_000.0)]
    pub max_rate: f64,
    /// Streamed requests, timed to the end of the stream (default: non-streamed)
    #[arg(long)]
    pub stream: bool,
    /// off: the gateway runs with --no-database and a static key
    #[arg(long, value_enum, default_value_t = Metering::On)]
    pub metering: Metering,
    /// RUST_LOG for the gateway (info is its own default)
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub gateway_log: String,
    /// Also write the results as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The tollgate binary (default: the `tollgate` next to this benchmark's executable)
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// An older tollgate binary: run it and --binary alternately, --rounds times each, at the
    /// listed rates (no search), and print the ratios of their figures
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// With --baseline: how many times each binary runs (the order alternates)
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Where the temporary ledger and config go (default: the system temp dir)
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// After the listed rates: open N keep-alive connections to the gateway (one request each),
    /// hold them idle, run the listed rates again and report the gateway's memory per connection
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        conflicts_with = "baseline"
    )]
    pub idle_connections: usize,
    /// Likewise M streamed requests that an upstream answers one piece every 100 ms, held open
    /// for the whole measurement (memory per stream)
    #[arg(
        long,
        value_name = "M",
        default_value_t = 0,
        conflicts_with = "baseline"
    )]
    pub slow_streams: usize,
    /// The ledger (and the limits) on this PostgreSQL database instead of a temporary SQLite
    /// file; the key then has limits, so every request takes its share of them
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// With --postgres: the whole benchmark with one gateway, then again with N gateways
    /// sharing the database, the load split evenly between them
    #[arg(long, value_name = "N", default_value_t = 1, requires = "postgres",
          conflicts_with_all = ["baseline", "idle_connections", "slow_streams"],
          value_parser = clap::value_parser!(u32).range(1..=16))]
    pub replicas: u32,
    /// Also write every measured request as CSV, one file per run: scheduled send (ms from the
    /// run's start), latency (ms), ok
    #[arg(long, value_name = "DIR")]
    pub raw: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Metering {
    On,
    Off,
}

impl Options {
    /// The command line, with the rates in ascending order (the search starts from the last).
    pub fn from_args() -> Self {
        let mut o = Self::parse();
        o.rates.sort_by(f64::total_cmp);
        o
    }

    pub fn search(&self) -> bool {
        !self.no_search
    }

    pub fn metering(&self) -> bool {
        self.metering == Metering::On
    }
}

fn number(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("a number, not `{text}`"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("a finite number, not `{text}`"))
    }
}

fn positive(text: &str) -> Result<f64, String> {
    above(text, 0.0, "must be positive")
}

fn above_one(text: &str) -> Result<f64, String> {
    above(text, 1.0, "must be above 1")
}

/// A number greater than `floor`, else `refusal`.
fn above(text: &str, floor: f64, refusal: &str) -> Result<f64, String> {
    let v = number(text)?;
    if v > floor {
        Ok(v)
    } else {
        Err(refusal.into())
    }
}

fn seconds(text: &str) -> Result<Duration, String> {
    let v = number(text)?;
    if v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err("seconds, zero or more".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let o = Options::try_parse_from(["overhead"]).unwrap();
        assert_eq!(o.rates, [250.0, 500.0, 1000.0, 2000.0]);
        assert_eq!(o.duration, Duration::from_secs(10));
        assert_eq!(o.warmup, Duration::from_secs(2));
        assert!(o.search() && o.metering() && !o.stream);
        assert_eq!((o.step, o.refine, o.max_rate), (1.25, 2, 50_000.0));
    }

    #[test]
    fn values_are_checked() {
        let o =
            Options::try_parse_from(["overhead", "--rates=500, 100", "--metering", "off"]).unwrap();
        assert_eq!(o.rates, [500.0, 100.0]);
        assert!(!o.metering());
        for bad in [
            &["overhead", "--rates", "0"][..],
            &["overhead", "--step", "1"],
            &["overhead", "--duration", "-1"],
            &["overhead", "--metering", "maybe"],
            &["overhead", "--idle-connections", "5", "--baseline", "old"],
            &["overhead", "--replicas", "2"],
        ] {
            assert!(Options::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
