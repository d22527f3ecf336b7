//! The console's view of a customer's LoRA adapters: a section of its page listing them (model
//! id, base model, price, path, created) with a button that removes one, and the form that
//! registers one. Both go through the admin API's rules (`crate::api::admin::register` and
//! `unregister`: the same checks, the same audit entries, as the signed-in session).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup};

use super::pages::{time, Fields};
use super::{csrf_field, PageError, Signed};
use crate::api::admin::{register, unregister, CreateAdapter};
use crate::config::check_adapter_base;
use crate::AppState;
use tollgate_metering::accounts::CustomerAdapter;
use tollgate_metering::money::PriceTable;

/// The form's price inputs: label and name (the keys of a model's `price`).
const PRICE_FIELDS: [(&str, &str); 4] = [
    ("Input USD / Mtok ", "input_per_mtok"),
    ("Output USD / Mtok ", "output_per_mtok"),
    (
        "Cached input USD / Mtok (blank: input) ",
        "cached_input_per_mtok",
    ),
    (
        "Rejected prediction USD / Mtok (blank: output) ",
        "rejected_prediction_per_mtok",
    ),
];

/// How a price table reads in the list: its default input and output prices, and whether it
/// sets more (per-tier prices) than that.
fn price_text(price: Option<&PriceTable>) -> String {
    let Some(p) = price else {
        return "base model's".into();
    };
    let tiers = p.flex.is_some() || p.batch.is_some() || p.priority.is_some();
    format!(
        "in {} / out {} per Mtok{}",
        p.input_per_mtok,
        p.output_per_mtok,
        if tiers { " (+ tier prices)" } else { "" }
    )
}

/// A customer's adapters and the form that registers one (base models: the catalogue's local
/// models that are not adapters themselves).
pub(super) fn section(
    state: &AppState,
    signed: &Signed,
    customer_id: &str,
    adapters: &[CustomerAdapter],
) -> Markup {
    let models = state.catalogue.current().models.clone();
    let bases: Vec<&String> = models
        .iter()
        .filter(|(id, m)| check_adapter_base(id, Some(m)).is_ok())
        .map(|(id, _)| id)
        .collect();
    html! {
        h2 { "LoRA adapters" }
        table #adapters {
            thead { tr { th { "Id" } th { "Base model" } th { "Price" } th { "Path" } th { "Created" } th {} } }
            tbody {
                @for a in adapters {
                    tr id={"adapter-" (a.name)} {
                        td { (a.model_id()) }
                        td { (a.base_model) }
                        td.price { (price_text(a.price.as_ref())) }
                        td { code { (a.path) } }
                        td { (time(a.created_at)) }
                        td {
                            form method="post" action={"/console/customers/" (customer_id) "/adapters/" (a.name) "/remove"} {
                                (csrf_field(signed))
                                button.danger type="submit" name="remove" { "Remove" }
                            }
                        }
                    }
                }
            }
        }
        @if bases.is_empty() {
            p.empty { "No model can carry an adapter: adapters go on local models of the catalogue." }
        } @else {
            form.grid method="post" action={"/console/customers/" (customer_id) "/adapters"} {
                (csrf_field(signed))
                label { "Base model " select name="base_model" {
                    @for m in &bases { option value=(m) { (m) } }
                } }
                label { "Name " input name="name" id="adapter-name" required pattern="[A-Za-z0-9._-]{1,64}"; }
                label { "Path (absolute, on the servers) " input name="path" id="adapter-path" required; }
                @for (text, name) in PRICE_FIELDS {
                    label { (text) input name=(name) inputmode="decimal"; }
                }
                p.hint { "Prices blank: the base model's. Per-tier prices: the admin API or the CLI." }
                button type="submit" id="create-adapter" { "Register adapter" }
            }
        }
    }
}

/// The price the form gives: input and output together, or neither (the base model's).
fn form_price(fields: &Fields) -> Option<PriceTable> {
    let given = |name: &str| fields.get(name).map(str::to_string);
    let any = PRICE_FIELDS.iter().any(|(_, name)| given(name).is_some());
    any.then(|| PriceTable {
        // Blank beside a given price: refused by the price's checks, naming the key.
        input_per_mtok: given("input_per_mtok").unwrap_or_default(),
        output_per_mtok: given("output_per_mtok").unwrap_or_default(),
        cached_input_per_mtok: given("cached_input_per_mtok"),
        rejected_prediction_per_mtok: given("rejected_prediction_per_mtok"),
        flex: None,
        batch: None,
        priority: None,
        priority_multiplier: None,
        reserved_per_ktpm_month: None,
    })
}

/// The customer page's adapter form: registers through the admin API's rules, then shows the
/// page again (an error page says why not).
pub(crate) async fn create_adapter(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(customer_id): Path<String>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let new = CreateAdapter {
        base_model: fields.get("base_model").unwrap_or_default().to_string(),
        name: fields.get("name").unwrap_or_default().to_string(),
        path: fields.get("path").unwrap_or_default().to_string(),
        price: form_price(&fields),
    };
    register(&state, &customer_id, new, &signed.actor).await?;
    Ok(Redirect::to(&format!("/console/customers/{customer_id}")).into_response())
}

/// Removes an adapter, from its row's button.
pub(crate) async fn remove_adapter(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path((customer_id, name)): Path<(String, String)>,
) -> Result<Response, PageError> {
    unregister(&state, &customer_id, &name, &signed.actor).await?;
    Ok(Redirect::to(&format!("/console/customers/{customer_id}")).into_response())
}
