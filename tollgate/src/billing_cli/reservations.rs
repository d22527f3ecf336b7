//! `tollgate reservations`: reserved capacity against the database directly, as the admin
//! API's `/admin/v1/customers/{id}/reservations` and `/admin/v1/reservations/{id}`. Creating
//! one reads models.toml for the model's `capacity_tpm` and reserved price; the store refuses
//! one that would oversell the model.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use clap::Subcommand;
use serde_json::json;
use tollgate_metering::audit::Actor;
use tollgate_metering::billing::parse_time;
use tollgate_metering::store::now_micros;
use tollgate_metering::views::ReservationView;

use super::{print, DbArgs};

#[derive(Debug, Subcommand)]
pub enum ReservationsCommand {
    /// Reserve tokens per minute of a model for a customer (refused when the model's
    /// capacity_tpm is taken over that span).
    Create {
        /// The customer's id.
        customer_id: String,
        /// A model with capacity_tpm and price.reserved_per_ktpm_month in models.toml.
        #[arg(long)]
        model: String,
        /// Tokens per minute reserved.
        #[arg(long)]
        tpm: i64,
        /// From (RFC 3339 or YYYY-MM-DD; default: now).
        #[arg(long)]
        starts_at: Option<String>,
        /// Until (RFC 3339 or YYYY-MM-DD; default: until ended).
        #[arg(long)]
        ends_at: Option<String>,
        /// The model catalogue.
        #[arg(long, default_value = "models.toml", env = "TOLLGATE_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List reservations (all, a customer's, or a model's).
    List {
        /// Only this customer's reservations.
        #[arg(long)]
        customer_id: Option<String>,
        /// Only reservations on this model.
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// End a reservation now (billed until now).
    End {
        /// The reservation's id (`rsv_...`).
        id: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

fn time_arg(text: Option<&str>, name: &str) -> anyhow::Result<Option<i64>> {
    text.map(|t| parse_time(t).map_err(|e| anyhow!("--{name}: {e}")))
        .transpose()
}

pub async fn reservations(cmd: ReservationsCommand) -> anyhow::Result<()> {
    match cmd {
        ReservationsCommand::Create {
            customer_id,
            model,
            tpm,
            starts_at,
            ends_at,
            config,
            db,
        } => {
            let config = tollgate_gateway::config::Config::load(&config)
                .with_context(|| format!("cannot load {}", config.display()))?;
            let m = config
                .models
                .get(&model)
                .ok_or_else(|| anyhow!("unknown model `{model}` in the catalogue"))?;
            let starts_at = time_arg(starts_at.as_deref(), "starts-at")?.unwrap_or_else(now_micros);
            let ends_at = time_arg(ends_at.as_deref(), "ends-at")?;
            let (new, capacity) = m
                .reservation(&customer_id, tpm, starts_at, ends_at)
                .map_err(|(_, message)| anyhow!(message))?;
            let created = db
                .open()
                .await?
                .create_reservation(&new, capacity, &Actor::cli_os_user())
                .await?;
            print(&ReservationView::from(&created))
        }
        ReservationsCommand::List {
            customer_id,
            model,
            db,
        } => {
            let held = db
                .open()
                .await?
                .reservations(customer_id.as_deref(), model.as_deref())
                .await?;
            let data: Vec<ReservationView> = held.iter().map(ReservationView::from).collect();
            print(&json!({"object": "list", "data": data}))
        }
        ReservationsCommand::End { id, db } => {
            let ended = db
                .open()
                .await?
                .end_reservation(&id, now_micros(), &Actor::cli_os_user())
                .await?;
            print(&ReservationView::from(&ended))
        }
    }
}
