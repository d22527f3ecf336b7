//! The console's customers and keys: the list, a new customer, one customer's page (its limits,
//! budget and keys; its reservations and LoRA adapters from `reservations` and `adapters`, its
//! batches and background responses from `work`), a new key (the one page
//! that shows its secret) and revoking one. Changes go through the store's audited methods as
//! the signed-in session.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use maud::{html, Markup};

use super::pages::{bad, budget, limit, opt, store, time, usd, Fields, PageResult};
use super::{csrf_field, layout, PageError, Signed};
use crate::AppState;
use tollgate_metering::accounts::parse_default_tier;
use tollgate_metering::billing::parse_time;
use tollgate_metering::kinds::ServiceTier;
use tollgate_metering::money::format_usd;
use tollgate_metering::periods::month_bounds;
use tollgate_metering::store::valid_id;
use tollgate_metering::store::{now_micros, ApiKey, CustomerFields, NewKey};

pub(crate) async fn customers(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
) -> PageResult {
    let store = store(&state)?;
    let (period_start, _) = month_bounds(now_micros());
    let mut rows = Vec::new();
    for c in store.list_customers().await? {
        let spent = store.spent_since(&c.id, period_start).await?;
        rows.push((c, spent));
    }
    let content = html! {
        table #customers {
            thead { tr { th { "Id" } th { "Name" } th { "Spent this month" } th { "Budget" } th { "RPM" } th { "TPM" } th { "Created" } } }
            tbody {
                @for (c, spent) in &rows {
                    tr {
                        td { a href={"/console/customers/" (c.id)} { (c.id) } }
                        td { (c.name) }
                        td { (usd(*spent)) }
                        td {
                            @match c.budget_nano_usd {
                                Some(b) => {
                                    (usd(b))
                                    @let pct = if b > 0 { (super::chart::drawn((*spent).into()) / super::chart::drawn(b.into()) * 100.0).min(999.0) } else { 100.0 };
                                    " " meter min="0" max="100" value=(format!("{pct:.0}")) {} " " (format!("{pct:.0}%"))
                                }
                                None => { "none" }
                            }
                        }
                        td { (opt(c.rpm)) }
                        td { (opt(c.tpm)) }
                        td { (time(c.created_at)) }
                    }
                }
            }
        }
        h2 { "New customer" }
        form.grid method="post" action="/console/customers" {
            (csrf_field(&signed))
            label { "Id " input name="id" required pattern="[A-Za-z0-9._-]{1,64}"; }
            label { "Name " input name="name"; }
            label { "Monthly budget (USD) " input name="budget_usd" inputmode="decimal"; }
            label { "RPM " input name="rpm" inputmode="numeric"; }
            label { "TPM " input name="tpm" inputmode="numeric"; }
            button type="submit" id="create-customer" { "Create customer" }
        }
    };
    Ok(layout(&signed, "Customers", content))
}

pub(crate) async fn create_customer(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let id = fields.get("id").unwrap_or_default().to_string();
    if !valid_id(&id) {
        return Err(bad(format!(
            "`{id}` is not a valid id: 1-64 letters, digits, `-`, `_`, `.`"
        )));
    }
    let name = fields.get("name").unwrap_or(&id).to_string();
    let new = settings(&fields, Some(name))?;
    store(&state)?
        .create_customer(&id, new, &signed.actor)
        .await?;
    Ok(Redirect::to(&format!("/console/customers/{id}")).into_response())
}

/// The settings the customer form sets: its name, budget and rate limits (a blank field
/// clears its setting).
fn settings(fields: &Fields, name: Option<String>) -> Result<CustomerFields, PageError> {
    Ok(CustomerFields {
        name,
        budget_nano_usd: Some(budget(fields)?),
        budget_period: None,
        rpm: Some(limit(fields, "rpm")?),
        tpm: Some(limit(fields, "tpm")?),
        max_concurrent_requests: None,
        scheduling_weight: None,
        default_service_tier: Some(default_tier(fields)?),
        allow_priority: Some(fields.get("allow_priority").is_some()),
    })
}

/// The `default_service_tier` select: blank for none.
fn default_tier(fields: &Fields) -> Result<Option<ServiceTier>, PageError> {
    fields
        .get("default_service_tier")
        .map(parse_default_tier)
        .transpose()
        .map_err(bad)
}

/// The service-tier settings of a customer's or a key's form: the default tier and whether
/// `priority` may be asked for.
fn tier_inputs(tier: Option<ServiceTier>, allow_priority: bool, priority_label: &str) -> Markup {
    let options = [
        ("", "none"),
        ("default", "default"),
        ("flex", "flex"),
        ("priority", "priority"),
    ];
    let current = tier.map_or("", ServiceTier::as_str);
    html! {
        label { "Default service tier "
            select name="default_service_tier" {
                @for (value, text) in options {
                    option value=(value) selected[value == current] { (text) }
                }
            }
        }
        label.inline { input type="checkbox" name="allow_priority" value="on" checked[allow_priority]; " " (priority_label) }
    }
}

pub(crate) async fn update_customer(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let change = settings(&fields, fields.get("name").map(str::to_string))?;
    store(&state)?
        .update_customer(&id, change, &signed.actor)
        .await?;
    state.auth.forget_customer(&id);
    Ok(Redirect::to(&format!("/console/customers/{id}")).into_response())
}

pub(crate) async fn customer(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> PageResult {
    customer_page(&state, &signed, &id, None).await
}

/// A customer's page; `issued` is a key just created and its secret, shown this once.
async fn customer_page(
    state: &AppState,
    signed: &Signed,
    id: &str,
    issued: Option<(String, String)>,
) -> PageResult {
    let store = store(state)?;
    let c = store.customer(id).await?;
    let keys = store.list_keys(id).await?;
    let held = store.reservations(Some(id), None).await?;
    let adapters = store.adapters(Some(id)).await?;
    let (period_start, _) = month_bounds(now_micros());
    let spent = store.spent_since(id, period_start).await?;
    let work = super::work::section(store, id).await?;
    let field = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    let content = html! {
        @if let Some((key_id, secret)) = &issued {
            section.secret #new-key {
                h2 { "New key " (key_id) }
                p { "Copy the secret now: it is not stored and cannot be shown again." }
                code #secret { (secret) }
                " "
                button type="button" data-copy="secret" { "Copy" }
            }
        }
        p { "Spent this month: " strong #spent { (usd(spent)) }
            @if let Some(b) = c.budget_nano_usd { " of " (usd(b)) } }
        h2 { "Settings" }
        form.grid method="post" action={"/console/customers/" (c.id)} {
            (csrf_field(signed))
            label { "Name " input name="name" value=(c.name); }
            label { "Monthly budget (USD, blank: none) " input name="budget_usd" value=(c.budget_nano_usd.map(format_usd).unwrap_or_default()); }
            label { "RPM (blank: none) " input name="rpm" value=(field(c.rpm)); }
            label { "TPM (blank: none) " input name="tpm" value=(field(c.tpm)); }
            (tier_inputs(c.default_service_tier, c.allow_priority, "May use service_tier priority"))
            button type="submit" id="save-customer" { "Save" }
        }
        (keys_table(signed, &keys))
        (new_key_form(state, signed, &c.id))
        (super::reservations::section(state, signed, &c.id, &held))
        (super::adapters::section(state, signed, &c.id, &adapters))
        (work)
        p { a href={"/console/requests?customer_id=" (c.id)} { "This customer's requests" } " · "
            a href={"/console/invoices?customer_id=" (c.id)} { "Invoice" } }
    };
    Ok(layout(signed, &format!("Customer {}", c.id), content))
}

/// A customer's keys, each with its state and a revoke button while it is not revoked.
fn keys_table(signed: &Signed, keys: &[ApiKey]) -> Markup {
    let now = now_micros();
    html! {
        h2 { "Keys" }
        table #keys {
            thead { tr { th { "Id" } th { "Name" } th { "Prefix" } th { "Models" } th { "RPM" } th { "TPM" } th { "Budget" } th { "Tier" } th { "Priority" } th { "Expires" } th { "State" } th {} } }
            tbody {
                @for k in keys {
                    @let live = k.revoked_at.is_none() && k.expires_at.is_none_or(|e| e > now);
                    tr id={"key-" (k.id)} {
                        td { (k.id) }
                        td { (k.name) }
                        td { code { (k.key_prefix) "…" } }
                        td { (k.models.as_ref().map_or_else(|| "all".to_string(), |m| m.join(", "))) }
                        td { (opt(k.rpm)) }
                        td { (opt(k.tpm)) }
                        td { (k.budget_nano_usd.map_or_else(|| "—".to_string(), usd)) }
                        td { (k.default_service_tier.map_or("customer's", ServiceTier::as_str)) }
                        td { (if k.allow_priority { "if the customer may" } else { "no" }) }
                        td { (k.expires_at.map(time).unwrap_or_else(|| "never".into())) }
                        td.state {
                            @if let Some(r) = k.revoked_at { "revoked " (time(r)) }
                            @else if live { "active" } @else { "expired" }
                        }
                        td {
                            @if k.revoked_at.is_none() {
                                form method="post" action={"/console/keys/" (k.id) "/revoke"} {
                                    (csrf_field(signed))
                                    button.danger type="submit" name="revoke" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The form that issues a key to customer `customer_id`.
fn new_key_form(state: &AppState, signed: &Signed, customer_id: &str) -> Markup {
    html! {
        h2 { "New key" }
        form.grid method="post" action={"/console/customers/" (customer_id) "/keys"} {
            (csrf_field(signed))
            label { "Name " input name="name" id="key-name"; }
            fieldset {
                legend { "Models (none checked: all)" }
                @for m in state.catalogue.current().models.keys() {
                    label.inline { input type="checkbox" name="models" value=(m); " " (m) }
                }
            }
            label { "RPM " input name="rpm" inputmode="numeric"; }
            label { "TPM " input name="tpm" inputmode="numeric"; }
            label { "Monthly budget (USD) " input name="budget_usd" inputmode="decimal"; }
            label { "Expires (date) " input name="expires_at" type="date"; }
            (tier_inputs(None, true, "May use priority (when the customer may)"))
            button type="submit" id="create-key" { "Create key" }
        }
    }
}

pub(crate) async fn create_key(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(customer_id): Path<String>,
    Form(fields): Form<Fields>,
) -> Result<Response, PageError> {
    let models = fields.all("models");
    if let Some(unknown) = models
        .iter()
        .find(|m| !state.catalogue.current().models.contains_key(*m))
    {
        return Err(bad(format!("unknown model `{unknown}`")));
    }
    let expires_at = match fields.get("expires_at") {
        Some(t) => {
            let at = parse_time(t).map_err(bad)?;
            if at <= now_micros() {
                return Err(bad(format!("the expiry {t} is in the past")));
            }
            Some(at)
        }
        None => None,
    };
    let new = NewKey {
        name: fields.get("name").unwrap_or_default().to_string(),
        models: (!models.is_empty()).then_some(models),
        rpm: limit(&fields, "rpm")?,
        tpm: limit(&fields, "tpm")?,
        expires_at,
        tags: Default::default(),
        budget_nano_usd: budget(&fields)?,
        max_concurrent_requests: None,
        default_service_tier: default_tier(&fields)?,
        allow_priority: Some(fields.get("allow_priority").is_some()),
    };
    let (key, secret) = store(&state)?
        .issue_key(&customer_id, new, &signed.actor)
        .await?;
    let page = customer_page(&state, &signed, &customer_id, Some((key.id, secret))).await?;
    Ok((StatusCode::CREATED, page).into_response())
}

pub(crate) async fn revoke_key(
    State(state): State<AppState>,
    Extension(signed): Extension<Signed>,
    Path(key_id): Path<String>,
) -> Result<Response, PageError> {
    let key = store(&state)?.revoke_key(&key_id, &signed.actor).await?;
    state.auth.forget_key(&key_id);
    Ok(Redirect::to(&format!("/console/customers/{}", key.customer_id)).into_response())
}
