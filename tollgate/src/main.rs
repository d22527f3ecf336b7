//! `tollgate`: the command line. Parses arguments, loads configuration, and hands over to the
//! gateway (`serve`) or the runtime (`generate`). No logic of its own beyond composing them.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::prelude::*;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "OpenAI-compatible inference gateway with a candle Llama runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with an in-process engine for every local model.
    Serve {
        /// The model catalogue.
        #[arg(long, default_value = "models.toml", env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// Address to listen on (`127.0.0.1:0` picks a free port and logs it).
        #[arg(long, default_value = "127.0.0.1:8080", env = "TOLLGATE_LISTEN")]
        listen: String,
        /// Usage ledger database: a SQLite file (created when missing), `sqlite://file`, or
        /// `postgres://...`.
        #[arg(long, env = "DATABASE_URL", default_value = "tollgate.db")]
        database: String,
        /// Serve without a database: static keys only, nothing metered.
        #[arg(long, conflicts_with = "spool")]
        no_database: bool,
        /// The ledger's local append-only spool (default: next to the SQLite file, or
        /// `tollgate-ledger.spool` for PostgreSQL).
        #[arg(long, env = "TOLLGATE_SPOOL")]
        spool: Option<PathBuf>,
        /// When a usage record must reach the disk: `always` = every response waits for its
        /// record's fdatasync (survives power loss); an interval such as `10ms` = every response
        /// waits for its record's write to the spool (survives a crash of this process) and
        /// the spool is fdatasynced at that interval (a crash of the machine can lose the
        /// records of the last interval).
        #[arg(long, env = "TOLLGATE_SPOOL_SYNC", default_value = "10ms")]
        spool_sync: tollgate_metering::ledger::SpoolSync,
        /// Where the Files API keeps file bytes: `s3://bucket/prefix` for an S3-compatible
        /// store (the standard `AWS_*` variables: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...),
        /// or a directory (default: next to the SQLite file, or `tollgate-files`).
        #[arg(long, env = "TOLLGATE_FILES_URL", conflicts_with = "no_database")]
        files_url: Option<String>,
        /// Serve the admin API and /metrics on this address only (not on --listen), to keep
        /// them off the public network.
        #[arg(long, env = "TOLLGATE_ADMIN_LISTEN")]
        admin_listen: Option<String>,
    },
    /// Serve one local model's engine for gateways (`backend = { type = "http", urls = [...] }`).
    Worker {
        /// The model id in the catalogue (a `local` backend).
        #[arg(long)]
        model: String,
        /// Override the catalogue's device (`cpu`, `cuda:N`).
        #[arg(long)]
        device: Option<tollgate_gateway::config::DeviceSpec>,
        /// The model catalogue.
        #[arg(long, default_value = "models.toml", env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        /// Address to listen on for gateways.
        #[arg(long, default_value = "127.0.0.1:8081", env = "TOLLGATE_LISTEN")]
        listen: String,
    },
    /// Manage customers in the database.
    #[command(subcommand)]
    Customers(tollgate::billing_cli::CustomersCommand),
    /// Manage API keys in the database.
    #[command(subcommand)]
    Keys(tollgate::billing_cli::KeysCommand),
    /// Scoped admin tokens (usage:read, customers:read, customers:write, keys:write, admin).
    #[command(subcommand)]
    AdminTokens(tollgate::billing_cli::AdminTokensCommand),
    /// Reserved capacity: a customer's tokens per minute on a model, billed per month.
    #[command(subcommand)]
    Reservations(tollgate::billing_cli::ReservationsCommand),
    /// Read usage: exports for billing jobs, aggregates, invoices.
    #[command(subcommand)]
    Usage(tollgate::billing_cli::UsageCommand),
    /// Generate text for one prompt and print it as it streams, then the speed.
    Generate(tollgate::generate::GenerateArgs),
}

fn main() -> anyhow::Result<()> {
    tollgate::resident::reclaim::limit_arenas();
    // candle's CPU thread pool spins at its barrier by default; on a small shared machine a
    // spinning pool collapses as soon as another process wants the cores (measured here), so park
    // instead unless the operator asked otherwise. Set before any thread exists.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log redirected to a file or a collector stays plain text.
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    // Before any async runtime: the OTLP exporter's client is a blocking one. Its guard flushes
    // the last spans when dropped, after the runtime is gone.
    let (traces, flush) = match tollgate_gateway::server::telemetry::from_env()
        .context("cannot set up the OpenTelemetry exporter (OTEL_EXPORTER_OTLP_*)")?
    {
        Some((layer, guard)) => (Some(layer), Some(guard)),
        None => (None, None),
    };
    tracing_subscriber::registry().with(log).with(traces).init();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. } | Command::Worker { .. }) {
        raise_open_file_limit();
    }
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            database,
            no_database,
            spool,
            spool_sync,
            files_url,
            admin_listen,
        } => {
            let metering = tollgate::Metering {
                database: (!no_database).then_some(database),
                spool,
                spool_sync,
                files_url,
                admin_token: std::env::var("TOLLGATE_ADMIN_TOKEN").ok(),
                catalogue: Some(config.clone()),
            };
            async_runtime()?.block_on(serve(config, listen, admin_listen, metering))
        }
        Command::Generate(args) => tollgate::generate::run(args),
        Command::Worker {
            model,
            device,
            config,
            listen,
        } => async_runtime()?.block_on(async move {
            let path = config;
            let config = tollgate_gateway::config::Config::load(&path)
                .with_context(|| format!("cannot load {}", path.display()))?;
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let token = std::env::var("TOLLGATE_WORKER_TOKEN").unwrap_or_default();
            let operator = tollgate::WorkerOperator {
                catalogue: Some(path),
                admin_token: std::env::var("TOLLGATE_ADMIN_TOKEN").ok(),
            };
            let model = tollgate::reload::WorkerModel { model, device };
            tollgate::worker(listener, config, model, &token, operator, shutdown_signal()).await
        }),
        Command::Customers(cmd) => async_runtime()?.block_on(tollgate::billing_cli::customers(cmd)),
        Command::Keys(cmd) => async_runtime()?.block_on(tollgate::billing_cli::keys(cmd)),
        Command::AdminTokens(cmd) => {
            async_runtime()?.block_on(tollgate::billing_cli::admin_tokens(cmd))
        }
        Command::Usage(cmd) => async_runtime()?.block_on(tollgate::billing_cli::usage(cmd)),
        Command::Reservations(cmd) => {
            async_runtime()?.block_on(tollgate::billing_cli::reservations(cmd))
        }
    };
    drop(flush);
    result
}

fn async_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn serve(
    config: PathBuf,
    listen: String,
    admin_listen: Option<String>,
    metering: tollgate::Metering,
) -> anyhow::Result<()> {
    let config = tollgate_gateway::config::Config::load(&config)
        .with_context(|| format!("cannot load {}", config.display()))?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let operator = match admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--admin-listen)"))?,
        ),
        None => None,
    };
    tollgate::serve_split(listener, operator, config, metering, shutdown_signal()).await
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining in-flight requests");
}

/// Every connection is a file descriptor, and distributions start processes with a soft limit
/// of 1,024 (a gateway under load once failed with "too many open files"): the soft limit is
/// raised to the hard one where the OS allows, and the log says what it is.
fn raise_open_file_limit() {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit > before => {
            tracing::info!("open-file limit raised from {before} to {limit}");
        }
        Ok(limit) => tracing::info!("open-file limit: {limit}"),
        Err(e) => tracing::warn!("cannot raise the open-file limit (now {before}): {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every subcommand, with the path of commands that leads to it.
    fn arguments(command: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in command.get_arguments() {
            out.push((path.to_string(), arg.clone()));
        }
        for sub in command.get_subcommands() {
            arguments(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_option_and_argument_has_help() {
        let mut all = Vec::new();
        arguments(&Cli::command(), "tollgate", &mut all);
        let silent: Vec<String> = all
            .iter()
            .filter(|(_, a)| {
                !matches!(a.get_id().as_str(), "help" | "version") && a.get_help().is_none()
            })
            .map(|(path, a)| format!("{path} {}", a.get_id()))
            .collect();
        assert!(all.len() > 50, "the walk found the arguments");
        assert!(
            silent.is_empty(),
            "arguments without help text: {silent:#?}"
        );
    }
}
