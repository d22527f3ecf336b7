//! `GET /admin/v1/models`: the catalogue in force, and for each local model whether it is
//! loaded, its memory and its load time; `POST /admin/v1/models/reload`: read models.toml
//! again (audited; an invalid file is refused with its error and the catalogue stays).
//!
//! The catalogue itself is `crate::catalogue`; what loads and unloads models is the binary's.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use crate::backend::{Residency, ResidencyState};
use crate::catalogue::{ReloadError, ReloadOutcome};
use crate::config::BackendConfig;
use crate::error::ApiError;
use crate::AppState;
use tollgate_metering::audit::{Action, Actor, Change};

/// One model of the catalogue as operators see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogueModel {
    pub id: String,
    #[schema(value_type = String, pattern = "^catalogue\\.model$")]
    pub object: &'static str,
    /// `local` (an engine in this process) or `http` (upstreams or workers).
    #[schema(value_type = String, pattern = "^(local|http)$")]
    pub backend: &'static str,
    /// Seconds idle before it is unloaded; `null`: only to make room.
    pub keep_alive_secs: Option<u64>,
    /// A local model's place in the memory budget; an http model shows `loaded` and 0 bytes
    /// (its upstreams keep their own).
    #[serde(flatten)]
    pub residency: Residency,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogueModelList {
    #[schema(value_type = String, pattern = "^list$")]
    pub object: &'static str,
    pub data: Vec<CatalogueModel>,
}

/// What a reload changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadResult {
    #[schema(value_type = String, pattern = "^catalogue\\.reload$")]
    pub object: &'static str,
    #[serde(flatten)]
    pub outcome: ReloadOutcome,
}

/// Every model of the catalogue, whether it is loaded, its memory and its load time.
#[utoipa::path(get, path = "/admin/v1/models", tag = "admin",
    responses((status = 200, body = CatalogueModelList), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn list_models(State(state): State<AppState>) -> Json<CatalogueModelList> {
    let catalogue = state.catalogue.current();
    let data = catalogue
        .models
        .values()
        .map(|m| {
            let local = matches!(m.backend, BackendConfig::Local(_));
            let residency = catalogue
                .backends
                .get(&m.id)
                .and_then(|b| b.residency())
                .unwrap_or(Residency {
                    state: ResidencyState::Loaded,
                    pinned: m.pinned,
                    ..Residency::default()
                });
            CatalogueModel {
                id: m.id.clone(),
                object: "catalogue.model",
                backend: if local { "local" } else { "http" },
                keep_alive_secs: m.keep_alive.map(|d| d.as_secs()),
                residency,
            }
        })
        .collect();
    Json(CatalogueModelList {
        object: "list",
        data,
    })
}

/// Reads models.toml again: new models appear, removed ones finish their requests and
/// unload, changed prices apply to requests admitted from now on. An invalid file is refused
/// (400 with its error) and the catalogue in force stays.
#[utoipa::path(post, path = "/admin/v1/models/reload", tag = "admin",
    responses((status = 200, body = ReloadResult), crate::openapi::AdminErrors),
    security(("admin_token" = [])))]
pub(super) async fn reload_models(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
) -> Result<Json<ReloadResult>, ApiError> {
    let outcome = reload(&state, &actor).await.map_err(|e| match e {
        ReloadError::Invalid(_) | ReloadError::Backend(_) | ReloadError::Unsupported => {
            ApiError::invalid(e.to_string(), None)
        }
    })?;
    Ok(Json(ReloadResult {
        object: "catalogue.reload",
        outcome,
    }))
}

/// Reloads the catalogue for `actor` and audits what changed (when there is a database);
/// the admin API and `SIGHUP` both reload through here.
pub async fn reload(state: &AppState, actor: &Actor) -> Result<ReloadOutcome, ReloadError> {
    let outcome = state.catalogue.reload().await?;
    tracing::info!(
        added = ?outcome.added,
        removed = ?outcome.removed,
        replaced = ?outcome.replaced,
        updated = ?outcome.updated,
        "catalogue reloaded"
    );
    if let Some(store) = &state.store {
        let change = Change {
            action: Action::CatalogueReloaded,
            target_id: "models.toml".into(),
            changes: serde_json::to_value(&outcome).unwrap_or_default(),
        };
        // The reload is in force already: a failed audit write is logged, not undone.
        if let Err(e) = store.audit_only(actor, &change).await {
            tracing::error!("cannot write the audit entry of a catalogue reload: {e}");
        }
    }
    Ok(outcome)
}
