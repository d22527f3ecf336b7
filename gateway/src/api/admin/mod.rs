//! The operators' API: customers, keys, customers' LoRA adapters, reservations, usage aggregates, the record cursor,
//! invoices and the SLA report, behind `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`. Mounted only when the token
//! is set. JSON in and out, OpenAI's error shape, money as decimal strings.
//!
//! Its contract is written once: [`operations`] routes each operation with the scope it needs,
//! the handler's `#[utoipa::path]` documents it, and its bodies are the types the handlers read
//! (each file's request types, read after `reject_unknown` so an unknown field is named) and
//! write (customers and keys through `tollgate_metering::views`, alerts, admin tokens and audit
//! entries through metering's views, which the CLI and the audit log use too; the usage report,
//! the records page and the invoice through `tollgate_metering::billing::views`).

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde_json::{Map, Value};
use utoipa::OpenApi;

use crate::api::admin_tokens::{self, Scope};
use crate::api::audit;
use crate::error::ApiError;
use crate::{AppState, RequestId};
use tollgate_metering::audit::Actor;
use tollgate_metering::store::Store;

/// Records per page of `/admin/v1/usage/records` unless `limit` says otherwise.
const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 10_000;

mod adapters;
mod customers;
mod keys;
pub mod models;
mod reservations;
mod tiers;
mod usage;

use adapters::{create_adapter, list_adapters, remove_adapter, update_adapter};
pub(crate) use adapters::{register, unregister, CreateAdapter};
use customers::{
    create_customer, get_alert_settings, get_customer, list_alerts, list_customers,
    put_alert_settings, update_customer,
};
use keys::{create_key, get_key, list_keys, revoke_key, update_key};
pub(crate) use reservations::reserve;
use reservations::{create_reservation, end_reservation, get_reservation, list_reservations, sla};
use usage::{invoice, usage, usage_records};

/// The admin API, one line per operation: its method, path, handler and the scope it needs.
/// The handlers' `#[utoipa::path]` document them ([`AdminApi`]); the tests hold the two
/// together, both ways.
fn operations() -> Operations {
    use Scope::{Admin, CustomersRead, CustomersWrite, KeysWrite, UsageRead};
    use Verb::{Delete, Get, Patch, Post, Put};
    let customer = "/admin/v1/customers/{id}";
    let key = "/admin/v1/keys/{key_id}";
    let reservations = "/admin/v1/customers/{id}/reservations";
    let reservation = "/admin/v1/reservations/{reservation_id}";
    let adapters = "/admin/v1/customers/{id}/adapters";
    let adapter = "/admin/v1/customers/{id}/adapters/{name}";
    Operations::default()
        .op(Get, "/admin/v1/customers", list_customers, CustomersRead)
        .op(Post, "/admin/v1/customers", create_customer, CustomersWrite)
        .op(Get, customer, get_customer, CustomersRead)
        .op(Patch, customer, update_customer, CustomersWrite)
        .op(Get, "/admin/v1/customers/{id}/keys", list_keys, KeysWrite)
        .op(Post, "/admin/v1/customers/{id}/keys", create_key, KeysWrite)
        .op(Get, key, get_key, KeysWrite)
        .op(Delete, key, revoke_key, KeysWrite)
        .op(Patch, key, update_key, KeysWrite)
        .op(
            Get,
            "/admin/v1/customers/{id}/alerts",
            get_alert_settings,
            Admin,
        )
        .op(
            Put,
            "/admin/v1/customers/{id}/alerts",
            put_alert_settings,
            Admin,
        )
        .op(Get, "/admin/v1/alerts", list_alerts, Admin)
        .op(Get, reservations, list_reservations, CustomersRead)
        .op(Post, reservations, create_reservation, CustomersWrite)
        .op(Get, reservation, get_reservation, CustomersRead)
        .op(Delete, reservation, end_reservation, CustomersWrite)
        .op(Get, adapters, list_adapters, CustomersRead)
        .op(Post, adapters, create_adapter, CustomersWrite)
        .op(Patch, adapter, update_adapter, CustomersWrite)
        .op(Delete, adapter, remove_adapter, CustomersWrite)
        .op(Get, "/admin/v1/sla", sla, UsageRead)
        .op(Get, "/admin/v1/usage", usage, UsageRead)
        .op(Get, "/admin/v1/usage/records", usage_records, UsageRead)
        .op(Get, "/admin/v1/invoices/{customer_id}", invoice, UsageRead)
        .op(Get, "/admin/v1/audit", audit::list, Admin)
        .op(Get, "/admin/v1/models", models::list_models, Admin)
        .op(
            Post,
            "/admin/v1/models/reload",
            models::reload_models,
            Admin,
        )
        .op(
            Get,
            "/admin/v1/admin_tokens",
            admin_tokens::list_handler,
            Admin,
        )
        .op(Post, "/admin/v1/admin_tokens", admin_tokens::create, Admin)
        .op(
            Delete,
            "/admin/v1/admin_tokens/{id}",
            admin_tokens::revoke_handler,
            Admin,
        )
}

/// The OpenAPI operations of [`operations`], from the handlers' own `#[utoipa::path]`.
#[derive(OpenApi)]
#[openapi(paths(
    customers::list_customers,
    customers::create_customer,
    customers::get_customer,
    customers::update_customer,
    keys::list_keys,
    keys::create_key,
    keys::get_key,
    keys::revoke_key,
    keys::update_key,
    usage::usage,
    usage::usage_records,
    usage::invoice,
    admin_tokens::list_handler,
    admin_tokens::create,
    admin_tokens::revoke_handler,
    customers::get_alert_settings,
    customers::put_alert_settings,
    customers::list_alerts,
    audit::list,
    reservations::create_reservation,
    reservations::list_reservations,
    reservations::get_reservation,
    reservations::end_reservation,
    reservations::sla,
    adapters::create_adapter,
    adapters::list_adapters,
    adapters::remove_adapter,
    adapters::update_adapter,
    models::list_models,
    models::reload_models,
))]
pub(crate) struct AdminApi;

pub fn router(state: AppState) -> Router<AppState> {
    let Operations { router, scopes } = operations();
    router.route_layer(middleware::from_fn_with_state(
        (state, Arc::new(scopes)),
        require_admin,
    ))
}

/// The methods the admin API routes.
#[derive(Debug, Clone, Copy)]
enum Verb {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Verb {
    fn method(self) -> Method {
        match self {
            Self::Get => Method::GET,
            Self::Post => Method::POST,
            Self::Put => Method::PUT,
            Self::Patch => Method::PATCH,
            Self::Delete => Method::DELETE,
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Self::Get => MethodFilter::GET,
            Self::Post => MethodFilter::POST,
            Self::Put => MethodFilter::PUT,
            Self::Patch => MethodFilter::PATCH,
            Self::Delete => MethodFilter::DELETE,
        }
    }
}

/// The admin router as it is built, with the scope each of its operations needs.
#[derive(Default)]
struct Operations {
    router: Router<AppState>,
    scopes: Scopes,
}

impl Operations {
    fn op<H, T>(self, verb: Verb, path: &'static str, handler: H, scope: Scope) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let Self { router, mut scopes } = self;
        scopes.0.push((verb.method(), path, scope));
        Self {
            router: router.route(path, on(verb.filter(), handler)),
            scopes,
        }
    }
}

/// The scope each admin operation needs, by method and route template.
#[derive(Debug, Default)]
pub(crate) struct Scopes(Vec<(Method, &'static str, Scope)>);

impl Scopes {
    /// The scope `method` on `route` needs. A method the route does not serve (a 405, or `HEAD`)
    /// needs what the route's writes need, and a route without writes, or not listed, `admin`:
    /// so a new route is closed to narrower tokens until someone decides otherwise.
    pub(crate) fn needed(&self, method: &Method, route: &str) -> Scope {
        let on_route = || self.0.iter().filter(|(_, r, _)| *r == route);
        match on_route().find(|(m, _, _)| m == method) {
            Some((_, _, scope)) => *scope,
            None => on_route()
                .filter(|(m, _, _)| *m != Method::GET)
                .map(|(_, _, scope)| *scope)
                .max()
                .unwrap_or(Scope::Admin),
        }
    }
}

/// Admits the bootstrap token or an issued admin token whose scopes cover the route
/// (`admin_tokens::authorize`), and puts the caller's `AdminIdentity` in the extensions.
async fn require_admin(
    State((state, scopes)): State<(AppState, Arc<Scopes>)>,
    mut request: Request,
    next: Next,
) -> Response {
    let asked = admin_tokens::AdminRequest::of(&request);
    let needed = scopes.needed(asked.method(), asked.route());
    match admin_tokens::authorize(&state, asked, needed).await {
        Ok(identity) => {
            let actor = Actor::admin_api(
                &identity.token_id,
                remote_addr(&request),
                request.extensions().get::<RequestId>().map(|r| r.0.clone()),
            );
            request.extensions_mut().insert(actor);
            request.extensions_mut().insert(identity);
            if let Err(e) = known_params(&request) {
                return e.into_response();
            }
            next.run(request).await
        }
        Err(refusal) => refusal,
    }
}

/// The query parameters each admin route takes (by route template); a route not named takes
/// none, so every admin route refuses a parameter it would ignore.
fn route_params(route: &str) -> &'static [&'static str] {
    match route {
        "/admin/v1/usage" => &[
            "start",
            "end",
            "customer_id",
            "model",
            "tag",
            "group_by",
            "format",
        ],
        "/admin/v1/usage/records" => &[
            "after",
            "limit",
            "customer_id",
            "key_id",
            "model",
            "status",
            "start",
            "end",
        ],
        "/admin/v1/invoices/{customer_id}" => &["period", "tag", "group_by", "format"],
        "/admin/v1/audit" => &["after", "limit"],
        "/admin/v1/alerts" => &["customer_id", "limit"],
        "/admin/v1/sla" => &["month", "customer_id", "model"],
        _ => &[],
    }
}

/// A 400 naming the first query parameter the route does not take.
fn known_params(request: &Request) -> Result<(), ApiError> {
    let Some(raw) = request.uri().query() else {
        return Ok(());
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("", |p| p.as_str());
    let allowed = route_params(route);
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw)
        .map_err(|e| ApiError::invalid(format!("invalid query: {e}"), None))?;
    match pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some((k, _)) => Err(ApiError::InvalidRequest {
            message: if allowed.is_empty() {
                format!("unknown query parameter `{}`; {route} takes none", shown(k))
            } else {
                format!(
                    "unknown query parameter `{}`; {route} takes {}",
                    shown(k),
                    allowed.join(", ")
                )
            },
            param: Some(shown(k)),
        }),
    }
}

/// The peer's address (as the listener accepted it), for the audit log.
pub(crate) fn remote_addr(request: &Request) -> Option<String> {
    request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string())
}

fn store(state: &AppState) -> Result<&Store, ApiError> {
    state
        .store
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("this gateway runs without a database".into()))
}

/// A JSON object body (whatever the `Content-Type`, so `curl -d` works); anything else is a
/// 400 naming the problem.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(ApiError::invalid(format!("invalid JSON body: {e}"), None)),
    }
}

fn reject_unknown(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::InvalidRequest {
            message: format!(
                "unknown field `{k}`; expected one of {}",
                allowed.join(", ")
            ),
            param: Some(k.clone()),
        }),
        None => Ok(()),
    }
}

fn invalid_field(field: &str, message: String) -> ApiError {
    ApiError::InvalidRequest {
        message,
        param: Some(field.to_string()),
    }
}

use crate::error::query;
use tollgate_metering::store::valid_id;

/// Defines an admin body with its own fields followed by the limit and service-tier fields that
/// customers and keys share (`null` clears a limit or the tier): one definition for the four
/// bodies that take them. The docs of the shared fields differ between customers and keys.
macro_rules! limits_body {
    (
        $(#[$attr:meta])*
        pub struct $name:ident { $($own:tt)* }
        concurrency = $concurrency_doc:literal,
        tier = $tier_doc:literal,
        priority = $priority_doc:literal $(,)?
    ) => {
        $(#[$attr])*
        #[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($own)*
            #[serde(default, deserialize_with = "patch")]
            #[schema(value_type = Option<i64>, minimum = 1)]
            pub rpm: Option<Option<i64>>,
            #[serde(default, deserialize_with = "patch")]
            #[schema(value_type = Option<i64>, minimum = 1)]
            pub tpm: Option<Option<i64>>,
            #[doc = $concurrency_doc]
            #[serde(default, deserialize_with = "patch")]
            #[schema(value_type = Option<i64>, minimum = 1)]
            pub max_concurrent_requests: Option<Option<i64>>,
            #[doc = $tier_doc]
            #[serde(default, deserialize_with = "patch")]
            #[schema(value_type = Option<DefaultServiceTier>)]
            pub default_service_tier: Option<Option<DefaultServiceTier>>,
            #[doc = $priority_doc]
            #[serde(default, deserialize_with = "patch")]
            #[schema(value_type = Option<bool>)]
            pub allow_priority: Option<Option<bool>>,
        }
    };
}
use limits_body;

/// A field that `null` clears: absent → `None`, `null` → `Some(None)`, a value → `Some(Some(v))`.
fn patch<'de, T, D>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    T: serde::Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer).map(Some)
}

/// A limit that `null` clears: a positive integer.
fn limit(value: Option<Option<i64>>, field: &str) -> Result<Option<Option<i64>>, ApiError> {
    match value {
        Some(Some(n)) if n <= 0 => Err(invalid_field(
            field,
            format!("`{field}` must be a positive integer or null, got {n}"),
        )),
        v => Ok(v),
    }
}

/// An amount of USD: a decimal string (`"25.50"`) or a number (`25.5`).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum UsdAmount {
    Text(String),
    Number(#[schema(inline)] JsonNumber),
}

/// A JSON number kept as written (`25.5` stays `25.5` on its way to a decimal).
#[derive(Debug, serde::Deserialize)]
pub struct JsonNumber(serde_json::Number);

impl utoipa::PartialSchema for JsonNumber {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <f64 as utoipa::PartialSchema>::schema()
    }
}

impl utoipa::ToSchema for JsonNumber {}

impl UsdAmount {
    /// As written (a number as JSON writes it).
    fn text(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Number(n) => n.0.to_string(),
        }
    }

    /// In nano-USD; an error names `field`.
    fn nano_usd(&self, field: &str) -> Result<i64, ApiError> {
        tollgate_metering::money::parse_usd(&self.text())
            .map_err(|e| invalid_field(field, format!("{field}: {e}")))
    }
}

/// A value quoted back in an error, cut to a readable length (a 3 MB id is not echoed).
fn shown(value: &str) -> String {
    const MAX: usize = 80;
    match value.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::admin_tokens::{AdminIdentity, BOOTSTRAP_ID};

    fn required(method: &Method, route: &str) -> Scope {
        operations().scopes.needed(method, route)
    }

    #[test]
    fn each_route_needs_its_scope_and_admin_covers_all() {
        let usage = AdminIdentity {
            token_id: "t".into(),
            scopes: vec![Scope::UsageRead],
        };
        for route in [
            "/admin/v1/usage",
            "/admin/v1/usage/records",
            "/admin/v1/invoices/{customer_id}",
            "/admin/v1/sla",
        ] {
            assert!(usage.allows(required(&Method::GET, route)), "{route}");
        }
        for (method, route) in [
            (Method::GET, "/admin/v1/customers"),
            (Method::POST, "/admin/v1/customers"),
            (Method::PATCH, "/admin/v1/customers/{id}"),
            (Method::POST, "/admin/v1/customers/{id}/keys"),
            (Method::DELETE, "/admin/v1/keys/{key_id}"),
            (Method::POST, "/admin/v1/customers/{id}/reservations"),
            (Method::DELETE, "/admin/v1/reservations/{reservation_id}"),
            (Method::POST, "/admin/v1/admin_tokens"),
            (Method::GET, "/admin/v1/audit"),
            (Method::GET, "/admin/v1/some-future-route"),
        ] {
            assert!(!usage.allows(required(&method, route)), "{method} {route}");
        }
        let keys = AdminIdentity {
            token_id: "k".into(),
            scopes: vec![Scope::KeysWrite],
        };
        assert!(keys.allows(required(&Method::DELETE, "/admin/v1/keys/{key_id}")));
        assert!(!keys.allows(required(&Method::POST, "/admin/v1/customers")));
        let admin = AdminIdentity {
            token_id: BOOTSTRAP_ID.into(),
            scopes: vec![Scope::Admin],
        };
        assert!(Scope::ALL.into_iter().all(|s| admin.allows(s)));
    }

    /// A method a route does not serve needs what its writes need (or `admin`), as before the
    /// scopes moved beside the routes.
    #[test]
    fn an_unserved_method_needs_the_routes_write_scope() {
        for (method, route, scope) in [
            (Method::HEAD, "/admin/v1/customers", Scope::CustomersWrite),
            (
                Method::DELETE,
                "/admin/v1/customers/{id}",
                Scope::CustomersWrite,
            ),
            (
                Method::PUT,
                "/admin/v1/customers/{id}/keys",
                Scope::KeysWrite,
            ),
            (Method::POST, "/admin/v1/usage", Scope::Admin),
            (
                Method::HEAD,
                "/admin/v1/invoices/{customer_id}",
                Scope::Admin,
            ),
        ] {
            assert_eq!(required(&method, route), scope, "{method} {route}");
        }
    }

    /// Every admin operation is in the OpenAPI document, and every documented admin
    /// operation is routed with a scope.
    #[test]
    fn every_operation_is_documented_and_every_documented_one_routed() {
        let routed: std::collections::BTreeSet<(String, String)> = operations()
            .scopes
            .0
            .iter()
            .map(|(m, path, _)| (m.as_str().to_lowercase(), path.to_string()))
            .collect();
        let doc = serde_json::to_value(AdminApi::openapi()).unwrap();
        let documented: std::collections::BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .map(|m| (m.clone(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(routed, documented);
        assert_eq!(routed.len(), 30);
    }
}
