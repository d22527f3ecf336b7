//! The operators' console at `/console`: server-rendered HTML (maud) with its stylesheet and
//! script embedded in the binary, mounted beside the admin API and only when
//! `TOLLGATE_ADMIN_TOKEN` is set.
//!
//! This module owns signing in and out and the guard in front of every screen: a session
//! cookie (`HttpOnly`, `SameSite=Strict`, `Secure` behind a proxy that says it serves HTTPS,
//! expiring), sessions kept in this process (logging out ends one at once; the sessions
//! themselves are [`crate::sessions`], which the state holds), and a CSRF token per session
//! checked on every form that changes state. The screens are in `pages.rs` (overview),
//! `customers.rs` (with `adapters.rs`, a customer's LoRA adapters) and `reports.rs`, the charts
//! in `chart.rs`. It changes customers, keys and adapters only through the store's audited
//! methods (adapters through the admin API's rules), as a console actor.

mod adapters;
mod chart;
mod customers;
mod pages;
mod reports;
mod reservations;
mod work;

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::api::admin_tokens::{self, Scope};
use crate::error::ApiError;
use crate::sessions::{Session, SESSION_TTL};
use crate::{AppState, RequestId};
use tollgate_metering::audit::Actor;

/// The session cookie's name.
const COOKIE: &str = "tollgate_console";
/// Largest form body the console reads.
const MAX_FORM_BYTES: usize = 64 * 1024;

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// The console's routes (the caller mounts them only when an admin token is set).
pub fn router(state: AppState) -> Router<AppState> {
    let guarded = Router::new()
        .route("/console", get(pages::overview))
        .route(
            "/console/customers",
            get(customers::customers).post(customers::create_customer),
        )
        .route(
            "/console/customers/{id}",
            get(customers::customer).post(customers::update_customer),
        )
        .route("/console/customers/{id}/keys", post(customers::create_key))
        .route("/console/keys/{key_id}/revoke", post(customers::revoke_key))
        .route(
            "/console/customers/{id}/adapters",
            post(adapters::create_adapter),
        )
        .route(
            "/console/customers/{id}/adapters/{name}/remove",
            post(adapters::remove_adapter),
        )
        .route(
            "/console/customers/{id}/reservations",
            post(reservations::create_reservation),
        )
        .route(
            "/console/reservations/{id}/end",
            post(reservations::end_reservation),
        )
        .route("/console/sla", get(reservations::sla))
        .route("/console/requests", get(reports::requests))
        .route("/console/models", get(reports::models))
        .route("/console/invoices", get(reports::invoices))
        .route("/console/usage.csv", get(reports::usage_csv))
        .route("/console/audit", get(reports::audit))
        .route("/console/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(state, require_session));
    Router::new()
        .route("/console/login", get(login_page).post(login))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .merge(guarded)
}

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// The value of our cookie in the request.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then_some(value)
        })
}

/// Served over HTTPS: a proxy in front says so (`X-Forwarded-Proto: https`).
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn set_cookie(value: &str, max_age: Duration, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text = format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A cross-site request: an `Origin` (or, without it, a `Referer`) whose host is not ours.
/// Defence in depth beside `SameSite=Strict` and the CSRF token.
fn cross_site(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    match source {
        // Browsers send `Origin: null` from sandboxed or privacy-sensitive contexts.
        Some(source) => {
            let rest = source.split_once("://").map_or(source, |(_, r)| r);
            rest.split('/').next() != Some(host)
        }
        None => false,
    }
}

/// Who is signed in on this request: its session, address and request id.
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    pub session: Session,
    pub actor: Actor,
}

/// Lets signed-in requests through with their [`Signed`]; sends others to the login page (a
/// form that changes state is refused outright). Every `POST` must carry the session's CSRF
/// token in its `csrf` field and come from our own origin.
async fn require_session(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let session = cookie(request.headers()).and_then(|c| state.console.get(c));
    let session = match session {
        Some(s) => match admin_tokens::still_valid(&state, &s.token_id).await {
            Ok(true) => Some(s),
            Ok(false) => {
                if let Some(c) = cookie(request.headers()) {
                    state.console.end(c);
                }
                None
            }
            Err(e) => return PageError(e).into_response(),
        },
        None => None,
    };
    let Some(session) = session else {
        if request.method() == Method::GET {
            return Redirect::to("/console/login").into_response();
        }
        return error_page(
            StatusCode::FORBIDDEN,
            "Not signed in, or the session expired.",
        );
    };
    let actor = Actor::console(
        &session.public_id,
        crate::api::admin::remote_addr(&request),
        request.extensions().get::<RequestId>().map(|r| r.0.clone()),
    );
    let mut request = request;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        if cross_site(request.headers()) {
            return error_page(StatusCode::FORBIDDEN, "Cross-site form submission refused.");
        }
        let (parts, body) = request.into_parts();
        let Ok(bytes) = to_bytes(body, MAX_FORM_BYTES).await else {
            return error_page(StatusCode::PAYLOAD_TOO_LARGE, "The form is too large.");
        };
        let sent = form_field(&bytes, "csrf").unwrap_or_default();
        if !bool::from(sent.as_bytes().ct_eq(session.csrf.as_bytes())) {
            return error_page(
                StatusCode::FORBIDDEN,
                "The form's CSRF token is missing or wrong; reload the page and try again.",
            );
        }
        request = Request::from_parts(parts, Body::from(bytes));
    }
    request.extensions_mut().insert(Signed { session, actor });
    let mut response = next.run(request).await;
    // Screens show customers, spend and, once, key secrets: never cached.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// One field of a URL-encoded form.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find_map(|(k, v)| (k == name).then_some(v))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login_page() -> Markup {
    login_markup(None)
}

fn login_markup(problem: Option<&str>) -> Markup {
    page_shell(
        "Sign in",
        html! {
            main.login {
                h1 { "Tollgate console" }
                @if let Some(p) = problem { p.error { (p) } }
                form method="post" action="/console/login" {
                    label for="token" { "Admin token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// Checks the admin token (the bootstrap one, or an issued token whose scopes allow the
/// console: `admin`), then starts a session.
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if cross_site(&headers) {
        return error_page(StatusCode::FORBIDDEN, "Cross-site sign-in refused.");
    }
    if state.admin_token.is_none() {
        return error_page(StatusCode::FORBIDDEN, "The console is disabled.");
    }
    let Ok(Form(form)) = serde_urlencoded::from_bytes::<LoginForm>(&body).map(Form) else {
        return (
            StatusCode::BAD_REQUEST,
            login_markup(Some("Enter the admin token.")),
        )
            .into_response();
    };
    let identity = match admin_tokens::identify(&state, form.token.trim()).await {
        Ok(identity) => identity,
        Err(ApiError::InvalidAdminToken(_)) => {
            tracing::warn!("console: sign-in with a wrong admin token");
            return (
                StatusCode::UNAUTHORIZED,
                login_markup(Some("Wrong admin token.")),
            )
                .into_response();
        }
        Err(e) => return PageError(e).into_response(),
    };
    if !identity.allows(CONSOLE_SCOPE) {
        tracing::warn!(token = %identity.token_id, "console: sign-in with a token outside its scopes");
        let problem = format!(
            "Admin token {} has scopes {}; the console needs `{}` (it changes customers and keys \
             and shows the audit log). Use the admin API with this token instead.",
            identity.token_id,
            scope_names(&identity.scopes),
            CONSOLE_SCOPE.as_str()
        );
        return (StatusCode::FORBIDDEN, login_markup(Some(&problem))).into_response();
    }
    let (cookie, session) = state.console.create(identity);
    tracing::info!(session = %session.public_id, token = %session.token_id, "console: signed in");
    let mut response = Redirect::to("/console").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&cookie, SESSION_TTL, over_https(&headers)),
    );
    response
}

/// What the console needs of an admin token: it changes customers and keys and shows the
/// audit log, so only `admin` covers it.
const CONSOLE_SCOPE: Scope = Scope::Admin;

fn scope_names(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn logout(State(state): State<AppState>, request: Request) -> Response {
    if let Some(c) = cookie(request.headers()) {
        state.console.end(c);
    }
    if let Some(s) = request.extensions().get::<Signed>() {
        tracing::info!(session = %s.session.public_id, "console: signed out");
    }
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie("", Duration::ZERO, over_https(request.headers())),
    );
    response
}

/// A console screen's error: the status and a message (5xx stay generic, as in the API).
pub(crate) struct PageError(ApiError);

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let message = if status.is_server_error() {
            tracing::error!("console: {}", self.0);
            "Something went wrong; the details are in the gateway's log.".to_string()
        } else {
            self.0.to_string()
        };
        error_page(status, &message)
    }
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let body = page_shell(
        "Error",
        html! {
            main.login {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error { (message) }
                p { a href="/console" { "Back to the console" } }
            }
        },
    );
    (status, body).into_response()
}

/// The document around every page.
fn page_shell(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tollgate" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body { (body) }
        }
    }
}

/// A signed-in screen: navigation, the sign-out form, then `content`.
pub(crate) fn layout(signed: &Signed, title: &str, content: Markup) -> Markup {
    const NAV: [(&str, &str); 8] = [
        ("/console", "Overview"),
        ("/console/customers", "Customers"),
        ("/console/requests", "Requests"),
        ("/console/models", "Models"),
        ("/console/invoices", "Invoices & exports"),
        ("/console/sla", "Service levels"),
        ("/console/audit", "Audit log"),
        ("/metrics", "Metrics"),
    ];
    page_shell(
        title,
        html! {
            header {
                span.brand { "Tollgate" }
                nav {
                    @for (href, label) in NAV {
                        a href=(href) class=@if label == title { "current" } { (label) }
                    }
                }
                span.identity title="The admin token this session signed in with, and its scopes" {
                    "Signed in with " (signed.session.token_id) " (" (scope_names(&signed.session.scopes)) ")"
                }
                form.logout method="post" action="/console/logout" {
                    (csrf_field(signed))
                    button type="submit" id="logout" { "Sign out" }
                }
            }
            main {
                h1 { (title) }
                (content)
            }
        },
    )
}

/// The hidden CSRF field every state-changing form carries.
pub(crate) fn csrf_field(signed: &Signed) -> Markup {
    html! { input type="hidden" name="csrf" value=(signed.session.csrf); }
}

/// Marks text that is already safe HTML (an SVG built by [`chart`]).
pub(crate) fn raw(text: String) -> PreEscaped<String> {
    PreEscaped(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_flags() {
        let plain = set_cookie("abc", SESSION_TTL, false);
        let plain = plain.to_str().unwrap();
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(plain.contains("Max-Age=28800") && !plain.contains("Secure"));
        let behind_tls = set_cookie("abc", SESSION_TTL, true);
        assert!(behind_tls.to_str().unwrap().ends_with("; Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(over_https(&h));
    }

    #[test]
    fn cross_site_forms_are_told_apart() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(!cross_site(&h), "no Origin: the token decides");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(!cross_site(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(cross_site(&h));
    }

    #[test]
    fn cookies_and_form_fields_are_read() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tollgate_console=xyz; b=2"),
        );
        assert_eq!(cookie(&h), Some("xyz"));
        assert_eq!(
            form_field(b"name=a+b&csrf=t%3D1", "csrf").as_deref(),
            Some("t=1")
        );
    }
}
