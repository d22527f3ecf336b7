//! `tollgate`: the command line. Parses arguments, loads configuration, and hands over to the
//! gateway (`serve`) or the runtime (`generate`). No logic of its own beyond composing them.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
        /// Usage ledger database URL (`sqlite://file` or `postgres://...`).
        #[arg(long, env = "DATABASE_URL")]
        database: Option<String>,
    },
    /// Generate text for one prompt and print it as it streams, then the speed.
    Generate(tollgate::generate::GenerateArgs),
}

fn main() -> anyhow::Result<()> {
    // candle's CPU thread pool spins at its barrier by default; on a small shared machine a
    // spinning pool collapses as soon as another process wants the cores (FACTS.md), so park
    // instead unless the operator asked otherwise. Set before any thread exists.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            database,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(serve(config, listen, database))
        }
        Command::Generate(args) => tollgate::generate::run(args),
    }
}

async fn serve(config: PathBuf, listen: String, database: Option<String>) -> anyhow::Result<()> {
    let config = tollgate_gateway::config::Config::load(&config)
        .with_context(|| format!("cannot load {}", config.display()))?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tollgate::serve(listener, config, database, shutdown_signal()).await
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
